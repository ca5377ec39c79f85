"""Attention-mask fills an FP16 engine can hold: float32's lowest (-3.4e38) becomes -16,384.

transformers builds the additive attention mask as Where(allowed, 0, finfo(float32).min), and the exported float32
graph keeps that scalar (Gemma-3-270m: two, the causal and the sliding-window mask). TensorRT 8.x with the FP16 flag
casts it to FP16, where it is -inf (or clamped to -65,504, and score + fill then overflows to -inf): a row with at
least one allowed key is still right (exp(-inf) = 0), but a fully masked row — a padding query of a left-padded
batch — is all -inf, and softmax of that is NaN (0/0). The NaN then reaches every position of the sequence through
the next layer's keys and values (softmax weight 0 × NaN = NaN). In float32 the same row is a uniform softmax.

-16,384 (2**14, exact in FP16) keeps the function: an allowed score s and a masked one s' - 16,384 differ by far more
than float32's exp underflows at (~104) as long as scores span less than ~16,000 (Gemma-3-270m's reach 42.7), so
the masked weights are exactly 0 as before; a fully masked row stays finite (the softmax of its raw scores, where
float32 gives a uniform row: a padding query's output, which no real position reads — its key is masked for them);
two fills added (-32,768) are still finite in FP16. Rewritten: a float constant of one element below -65,504 (or -inf) whose every
consumer is a Where. `finite_mask_fills(model)` rewrites an onnx.ModelProto in place (structure only: Constant nodes
and one-element initializers; no weight read) and returns the names of the constants it changed.

Torch-free and onnx-ir-free: it runs under the TensorRT kit's Python, from `sq-export build`.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from sq_export.onnxio.index import GraphIndex

FILL = -16384.0
FP16_LOWEST = -65504.0


def _small(t) -> bool:
    return t.data_location != onnx.TensorProto.EXTERNAL and int(np.prod(t.dims, dtype=np.int64)) == 1 and t.data_type in (
        onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)


def finite_mask_fills(model: onnx.ModelProto, fill: float = FILL) -> list[str]:
    g = model.graph
    ix = GraphIndex(g)
    done: list[str] = []
    cands = [(name, t) for name, t in ix.inits.items()]
    cands += [(n.output[0], n.attribute[0].t) for n in g.node
              if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"]
    for name, t in cands:
        if not _small(t):
            continue
        a = numpy_helper.to_array(t)
        v = float(a.reshape(-1)[0])
        if not (v < FP16_LOWEST):  # also false for NaN
            continue
        users = ix.consumers.get(name, [])
        if not users or any(u.op_type != "Where" for u in users):
            continue
        new = numpy_helper.from_array(np.full(a.shape, fill, dtype=a.dtype), t.name)
        t.CopyFrom(new)
        done.append(name)
    return done
