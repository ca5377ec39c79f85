"""Issue 17: greedy per-layer α of the up→down pairs by KL(float+prefix ‖ quantized) on the 4 calibration-split scoring
windows, on top of α per kind (--kinds); the pair's factor is re-folded in place (up's rows, down's columns and its
static scale), the layers below replayed from the committed state. Then the held-out perplexity (first 8,192 tokens).

    PYTHONPATH=. python lab/2026-11-29/pair_greedy.py --layers 0,29,23,2,27,5,25,1,22,8
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--kinds", default='{"input_layernorm": 0.75, "self_attn.v_proj": 0.8, "mlp.up_proj": 0.8}')
    p.add_argument("--layers", default="0,29,23,2,27,5,25,1,22,8")
    p.add_argument("--grid", default="0.6,0.7,0.75,0.8,0.85,0.9,0.95")
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--cache", default="/tmp/sq_calib_prefix_auto.pt")
    p.add_argument("--json")
    a = p.parse_args(argv)
    torch.set_grad_enabled(False)
    kinds = json.loads(a.kinds)

    from sq_export import api
    from sq_export.families import family_for
    from sq_export.measure.perplexity import torch_perplexity
    from sq_export.quant import prefix as prefix_mod
    from sq_export.quant.fallback import KLScore
    from sq_export.quant.qlinear import QLinear, replace_module
    from sq_export.quant.recipe import CalibOptions, make_recipe
    from sq_export.quant.smooth import factors_from_maxima, group_maxima

    t0 = time.perf_counter()
    model, tok = api.load_model("smollm2")
    fam = family_for(model)
    calib = torch.load(a.cache, weights_only=False)
    score = KLScore(calib.scoring_windows(4), layers_path=fam.layers_path)
    with prefix_mod.applied(model, calib.prefix):
        score.reference(model)
    fp = score.reference_ppl()
    gs = {g.source: g for g in fam.groups(include_linear_pairs=True)}
    amap = {s: float(next((v for k, v in kinds.items() if s.endswith("." + k)), 0.85)) for s in gs}
    r = make_recipe("default", calib=CalibOptions(None, 16, 512), prefix_outliers="auto", fallback="none", alpha=dict(amap))
    q = api.quantize(model, calib, r, copy=True)
    m = q.model
    cur = score(m)
    score.commit()
    print(f"start KL {cur:.5f} ({100 * (score.last_ppl / fp - 1):+.2f} %)", flush=True)
    out = {"args": vars(a), "start_kl": cur, "steps": []}

    def set_pair(L, alpha_old, alpha_new):
        src = f"model.layers.{L}.mlp.up_proj"
        dn = f"model.layers.{L}.mlp.down_proj"
        g = gs[src]
        mx = group_maxima(model, g, calib.act_max)  # unsmoothed model: the pair's maxima
        s_old, s_new = factors_from_maxima(*mx, alpha_old), factors_from_maxima(*mx, alpha_new)
        qu, qd = m.get_submodule(src), m.get_submodule(dn)
        up = nn.Linear(qu.in_features, qu.out_features, bias=False)
        up.weight.data = (qu.w_kn.t() * (s_old / s_new)[:, None]).contiguous()
        down = nn.Linear(qd.in_features, qd.out_features, bias=False)
        down.weight.data = (qd.w_kn.t() * (s_new / s_old)[None, :]).contiguous()
        replace_module(m, src, QLinear(up, "static", qu.act_scale))
        amax = float((calib.act_max[dn] / s_new).max())
        replace_module(m, dn, QLinear(down, "static", amax / 127.0))

    grid = [float(x) for x in a.grid.split(",")]
    for L in [int(x) for x in a.layers.split(",")]:
        src = f"model.layers.{L}.mlp.up_proj"
        base = amap[src]
        res = {}
        now = base
        for v in grid:
            if v == base:
                continue
            set_pair(L, now, v)
            now = v
            res[v] = score(m, start=L)
        best = min(res, key=res.get)
        if res[best] < cur:
            set_pair(L, now, best)
            amap[src] = best
            cur = score(m, start=L)
            score.commit()
        else:
            set_pair(L, now, base)
        out["steps"].append({"layer": L, "kl": res, "chosen": amap[src], "kl_after": cur})
        print(f"layer {L:2d}: " + " ".join(f"{v}:{k:.5f}" for v, k in res.items()) + f" -> {amap[src]} KL {cur:.5f} "
              f"({100 * (score.last_ppl / fp - 1):+.2f} %)", flush=True)
    ids = api.text_ids(tok, None, "eval")
    v = torch_perplexity(m, ids, 512, a.max_tokens, desc=None)["perplexity"]
    out["alpha"] = amap
    out["heldout_ppl"] = v
    print(f"held-out {v:.3f}; total {time.perf_counter() - t0:.0f} s", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
