"""Issue 17: α per smoothing-group kind and the down_proj input range, chosen by KL(float+prefix ‖ quantized) on
4 calibration-split windows (seed 1), never the held-out text. SmolLM2, calibration 16 × 512 after
--prefix-outliers auto, pairs, every Linear INT8.

  kinds    coordinate search over the α of each group kind (input_layernorm, post_attention_layernorm, v→o, up→down),
           all starting at 0.85
  clip     the down_proj input's static range × r for all layers (r on a grid), on the best α
  eval     held-out perplexity (first --max-tokens tokens) of given configurations (--configs JSON list)

    PYTHONPATH=. python lab/2026-11-29/alpha_kl.py --steps kinds,clip --json lab/2026-11-29/logs4/alpha_kl.json
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

KINDS = ("input_layernorm", "post_attention_layernorm", "self_attn.v_proj", "mlp.up_proj")
GRID = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--steps", default="kinds,clip")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--start", default="{}", help="JSON {kind: alpha} to start from (others 0.85)")
    p.add_argument("--configs", default="[]", help="JSON list of {kinds: {...}, down_clip: r} for 'eval'")
    p.add_argument("--cache", default="/tmp/sq_calib_prefix_auto.pt")
    p.add_argument("--json")
    a = p.parse_args(argv)
    steps = a.steps.split(",")
    torch.set_grad_enabled(False)

    from sq_export import api
    from sq_export.families import family_for
    from sq_export.measure.perplexity import torch_perplexity
    from sq_export.quant import prefix as prefix_mod
    from sq_export.quant.fallback import KLScore
    from sq_export.quant.recipe import CalibOptions, make_recipe

    out = {"args": vars(a), "evals": []}

    def dump():
        if a.json:
            with open(a.json, "w") as f:
                json.dump(out, f, indent=1)

    t0 = time.perf_counter()
    model, tok = api.load_model("smollm2")
    fam = family_for(model)
    if os.path.exists(a.cache):
        calib = torch.load(a.cache, weights_only=False)
    else:
        calib = api.calibrate(model, tok, samples=a.samples, seq_len=512, rows=512, prefix_outliers="auto")
        torch.save(calib, a.cache)
    pre = calib.prefix
    print(f"load+calibrate {time.perf_counter() - t0:.0f} s; prefix {pre.tokens}", flush=True)
    score = KLScore(calib.scoring_windows(a.windows), layers_path=fam.layers_path)
    with prefix_mod.applied(model, pre):
        score.reference(model)
    fp = score.reference_ppl()
    groups = [g.source for g in fam.groups(include_linear_pairs=True)]

    def alpha_map(kinds):
        return {g: float(next((v for k, v in kinds.items() if g.endswith("." + k)), 0.85)) for g in groups}

    def build(kinds, down_clip=1.0):
        r = make_recipe("default", calib=CalibOptions(None, a.samples, 512), prefix_outliers="auto", fallback="none",
                        alpha=alpha_map(kinds))
        q = api.quantize(model, calib, r, copy=True)
        if down_clip != 1.0:
            for n in fam.quantized_linears():
                if n.endswith("mlp.down_proj"):
                    m = q.model.get_submodule(n)
                    m.act_scale *= down_clip
        return q

    def evaluate(kinds, down_clip=1.0, tag=""):
        t = time.perf_counter()
        q = build(kinds, down_clip)
        k = score(q.model)
        row = {"kinds": dict(kinds), "down_clip": down_clip, "kl": k, "ppl": score.last_ppl,
               "pct": 100 * (score.last_ppl / fp - 1), "s": round(time.perf_counter() - t, 1), "tag": tag}
        out["evals"].append(row)
        dump()
        print(f"  {tag:<8} {json.dumps(kinds)} clip {down_clip}: KL {k:.5f} ppl {row['pct']:+.2f} % ({row['s']} s)", flush=True)
        return k

    best = {k: 0.85 for k in KINDS}
    best.update(json.loads(a.start))
    clip = 1.0
    if "kinds" in steps:
        cur = evaluate(best, tag="start")
        for kind in KINDS[::-1]:
            for v in GRID:
                if v == best[kind]:
                    continue
                trial = {**best, kind: v}
                k = evaluate(trial, tag=kind[:8])
                if k < cur:
                    cur, best = k, trial
            print(f"best after {kind}: {best} KL {cur:.5f}", flush=True)
        out["best_kinds"] = best
    if "clip" in steps:
        cur = evaluate(best, 1.0, tag="clip")
        for r in (0.9, 0.8, 0.7, 0.6, 0.5, 0.4):
            k = evaluate(best, r, tag="clip")
            if k < cur:
                cur, clip = k, r
        out["best_clip"] = clip
    if "eval" in steps:
        ids = api.text_ids(tok, None, "eval")
        for cfg in json.loads(a.configs):
            q = build(cfg.get("kinds", {}), cfg.get("down_clip", 1.0))
            t = time.perf_counter()
            v = torch_perplexity(q.model, ids, 512, a.max_tokens, desc=None)["perplexity"]
            out.setdefault("heldout", []).append({**cfg, "ppl": v})
            dump()
            print(f"held-out {json.dumps(cfg)}: {v:.3f} ({time.perf_counter() - t:.0f} s)", flush=True)
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
