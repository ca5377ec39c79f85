"""Issue 17 diagnosis: where the last +2 % of every-Linear-INT8 SmolLM2 after the outlier prefix comes from.

One load, one calibration (16 × 512, --prefix-outliers auto, 512-row sample); the reference is the float model
after the prefix. Steps (comma list, --steps):

  outliers  per Linear input, on the 4 scoring windows after the prefix (float model): max over tokens of the
            token's max|x|, its position and id, the median token's max|x|; and the calibrated max vs the
            row sample's max and 99.99th percentile (do the α search's rows see what the static scale sees?)
  roles     pairs + α A (fixed; --alpha): KL(float+prefix ‖ quantized) on 4 calibration-split windows (seed 1);
            each role alone INT8 (the rest float) and each role alone float (the rest INT8); first-order
            gains per Linear, summed by role and by layer; measured gain of each layer in float
  alpha     the α search's choice (histogram) and its KL vs the fixed α
  heldout   held-out perplexity (first --max-tokens tokens) of the fixed-α model

    PYTHONPATH=. python lab/2026-11-29/prefix_diag.py --steps outliers,roles --json lab/2026-11-29/logs4/diag.json
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections import Counter, defaultdict

import torch
from torch import nn


class FloatOf(nn.Module):
    """The float Linear a QLinear was made from (its smoothed weight, its bias)."""

    def __init__(self, q):
        super().__init__()
        self.q = q

    def forward(self, x):
        y = torch.matmul(x, self.q.w_kn)
        return y if self.q.bias is None else y + self.q.bias


def role(n):
    return re.sub(r"model\.layers\.\d+\.", "", n)


def layer(n):
    return int(n.split(".")[2])


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--steps", default="outliers,roles,alpha")
    p.add_argument("--alpha", type=float, default=0.85)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--per-layer", action="store_true", help="also measure each layer's Linears in float")
    p.add_argument("--json")
    a = p.parse_args(argv)
    steps = a.steps.split(",")
    torch.set_grad_enabled(False)

    from sq_export import api
    from sq_export.families import family_for
    from sq_export.measure.perplexity import torch_perplexity
    from sq_export.quant import prefix as prefix_mod
    from sq_export.quant.fallback import KLScore
    from sq_export.quant.qlinear import replace_module
    from sq_export.quant.recipe import CalibOptions, make_recipe
    from sq_export.quant.reservoir import rows_for

    out = {"args": vars(a)}

    def dump():
        if a.json:
            with open(a.json, "w") as f:
                json.dump(out, f, indent=1)

    t0 = time.perf_counter()
    model, tok = api.load_model("smollm2")
    fam = family_for(model)
    names = fam.quantized_linears()
    calib = api.calibrate(model, tok, samples=a.samples, seq_len=512, rows=512, prefix_outliers="auto")
    pre = calib.prefix
    print(f"load+calibrate {time.perf_counter() - t0:.0f} s; prefix {pre.tokens} {pre.text!r}", flush=True)
    wins = calib.scoring_windows(a.windows)

    if "outliers" in steps:
        rec = defaultdict(list)
        hooks = [model.get_submodule(n).register_forward_pre_hook(
            lambda m, inp, n=n: rec[n].append(inp[0][0].abs().amax(-1).float())) for n in names]
        with prefix_mod.applied(model, pre):
            for w in wins:
                x = torch.as_tensor(w)[None]
                model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False)
        for h in hooks:
            h.remove()
        rows = {}
        for n in names:
            tm = torch.stack(rec[n])  # [windows, T]
            flat = tm.reshape(-1)
            i = int(flat.argmax())
            wi, pos = divmod(i, tm.shape[1])
            r = rows_for(calib.reservoir, fam, n)
            ra = r.abs()
            cal = float(calib.act_max[n].max())
            rows[n] = {"max_token": float(flat.max()), "pos": pos, "id": int(wins[wi][pos]),
                       "median_token": float(flat.median()), "ratio": float(flat.max() / flat.median()),
                       "pos0_ratio": float(tm[:, 0].max() / flat.median()),
                       "calib_max": cal, "rows_max": float(ra.max()),
                       "rows_p9999": float(torch.quantile(ra.reshape(-1)[::7], 0.9999)),
                       "rows_token_max_max": float(ra.amax(-1).max()), "rows_token_max_median": float(ra.amax(-1).median())}
        out["outliers"] = rows
        print("\n== token outliers after the prefix (scoring windows, float model); calibrated max vs row sample")
        print(f"{'linear':<36} {'maxtok':>8} {'pos':>4} {'id':>6} {'median':>7} {'ratio':>6} {'pos0':>5} | "
              f"{'calmax':>8} {'rowsmax':>8} {'p99.99':>7}")
        for n in names:
            if fam.groups and n.endswith(("k_proj", "v_proj", "up_proj")):
                continue  # same input as q_proj / gate_proj
            r = rows[n]
            print(f"{n[13:]:<36} {r['max_token']:8.2f} {r['pos']:4d} {r['id']:6d} {r['median_token']:7.2f} {r['ratio']:6.1f} "
                  f"{r['pos0_ratio']:5.1f} | {r['calib_max']:8.2f} {r['rows_max']:8.2f} {r['rows_p9999']:7.2f}")
        dump()

    if not ({"roles", "alpha", "heldout"} & set(steps)):
        return
    score = KLScore(wins, layers_path=fam.layers_path)
    with prefix_mod.applied(model, pre):
        score.reference(model)
    fp_ppl = score.reference_ppl()
    out["windows_fp_ppl"] = fp_ppl

    def prep(alpha):
        r = make_recipe("default", calib=CalibOptions(None, a.samples, 512), prefix_outliers="auto", fallback="none", alpha=alpha)
        t = time.perf_counter()
        q = api.quantize(model, calib, r, copy=True)
        return q, time.perf_counter() - t

    def kl(m, start=0):
        v = score(m, start=start) if start else score(m)
        return v, score.last_ppl

    if "roles" in steps:
        q, s = prep(a.alpha)
        m = q.model
        k0, p0 = kl(m)
        score.commit()
        print(f"\n== pairs + alpha {a.alpha}, every Linear INT8: KL {k0:.5f}, windows ppl {p0:.3f} (float+prefix {fp_ppl:.3f}, "
              f"{100 * (p0 / fp_ppl - 1):+.2f} %); prepare {s:.0f} s", flush=True)
        qm = {n: m.get_submodule(n) for n in names}
        fl = {n: FloatOf(qm[n]) for n in names}
        out["roles"] = {"kl_all_int8": k0, "ppl_all_int8": p0}
        by_role = defaultdict(list)
        for n in names:
            by_role[role(n)].append(n)
        # first-order gains
        t = time.perf_counter()
        est = score.first_order_gains(m, fl)
        print(f"first-order gains {time.perf_counter() - t:.0f} s", flush=True)
        out["first_order"] = est
        rg = {r: sum(est[n] for n in ns) for r, ns in by_role.items()}
        lg = defaultdict(float)
        for n in names:
            lg[layer(n)] += est[n]
        print("first-order KL gain by role: " + ", ".join(f"{r} {v:.5f}" for r, v in sorted(rg.items(), key=lambda x: -x[1])))
        print("by layer: " + ", ".join(f"{i}:{v:.5f}" for i, v in sorted(lg.items())))
        top = sorted(names, key=lambda n: -est[n])[:20]
        print("top 20 Linears: " + ", ".join(f"{n[13:]} {est[n]:.5f}" for n in top), flush=True)
        # measured: role alone float / role alone INT8
        res = {}
        for r, ns in by_role.items():
            for n in ns:
                replace_module(m, n, fl[n])
            k_f, p_f = kl(m)
            for n in names:
                replace_module(m, n, fl[n] if n not in ns else qm[n])
            k_q, p_q = kl(m)
            for n in names:
                replace_module(m, n, qm[n])
            res[r] = {"kl_role_float": k_f, "ppl_role_float": p_f, "gain": k0 - k_f, "kl_role_only_int8": k_q, "ppl_role_only_int8": p_q}
            print(f"  {r:<26} float: KL {k_f:.5f} (gain {k0 - k_f:.5f}) ppl {100 * (p_f / fp_ppl - 1):+.2f} % | only it INT8: "
                  f"KL {k_q:.5f} ppl {100 * (p_q / fp_ppl - 1):+.2f} %", flush=True)
            out["roles"]["measured"] = res
            dump()
        if a.per_layer:
            score(m)
            score.commit()
            lay = {}
            for i in range(fam.num_layers()):
                ns = [n for n in names if layer(n) == i]
                for n in ns:
                    replace_module(m, n, fl[n])
                k_f, p_f = kl(m, start=i)
                for n in ns:
                    replace_module(m, n, qm[n])
                lay[i] = {"kl": k_f, "gain": k0 - k_f, "ppl": p_f}
                print(f"  layer {i:2d} float: gain {k0 - k_f:.5f}  ppl {100 * (p_f / fp_ppl - 1):+.2f} %", flush=True)
            out["roles"]["layers"] = lay
            dump()
        del q, m, qm, fl

    if "alpha" in steps:
        r = make_recipe("default", calib=CalibOptions(None, a.samples, 512), prefix_outliers="auto", fallback="none")
        t = time.perf_counter()
        q = api.quantize(model, calib, r, copy=True)
        s = time.perf_counter() - t
        apg = q.prepared.alpha_per_group
        k, pp = kl(q.model)
        hist = defaultdict(Counter)
        for g, v in apg.items():
            hist[re.sub(r"model\.layers\.\d+\.", "", g)][v] += 1
        out["alpha_auto"] = {"kl": k, "ppl": pp, "alpha_per_group": apg, "seconds": s}
        print(f"\n== alpha auto: KL {k:.5f} ppl {100 * (pp / fp_ppl - 1):+.2f} % ({s:.0f} s)")
        for g, c in hist.items():
            print(f"  {g:<34} " + " ".join(f"{v}:{c[v]}" for v in sorted(c)))
        dump()
        del q

    if "heldout" in steps:
        ids = api.text_ids(tok, None, "eval")
        q, _ = prep(a.alpha)
        t = time.perf_counter()
        v = torch_perplexity(q.model, ids, 512, a.max_tokens, desc=None)["perplexity"]
        out["heldout"] = {"alpha": a.alpha, "ppl": v}
        print(f"held-out ppl alpha {a.alpha}: {v:.3f} ({time.perf_counter() - t:.0f} s)")
        dump()
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
