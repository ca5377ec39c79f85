"""The exported float graph of Gemma-3-270m in ONNX Runtime (float32, graph optimizations off) on held-out chunks:
max |x| of every node output, the nodes over FP16's 65,504 (they overflow in an FP16 engine), the nodes that read
such a tensor, and the float constants outside FP16's range. Then the same after the build-time rewrites
(norm prescale) to show what an FP16 engine must still hold above 65,504.
Usage: gemma_onnx_range.py GRAPH.onnx [TOKENS.npz] [N_CHUNKS] [rewrites]; "rewrites": first apply what
`sq-export build` applies with the FP16 flag (engine/norm_prescale.py, engine/mask_fill.py). 2026-11-29 (issue 16); output in logs4/gemma/."""
import re
import sys
from collections import defaultdict

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

FP16_MAX = 65504.0
path = sys.argv[1]
ids = np.load(sys.argv[2] if len(sys.argv) > 2 else "/tmp/gemma.tokens.npz")["input_ids"]
n_chunks = int(sys.argv[3]) if len(sys.argv) > 3 else 1
m = onnx.load(path)
g = m.graph
if len(sys.argv) > 4 and sys.argv[4] == "rewrites":
    from sq_export.engine.mask_fill import finite_mask_fills
    from sq_export.engine.norm_prescale import prescale_norms

    print("build rewrites: prescaled norms", len(prescale_norms(m)), "mask fills", finite_mask_fills(m))

print("== float constants outside FP16 range")
for t in list(g.initializer) + [a.t for n in g.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]:
    if t.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16):
        continue
    if t.data_location == onnx.TensorProto.EXTERNAL:
        continue
    a = numpy_helper.to_array(t)
    if a.size and np.abs(a[np.isfinite(a)]).max(initial=0) > FP16_MAX or not np.isfinite(a).all():
        print(f"  {t.name}: shape {list(a.shape)} values {np.unique(a)[:4]}")
for n in g.node:  # ConstantOfShape / Where fills and Cast of constants
    if n.op_type == "ConstantOfShape":
        for a in n.attribute:
            v = numpy_helper.to_array(a.t)
            if v.dtype.kind == "f" and (np.abs(v) > FP16_MAX).any():
                print(f"  ConstantOfShape {n.name}: {v}")

ops = {}
wanted = []
for n in g.node:
    for o in n.output:
        ops[o] = (n.name, n.op_type)
        wanted.append(o)
del g.output[:]
for o in wanted:
    g.output.append(helper.make_empty_tensor_value_info(o))
so = ort.SessionOptions()
so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
names = [o.name for o in sess.get_outputs()]
mx = defaultdict(float)
bad = defaultdict(int)
for r in ids[:n_chunks]:
    feeds = {"input_ids": r[None].astype(np.int64), "attention_mask": np.ones((1, len(r)), np.int64)}
    for name, v in zip(names, sess.run(names, feeds)):
        if not isinstance(v, np.ndarray) or v.dtype.kind != "f" or not v.size:
            continue
        fin = np.isfinite(v)
        bad[name] += int((~fin).sum())
        if fin.any():
            mx[name] = max(mx[name], float(np.abs(v[fin]).max()))
print(f"\n== {len(names)} node outputs on {n_chunks} chunk(s) of {ids.shape[1]} tokens")
over = [(name, mx[name]) for name in names if mx[name] > FP16_MAX]
print(f"== node outputs over 65,504 (float32 values): {len(over)}")
for name, v in over:
    print(f"  {ops[name][1]:12s} {ops[name][0]:60s} {v:12.0f}")
print("== non-finite in float32:", {k: v for k, v in bad.items() if v})
kinds = defaultdict(float)
for name in names:
    if name in mx:
        kinds[(ops[name][1], re.sub(r"layers\.\d+", "layers.N", ops[name][0]))] = max(kinds[(ops[name][1], re.sub(r"layers\.\d+", "layers.N", ops[name][0]))], mx[name])
print("== max |x| per node kind (over layers), largest 40")
for (op, nm), v in sorted(kinds.items(), key=lambda kv: -kv[1])[:40]:
    print(f"  {op:12s} {nm:60s} {v:12.5g}")
readers = defaultdict(list)
g2 = onnx.load(path, load_external_data=False).graph
if len(sys.argv) > 4 and sys.argv[4] == "rewrites":
    g2 = g
over_set = {n for n, _ in over}
for n in g2.node:
    for i in n.input:
        if i in over_set:
            readers[i].append(f"{n.op_type}:{n.name}")
print("== readers of the tensors over 65,504")
for name, _ in over:
    print(f"  {ops[name][0]} → {readers[name]}")
