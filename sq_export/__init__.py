"""sq_export: SmoothQuant W8A8 INT8 for Hugging Face causal LMs, from real-text calibration to a checked ONNX Q/DQ
graph and a TensorRT engine.

    import sq_export as sq

    model, tok = sq.load_model("smollm2")                     # or any HF causal LM + tokenizer already loaded
    calib = sq.calibrate(model, tok, samples=64)              # the shipped calibration split, a file, str or list
    qm = sq.quantize(model, calib, sq.Recipe())                # the accurate recipe (sq.Recipe.paper(), .naive())
    sq.export_onnx(qm, "model.onnx", weights="qdq")           # TensorRT 8.6; weights="int8" for TensorRT 10+
    sq.check("model.onnx").raise_for_violations()
    from sq_export.engine import build_engine                  # torch-free
    build_engine("model.onnx", "model.engine", precision="int8")
    sq.split("big.onnx", segments=8)                           # -> big.segments.json; engine.build_segments(...)

The API lives in sq_export.api (the CLI, `sq-export`, is a thin shell over it); its names are importable from here,
lazily: `import sq_export` imports nothing heavy, so `import sq_export.engine` works where torch is absent.
The torch side (sq_export.quant, sq_export.export, sq_export.measure) and the engine side (sq_export.engine,
sq_export.passes: numpy, onnx, onnx-ir, polygraphy, tensorrt only) meet only through files.
"""

from __future__ import annotations

__version__ = "0.2.0"

_API = {
    "load_model": "sq_export.api",
    "load_tokenizer": "sq_export.api",
    "calibrate": "sq_export.api",
    "calibrate_streamed": "sq_export.api",
    "quantize_streamed": "sq_export.api",
    "load_quantized": "sq_export.api",
    "perplexity_streamed": "sq_export.api",
    "load_float": "sq_export.api",
    "quantize": "sq_export.api",
    "export_onnx": "sq_export.api",
    "check": "sq_export.api",
    "perplexity": "sq_export.api",
    "run_pipeline": "sq_export.api",
    "token_outliers": "sq_export.api",
    "linear_sqnr": "sq_export.api",
    "QuantizedModel": "sq_export.api",
    "ExportResult": "sq_export.api",
    "Recipe": "sq_export.quant.recipe",
    "CalibOptions": "sq_export.quant.recipe",
    "make_recipe": "sq_export.quant.recipe",
    "Calibration": "sq_export.quant.calibrate",
    "RunOptions": "sq_export.run.options",
    "split": "sq_export.onnxio.segments",
    "errors": "sq_export",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    mod = _API.get(name)
    if mod is None:
        raise AttributeError(f"module 'sq_export' has no attribute {name!r}")
    import importlib

    if name == "errors":
        return importlib.import_module("sq_export.errors")
    return getattr(importlib.import_module(mod), name)


def __dir__():
    return sorted(set(globals()) | set(_API))
