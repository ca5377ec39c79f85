"""fold_smoothing (`check --fix`): fold norm -> Mul(c) / Div(c) into the norm's weights.

LayerNormalization(x, g, b) * c  ==  LayerNormalization(x, g*c, b*c)
RMSNorm: Mul(g, xhat) * c        ==  Mul(g*c, xhat)          (decomposed LayerNorm: g*c and b*c likewise)
Gemma's RMSNorm: Mul(xhat, Add(1, w)) * c  ==  Mul(xhat, (1+w)*c)   (the new gain is one constant)
Div(y, c) is folded as g/c (and b/c).

Other consumers of the norm output: the folded norm is a *new* node (LayerNormalization, or just the final Mul by
gamma for RMSNorm, so the cost is one elementwise op) that replaces the Mul/Div; the original norm stays for any
other reader that needs the unscaled value, and is removed when nothing but shape readers (Shape, which see the
same shape) is left. So folding never changes what another consumer sees. New gamma/beta initializers are created
(never edited in place: torch shares identical weights between norms via Identity).

Not folded (left for verify_folded to report, and listed in `refused` with the reason as SQ003): a constant that is
not per-channel along the norm's last axis, a non-constant gamma/beta, a multi-axis norm, or a Mul reached only
through a Cast. Folding repeats until nothing changes, so chains Mul(c1) -> Mul(c2) fold too.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from sq_export.passes._graph import (
    Norm,
    Violation,
    add_initializer,
    const_array,
    drop_if_unused,
    find_norms,
    gain_array,
    is_per_channel,
    label,
    scaling_operand,
)

SHAPE_ONLY = frozenset({"Shape", "Size"})


@dataclasses.dataclass(frozen=True)
class Fold:
    norm: str
    node: str  # the Mul/Div folded away
    kind: str
    op: str
    duplicated: bool  # the original norm was kept for other consumers

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _fold_one(graph: ir.Graph, norm: Norm, mul: ir.Node, c: np.ndarray) -> tuple[Fold | None, str | None]:
    g = gain_array(norm.gamma)  # γ, or Gemma's 1 + γ (a folded constant or Add(1, γ)): the new gain is g·c
    b = const_array(norm.beta) if norm.beta is not None else None
    if g is None or (norm.beta is not None and b is None):
        return None, "gamma/beta is not a constant"
    if not is_per_channel(c):
        return None, f"constant of shape {list(c.shape)} is not per-channel along the last axis"
    cv = c.reshape(-1)
    if g.ndim > 1 or (g.ndim == 1 and g.shape[0] not in (1, cv.shape[0])):
        return None, f"gamma shape {list(g.shape)} does not match the {cv.shape[0]} channels of the constant"
    if norm.kind == "layernorm" and norm.node.op_type == "LayerNormalization":
        axis = norm.node.attributes.get("axis")
        if axis is not None and int(axis.value) != -1 and g.ndim != 1:
            return None, "LayerNormalization over several axes"
    dt = g.dtype
    g64, c64 = g.astype(np.float64), cv.astype(np.float64)
    new_g = (g64 / c64 if mul.op_type == "Div" else g64 * c64).astype(dt)
    new_b = None
    if b is not None:
        b64 = np.broadcast_to(b.astype(np.float64), cv.shape)
        new_b = (b64 / c64 if mul.op_type == "Div" else b64 * c64).astype(b.dtype)
    gname = norm.gamma.name or "gamma"
    gv = add_initializer(graph, f"{gname}.smoothed", new_g)
    bv = add_initializer(graph, f"{norm.beta.name or 'beta'}.smoothed", new_b) if new_b is not None else None

    # the new norm (tail): LayerNormalization / RMSNormalization copy, or Mul(gamma') [+ Add(beta')] copy
    src = norm.gamma_node
    inputs = [gv if v is norm.gamma else v for v in src.inputs]
    new_nodes = [ir.node(src.op_type, inputs, attributes={k: a for k, a in src.attributes.items()},
                         domain=src.domain, num_outputs=1, name=f"{src.name or src.op_type}/smoothed")]
    if norm.kind == "layernorm" and len(inputs) > 2 and norm.beta is not None:
        new_nodes[0].replace_input_with(2, bv)
    if norm.beta_node is not None and norm.beta_node is not src:  # decomposed LN: ... Mul(g) -> Add(b)
        bn = norm.beta_node
        ins = [new_nodes[0].outputs[0] if v is src.outputs[0] else (bv if v is norm.beta else v) for v in bn.inputs]
        new_nodes.append(ir.node(bn.op_type, ins, num_outputs=1, name=f"{bn.name or bn.op_type}/smoothed"))
    graph.insert_before(mul, new_nodes)
    new_out = new_nodes[-1].outputs[0]
    old_out = mul.outputs[0]
    new_out.type, new_out.shape = old_out.type, old_out.shape
    ir.convenience.replace_all_uses_with(old_out, new_out, replace_graph_outputs=True)
    name = old_out.name
    mul_inputs = [v for v in mul.inputs if v is not None and v is not norm.output]
    graph.remove(mul, safe=True)
    new_out.name = name
    for v in mul_inputs:
        _drop_chain(graph, v)

    # the original norm: keep for real consumers, drop when only shape readers remain
    out = norm.output
    users = out.uses()
    duplicated = any(u.node.op_type not in SHAPE_ONLY for u in users) or out.is_graph_output()
    if not duplicated:
        for u in list(users):
            u.node.replace_input_with(u.idx, new_out)
        old_nodes = [norm.node] if norm.node is src else [norm.node, src]
        old_inputs = {id(v): v for n in old_nodes for v in n.inputs if v is not None}.values()
        graph.remove(old_nodes, safe=True)
        for v in old_inputs:
            _drop_chain(graph, v)
    fold = Fold(norm.name, label(mul), norm.kind, mul.op_type, duplicated)
    return fold, None


def _drop_chain(graph: ir.Graph, v: ir.Value) -> None:
    """Drop a now-unread constant (initializer, Constant, or an Identity/Cast of one), or Gemma's unread Add(1, γ) gain
    (with the Casts and constants behind it)."""
    from sq_export.passes._graph import is_const, offset_gain

    if not is_const(v):
        p = v.producer()
        if p is None or v.uses() or v.is_graph_output() or p.op_type not in ("Add", "Cast") or p.graph is not graph:
            return
        if offset_gain(v) is None and not (p.op_type == "Cast" and _const_chain(p.inputs[0])):
            return
        ins = [i for i in p.inputs if i is not None]
        graph.remove(p, safe=True)
        for i in ins:
            _drop_chain(graph, i)
        return
    p = v.producer()
    if p is not None and p.op_type in ("Identity", "Cast") and not v.uses() and not v.is_graph_output():  # is_const
        # sees through both (shared weights; --weights qdq16's widening Cast)
        src = p.inputs[0]
        graph.remove(p, safe=True)
        _drop_chain(graph, src)
        return
    drop_if_unused(graph, v)


def _const_chain(v: ir.Value | None) -> bool:
    """A constant, possibly behind Cast nodes."""
    from sq_export.passes._graph import is_const

    for _ in range(8):
        if v is None:
            return False
        if is_const(v):
            return True
        p = v.producer()
        if p is None or p.op_type != "Cast" or not p.inputs:
            return False
        v = p.inputs[0]
    return False


def fold_graph(graph: ir.Graph) -> tuple[list[Fold], list[Violation]]:
    folds: list[Fold] = []
    refused: dict[str, Violation] = {}
    for _ in range(64):
        changed = False
        for norm in find_norms(graph):
            for use in list(norm.output.uses()):
                n = use.node
                so = scaling_operand(n)
                if so is None or so[0] != use.idx or not is_per_channel(so[1]):
                    continue
                fold, why = _fold_one(graph, norm, n, so[1])
                if fold is None:
                    refused[label(n)] = Violation("SQ003", label(n), f"cannot fold {n.op_type} into norm "
                                                  f"{norm.name}: {why}")
                    continue
                folds.append(fold)
                refused.pop(label(n), None)
                changed = True
                break  # the norm list is stale now
            if changed:
                break
        if not changed:
            break
    return folds, list(refused.values())


class FoldSmoothingPass(ir.passes.InPlacePass):
    """Folds in place. `self.folds` lists what was folded, `self.refused` what could not be (SQ003)."""

    def __init__(self) -> None:
        super().__init__()
        self.folds: list[Fold] = []
        self.refused: list[Violation] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.folds, self.refused = fold_graph(model.graph)
        return ir.passes.PassResult(model, modified=bool(self.folds))

    def ensures(self, model: ir.Model) -> None:
        from sq_export.passes.verify_folded import find_unfolded

        left = {v.node for v in find_unfolded(model.graph) if v.rule == "SQ001"}
        unexpected = left - {v.node for v in self.refused}
        if unexpected:
            raise ir.passes.PostconditionError(f"smoothing still unfolded after the fold at {sorted(unexpected)}")
