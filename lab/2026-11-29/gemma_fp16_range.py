"""max |residual| per decoder layer and position of Gemma-3-270m (float, PyTorch) on the first 4 held-out chunks the H200 engine ran (logs3/gemma.tokens.npz copied to /tmp). 2026-11-29; output in logs3/gemma_fp16_range.log."""
import numpy as np, torch
from sq_export import api
from sq_export.families import family_for
m, tok = api.load_model("gemma3-270m", device="cpu")
fam = family_for(m)
d = np.load("/tmp/gemma.tokens.npz")
ids = d["input_ids"][:4]
layers = m.get_submodule(fam.layers_path)
rec = {}
def hook(i):
    def f(mod, args, out):
        h = out[0] if isinstance(out, tuple) else out
        rec.setdefault(i, []).append(h.detach().abs().amax(-1).float())
    return f
hs = [l.register_forward_hook(hook(i)) for i, l in enumerate(layers)]
with torch.no_grad():
    for r in ids:
        m(torch.as_tensor(r[None]))
for i in sorted(rec):
    a = torch.cat(rec[i])  # [4, 256]
    top = a.max(0)
    print(f"layer {i:2d}: max|h| per chunk {[round(float(x)) for x in a.amax(1)]}, argmax pos {a.argmax(1).tolist()}, pos0 {[round(float(x)) for x in a[:,0]]}, max over pos>=1 {[round(float(x)) for x in a[:,1:].amax(1)]}")
print("first ids", ids[:, :3].tolist())
