"""float_weights_fp16 (`export --mode fp --weights qdq16`): the compact float graph. A constant float32 weight W
feeding MatMul / Gemm (or the data of a Gather: the embeddings)  ==>  float16 W -> Cast(to=FLOAT), only where
float16 holds every value of W exactly (float32(float16(W)) == W): the Cast gives back W bit for bit, so the graph
computes what the float32 graph computes (ONNX Runtime: bit-identical logits). A weight float16 cannot carry
(a float32-trained value, a bfloat16 value below float16's range) stays float32 and is counted (`kept_float32`).

Why: TensorRT 8.6's FP16 engine of a 7B model needs its float ONNX graph, whose float32 weights are 27 GB; a
checkpoint stored in float16 (Llama-2-7B's) is exact everywhere, so its float graph halves (13.5 GB).

Memory: the float16 weight is computed when the file is written (an `ir.LazyTensor`), so the float16 copies are
never all in memory at once. Checking exactness reads each weight once, one at a time (in blocks of rows), except
for a weight still in its checkpoint (an export from placeholders, sq_export.stream.lazy) whose tensor
`SOURCE_DTYPE` marks as stored in float16: exact by construction, never read here. A weight of a float32 or
bfloat16 checkpoint is read to check it and read again when written (one weight in memory at a time).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from sq_export.passes._graph import drop_if_unused
from sq_export.passes.weights_fp16 import WeightsToFp16Pass, widened_fp16

# ir.Tensor.meta key: the ir.DataType its values are stored in at their source (a checkpoint tensor widened to
# float32 when read). FLOAT16: float16 holds them exactly, no need to read them to know.
SOURCE_DTYPE = "sq_export.source_dtype"
# the inputs that take a weight: MatMul / Gemm A and B, Gather's data
WEIGHT_INPUTS = {"MatMul": (0, 1), "Gemm": (0, 1), "Gather": (0,)}
CHECK_BLOCK = 1 << 22  # elements checked at a time (16 MB of float32)


def fp16_exact(a: np.ndarray) -> bool:
    """float16 holds every value of float32 array `a` exactly (NaN never counts as exact), checked in blocks of
    rows (no whole-array temporaries)."""
    a = np.asarray(a)
    if a.ndim == 0:
        a = a.reshape(1)
    rows = max(1, CHECK_BLOCK // max(1, a[0].size if a.shape[0] else 1))
    with np.errstate(over="ignore", invalid="ignore"):
        for i in range(0, a.shape[0], rows):
            blk = a[i:i + rows]
            if not np.array_equal(blk.astype(np.float16).astype(np.float32), blk):
                return False
    return True


def _lazy_fp16(src) -> ir.LazyTensor:
    """float16 of `src`'s values, computed when the tensor is written and not kept afterwards."""
    return ir.LazyTensor(lambda: ir.Tensor(np.asarray(src.numpy()).astype(np.float16, order="C")),
                         dtype=ir.DataType.FLOAT16, shape=ir.Shape(tuple(src.shape)))


def _is_weight_use(node: ir.Node, idx: int) -> bool:
    return node.domain in ("", "ai.onnx") and idx in WEIGHT_INPUTS.get(node.op_type, ())


def known_exact(t) -> bool:
    """Exact in float16 without reading: a tensor whose source stores float16 (SOURCE_DTYPE)."""
    meta = getattr(t, "meta", None)
    return meta is not None and meta.get(SOURCE_DTYPE) == ir.DataType.FLOAT16


def float_weights_graph(graph: ir.Graph) -> tuple[int, int]:
    """(weights stored as float16 -> Cast, weights kept float32 because float16 does not hold them exactly)."""
    done = kept = 0
    order = {id(n): i for i, n in enumerate(graph)}  # the Casts inserted below do not change the others' order
    for w in list(graph.initializers.values()):
        src = w.const_value
        if (src is None or w.producer() is not None or w.is_graph_input() or w.is_graph_output()
                or src.dtype != ir.DataType.FLOAT or len(src.shape) < 2):
            continue
        if not any(_is_weight_use(u.node, u.idx) for u in w.uses()):
            continue
        if not (known_exact(src) or fp16_exact(src.numpy())):  # one weight read at a time, not kept
            kept += 1
            continue
        first = min((u.node for u in w.uses()), key=lambda n: order.get(id(n), 0))
        out = widened_fp16(graph, w, _lazy_fp16(src), before=first)
        for u in list(w.uses()):
            u.node.replace_input_with(u.idx, out)
        drop_if_unused(graph, w)
        done += 1
    return done, kept


class FloatWeightsToFp16Pass(WeightsToFp16Pass):
    """The compact float graph (module docstring); `count` weights stored in float16, `kept_float32` not."""

    graph_pass = staticmethod(float_weights_graph)
