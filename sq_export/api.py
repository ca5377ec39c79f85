"""The Python API: what `sq-export`'s commands call, for export scripts that already hold a model.

    import sq_export as sq

    model, tok = sq.load_model("smollm2")                       # or any HF causal LM + tokenizer already loaded
    calib = sq.calibrate(model, tok, samples=64, seq_len=512)   # real text: the shipped split, a file, str or list[str]
    qm = sq.quantize(model, calib, sq.Recipe())                  # the accurate recipe; sq.Recipe.paper(), .naive()
    sq.export_onnx(qm, "model.onnx", weights="qdq")             # TensorRT 8.6 form; weights="int8" for 10+
    sq.check("model.onnx").raise_for_violations()
    from sq_export.engine import build_engine                    # torch-free
    build_engine("model.onnx", "model.engine", precision="int8")

Every function raises the typed errors of sq_export.errors (BadInput, NotFoldable, SmoothingChangedOutputs, ...),
which the CLI turns into one line and an exit code. Nothing here writes a file unless given a path.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from sq_export.errors import BackendMissing, BadInput
from sq_export.quant.recipe import CalibOptions, Recipe, make_recipe

if TYPE_CHECKING:  # torch is imported only by the functions that need it: `check` works where torch is absent
    from sq_export.quant.calibrate import Calibration

__all__ = [
    "load_model", "load_tokenizer", "calibrate", "quantize", "export_onnx", "check", "perplexity", "run_pipeline",
    "calibrate_streamed", "quantize_streamed", "load_quantized", "load_float",
    "QuantizedModel", "ExportResult", "Recipe", "CalibOptions", "make_recipe", "normalize_target", "text_ids",
    "token_outliers", "linear_sqnr",
]


# ----- loading --------------------------------------------------------------------------------------------------
def load_model(model: str | Path, *, tokenizer: str | Path | None = None, with_tokenizer: bool = True,
               device: str | None = None, dtype: str = "auto", device_map=None, max_memory: dict | None = None):
    """(model, tokenizer) from a Hugging Face folder, a .gguf file or an alias ('smollm2'): eval mode, eager
    attention. `tokenizer`: load the tokenizer from there instead (a checkpoint saved without one).

    `device`: "cuda" (also "cuda:N"), "cpu", or None (cuda when torch sees a GPU). `dtype`: "auto" (the
    checkpoint's float type on cuda, float32 on cpu), "float32", "float16" or "bfloat16"; the statistics, factors
    and scales the recipe computes are float32 whatever the model's type. `device_map` / `max_memory`: accelerate's
    big-model dispatch (e.g. device_map="auto", max_memory={0: "20GiB", "cpu": "200GiB"}) instead of one device;
    calibration and smoothing work on the dispatched model (offloaded weights included)."""
    from sq_export.modeling import env_threads, load_model as _load, load_tokenizer as _tok

    env_threads()
    m, tok, _ = _load(str(model), with_tokenizer=with_tokenizer and tokenizer is None, device=device, dtype=dtype,
                      device_map=device_map, max_memory=max_memory)
    if tokenizer is not None and with_tokenizer:
        tok = _tok(str(tokenizer))
    m._sq_source = str(model)  # recorded as source_model in exported graphs
    return m, tok


def model_type(model: str | Path) -> str:
    """The model_type of a Hugging Face folder's config.json (without loading the model)."""
    import json as _json

    from sq_export.modeling import resolve_model_path

    p = resolve_model_path(str(model))
    if not p.is_dir():
        raise BadInput(f"{model} is not a Hugging Face folder (config.json)")
    try:
        return str(_json.loads((p / "config.json").read_text())["model_type"])
    except (OSError, ValueError, KeyError) as e:
        raise BadInput(f"{p / 'config.json'} unreadable or without model_type ({type(e).__name__})") from e


def load_tokenizer(model: str | Path):
    from sq_export.modeling import load_tokenizer as _tok

    return _tok(str(model))


# ----- calibration ----------------------------------------------------------------------------------------------
def text_ids(tokenizer, texts, kind: str = "calib") -> np.ndarray:
    """Token ids of `texts`: None (the shipped split of `kind`), a path, a string, a list of strings (joined by
    blank lines), or token ids already (a 1-D integer array)."""
    from sq_export.textdata import token_ids, tokenize

    if isinstance(texts, np.ndarray):
        if texts.ndim != 1 or not np.issubdtype(texts.dtype, np.integer):
            raise BadInput(f"token ids must be a 1-D integer array, got {texts.dtype} {list(texts.shape)}")
        return texts
    if texts is None or isinstance(texts, Path):
        return _checked(token_ids(tokenizer, texts, kind), tokenizer, "the text")
    if tokenizer is None:
        raise BadInput("texts need a tokenizer to become token ids: pass the model's tokenizer")
    if isinstance(texts, str):
        if "\n" not in texts and len(texts) < 4096:
            if Path(texts).is_file():
                return _checked(token_ids(tokenizer, texts, kind), tokenizer, texts)
            if Path(texts).suffix.lower() in (".txt", ".md", ".text", ".json", ".jsonl") and " " not in texts:
                raise BadInput(f"text file {texts} not found: pass an existing UTF-8 text file (or the text itself)")
        return _checked(tokenize(tokenizer, texts), tokenizer, "the text")
    if isinstance(texts, Sequence) and all(isinstance(t, str) for t in texts):
        return _checked(tokenize(tokenizer, "\n\n".join(texts)), tokenizer, "the texts")
    raise BadInput(f"texts must be None, a path, a string, a list of strings or token ids, not {type(texts).__name__}")


def _checked(ids, tokenizer, what) -> np.ndarray:
    from sq_export.textdata import check_tokenized

    check_tokenized(ids, tokenizer, what)
    return ids


def calibrate(model, tokenizer=None, texts=None, *, samples: int = 512, seq_len: int = 512, batch_size: int = 4,
              rows: int | None = 512, act_scales: str | None = None, recipe: Recipe | None = None,
              prefix_outliers=None) -> Calibration:
    """Per-channel max|x| at every quantized Linear's input (and a bounded row sample per input when `rows`, which
    the default recipe's α search and fallback need) on `samples` windows of `seq_len` tokens of real text.
    `recipe`: take the calibration options, the row sample's need and the outlier prefix from it instead.
    `prefix_outliers` ("auto", N, "ids:...", "text:..."; sq_export.quant.prefix): choose an outlier prefix on the
    calibration windows and calibrate with every window running after its float KV cache (`calib.prefix`)."""
    from sq_export.quant.recipe import parse_prefix

    from sq_export.families import family_for
    from sq_export.quant.calibrate import calibrate_ids

    prefix = parse_prefix(prefix_outliers)
    if recipe is not None:
        o = recipe.calib
        rows = recipe.reservoir_rows if recipe.needs_rows() else None
        act_scales = act_scales or recipe.act_scales
        prefix = recipe.prefix_spec()
        texts = texts if texts is not None else (Path(o.calib_text) if o.calib_text else None)
    else:
        o = CalibOptions(None if texts is None or not isinstance(texts, (str, Path)) else str(texts), samples, seq_len, batch_size)
    fam = family_for(model)
    ids = text_ids(tokenizer, texts, "calib")
    return calibrate_ids(model, fam, ids, o, rows=rows, act_scales=act_scales, prefix=prefix, tokenizer=tokenizer,
                         stats=recipe is None or recipe.needs_statistics())


def calibrate_streamed(model: str | Path, tokenizer=None, texts=None, *, samples: int = 512, seq_len: int = 512,
                       batch_size: int = 4, rows: int | None = 512, recipe: Recipe | None = None, device: str | None = None,
                       dtype: str = "auto", cache_device: str | None = None) -> Calibration:
    """`calibrate` for a model folder (Hugging Face safetensors) too large to load: streamed one decoder layer at a
    time (sq_export.stream), never the whole model. The same Calibration as `calibrate` on the loaded model (bit for
    bit on the CPU in float32). `tokenizer`: default the folder's. `cache_device`: where the cached activations
    live (default: the device; "cpu" to keep them in host memory)."""
    from sq_export.stream.calibrate import calibrate_streamed as _stream

    if recipe is not None:
        o = recipe.calib
        rows = recipe.reservoir_rows if recipe.needs_rows() else None
        texts = texts if texts is not None else (Path(o.calib_text) if o.calib_text else None)
    else:
        o = CalibOptions(None if texts is None or not isinstance(texts, (str, Path)) else str(texts), samples, seq_len, batch_size)
    if tokenizer is None and not isinstance(texts, np.ndarray):
        tokenizer = load_tokenizer(model)
    return _stream(model, text_ids(tokenizer, texts, "calib"), o, rows=rows, device=device, dtype=dtype, cache_device=cache_device)


def quantize_streamed(model: str | Path, out: str | Path, recipe: Recipe | None = None, *, tokenizer=None, texts=None,
                      device: str | None = None, dtype: str = "auto", cache_device: str | None = None,
                      calibration: Calibration | None = None):
    """Calibrate, smooth and quantize a model folder layer by layer (sq_export.stream.quantize) and write `out`: the
    smoothed checkpoint (loadable by from_pretrained), its static scales and decisions (sq_quant.json). `recipe`:
    default `Recipe(fallback=None)` (--fallback auto needs whole-model logits; N or names stream). `calibration`:
    `calibrate_streamed`'s result on the same model, text and options, whose act maxima are then not measured again
    (the same outputs). Read it back for export with `load_quantized(out)`. Returns a
    sq_export.stream.quantize.StreamedQuantization."""
    from sq_export.stream.quantize import quantize_streamed as _stream

    recipe = recipe or Recipe(fallback=None)
    texts = texts if texts is not None else (Path(recipe.calib.calib_text) if recipe.calib.calib_text else None)
    if tokenizer is None and not isinstance(texts, np.ndarray):
        tokenizer = load_tokenizer(model)
    return _stream(model, out, text_ids(tokenizer, texts, "calib"), recipe, device=device, dtype=dtype,
                   cache_device=cache_device, source_model=str(model), calibration=calibration)


def load_quantized(folder: str | Path, *, device: str | None = None, dtype: str = "auto", lazy: bool = False) -> QuantizedModel:
    """The QuantizedModel a streamed quantization wrote (`quantize_streamed`): the smoothed model with its
    Linears swapped for static QLinears with the recorded scales (the fallback's kept in float), and what the
    recipe decided; `export_onnx` writes the same graph as quantizing the whole model would (for the recipes that
    stream). The whole smoothed model is loaded (export traces it on the CPU in float32: 4 bytes a parameter).
    `lazy=True`: for export only — the weight matrices are placeholders that take no memory, the export traces on
    them and reads each weight from the checkpoint when it writes it (sq_export.stream.lazy: the same bytes, host
    memory ≈ one weight; the model computes nothing meaningful, so nothing but `export_onnx` may use it)."""
    from sq_export.families import family_for
    from sq_export.quant import hadamard
    from sq_export.quant.prepare import Prepared
    from sq_export.stream.quantize import QUANT_FILE, quantize_as_recorded, read_quant_record, recipe_from_json

    rec = read_quant_record(folder)
    if rec is None:
        raise BadInput(f"{folder} holds no {QUANT_FILE}: it was not written by quantize_streamed")
    recipe = recipe_from_json(rec["recipe"])
    if lazy:
        from sq_export.stream.lazy import load_lazy

        _lazy_on_cpu("load_quantized", device, dtype)
        model, fam, lw, quantized = load_lazy(folder, rec)
        model._sq_lazy_weights = lw  # read by the exporter (export.exporter._attach_weights)
    else:
        model, _ = load_model(folder, with_tokenizer=False, device=device, dtype=dtype)
        fam = family_for(model)
        quantized = quantize_as_recorded(model, rec)
    graph_meta = hadamard.metadata(recipe.rotate_down, len(rec["rotated"])) if rec.get("rotated") else {}
    prep = Prepared(model, fam, recipe, rec["alpha"], quantized, {}, None, None, rec.get("max_layer_change"),
                    rec.get("alpha_per_group"), list(rec["fp16_layers"]), rec.get("tune") or {}, graph_meta)
    return QuantizedModel(model, fam, recipe, prep, None, rec["source_model"])


def _lazy_on_cpu(what: str, device, dtype) -> None:
    if device not in (None, "cpu") or dtype not in ("auto", "float32"):
        raise BadInput(f"{what}(lazy=True) builds a CPU float32 skeleton for export: leave device and dtype")


def load_float(model: str | Path, *, device: str | None = None, dtype: str = "auto", lazy: bool = False) -> QuantizedModel:
    """The float model of `model` (a Hugging Face folder, a .gguf file or an alias) as the QuantizedModel of mode fp
    that `export_onnx` writes as the float (FP32 / FP16 reference) graph — what `export_onnx` makes of a loaded float
    model. `lazy=True` (a Hugging Face safetensors folder): for export only, like load_quantized(lazy=True) — the
    weight matrices are placeholders, the export traces on them and reads each weight from the checkpoint when it
    writes it (sq_export.stream.lazy: the bytes of the loaded model's export, host memory ≈ one weight)."""
    if not lazy:
        m, _ = load_model(model, with_tokenizer=False, device=device, dtype=dtype)
        return _float(m)
    from sq_export.modeling import resolve_model_path
    from sq_export.stream.lazy import load_float_lazy

    _lazy_on_cpu("load_float", device, dtype)
    if not resolve_model_path(str(model)).is_dir():
        raise BadInput(f"{model} is not a Hugging Face safetensors folder: a .gguf model cannot be exported from "
                       "placeholders (lazy); load it (lazy=False, no --stream) or save it once with save_pretrained")
    m, fam, lw = load_float_lazy(model)
    m._sq_lazy_weights = lw  # read by the exporter (export.exporter._attach_weights)
    m._sq_source = str(model)  # as load_model records it
    return _float(m, fam)


# ----- quantization ---------------------------------------------------------------------------------------------
@dataclass
class QuantizedModel:
    """A model prepared for a recipe (smoothed, Linears swapped for fake-quantized QLinears), with what was decided."""

    model: Any
    family: Any
    recipe: Recipe
    prepared: Any  # sq_export.quant.prepare.Prepared
    calibration: "Calibration | None" = None
    source: str | None = None  # the model path it was loaded from, when known (recorded in the ONNX metadata)

    @property
    def alpha(self):
        return self.prepared.alpha_per_group or self.prepared.alpha

    @property
    def fp16_layers(self) -> list[str]:
        return list(self.prepared.fp16_layers)

    def summary(self) -> dict:
        return self.prepared.summary()

    def export_onnx(self, path, **kw) -> "ExportResult":
        return export_onnx(self, path, **kw)


def quantize(model, calib: Calibration | None = None, recipe: Recipe | None = None, *, tokenizer=None,
             copy: bool = False, source: str | None = None, fallback_score=None) -> QuantizedModel:
    """Prepare `model` for `recipe` (default: `Recipe()`, the most accurate recipe) with calibration `calib` (from
    this float model; when None it is taken here with the recipe's options, which needs `tokenizer`).

    In place, like ModelOpt's `mtq.quantize`: `model` becomes the quantized model. `copy=True` prepares a copy that
    shares every tensor preparation does not write (the float model stays usable)."""
    from sq_export.families import family_for
    from sq_export.quant.prepare import prepare, working_copy

    recipe = (recipe or Recipe()).validate()
    fam = family_for(model)
    if calib is None and recipe.needs_calibration():
        if tokenizer is None:
            raise BadInput("quantize needs calibration statistics (sq_export.calibrate) or a tokenizer to take them")
        calib = calibrate(model, tokenizer, recipe=recipe)
    if calib is not None and recipe.needs_rows() and calib.reservoir is None:
        raise BadInput("this recipe (alpha auto, clip or fallback) needs a row sample: calibrate with rows=512 (the default)")
    from sq_export.device import fits, model_device

    m = working_copy(model, fam, smoothing=recipe.mode == "sq", linear_pairs=recipe.linear_pairs) if copy else model
    fam_m = fam if m is model else family_for(m)
    with fits("preparing the model (smoothing check, fallback scoring, attention / LM head calibration)", model_device(m)):
        prep = prepare(m, fam_m, recipe, calib, fallback_score=fallback_score)
    return QuantizedModel(m, fam_m, recipe, prep, calib, source or getattr(model, "_sq_source", None))


# ----- export ---------------------------------------------------------------------------------------------------
@dataclass
class ExportResult:
    path: Path
    bytes: int
    nodes: int
    metadata: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"onnx": str(self.path), "bytes": self.bytes, "nodes": self.nodes, **self.metadata}


