"""Norm statistics that cannot overflow FP16: divide each token by its own max |x| before squaring.

TensorRT 8.6 with the FP16 flag may compute a norm's mean of squares in FP16 even when the layers are pinned to FP32
(precision constraints are hints; its Myelin backend fuses the norm with the QuantizeLinear that reads it). Real LLM
residual streams reach |x| ≈ 20,000 (SmolLM2-135M from layer 12 on), so mean(x²) ≈ 7e5 overflows FP16's 65,504 and
the token's normalized activations collapse. RMSNorm and LayerNorm are invariant to the scale of their input, so

    y · rsqrt(mean(y²) + ε)  ==  (y/c) · rsqrt(mean((y/c)²) + ε/c²)      for any c > 0

and with c = max(max_j |y_j|, 1) per token every square is ≤ 1 and their mean ≤ 1: nothing left to overflow, and
ε/c² keeps the function exact (not an approximation; ONNX Runtime agrees to float32 rounding). Tokens whose max |y| is
below 1 are not scaled (c = 1).

`prescale_norms(model)` rewrites an onnx.ModelProto in place (structure only: it adds Abs → ReduceMax → Max → Div
nodes and touches no weights, so a graph loaded without its external data works) and returns the names of the
ReduceMean nodes it made safe. It matches each decomposed norm by its mean of squares:
    square(y) → ReduceMean → [Add ε] → Sqrt → Div(1, ·) | Reciprocal → Mul(y, ·)      (HF RMSNorm; LayerNorm with y = x - mean)
    square(y) → ReduceMean → [Add ε] → Sqrt → Div(y, ·)
    square(y) → ReduceMean → [Add ε] → Pow(·, -0.5) → Mul(y, ·)
LayerNormalization nodes are left alone (a single op, its statistics are TensorRT's own kernel).

Torch-free and onnx-ir-free: it runs under the TensorRT kit's Python, from `sq-export build`.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from sq_export.onnxio.index import GraphIndex


def _opset(model) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return int(o.version)
    return 17


def prescale_norms(model: onnx.ModelProto) -> list[str]:
    g = model.graph
    ix = GraphIndex(g)  # a snapshot of the graph before the rewrite: the matches below only read it
    producer, consumers, scalar = ix.producer, ix.consumers, ix.scalar

    def only(value, op):
        c = consumers.get(value, [])
        return c[0] if len(c) == 1 and c[0].op_type == op else None

    def square_of(node):
        if node is None:
            return None
        if node.op_type == "Pow" and scalar(node.input[1]) == 2.0:
            return node.input[0]
        if node.op_type == "Mul" and node.input[0] == node.input[1]:
            return node.input[0]
        return None

    taken = set(producer) | set(ix.inits) | {i.name for i in g.input}

    def fresh(base):
        name, k = base, 0
        while name in taken:
            k += 1
            name = f"{base}_{k}"
        taken.add(name)
        return name

    opset = _opset(model)
    done: list[str] = []
    inserts: list[tuple[int, list]] = []  # (index of a node, new nodes to put before it)
    index = {id(n): k for k, n in enumerate(g.node)}
    for rm in list(g.node):
        if rm.op_type != "ReduceMean":
            continue
        sq = producer.get(rm.input[0])
        y = square_of(sq)
        if y is None or len(consumers.get(rm.output[0], [])) != 1:
            continue
        if "/prescale/" in getattr(producer.get(y), "name", ""):
            continue  # already prescaled (the pass is idempotent)
        nxt = consumers[rm.output[0]][0]
        eps_add, eps_in = None, None
        if nxt.op_type == "Add":
            k = 1 if nxt.input[0] == rm.output[0] else 0
            if scalar(nxt.input[k]) is None:
                continue
            eps_add, eps_in = nxt, k
            stat = nxt.output[0]
        else:
            stat = rm.output[0]
        norm_mul, y_slot = None, None
        sqrt = only(stat, "Sqrt")
        if sqrt is not None:
            c = consumers.get(sqrt.output[0], [])
            if len(c) == 1 and c[0].op_type == "Div" and c[0].input[1] == sqrt.output[0]:
                if c[0].input[0] == y:
                    norm_mul, y_slot = c[0], 0
                elif scalar(c[0].input[0]) == 1.0:
                    m = only(c[0].output[0], "Mul")
                    if m is not None and y in m.input:
                        norm_mul, y_slot = m, list(m.input).index(y)
            elif len(c) == 1 and c[0].op_type == "Reciprocal":
                m = only(c[0].output[0], "Mul")
                if m is not None and y in m.input:
                    norm_mul, y_slot = m, list(m.input).index(y)
        else:
            p = only(stat, "Pow")
            if p is not None and scalar(p.input[1]) == -0.5:
                m = only(p.output[0], "Mul")
                if m is not None and y in m.input:
                    norm_mul, y_slot = m, list(m.input).index(y)
        if norm_mul is None:
            continue
        # dtype of y: that of the eps constant, or of the exponent, else float32
        dt = TensorProto.FLOAT
        for cand in ([eps_add.input[eps_in]] if eps_add is not None else []) + ([sq.input[1]] if sq.op_type == "Pow" else []):
            if ix.is_const(cand):
                dt = ix.tensor(cand).data_type
                break
        base = (rm.name or rm.output[0]).rsplit("/", 1)[0] + "/prescale"
        one = fresh(base + "/one")
        absn, mx, c, z = fresh(base + "/abs"), fresh(base + "/max"), fresh(base + "/c"), fresh(base + "/y_over_c")
        new = [
            helper.make_node("Constant", [], [one], name=one, value=helper.make_tensor(one, dt, [], [1.0])),
            helper.make_node("Abs", [y], [absn], name=absn),
        ]
        if opset >= 18:
            axes = fresh(base + "/axes")
            new.append(helper.make_node("Constant", [], [axes], name=axes, value=helper.make_tensor(axes, TensorProto.INT64, [1], [-1])))
            new.append(helper.make_node("ReduceMax", [absn, axes], [mx], name=mx, keepdims=1))
        else:
            new.append(helper.make_node("ReduceMax", [absn], [mx], name=mx, axes=[-1], keepdims=1))
        new.append(helper.make_node("Max", [mx, one], [c], name=c))
        new.append(helper.make_node("Div", [y, c], [z], name=z))
        if eps_add is not None:  # ε/c², as two divisions (c² itself may exceed FP16); placed before the Add
            e1, e2 = fresh(base + "/eps_over_c"), fresh(base + "/eps_over_c2")
            inserts.append((index[id(eps_add)], [helper.make_node("Div", [eps_add.input[eps_in], c], [e1], name=e1),
                                                 helper.make_node("Div", [e1, c], [e2], name=e2)]))
            eps_add.input[eps_in] = e2
        sq.input[0] = z
        if sq.op_type == "Mul":
            sq.input[1] = z
        norm_mul.input[y_slot] = z
        inserts.append((index[id(sq)], new))
        done.append(rm.name or rm.output[0])
    if inserts:
        nodes = list(g.node)
        by_index: dict[int, list] = {}
        for k, new in inserts:
            by_index.setdefault(k, []).extend(new)
        out = []
        for k, n in enumerate(nodes):
            out.extend(by_index.get(k, []))
            out.append(n)
        del g.node[:]
        g.node.extend(out)
    return done
