"""Where the torch side runs and in which float type: `--device`, `--model-dtype`, and the out-of-memory guard.

    dev = resolve_device(None)                          # cuda when torch sees a GPU, else cpu
    dt = resolve_dtype("auto", dev, checkpoint_dtype(path))   # the checkpoint's type on cuda, float32 on cpu
    with fits("decoder layer 12", dev, hint=STREAM_HINT):     # an out-of-memory error becomes DoesNotFit (exit 2)
        layer.to(dev)

The model's weights and activations live in the model's type on its device; every statistic the recipe computes
from them (per-channel max|x|, the row sample, smoothing factors, α-search errors, static scales) is float32 (and
kept on the CPU where it is small), so a bfloat16 GPU run and a float32 CPU run agree to float32 reduction
tolerance where the statistic is exact (a max of the same values) and to the model type's rounding elsewhere.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from sq_export.errors import BackendMissing, BadInput, DoesNotFit

DEVICES = ("cuda", "cpu")
MODEL_DTYPES = ("auto", "float32", "float16", "bfloat16")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

STREAM_HINT = "stream the model layer by layer (sq_export.stream)"


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """`device`: "cuda" (also "cuda:N"), "cpu", or None/"auto" (cuda when torch sees a GPU, else cpu)."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        d = torch.device(str(device))
    except RuntimeError:
        raise BadInput(f"--device {device} unknown: cuda, cuda:N or cpu") from None
    if d.type not in DEVICES:
        raise BadInput(f"--device {device} unknown: cuda, cuda:N or cpu")
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise BackendMissing(f"--device {device}: torch sees no CUDA GPU (torch {torch.__version__}); use --device cpu")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise BadInput(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return d


def checkpoint_dtype(path: str | Path) -> torch.dtype | None:
    """The float type a Hugging Face folder's config.json records (`dtype`, or the older `torch_dtype`); None for a
    .gguf file (dequantized: no float type of its own) or when not recorded."""
    p = Path(path)
    cfg = p / "config.json" if p.is_dir() else None
    if cfg is None or not cfg.is_file():
        return None
    try:
        d = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return None
    name = d.get("dtype") or d.get("torch_dtype")
    return _DTYPES.get(str(name)) if name else None


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device, checkpoint: torch.dtype | None = None) -> torch.dtype:
    """`dtype`: "auto" (None too: the checkpoint's float type on cuda, float32 on cpu, float32 when the checkpoint
    records none) or float32 / float16 / bfloat16 (a torch.dtype too)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise BadInput(f"--model-dtype {dtype} unsupported: float32, float16 or bfloat16")
        return dtype
    if dtype is None or dtype == "auto":
        if torch.device(device).type == "cuda" and checkpoint in (torch.float16, torch.bfloat16):
            return checkpoint
        return torch.float32
    t = _DTYPES.get(str(dtype))
    if t is None:
        raise BadInput(f"--model-dtype {dtype} unknown: {', '.join(MODEL_DTYPES)}")
    return t


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ----- where a model's inputs go ----------------------------------------------------------------------------------
def execution_device(module) -> torch.device:
    """Where `module` computes: accelerate's execution device when it is dispatched (its weights may sit on the CPU
    or on "meta" between calls), else the device of its first parameter or buffer (cpu when it has none)."""
    hook = getattr(module, "_hf_hook", None)
    dev = getattr(hook, "execution_device", None)
    if dev is not None:
        return torch.device(dev) if not isinstance(dev, int) else torch.device("cuda", dev)
    for t in (*module.parameters(), *module.buffers()):
        if t.device.type != "meta":
            return t.device
    return torch.device("cpu")


def model_device(model) -> torch.device:
    """The device token ids must be on for `model(input_ids=...)`: its input embedding's execution device."""
    emb = None
    try:
        emb = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        pass
    return execution_device(emb if emb is not None else model)


def model_dtype(model) -> torch.dtype:
    """The float type of the model's weights (the first floating-point parameter's)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def to_device(x, model):
    """Token ids (numpy or torch) as a tensor on the model's input device."""
    import numpy as np

    t = torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x
    dev = model_device(model)
    return t if t.device == dev else t.to(dev)


# ----- out of memory ----------------------------------------------------------------------------------------------
def is_oom(e: BaseException) -> bool:
    """A CUDA out-of-memory error, or the CPU allocator's failure (a RuntimeError naming it)."""
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(e, oom):
        return True
    if isinstance(e, (RuntimeError, MemoryError)):
        s = str(e)
        return isinstance(e, MemoryError) or "out of memory" in s.lower() or "can't allocate memory" in s \
            or "DefaultCPUAllocator" in s
    return False


@contextlib.contextmanager
def fits(what: str, device: torch.device | str | None = None, hint: str | None = None):
    """Turn an out-of-memory error raised inside the block into DoesNotFit: one line naming what did not fit where,
    and what to change. The CUDA cache is emptied first, so a caller that catches it can go on."""
    try:
        yield
    except DoesNotFit:
        raise
    except Exception as e:  # noqa: BLE001 (only out-of-memory errors are turned; the rest re-raised as they are)
        if not is_oom(e):
            raise
        raise does_not_fit(e, what, device, hint) from None


def does_not_fit(e: BaseException, what: str, device=None, hint: str | None = None) -> DoesNotFit:
    dev = torch.device(device) if device is not None else None
    cuda_oom = getattr(torch.cuda, "OutOfMemoryError", ())
    gpu = isinstance(e, cuda_oom) if cuda_oom else False
    gpu = gpu or (dev is not None and dev.type == "cuda")
    if gpu:
        with contextlib.suppress(Exception):
            torch.cuda.empty_cache()
    where = f"on {dev}" if dev is not None and (gpu == (dev.type == "cuda")) else ("on the GPU" if gpu else "in host memory")
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
    if gpu:
        todo = ("use --device cpu, or give accelerate a max_memory that offloads layers to the CPU (device_map='auto'), "
                "or lower --calib-batch, or " + (hint or STREAM_HINT))
    else:
        todo = "free host memory, lower --samples or --calib-batch, or " + (hint or STREAM_HINT)
    return DoesNotFit(f"{what} does not fit {where} ({first}): {todo}")