def export_onnx(model, path, *, weights: str = "int8", target: str = "tensorrt", dtype: str = "fp32",
                decode: bool = False, source_model: str | None = None, trace_device: str = "cpu") -> ExportResult:
    """Write `model` (a QuantizedModel, or a float HF model for the FP32/FP16 reference graph) as ONNX at `path`,
    atomically. `weights`: "int8" (INT8 initializers → DQ, TensorRT 10+), "qdq" (float32 W → Q → DQ, TensorRT
    8.6) or "qdq16" (float16 W → Cast → Q → DQ: TensorRT 8.6 at half the bytes, the same INT8 values, see
    sq_export.passes.weights_fp16); `target`: "tensorrt" or "ort" (uint8 activations for ONNX Runtime's integer
    kernels); `dtype` "fp16": float parts in float16 (opset 19); `decode`: the KV-cache graph instead of the logits
    graph. A model on the GPU or in a half type is traced on the CPU in float32 (the TorchScript exporter's
    ground; half weights widen exactly, so the INT8 values are the half model's): that needs 4 bytes per parameter
    of host memory while it runs; the model is put back where it was afterwards. A model dispatched by accelerate
    is first gathered onto the CPU (sq_export.dispatch.undispatch, in place). `trace_device` "cuda" (logits graph):
    trace in float32 on the GPU instead, so the 4 bytes a parameter are GPU memory and host memory holds one tensor
    at a time while the file is written (a 7B model: ~27 GB of GPU memory instead of host memory; the CPU trace's
    bytes: tests/test_gpu.py, passed on an H200 on 2026-11-29)."""
    from sq_export.export.exporter import export_onnx as _export
    from sq_export.export.exporter import float32_on
    from sq_export.onnxio.meta import graph_metadata

    target = normalize_target(target)
    if dtype == "fp16" and decode:
        raise BadInput("--dtype fp16 is for the logits graph only: export the --decode graph with --dtype fp32")
    qm = model if isinstance(model, QuantizedModel) else _float(model)
    if getattr(qm.model, "_sq_lazy_weights", None) is not None and (dtype != "fp32" or trace_device != "cpu"):
        raise BadInput("a model loaded with lazy=True (load_quantized, load_float) exports float32 graphs traced on "
                       "the CPU only: load it with lazy=False for --dtype fp16 or --trace-device cuda")
    if trace_device != "cpu":
        from sq_export.device import resolve_device

        if decode or dtype != "fp32":
            raise BadInput("--trace-device cuda is for the float32 logits graph: export --decode or --dtype fp16 graphs "
                           "with --trace-device cpu")
        try:
            trace_device = resolve_device(trace_device)
        except BackendMissing:
            raise BackendMissing(f"--trace-device {trace_device}: torch sees no CUDA GPU; trace on the CPU (--trace-device cpu)") from None
    r = qm.recipe
    calibration = Path(r.act_scales).name if r.act_scales else r.calib.label()
    meta = graph_metadata(source_model or qm.source or "", qm.prepared, calibration)
    with float32_on(qm.model, trace_device):
        if decode:
            from sq_export.export.decode import export_decode_onnx

            res = export_decode_onnx(qm.model, qm.family, path, weights=weights, target=target, meta=meta,
                                     prefix=getattr(qm.prepared, "prefix", None))
        else:
            res = _export(qm.model, qm.family, path, weights=weights, target=target, meta=meta, **({"dtype": dtype} if dtype != "fp32" else {}))
    return ExportResult(Path(res.pop("onnx")), res.pop("bytes"), res.pop("nodes"), {**meta, **res})


