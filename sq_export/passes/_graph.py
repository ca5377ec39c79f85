"""Shared graph helpers for the passes (onnx-ir based; torch-free).

Constants are read from initializers *and* from `Constant` nodes (the TorchScript exporter writes Q/DQ scales and
zero-points as Constant nodes). Initializer data is only read where a value is needed (scales, zero-points, norm
weights, and the weights `weights_int8` quantizes), so external-data models stay lazy otherwise.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Iterable

import numpy as np
import onnx
import onnx_ir as ir

# ops that hand a tensor on unchanged along the hidden (last) axis
PASS_THROUGH = frozenset({"Cast", "Identity", "Reshape", "Squeeze", "Unsqueeze", "Flatten"})



@dataclasses.dataclass(frozen=True)
class Violation:
    rule: str
    node: str
    message: str

    def to_dict(self) -> dict:
        return {"rule": self.rule, "node": self.node, "message": self.message}

    def __str__(self) -> str:
        return f"{self.rule} {self.node}: {self.message}"


@dataclasses.dataclass
class Norm:
    kind: str  # layernorm | rmsnorm | layernorm_decomposed
    node: ir.Node  # the LayerNormalization, or the Mul by gamma (RMSNorm), or the Add of beta (decomposed LN)
    gamma_node: ir.Node  # node holding gamma: the LayerNormalization itself, or the Mul by gamma
    gamma: ir.Value  # the gain the norm multiplies by: a constant, or Gemma's Add(1, w) of constants (gain_array)
    beta: ir.Value | None
    beta_node: ir.Node | None = None

    @property
    def output(self) -> ir.Value:
        return self.node.outputs[0]

    @property
    def name(self) -> str:
        return label(self.node)


# ----- model conversion ------------------------------------------------------------------------------------------
def to_ir(model: onnx.ModelProto | ir.Model | str | os.PathLike) -> ir.Model:
    if isinstance(model, ir.Model):
        return model
    if isinstance(model, onnx.ModelProto):
        return ir.from_proto(model)
    return ir.load(os.fspath(model))


def to_proto(model: ir.Model) -> onnx.ModelProto:
    return ir.to_proto(model)


# ----- values and constants --------------------------------------------------------------------------------------
def label(node: ir.Node | None) -> str:
    if node is None:
        return "<graph input>"
    return node.name or f"{node.op_type}({node.outputs[0].name if node.outputs else '?'})"


def is_const(value: ir.Value | None) -> bool:
    """Initializer or Constant-node output, without reading any data."""
    if value is None:
        return False
    if value.const_value is not None or value.is_initializer():
        return True
    p = value.producer()
    if p is not None and p.op_type in ("Identity", "Cast") and p.inputs:  # torch shares identical weights via
        return is_const(p.inputs[0])  # Identity; --weights qdq16 widens float16 weights with a Cast
    return p is not None and p.op_type == "Constant" and p.domain == ""


def const_array(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    p = value.producer()
    if p is not None and p.op_type == "Identity" and p.inputs:
        return const_array(p.inputs[0])
    if p is not None and p.op_type == "Cast" and p.inputs and p.domain == "":
        a = const_array(p.inputs[0])
        to = p.attributes.get("to")
        if a is None or to is None:
            return None
        import onnx

        return a.astype(onnx.helper.tensor_dtype_to_np_dtype(int(to.value)))
    if p is None or p.op_type != "Constant" or p.domain != "":
        return None
    for key, attr in p.attributes.items():
        a = attr.value
        if key in ("value", "sparse_value"):
            return a.numpy()
        if key == "value_float":
            return np.array(a, np.float32)
        if key == "value_floats":
            return np.array(list(a), np.float32)
        if key == "value_int":
            return np.array(a, np.int64)
        if key == "value_ints":
            return np.array(list(a), np.int64)
    return None


def const_shape(value: ir.Value) -> tuple[int, ...] | None:
    """Shape of a constant without loading it."""
    t = value.const_value
    if t is not None:
        return tuple(int(d) for d in t.shape)
    p = value.producer()
    if p is not None and p.op_type in ("Identity", "Cast") and p.inputs and p.inputs[0] is not None:
        return const_shape(p.inputs[0])
    a = const_array(value)
    return None if a is None else tuple(a.shape)


def _const_through_cast(value: ir.Value | None) -> tuple[ir.Value, list[int]] | None:
    """(the constant behind `value`, the Cast target types on the way, innermost first), or None when `value` is
    not a constant, possibly behind Cast nodes. Reads no data."""
    casts: list[int] = []
    for _ in range(8):
        if value is None:
            return None
        if is_const(value):
            return value, casts[::-1]
        p = value.producer()
        if p is None or p.op_type != "Cast" or p.domain != "" or not p.inputs or "to" not in p.attributes:
            return None
        casts.append(int(p.attributes["to"].value))
        value = p.inputs[0]
    return None


def _const_size(value: ir.Value) -> int | None:
    shp = const_shape(value) if value.const_value is not None else None
    if shp is None and value.shape is not None and all(isinstance(d, int) for d in value.shape):
        shp = tuple(value.shape)
    if shp is None:
        a = const_array(value)
        shp = None if a is None else a.shape
    return None if shp is None else int(np.prod(shp, dtype=np.int64))


def offset_gain(value: ir.Value | None) -> tuple[ir.Node, ir.Value, ir.Value] | None:
    """Gemma's norm gain (1 + w) left unfolded by the exporter: `value` is Add(c, w) (through Cast/Identity), c a
    scalar constant (the 1) and w a per-channel constant (also through a Cast, as HF's `1.0 + weight.float()`).
    Returns (the Add, c's input, w's input) or None. Reads no initializer data (shapes only)."""
    if value is None or is_const(value):
        return None
    add = walk_back(value)
    if add is None or add.op_type != "Add" or add.domain != "" or len(add.inputs) != 2:
        return None
    srcs = [_const_through_cast(v) for v in add.inputs]
    if any(x is None for x in srcs):
        return None
    sizes = [_const_size(x[0]) for x in srcs]
    if None in sizes:
        return None
    if sizes[0] == 1 and sizes[1] > 1:
        return add, add.inputs[0], add.inputs[1]
    if sizes[1] == 1 and sizes[0] > 1:
        return add, add.inputs[1], add.inputs[0]
    return None


def is_gain(value: ir.Value | None) -> bool:
    """A norm's per-channel gain: a constant, or Gemma's unfolded Add(1, w) of constants."""
    return is_const(value) or offset_gain(value) is not None


def _eval_const(value: ir.Value) -> np.ndarray | None:
    found = _const_through_cast(value)
    if found is None:
        return None
    a = const_array(found[0])
    for to in found[1]:
        a = None if a is None else a.astype(ir.DataType(to).numpy())
    return a


def gain_array(value: ir.Value | None) -> np.ndarray | None:
    """The values of a norm's gain (see is_gain): the constant, or c + w of Gemma's Add(c, w), in w's type."""
    if is_const(value):
        return const_array(value)
    og = offset_gain(value)
    if og is None:
        return None
    c, w = _eval_const(og[1]), _eval_const(og[2])
    if c is None or w is None:
        return None
    return (c.astype(np.float64) + w.astype(np.float64)).astype(w.dtype)


def is_per_channel(arr: np.ndarray | None) -> bool:
    """Shape [C], [1, C], [1, 1, C], ... with C > 1: varies along the last (hidden) axis only."""
    if arr is None or arr.ndim == 0 or arr.size <= 1:
        return False
    return all(d == 1 for d in arr.shape[:-1]) and arr.shape[-1] > 1


def scaling_operand(node: ir.Node) -> tuple[int, np.ndarray] | None:
    """For Mul(x, c) / Mul(c, x) / Div(x, c) with constant c: (index of x, c); else None."""
    if node.domain != "" or node.op_type not in ("Mul", "Div") or len(node.inputs) != 2:
        return None
    a, b = node.inputs
    if node.op_type == "Div":
        return (0, const_array(b)) if is_const(b) and not is_const(a) else None
    if is_const(b) and not is_const(a):
        return 0, const_array(b)
    if is_const(a) and not is_const(b):
        return 1, const_array(a)
    return None


def walk_back(value: ir.Value | None, ops: Iterable[str] = ("Cast", "Identity")) -> ir.Node | None:
    ops = frozenset(ops)
    seen = 0
    while value is not None and seen < 64:
        p = value.producer()
        if p is None or p.op_type not in ops:
            return p
        value = p.inputs[0] if p.inputs else None
        seen += 1
    return None


def unique_name(graph: ir.Graph, base: str) -> str:
    taken = set(graph.initializers)
    taken.update(v.name for n in graph for v in n.outputs if v.name)
    taken.update(v.name for v in graph.inputs if v.name)
    if base not in taken:
        return base
    for i in itertools.count(1):
        if f"{base}_{i}" not in taken:
            return f"{base}_{i}"
    raise AssertionError


def add_initializer(graph: ir.Graph, base: str, arr) -> ir.Value:
    """A new initializer named `base` (made unique): `arr` a numpy array, or an onnx-ir tensor (e.g. a LazyTensor,
    computed only when read) taken as it is."""
    name = unique_name(graph, base)
    if isinstance(arr, ir.LazyTensor):
        t = arr
        t.name = name
    else:
        t = ir.tensor(np.ascontiguousarray(arr), name=name)
    v = ir.val(name, const_value=t)
    graph.register_initializer(v)
    return v


def drop_if_unused(graph: ir.Graph, value: ir.Value | None) -> None:
    """Remove an initializer (or the Constant node producing it) once nothing reads it."""
    if value is None or value.uses() or value.is_graph_output():
        return
    if value.is_initializer() and value.name in graph.initializers and not value.is_graph_input():
        graph.initializers.pop(value.name)
        return
    p = value.producer()
    if p is not None and p.op_type == "Constant" and p.graph is graph:
        graph.remove(p, safe=True)


def graph_output_producers(graph: ir.Graph) -> list[tuple[ir.Value, ir.Node | None]]:
    """For each graph output, the first producer that is not a PASS_THROUGH op."""
    return [(out, walk_back(out, PASS_THROUGH | {"Identity"})) for out in graph.outputs]


# ----- norms -----------------------------------------------------------------------------------------------------
def _is_square(node: ir.Node | None) -> ir.Value | None:
    """Pow(y, 2) or Mul(y, y): returns y."""
    if node is None:
        return None
    if node.op_type == "Pow" and len(node.inputs) == 2:
        e = const_array(node.inputs[1])
        if e is not None and e.size == 1 and float(e.reshape(-1)[0]) == 2.0:
            return node.inputs[0]
    if node.op_type == "Mul" and len(node.inputs) == 2 and node.inputs[0] is node.inputs[1]:
        return node.inputs[0]
    return None


def _mean_of_square(sqrt_in: ir.Value | None) -> tuple[ir.Node, ir.Value] | None:
    """Add(ReduceMean(square(y)), eps) -> (ReduceMean node, y)."""
    add = walk_back(sqrt_in)
    rm = None
    if add is not None and add.op_type == "Add":
        for inp in add.inputs:
            cand = walk_back(inp)
            if cand is not None and cand.op_type == "ReduceMean":
                rm = cand
    elif add is not None and add.op_type == "ReduceMean":
        rm = add
    if rm is None:
        return None
    y = _is_square(walk_back(rm.inputs[0]))
    return (rm, y) if y is not None else None


def _rsqrt_of(value: ir.Value | None, divisor: bool) -> tuple[ir.Node, ir.Value] | None:
    """value == 1/sqrt(mean(y^2)+eps) (or sqrt(...) itself when divisor=True)."""
    p = walk_back(value)
    if p is None:
        return None
    if divisor:
        return _mean_of_square(p.inputs[0]) if p.op_type == "Sqrt" else None
    if p.op_type == "Reciprocal":
        s = walk_back(p.inputs[0])
        return _mean_of_square(s.inputs[0]) if s is not None and s.op_type == "Sqrt" else None
    if p.op_type == "Div" and is_const(p.inputs[0]):
        s = walk_back(p.inputs[1])
        return _mean_of_square(s.inputs[0]) if s is not None and s.op_type == "Sqrt" else None
    if p.op_type == "Pow":
        e = const_array(p.inputs[1])
        if e is not None and e.size == 1 and float(e.reshape(-1)[0]) == -0.5:
            return _mean_of_square(p.inputs[0])
    return None


def _normalized(value: ir.Value) -> tuple[ir.Node, ir.Value] | None:
    """value == y * rsqrt(mean(y^2)+eps) or y / sqrt(...): (ReduceMean of the square, y)."""
    p = walk_back(value)
    if p is None or len(p.inputs) != 2:
        return None
    if p.op_type == "Mul":
        for i in (0, 1):
            r = _rsqrt_of(p.inputs[i], divisor=False)
            if r is not None:
                return r
    if p.op_type == "Div":
        return _rsqrt_of(p.inputs[1], divisor=True)
    return None


def centered_input(y: ir.Value) -> bool:
    """y == Sub(x, ReduceMean(x)): the normalisation is a (decomposed) LayerNorm, not an RMSNorm."""
    s = walk_back(y)
    if s is None or s.op_type != "Sub":
        return False
    m = walk_back(s.inputs[1])
    return m is not None and m.op_type == "ReduceMean"


def find_norms(graph: ir.Graph) -> list[Norm]:
    norms: list[Norm] = []
    for node in graph:
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type in ("LayerNormalization", "RMSNormalization") and len(node.inputs) >= 2:
            beta = node.inputs[2] if len(node.inputs) > 2 else None
            kind = "layernorm" if node.op_type == "LayerNormalization" else "rmsnorm"
            norms.append(Norm(kind, node, node, node.inputs[1], beta, node))
            continue
        if node.op_type != "Mul" or len(node.inputs) != 2:
            continue
        for gi in (0, 1):
            g, x = node.inputs[gi], node.inputs[1 - gi]
            if is_const(x) or not is_gain(g):  # gain: γ, or Gemma's (1 + γ) as a folded constant or Add(1, γ)
                continue
            found = _normalized(x)
            if found is None:
                continue
            _, y = found
            if centered_input(y):
                # decomposed LayerNorm: ... Mul(gamma) -> Add(beta)
                out_node, beta, beta_node = node, None, None
                uses = node.outputs[0].consumers()
                if len(uses) == 1 and uses[0].op_type == "Add":
                    add = uses[0]
                    other = add.inputs[1] if add.inputs[0] is node.outputs[0] else add.inputs[0]
                    if is_const(other):
                        out_node, beta, beta_node = add, other, add
                norms.append(Norm("layernorm_decomposed", out_node, node, g, beta, beta_node))
            else:
                norms.append(Norm("rmsnorm", node, node, g, None))
            break
    return norms


def decomposed_layernorms(graph: ir.Graph) -> list[ir.Node]:
    """ReduceMean(x) -> Sub -> Pow(2) -> ReduceMean: the first ReduceMean of each match."""
    found = []
    for node in graph:
        if node.op_type != "ReduceMean":
            continue
        y = _is_square(walk_back(node.inputs[0]))
        if y is None:
            continue
        s = walk_back(y)
        if s is not None and s.op_type == "Sub":
            m = walk_back(s.inputs[1])
            if m is not None and m.op_type == "ReduceMean":
                found.append(m)
    return found


def nodes_of(graph: ir.Graph, op_type: str) -> list[ir.Node]:
    return [n for n in graph if n.op_type == op_type and n.domain in ("", "ai.onnx")]


def attr_int(node: ir.Node, name: str, default: int) -> int:
    a = node.attributes.get(name)
    return default if a is None else int(a.value)
