"""ONNX graph passes for SmoothQuant W8A8 Q/DQ graphs (torch-free: numpy, onnx, onnx-ir).

Simple functions on onnx.ModelProto (an onnx_ir.Model or a path also works as input; the input is never modified:
protos are converted, IR models are copied via proto round trip first). The onnx-ir pass classes are exported too
for use with `onnx_ir.passes.Sequential` on already-loaded IR models (large external-data models: load once with
`onnx_ir.load(path)`, run the passes, `onnx_ir.save`).

    verify_folded(model) -> list[Violation]           SQ001, SQ002
    fold_smoothing(model) -> (ModelProto, list[Fold]) the --fix
    lint_qdq(model, target="trt") -> list[Violation]  QDQ001..QDQ012
    weights_to_int8(model) -> ModelProto              W -> Q -> DQ  ==>  int8 W -> DQ
    activations_to_uint8(model) -> ModelProto         activation int8/0  ==>  uint8/128 (ONNX Runtime target)
    tidy_qdq_constants(model) -> ModelProto           no Identity on constants, one zero-point per Q/DQ (TensorRT 8.6)
    qdq_to_fp16(model) -> ModelProto                  Cast -> Q/DQ(float32 scale) -> Cast  ==>  float16 Q/DQ (opset 19)
    norm_precision(model) -> list[Violation]          FP16001 (float16 graph, norm statistics not in float32)
"""

from __future__ import annotations

import onnx
import onnx_ir as ir

import importlib
import pkgutil

from sq_export.passes._graph import Norm, Violation, find_norms, to_ir, to_proto
from sq_export.passes.registry import CHECKS, CheckPass, graph_check, rules

# every module of this package registers what it declares: a new graph check is one new file here
for _m in pkgutil.iter_modules(__path__):
    if not _m.name.startswith("_") and _m.name not in ("check", "registry"):
        importlib.import_module(f"{__name__}.{_m.name}")

from sq_export.passes.fold_smoothing import Fold, FoldSmoothingPass  # noqa: E402
from sq_export.passes.fp16_qdq import Float16QDQPass  # noqa: E402
from sq_export.passes.ort_uint8 import ActivationsToUint8Pass  # noqa: E402
from sq_export.passes.tidy_qdq_constants import TidyQDQConstantsPass  # noqa: E402
from sq_export.passes.weights_int8 import WeightsToInt8Pass, quantize_like_onnx  # noqa: E402

RULES = rules()

__all__ = [
    "RULES", "CHECKS", "CheckPass", "graph_check", "Violation", "Fold", "Norm", "find_norms",
    "verify_folded", "fold_smoothing", "lint_qdq", "weights_to_int8", "activations_to_uint8", "tidy_qdq_constants", "qdq_to_fp16",
    "FoldSmoothingPass", "WeightsToInt8Pass", "ActivationsToUint8Pass", "TidyQDQConstantsPass", "Float16QDQPass",
    "norm_precision", "quantize_like_onnx", "to_ir", "to_proto",
]




def _read(model) -> ir.Model:
    return to_ir(model)


def _copy(model) -> ir.Model:
    """An IR model the pass may change, without touching the caller's object."""
    if isinstance(model, ir.Model):
        return ir.from_proto(ir.to_proto(model))
    return to_ir(model)  # from_proto / load already build a fresh IR model


def _violations(name: str, model, target: str = "trt") -> list[Violation]:
    p = CheckPass(name, target)
    p(_read(model))
    return p.violations


def verify_folded(model) -> list[Violation]:
    return _violations("verify_folded", model)


def fold_smoothing(model) -> tuple[onnx.ModelProto, list[Fold]]:
    p = FoldSmoothingPass()
    res = p(_copy(model))
    return to_proto(res.model), p.folds


def lint_qdq(model, target: str = "trt") -> list[Violation]:
    return _violations("lint_qdq", model, target)


def norm_precision(model) -> list[Violation]:
    return _violations("norm_precision", model)


def weights_to_int8(model) -> onnx.ModelProto:
    return to_proto(WeightsToInt8Pass()(_copy(model)).model)


def activations_to_uint8(model) -> onnx.ModelProto:
    return to_proto(ActivationsToUint8Pass()(_copy(model)).model)


def tidy_qdq_constants(model) -> onnx.ModelProto:
    return to_proto(TidyQDQConstantsPass()(_copy(model)).model)


def qdq_to_fp16(model) -> onnx.ModelProto:
    return to_proto(Float16QDQPass()(_copy(model)).model)