def _float(model, fam=None) -> QuantizedModel:
    from sq_export.families import family_for
    from sq_export.quant.prepare import prepare

    fam = fam or family_for(model)
    r = Recipe.fp()
    return QuantizedModel(model, fam, r, prepare(model, fam, r, None), None, getattr(model, "_sq_source", None))


TARGETS = {"tensorrt": "tensorrt", "trt": "tensorrt", "ort": "ort", "onnxruntime": "ort"}


def normalize_target(target: str) -> str:
    """"tensorrt" (also "trt") or "ort" (also "onnxruntime"): the one spelling of --target everywhere."""
    t = TARGETS.get(str(target).lower())
    if t is None:
        raise BadInput(f"--target {target} unknown: tensorrt or ort")
    return t


# ----- check ----------------------------------------------------------------------------------------------------
def check(path, *, target: str = "tensorrt", fix: str | Path | None = None):
    """The graph passes on an exported file (smoothing folded, Q/DQ where TensorRT needs them): a CheckReport, whose
    `raise_for_violations()` raises GraphCheckFailed when any rule is violated. `fix`: fold what can be folded and
    write the fixed graph there."""
    from sq_export.passes.check import run_check

    return run_check(path, fix_out=fix, target=normalize_target(target))


# ----- measurement ----------------------------------------------------------------------------------------------
def _refuse_placeholders(model, what: str) -> None:
    m = model.model if isinstance(model, QuantizedModel) else model
    if getattr(m, "_sq_lazy_weights", None) is not None:
        raise BadInput(f"{what}: this model was loaded with lazy=True (load_quantized, load_float), whose weights are "
                       "placeholders for export only; load it with lazy=False")


