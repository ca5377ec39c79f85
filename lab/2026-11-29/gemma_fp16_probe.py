"""Gemma-3-270m in PyTorch, float32 and float16 (CPU), on the first 2 held-out chunks of the H200 run
(logs3's gemma.tokens.npz, copied to /tmp): max |x| per module (kind, over layers) and the first module whose
float16 output is non-finite; attention scores, mask and softmax from a wrapped eager_attention_forward.
`gemma_fp16_probe.py TOKENS.npz patched`: the same with the family's export patches applied (the residual stream
divided by 4, the GELU's cube on clipped x: families/gemma3.py), and the float16 logits against float32 ones.
2026-11-29 (issue 16); output in logs4/gemma/gemma_fp16_probe{,_patched}.log."""
import contextlib
import re
import sys
from collections import defaultdict

import numpy as np
import torch
import transformers.models.gemma3.modeling_gemma3 as g3

from sq_export import api
from sq_export.families import family_for

FP16_MAX = 65504.0
m, tok = api.load_model("gemma3-270m", device="cpu")
ids = np.load(sys.argv[1] if len(sys.argv) > 1 else "/tmp/gemma.tokens.npz")["input_ids"][:2]
patched = len(sys.argv) > 2 and sys.argv[2] == "patched"
fam = family_for(m)
print("export patches applied:", [p.__name__ for p in fam.export_patches] if patched else [])
print("config: hidden", m.config.hidden_size, "layers", m.config.num_hidden_layers, "sliding_window", m.config.sliding_window,
      "query_pre_attn_scalar", m.config.query_pre_attn_scalar, "final_logit_softcapping", m.config.final_logit_softcapping,
      "attn_logit_softcapping", m.config.attn_logit_softcapping, "act", m.config.hidden_activation)

rec = {}          # module name → max |out| (finite part) and non-finite count
order = []        # first non-finite, in call order


def kind(name):
    return re.sub(r"layers\.\d+", "layers.N", name)


def amax(t):
    f = t.detach().float()
    fin = torch.isfinite(f)
    return (float(f[fin].abs().max()) if fin.any() else float("nan")), int((~fin).sum())


def hook(name):
    def f(mod, args, out):
        h = out[0] if isinstance(out, tuple) else out
        if not torch.is_tensor(h) or not h.is_floating_point():
            return
        mx, bad = amax(h)
        a, b = rec.get(name, (0.0, 0))
        rec[name] = (max(a, mx) if mx == mx else a, b + bad)
        if bad and not any(o[0] == name for o in order):
            order.append((name, bad, h.numel()))
    return f


orig = g3.eager_attention_forward


def wrapped(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None, **kw):
    name = f"layers.{module.layer_idx}.attn"
    kv = g3.repeat_kv(key, module.num_key_value_groups)
    s = torch.matmul(query, kv.transpose(2, 3)) * scaling
    for tag, t in (("q", query), ("k", key), ("v", value), ("scores", s)):
        mx, bad = amax(t)
        a, b = rec.get(f"{name}.{tag}", (0.0, 0))
        rec[f"{name}.{tag}"] = (max(a, mx) if mx == mx else a, b + bad)
    if attention_mask is not None:
        am = attention_mask.float()
        rec.setdefault(f"{name}.mask_min", (float(am.min()), 0))
        full = int(((am <= torch.finfo(attention_mask.dtype).min / 2).all(-1)).sum())
        rec[f"{name}.mask_fully_masked_rows"] = (full, 0)
    out, w = orig(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, softcap=softcap, **kw)
    mx, bad = amax(w)
    rec[f"{name}.softmax"] = (mx, rec.get(f"{name}.softmax", (0, 0))[1] + bad)
    return out, w


g3.eager_attention_forward = wrapped
for n, mod in m.named_modules():
    if n:
        mod.register_forward_hook(hook(n))


def run(dtype):
    rec.clear(); order.clear()
    mm = m.to(dtype)
    with torch.no_grad(), contextlib.ExitStack() as stack:
        if patched:
            for p in fam.export_patches:
                stack.enter_context(p(mm))
        for r in ids:
            logits = mm(torch.as_tensor(r[None])).logits
    print(f"\n=== {dtype}: last chunk logits non-finite {int((~torch.isfinite(logits)).sum())} of {logits.numel()}")
    by = defaultdict(lambda: [0.0, 0, ""])
    for n, (mx, bad) in rec.items():
        k = kind(n)
        if mx > by[k][0]:
            by[k][0], by[k][2] = mx, n
        by[k][1] += bad
    print(f"{'module kind':62s} {'max|x|':>12s} {'non-finite':>11s}  where")
    for k, (mx, bad, where) in by.items():
        flag = "  > FP16 max" if abs(mx) > FP16_MAX else ""
        print(f"{k:62s} {mx:12.5g} {bad:11d}  {where}{flag}")
    print("first non-finite modules (call order):", order[:12])
    over = sorted(((mx, n) for n, (mx, _) in rec.items() if abs(mx) > FP16_MAX and "mask" not in n), reverse=True)
    print("modules over 65,504:", [(n, round(mx)) for mx, n in over[:40]])
    return logits.float()


l32 = run(torch.float32)
l16 = run(torch.float16)
fin = torch.isfinite(l16).all(-1)[0]
print(f"\nlast chunk: positions with finite float16 logits {int(fin.sum())} of {fin.numel()}")
if fin.any():
    d = (l16 - l32)[0][fin].abs()
    agree = (l16[0][fin].argmax(-1) == l32[0][fin].argmax(-1)).float().mean()
    print(f"float16 vs float32 logits: max |diff| {float(d.max()):.4g}, mean |diff| {float(d.mean()):.4g}, "
          f"top-1 agreement {float(agree):.4f}")
