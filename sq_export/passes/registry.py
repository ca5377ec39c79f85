"""The graph checks, registered by declaration: a check is one file in sq_export/passes/ that decorates its
function with `@graph_check(name, rules)`; `sq-export check`, `sq_export.check` and the run's check stage run every
registered check (sq_export.passes.check), and the rule ids and texts come from the declarations.

    @graph_check("norm_precision", {"FP16001": "float16 graph computes norm statistics in float16 ..."})
    def find_fp16_norm_statistics(graph: ir.Graph, target: str) -> list[Violation]: ...

`CheckPass(name)` runs one registered check as an onnx-ir pass (read-only: `modified` is False; results in
`violations`), for `onnx_ir.passes.Sequential` pipelines.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import onnx_ir as ir

TARGETS = ("trt", "ort")


@dataclasses.dataclass(frozen=True)
class GraphCheck:
    name: str
    rules: dict  # rule id -> what it means
    find: Callable  # (graph: ir.Graph, target: str) -> list[Violation]
    targets: tuple = TARGETS
    order: int = 100  # checks run (and report) in this order, then by name


CHECKS: dict[str, GraphCheck] = {}
# rules that belong to no graph check: the ONNX checker (run by check.py) and what --fix could not fold
OTHER_RULES = {
    "SQ003": "smoothing Mul/Div after a norm could not be folded by --fix",
    "ONNX001": "onnx.checker rejected the model",
}


def graph_check(name: str, rules: dict, targets: tuple = TARGETS, order: int = 100):
    """Register `fn(graph, target) -> list[Violation]` as the graph check `name` declaring `rules`."""

    def deco(fn):
        if name in CHECKS:
            raise RuntimeError(f"graph check {name} registered twice")
        taken = {r for c in CHECKS.values() for r in c.rules} | set(OTHER_RULES)
        dup = sorted(taken & set(rules))
        if dup:
            raise RuntimeError(f"graph check {name}: rule ids {dup} are declared elsewhere")
        CHECKS[name] = GraphCheck(name, dict(rules), fn, tuple(targets), order)
        return fn

    return deco


def ordered() -> list[GraphCheck]:
    return sorted(CHECKS.values(), key=lambda c: (c.order, c.name))


def rules() -> dict[str, str]:
    """Every rule id with its text, in check order."""
    out = {}
    for c in ordered():
        out.update(c.rules)
    out.update(OTHER_RULES)
    return out


META_KEY = "sq_export.metadata"  # graph.meta entry holding the model's sq_export.* metadata while checks run


def attach_metadata(model: ir.Model) -> None:
    """Hand the model's sq_export.* metadata to the checks, in graph.meta[META_KEY] (keys without the prefix)."""
    model.graph.meta[META_KEY] = {k.removeprefix("sq_export."): v for k, v in model.metadata_props.items()
                                  if k.startswith("sq_export.")}


def graph_metadata(graph: ir.Graph) -> dict:
    """The sq_export.* metadata attach_metadata handed over ({} when none)."""
    return graph.meta.get(META_KEY) or {}


def run_checks(graph: ir.Graph, target: str = "trt") -> list:
    """Every registered check that applies to `target`, in registration order."""
    out = []
    for c in ordered():
        if target in c.targets:
            out.extend(c.find(graph, target))
    return out


class CheckPass(ir.passes.InPlacePass):
    """One registered check as a read-only onnx-ir pass; results in `self.violations`."""

    def __init__(self, name: str, target: str = "trt") -> None:
        super().__init__()
        if name not in CHECKS:
            raise ValueError(f"no graph check {name!r} (registered: {', '.join(CHECKS)})")
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, not {target!r}")
        self.check = CHECKS[name]
        self.target = target
        self.violations: list = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        attach_metadata(model)
        self.violations = self.check.find(model.graph, self.target)
        return ir.passes.PassResult(model, modified=False)