def perplexity(model, tokenizer=None, text=None, *, seq_len: int = 512, max_tokens: int | None = None) -> dict:
    """Perplexity ({"perplexity", "tokens"}) of a torch model, a QuantizedModel or an .onnx path (ONNX Runtime) on
    `text` (None: the shipped held-out split; a path, a string, a list of strings, or token ids), chunks of
    `seq_len` (the same chunking on every backend)."""
    from sq_export.measure.perplexity import onnx_perplexity, torch_perplexity

    if seq_len < 2:
        raise BadInput(f"--seq-len {seq_len} must be at least 2")
    _refuse_placeholders(model, "perplexity")
    if isinstance(model, (str, Path)):
        if tokenizer is None:
            from sq_export.onnxio.meta import read_metadata

            src = read_metadata(model).get("source_model")
            if not src:
                raise BadInput(f"{model} does not record its source model: pass its tokenizer")
            tokenizer = load_tokenizer(src)
        return onnx_perplexity(str(model), text_ids(tokenizer, text, "eval"), seq_len, max_tokens)
    m = model.model if isinstance(model, QuantizedModel) else model
    return torch_perplexity(m, text_ids(tokenizer, text, "eval"), seq_len, max_tokens)  # on the model's device


def perplexity_streamed(folder: str | Path, tokenizer=None, text=None, *, seq_len: int = 512, max_tokens: int | None = None,
                        device: str | None = None, dtype: str = "auto") -> dict:
    """`perplexity` of a model folder too large to load (Hugging Face safetensors), one decoder layer at a time
    (sq_export.stream.perplexity); a `quantize_streamed` folder is measured as its fake-quantized model (what
    `load_quantized(folder)` computes). The whole-model value bit for bit on the CPU in float32. {"perplexity",
    "tokens", "quantized"}. `tokenizer`: default the folder's."""
    from sq_export.stream.perplexity import perplexity_streamed as _stream

    if seq_len < 2:
        raise BadInput(f"--seq-len {seq_len} must be at least 2")
    if tokenizer is None and not isinstance(text, np.ndarray):
        tokenizer = load_tokenizer(folder)
    return _stream(folder, text_ids(tokenizer, text, "eval"), seq_len, max_tokens, device=device, dtype=dtype)


