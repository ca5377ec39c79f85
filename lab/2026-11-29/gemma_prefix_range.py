"""the same with an outlier prefix (auto, and BOS + space (+ period)): does the prefix take the massive activations?. 2026-11-29; output in logs3/gemma_prefix_range.log."""
import numpy as np, torch
from sq_export import api
from sq_export.families import family_for
from sq_export.quant import prefix as px
from sq_export.quant.recipe import parse_prefix
m, tok = api.load_model("gemma3-270m", device="cpu")
fam = family_for(m)
d = np.load("/tmp/gemma.tokens.npz"); ids = d["input_ids"][:4]
layers = m.get_submodule(fam.layers_path)
def run(prefix, label):
    rec = {}
    def hook(i):
        def f(mod, args, out):
            h = out[0] if isinstance(out, tuple) else out
            rec.setdefault(i, []).append(h.detach().abs().amax(-1).float()[0, -ids.shape[1]:])
        return f
    hs = [l.register_forward_hook(hook(i)) for i, l in enumerate(layers)]
    with torch.no_grad(), px.applied(m, prefix):
        for r in ids:
            m(torch.as_tensor(r[None]))
    for h in hs: h.remove()
    a = torch.stack([torch.stack(rec[i]) for i in sorted(rec)])  # layers, chunks, positions
    mx = a.amax(0)  # chunks, positions
    print(label, "max|h| over layers and positions per chunk:", [round(float(x)) for x in mx.amax(1)],
          "positions over 65504:", int((mx > 65504).sum()), "argmax", mx.argmax(1).tolist(), flush=True)
calib = api.text_ids(tok, None, "calib")
print("calib windows", np.asarray(calib).shape, flush=True)
c = np.asarray(calib); w = c[: 16 * 512].reshape(16, 512)
toks, info = px.choose_tokens(m, fam, w, parse_prefix("auto"), tok)
print("auto prefix", toks, repr(tok.decode(toks)), info.get("frequent_outlier_ids"), flush=True)
run(px.compute_prefix(m, toks, tok), f"prefix auto {toks}")
for t in ([2, 236743], [2, 236743, 236761]):
    run(px.compute_prefix(m, t, tok), f"prefix {t}")
