"""`sq-export check`: is smoothing folded, and are Q/DQ where TensorRT needs them? Optionally fold (--fix).

    report = run_check("model.onnx")                       # CheckReport; report.violations empty == clean
    report = run_check("model.onnx", fix_out="fixed.onnx")   # fold smoothing, write atomically, re-check the file

Raises sq_export.errors.BadInput (exit 2) for a missing / non-ONNX / truncated file, for --fix onto the input path,
and for a graph with neither norms nor Q/DQ. Violations are data, not exceptions (the CLI exits 1 on them).
Torch-free. The weights' bytes are not read (sq_export.onnxio.read: onnx.checker and the passes see the graph with
its initializers left in the file; the passes read the few constants they need); files with external data (> 2 GB)
load lazily through onnx_ir; the fixed model is written with external data beside it when its initializers exceed
1.5 GB.
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from pathlib import Path

import onnx
import onnx_ir as ir

from sq_export.onnxio import read as onnx_read
from sq_export.onnxio.read import load_ir as load_model  # noqa: F401 (public name)
from sq_export.errors import BadInput
from sq_export.onnxio.write import save_model
from sq_export.passes import RULES
from sq_export.passes._graph import Violation, find_norms, nodes_of
from sq_export.passes.fold_smoothing import Fold, fold_graph
from sq_export.passes.registry import attach_metadata, run_checks

# --target as the export spells it (tensorrt, ort) and the rule sets' own names (trt, ort)
CHECK_TARGETS = {"tensorrt": "trt", "trt": "trt", "ort": "ort", "onnxruntime": "ort"}


@dataclasses.dataclass
class CheckReport:
    source: str
    violations: list[Violation]
    summary: dict
    folds: list[Fold] = dataclasses.field(default_factory=list)
    not_folded: list[Violation] = dataclasses.field(default_factory=list)  # SQ003: what --fix could not fold
    violations_before_fix: list[Violation] | None = None
    fixed_path: str | None = None
    target: str = "trt"

    @property
    def ok(self) -> bool:
        return not self.violations

    def to_json(self) -> dict:
        return {
            "source": self.source,
            "ok": self.ok,
            "target": self.target,
            "violations": [v.to_dict() for v in self.violations],
            "summary": self.summary,
            "folds": [f.to_dict() for f in self.folds],
            "not_folded": [v.to_dict() for v in self.not_folded],
            "violations_before_fix": None if self.violations_before_fix is None
            else [v.to_dict() for v in self.violations_before_fix],
            "fixed_path": self.fixed_path,
        }

    def raise_for_violations(self) -> "CheckReport":
        """Raise GraphCheckFailed (exit 1) naming the first violations; return self when the graph is clean."""
        if self.violations:
            from sq_export.errors import GraphCheckFailed

            first = "; ".join(f"{v.rule} {v.node}" for v in self.violations[:3])
            raise GraphCheckFailed(f"{self.source}: {len(self.violations)} violation(s) ({first}); run `sq-export check "
                                   f"{self.source}` for the list")
        return self

    def format_text(self) -> str:
        s = self.summary
        norms = ", ".join(f"{k} {v}" for k, v in sorted(s["norms"].items())) or "none"
        lines = [
            f"check {self.source} (target {self.target})",
            f"  {s['nodes']} nodes; norms: {norms}; {s['quantize_linear']} QuantizeLinear, "
            f"{s['dequantize_linear']} DequantizeLinear; {s['matmul_quantized']} of {s['matmul_total']} "
            f"MatMul/Gemm quantized ({s['matmul_float']} float)",
        ]
        if self.fixed_path is not None:
            before = len(self.violations_before_fix or [])
            lines.append(f"  --fix: folded {len(self.folds)} smoothing Mul/Div into norms "
                         f"({sum(f.duplicated for f in self.folds)} norms duplicated for other readers); "
                         f"{before} violations before, wrote {self.fixed_path}")
            for f in self.folds:
                lines.append(f"    folded {f.node} into {f.norm}")
            for v in self.not_folded:
                lines.append(f"    not folded: {v}")
        if self.ok:
            lines.append("  OK: no violations")
        else:
            lines.append(f"  FAIL: {len(self.violations)} violation(s)")
            for v in self.violations:
                lines.append(f"    {v.rule} {v.node}: {v.message}")
            for rule in sorted({v.rule for v in self.violations}):
                lines.append(f"  {rule}: {RULES.get(rule, '')}")
        return "\n".join(lines)




def _checker_message(path_or_model, model: ir.Model | None = None) -> str | None:
    """onnx.checker's first error line, or None. For a path it runs on the file (its own copy of the graph), so
    run_check calls it before loading the graph itself: the two copies never coexist."""
    if isinstance(path_or_model, (str, os.PathLike)):
        ran, message = onnx_read.checker_message(path_or_model)  # the graph without its weights' bytes
        if ran:
            return message
    try:
        if isinstance(path_or_model, (str, os.PathLike)):
            onnx.checker.check_model(os.fspath(path_or_model))
        else:
            proto = ir.to_proto(model)
            if proto.ByteSize() < 2**31 - 1:
                onnx.checker.check_model(proto)
    except Exception as e:  # ValidationError and friends
        msg = str(e).strip().splitlines()
        return msg[0] if msg else type(e).__name__
    return None


def _checker_violations(message: str | None, model: ir.Model) -> list[Violation]:
    return [] if message is None else [Violation("ONNX001", model.graph.name or "<graph>", message)]


def _checker(path_or_model, model: ir.Model) -> list[Violation]:
    return _checker_violations(_checker_message(path_or_model, model), model)


def summarize(model: ir.Model, violations: list[Violation]) -> dict:
    g = model.graph
    mms = [n for n in g if n.op_type in ("MatMul", "Gemm")]
    quantized = sum(1 for n in mms if any(
        v is not None and v.producer() is not None and v.producer().op_type == "DequantizeLinear"
        or (v is not None and v.producer() is not None and v.producer().op_type == "Transpose"
            and v.producer().inputs[0] is not None and v.producer().inputs[0].producer() is not None
            and v.producer().inputs[0].producer().op_type == "DequantizeLinear")
        for v in n.inputs[:2]))
    return {
        "nodes": len(g),
        "norms": dict(Counter(n.kind for n in find_norms(g))),
        "quantize_linear": len(nodes_of(g, "QuantizeLinear")),
        "dequantize_linear": len(nodes_of(g, "DequantizeLinear")),
        "matmul_total": len(mms),
        "matmul_quantized": quantized,
        "matmul_float": len(mms) - quantized,
        "violations_by_rule": dict(sorted(Counter(v.rule for v in violations).items())),
    }


def check_model(model: ir.Model, target: str = "trt") -> list[Violation]:
    """Every registered graph check (sq_export.passes.registry) that applies to `target`. The model's sq_export.*
    metadata is handed to the checks (registry.attach_metadata: prefix_kv reads the prefix length, rotation the block)."""
    attach_metadata(model)
    return run_checks(model.graph, target)



def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return os.path.realpath(a) == os.path.realpath(b)


def run_check(path_or_model, fix_out: str | os.PathLike | None = None, target: str = "trt") -> CheckReport:
    target = CHECK_TARGETS.get(str(target).lower())
    if target is None:
        raise BadInput(f"--target must be tensorrt (trt) or ort, not {target!r}")
    if fix_out is not None and isinstance(path_or_model, (str, os.PathLike)) and \
            _same_file(Path(path_or_model), Path(fix_out)):
        raise BadInput(f"--fix output {fix_out} is the input file: write the fixed graph to another path")
    message = None
    if isinstance(path_or_model, (str, os.PathLike)) and Path(path_or_model).is_file() and os.access(path_or_model, os.R_OK):
        message = _checker_message(path_or_model)  # first: see _checker_message
    model, name = load_model(path_or_model)
    g = model.graph
    if not find_norms(g) and not nodes_of(g, "QuantizeLinear") and not nodes_of(g, "DequantizeLinear"):
        raise BadInput(f"nothing to check: {name} has no norm (LayerNormalization / RMSNorm pattern) and no "
                       f"QuantizeLinear/DequantizeLinear; is this the quantized export?")
    if isinstance(path_or_model, (str, os.PathLike)):
        violations = _checker_violations(message, model) + check_model(model, target)
    else:
        violations = _checker(path_or_model, model) + check_model(model, target)
    if fix_out is None:
        return CheckReport(name, violations, summarize(model, violations), target=target)

    folds, refused = fold_graph(g)
    save_model(model, fix_out)
    fixed, _ = load_model(fix_out)
    after = _checker(fix_out, fixed) + check_model(fixed, target)
    return CheckReport(str(fix_out), after, summarize(fixed, after), folds=folds, not_folded=refused,
                       violations_before_fix=violations, fixed_path=str(fix_out), target=target)
