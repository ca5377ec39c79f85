"""Issue 17 (2026-11-29 20:1x UTC): how far ONNX Runtime's float Q/DQ path (graph optimizations off) and PyTorch's fake
quantization drift apart on one 512-token held-out chunk of SmolLM2 after the outlier prefix: the logits and the
down_proj inputs of a few layers (every Linear INT8, up->down alpha UP, 0.85 elsewhere).

    PYTHONPATH=. python lab/2026-11-29/export_decided.py 'kinds:{"mlp.up_proj": 0.8}' /tmp/up08.onnx --no-ppl
    PYTHONPATH=. python lab/2026-11-29/ort_vs_torch_probe.py /tmp/up08.onnx 0.8     # logs4/ort_vs_torch_up08.log
    PYTHONPATH=. python lab/2026-11-29/ort_vs_torch_probe.py /tmp/a085.onnx 0.85    # logs4/ort_vs_torch_a085.log
"""
import re
import sys

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper
from sq_export import api
from sq_export.families import family_for
from sq_export.quant.recipe import CalibOptions, make_recipe
from sq_export.textdata import token_ids
path = sys.argv[1]; up = float(sys.argv[2])
model, tok = api.load_model("smollm2")
kinds = {"mlp.up_proj": up} if up != 0.85 else {}
alpha = {g.source: float(next((v for k, v in kinds.items() if g.source.endswith("." + k)), 0.85)) for g in family_for(model).groups(include_linear_pairs=True)}
r = make_recipe("default", calib=CalibOptions(None, 16, 512), fallback="none", alpha=alpha, prefix_outliers="auto")
calib = api.calibrate(model, tok, recipe=r)
qm = api.quantize(model, calib, r)
ids = np.array(token_ids(tok, None, "eval"))[:512]
got = {}
def hook(name):
    def f(mod, args):
        got[name] = args[0].detach().float().numpy().copy()
    return f
layers = [0, 1, 2, 9, 10, 29]
hs = [qm.model.get_submodule(f"model.layers.{i}.mlp.down_proj").register_forward_pre_hook(hook(i)) for i in layers]
with torch.no_grad():
    lt = qm.model(input_ids=torch.as_tensor(ids)[None], attention_mask=torch.ones(1, 512, dtype=torch.long)).logits[0].numpy()
for h in hs: h.remove()
m = onnx.load(path)
outs = {}
for n in m.graph.node:
    mm = re.search(r"layers\.(\d+)/mlp/down_proj/", n.name)
    if mm and n.op_type == "QuantizeLinear" and int(mm.group(1)) in layers and int(mm.group(1)) not in outs:
        outs[int(mm.group(1))] = n.input[0]
for o in outs.values(): m.graph.output.append(helper.make_empty_tensor_value_info(o))
so = ort.SessionOptions(); so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL; so.log_severity_level = 3
s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
res = s.run(["logits"] + list(outs.values()), {"input_ids": ids[None].astype(np.int64), "attention_mask": np.ones((1, 512), np.int64)})
print("logits max|d|", float(np.abs(res[0][0] - lt).max()), "scale", float(np.abs(lt).max()))
for (i, name), v in zip(outs.items(), res[1:]):
    p = got[i][0]; o = v[0]
    print(f"layer {i} down_proj input: shape pt {p.shape} ort {o.shape}; max|pt| {np.abs(p).max():.3f} max|ort| {np.abs(o).max():.3f} max|d| {np.abs(p-o).max():.4g}")
