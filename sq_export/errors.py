"""Errors the CLI turns into one line and an exit code.

Exit codes (documented in the README):
  0  success
  1  the job ran and found a problem: graph-check violations, an accuracy tolerance not met
  2  bad input: a missing/corrupt model, text, ONNX file or option; an unsupported architecture
  3  a backend is missing: TensorRT, a GPU
  4  refused to avoid a wrong artifact: smoothing would change float outputs, a norm cannot be folded exactly
Every error names what was wrong and what to do. Nothing here imports torch.
"""


class SqExportError(Exception):
    exit_code = 1


class BadInput(SqExportError):
    exit_code = 2


class UnsupportedModel(BadInput):
    pass


class DoesNotFit(BadInput):
    """A model, a decoder layer or a batch does not fit in the memory of the device it was asked to go to (a CUDA
    or host out-of-memory error, caught where layers are moved or run). Exit code 2 like any option to change: the
    message names what to change (--device cpu, accelerate's max_memory, layer streaming, a smaller batch)."""


class GraphCheckFailed(SqExportError):
    exit_code = 1


class AccuracyCheckFailed(SqExportError):
    exit_code = 1


class BackendMissing(SqExportError):
    exit_code = 3


class NotFoldable(SqExportError):
    exit_code = 4


class SmoothingChangedOutputs(SqExportError):
    exit_code = 4