def linear_sqnr(model, tokenizer=None, recipe: Recipe | None = None, *, windows: int = 4, plot: str | Path | None = None,
                seed: int = 2) -> dict:
    """The SQNR view of `sq-export diagnose`: every quantized Linear's output SQNR (dB) against the float model, for
    naive W8A8 and for `recipe` (default: the default recipe; its `--fallback` is ignored: every Linear is measured
    quantized), on `windows` calibration windows (the recipe's calibration text and length). Calibrates once and
    shares the statistics between both. Returns {"family", "alpha", "alpha_per_group", "smooth_pairs", "clip",
    "tokens", "mean_sqnr_db": {naive, sq}, "rows": [{linear, naive_db, sq_db}] worst SmoothQuant first}; `plot`:
    also the per-Linear chart there (PNG, "png" in the result). With pairs, SmoothQuant is compared with the
    smoothed float model (report.smoothed_reference says why)."""
    import dataclasses
    import math

    import torch

    from sq_export.families import family_for
    from sq_export.measure.sqnr import naive_sq_sqnr
    from sq_export.textdata import calibration_samples

    if windows < 1:
        raise BadInput(f"--windows {windows} must be at least 1")
    recipe = dataclasses.replace(recipe or Recipe(), mode="sq", fallback=None)
    if recipe.prefix_spec() is not None:
        raise BadInput("the SQNR view does not take --prefix-outliers yet; --tokens does (the token view after the prefix)")
    fam = family_for(model)
    ids = text_ids(tokenizer, recipe.calib.calib_text and Path(recipe.calib.calib_text), "calib")
    batch = torch.as_tensor(calibration_samples(ids, windows, min(recipe.calib.seq_len, len(ids)), seed=seed))
    calib = calibrate(model, tokenizer, recipe=recipe)  # the float model is not changed by calibration
    naive = quantize(model, calib, recipe.baseline(), copy=True).model
    qm = quantize(model, calib, recipe, copy=True)
    prep = qm.prepared
    names = fam.quantized_linears()
    table = naive_sq_sqnr(model, naive, qm.model, names, batch, family=fam, act_max=calib.act_max,
                          alpha=prep.alpha_per_group or prep.alpha, linear_pairs=recipe.linear_pairs)
    order = sorted(names, key=lambda n: math.inf if table[n].get("sq") is None else table[n]["sq"])
    rows = [{"linear": n, "naive_db": table[n]["naive"], "sq_db": table[n]["sq"]} for n in order]

    def mean(k):
        v = [r[k] for r in rows if r[k] is not None]
        return sum(v) / max(1, len(v))

    res = {"family": fam.name, "alpha": prep.alpha, "alpha_per_group": prep.alpha_per_group,
           "smooth_pairs": recipe.linear_pairs, "clip": recipe.clip or "max", "tokens": int(batch.numel()),
           "mean_sqnr_db": {"naive": mean("naive_db"), "sq": mean("sq_db")}, "rows": rows}
    if plot is not None:
        from sq_export.report import _sqnr_plot

        _sqnr_plot(Path(plot), {n: {"naive": table[n]["naive"], "sq": table[n]["sq"]} for n in order})
        res["png"] = str(plot)
    return res


