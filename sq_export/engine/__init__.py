"""Engine side of sq_export: TensorRT engines from the exported ONNX graphs, and accuracy checks.

Torch-free by design: everything here imports only the standard library, NumPy, ONNX, ONNX Runtime,
Polygraphy and TensorRT, so it runs under a bare TensorRT Python (e.g. the CPython 3.10 kit on the lent GPU,
``$TRTPY``) where torch and transformers are absent. TensorRT is imported lazily inside the functions that
need it, so ``import sq_export.engine`` (and ``--help``) work on machines without TensorRT or a GPU.

Modules:
  trt_compat  TensorRT-version-dependent build plan (8.x builder flags vs 10+ strongly typed networks),
              pure functions of (version string, graph facts), plus the TensorRT/GPU availability checks
  build       build_engine(): ONNX -> serialized engine + JSON sidecar (atomic writes)
  run         load_tokens(), open_runner(), engine_perplexity(), onnx_perplexity()
  compare     compare(): Polygraphy Comparator over real token batches; format_table()
  chain       segment manifests (sq_export.onnxio.segments): ChainRunner, build_segments()

    from sq_export.engine import build_engine, model_perplexity   # (imported on first use)
"""

_LAZY = {"build_engine": "sq_export.engine.build",
         "model_perplexity": "sq_export.engine.run", "engine_perplexity": "sq_export.engine.run",
         "load_tokens": "sq_export.engine.run", "open_runner": "sq_export.engine.run",
         "build_segments": "sq_export.engine.chain", "split": "sq_export.onnxio.segments"}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'sq_export.engine' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)
