"""Issue 17: what the down_proj damage is made of, and per-layer α of the up→down pair, by KL(float+prefix ‖ quantized)
on 4 calibration-split windows. Same calibration as alpha_kl.py (its cache).

  split    every Linear INT8 (α per kind --kinds) and, for the down_proj only: activations unquantized (W8A16) /
           weights unquantized (A8W16)
  layers   per layer L in --layers: the α of L's up→down pair on a grid (the rest as --kinds)
  objective  `--alpha auto` with the local objective as is and with each row's error relative to its float output

    PYTHONPATH=. python lab/2026-11-29/down_split.py --steps split,layers,objective
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

KINDS = {"input_layernorm": 0.85, "post_attention_layernorm": 0.85, "self_attn.v_proj": 0.85, "mlp.up_proj": 0.85}


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--steps", default="split,layers,objective")
    p.add_argument("--kinds", default=json.dumps(KINDS))
    p.add_argument("--layers", default="0,29,23,2,27,5")
    p.add_argument("--grid", default="0.6,0.7,0.75,0.8,0.85,0.9,0.95")
    p.add_argument("--cache", default="/tmp/sq_calib_prefix_auto.pt")
    p.add_argument("--json")
    a = p.parse_args(argv)
    torch.set_grad_enabled(False)
    steps = a.steps.split(",")
    kinds = json.loads(a.kinds)

    from sq_export import api
    from sq_export.families import family_for
    from sq_export.quant import alpha as alpha_mod
    from sq_export.quant import prefix as prefix_mod
    from sq_export.quant.fallback import KLScore
    from sq_export.quant.recipe import CalibOptions, make_recipe

    out = {"args": vars(a)}

    def dump():
        if a.json:
            with open(a.json, "w") as f:
                json.dump(out, f, indent=1)

    t0 = time.perf_counter()
    model, tok = api.load_model("smollm2")
    fam = family_for(model)
    calib = torch.load(a.cache, weights_only=False) if os.path.exists(a.cache) else None
    if calib is None:
        calib = api.calibrate(model, tok, samples=16, seq_len=512, rows=512, prefix_outliers="auto")
        torch.save(calib, a.cache)
    score = KLScore(calib.scoring_windows(4), layers_path=fam.layers_path)
    with prefix_mod.applied(model, calib.prefix):
        score.reference(model)
    fp = score.reference_ppl()
    groups = [g.source for g in fam.groups(include_linear_pairs=True)]
    downs = [n for n in fam.quantized_linears() if n.endswith("mlp.down_proj")]

    def amap(over=None):
        m = {g: float(next((v for k, v in kinds.items() if g.endswith("." + k)), 0.85)) for g in groups}
        m.update(over or {})
        return m

    def build(alpha):
        r = make_recipe("default", calib=CalibOptions(None, 16, 512), prefix_outliers="auto", fallback="none", alpha=alpha)
        return api.quantize(model, calib, r, copy=True)

    def kl(m, start=0):
        v = score(m, start=start) if start else score(m)
        return v, 100 * (score.last_ppl / fp - 1)

    if "split" in steps:
        q = build(amap())
        k0, p0 = kl(q.model)
        print(f"all INT8: KL {k0:.5f} ({p0:+.2f} %)", flush=True)
        res = {"all": k0}
        for n in downs:
            q.model.get_submodule(n).act = "none"
        res["down_W8A16"], pp = kl(q.model)
        print(f"down_proj weights only INT8 (activations float): KL {res['down_W8A16']:.5f} ({pp:+.2f} %)", flush=True)
        for n in downs:  # weights unrounded: the QLinear multiplies by its float weight
            m = q.model.get_submodule(n)
            m.act = "static"
            m.quantized_weight = (lambda m=m: m.w_kn)
        res["down_A8W16"], pp = kl(q.model)
        print(f"down_proj activations only INT8 (weights float): KL {res['down_A8W16']:.5f} ({pp:+.2f} %)", flush=True)
        out["split"] = res
        dump()
        del q

    if "layers" in steps:
        grid = [float(x) for x in a.grid.split(",")]
        q = build(amap())
        k0, _ = kl(q.model)
        score.commit()
        res = {}
        for L in [int(x) for x in a.layers.split(",")]:
            src = f"model.layers.{L}.mlp.up_proj"
            row = {}
            for v in grid:
                qq = build(amap({src: v}))
                row[v], _ = kl(qq.model, start=L)
                del qq
            res[L] = row
            best = min(row, key=row.get)
            print(f"layer {L:2d} up→down α: " + " ".join(f"{v}:{row[v]:.5f}" for v in grid) + f"  best {best} (gain {k0 - row[best]:.5f})", flush=True)
            out["layers"] = res
            dump()

    if "objective" in steps:
        orig = alpha_mod.group_error
        res = {}
        for obj in ("abs", "row"):
            if obj == "row":
                def group_error_row(model, group, act_max, rows, alpha, head_dim=None, per_channel=True, float_outputs=None, maxima=None):
                    from sq_export.modeling import weight_oi
                    from sq_export.quant.clip import fake_quant_tensor
                    from sq_export.quant.smooth import factors_from_maxima, group_act_max, group_maxima

                    maxima = maxima or group_maxima(model, group, act_max, head_dim)
                    s = factors_from_maxima(*maxima, alpha).float()
                    amax = float((group_act_max(group, act_max) / s).max())
                    dev = weight_oi(model.get_submodule(group.linears[0])).device
                    rows, s = rows.to(dev), s.to(dev)
                    xq = fake_quant_tensor(rows / s, amax)
                    err = 0.0
                    for w, y in float_outputs or alpha_mod.float_outputs_of(model, group, rows):
                        yq = xq @ alpha_mod._fq_weight_oi(w * s.view(1, -1), per_channel).t()
                        err += float(((yq - y).pow(2).sum(-1) / y.pow(2).sum(-1).clamp(min=1e-12)).sum())
                    return err
                alpha_mod.group_error = group_error_row
            r = make_recipe("default", calib=CalibOptions(None, 16, 512), prefix_outliers="auto", fallback="none")
            q = api.quantize(model, calib, r, copy=True)
            alpha_mod.group_error = orig
            k, pp = kl(q.model)
            apg = q.prepared.alpha_per_group
            hist = {}
            for g, v in apg.items():
                kk = g.split(".", 3)[3]
                hist.setdefault(kk, {}).setdefault(v, 0)
                hist[kk][v] += 1
            res[obj] = {"kl": k, "pct": pp, "alpha_per_group": apg, "hist": hist}
            print(f"alpha auto, objective {obj}: KL {k:.5f} ({pp:+.2f} %) {json.dumps({h: dict(sorted(c.items())) for h, c in hist.items()})}", flush=True)
            out["objective"] = res
            dump()
            del q
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