def token_outliers(model, tokenizer=None, texts=None, *, windows: int = 8, seq_len: int = 512, top: int = 3,
                   threshold: float = 64.0, plot: str | Path | None = None, seed: int = 0, prefix_outliers=None) -> dict:
    """The token view of `sq-export diagnose --tokens`: per decoder layer, which token positions and ids carry the
    largest |x| at each quantized Linear's input and in the residual stream, on `windows` windows of `seq_len`
    tokens of `texts` (None: the shipped calibration split; the calibration windows' seed by default). `model`: a
    float model or a QuantizedModel (its prefix, if any, applies). Returns sq_export.measure.outliers.report's dict
    (with "text_table", the printable table); `plot`: also write the per-layer chart there (PNG).
    `prefix_outliers` (a float model): choose that outlier prefix on the same windows and measure after it."""
    import contextlib

    from sq_export.families import family_for
    from sq_export.measure import outliers
    from sq_export.quant import prefix as prefix_mod
    from sq_export.quant.recipe import parse_prefix
    from sq_export.textdata import calibration_samples

    if windows < 1:
        raise BadInput(f"--windows {windows} must be at least 1")
    m = model.model if isinstance(model, QuantizedModel) else model
    fam = family_for(m)
    ids = text_ids(tokenizer, texts, "calib")
    batch = calibration_samples(ids, windows, min(seq_len, len(ids)), seed=seed)
    spec = parse_prefix(prefix_outliers)
    pre = None
    if spec is not None:
        tokens, info = prefix_mod.choose_tokens(m, fam, batch, spec, tokenizer)
        pre = prefix_mod.compute_prefix(m, tokens, tokenizer, info)
    with prefix_mod.applied(m, pre) if pre is not None else contextlib.nullcontext():
        stats = outliers.token_stats(m, fam, batch)
    rep = outliers.report(stats, tokenizer, top=top, threshold=threshold)
    if pre is not None:
        rep["prefix_outliers"] = pre.summary()
    rep["text_table"] = outliers.format_table(rep)
    if plot is not None:
        outliers.plot(plot, stats)
        rep["png"] = str(plot)
    return rep


# ----- the whole pipeline ---------------------------------------------------------------------------------------
def run_pipeline(model, out, options=None, **kw) -> dict:
    """`sq-export run` from Python: the resumable pipeline into folder `out`; returns the manifest. `options`: a
    sq_export.run.RunOptions, or its fields as keywords (recipe="paper", weights="qdq", ...)."""
    from sq_export import run as _run

    if options is None:
        options = _run.RunOptions(**kw)
    elif kw:
        options = dataclasses.replace(options, **kw)
    return _run.run_pipeline(str(model), out, options)

