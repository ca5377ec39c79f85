"""sq_export: SmoothQuant W8A8 INT8 from a Hugging Face causal LM to a checked ONNX Q/DQ graph and TensorRT engine.

The torch side (calibrate, smooth, quantize, export, evaluate) and the engine side (``sq_export.engine``,
``sq_export.passes``: numpy, onnx, onnx-ir, polygraphy, tensorrt only) meet only through files.
Nothing heavy is imported here, so ``import sq_export.engine`` works where torch is absent.
"""

__version__ = "0.1.0"
