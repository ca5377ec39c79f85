"""The static W8A8 accuracy path, step by step: naive → SmoothQuant (fixed α) → + Linear-pair smoothing → + auto α
→ + clipped ranges → + float fallback. Loads the model once and calibrates once (act max + a bounded row sample in
the same pass); every row runs sq_export.quant.prepare.prepare with those statistics, i.e. the code of
`sq-export eval MODEL --recipe paper [--smooth-pairs] [--alpha auto] [--clip C] [--fallback auto]`.

    python tools/accuracy_path.py                       # SmolLM2-135M, 32x512 calibration, 8192 held-out tokens
    python tools/accuracy_path.py --tiny opt,bloom      # tiny configs with injected outliers: logits RMS error

Tiny models have random weights, so perplexity means nothing there: their table reports the RMS error of the
logits vs the float model (relative to the float logits' RMS) on random token windows, and uses --fallback N
(10 % of the Linears) instead of the perplexity-driven `auto`.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path


WIDE_GRID = tuple(round(0.3 + 0.05 * i, 2) for i in range(14)) + (0.975, 1.0)  # tried 2026-11-22: worse on SmolLM2


def steps(default_alpha, clips, only=None):
    s = [
        ("FP32", dict(mode="fp")),
        ("naive W8A8 (static)", dict(mode="naive")),
        (f"SQ alpha {default_alpha}", dict(mode="sq", alpha=default_alpha)),
        ("+ smooth pairs", dict(mode="sq", alpha=default_alpha, linear_pairs=True)),
        ("+ alpha auto (grid 0.30-1.0)", dict(mode="sq", alpha="auto", linear_pairs=True, _grid=WIDE_GRID)),
        ("+ alpha auto", dict(mode="sq", alpha="auto", linear_pairs=True)),
    ]
    for c in clips:
        s.append((f"+ clip {c}", dict(mode="sq", alpha="auto", linear_pairs=True, clip=c)))
    if only:  # keep rows by index into this list (FP32 is always kept: the reference)
        s = [s[0]] + [x for i, x in enumerate(s) if i and i in only]
    return s


def run_path(base, fam, calibration, measure, clips, fallback, fallback_score=None, target=0.02, log=print, only=None,
             select_score=None):
    """select_score: the --fallback auto criterion (default: fallback_score); fallback_score also scores the
    clip rows on calibration windows to pick the clip setting the fallback row builds on."""
    from sq_export.quant import alpha as alpha_search
    from sq_export.quant.prepare import prepare
    from sq_export.quant.recipe import make_recipe

    rows = []
    cache_alpha = {}
    for name, kw in steps(fam.default_alpha, clips, only) + ([("+ fallback", None)] if fallback else []):
        if kw is None:  # fallback on top of the best clipping choice by the calibration-split score (not held-out)
            kw = dict(rows[-1]["_kw"]) if not clips else dict(min((r for r in rows if "clip" in r["_kw"] or r["step"] == "+ alpha auto"), key=lambda r: r["calib_score"])["_kw"])
            kw.pop("_grid", None)
            kw["fallback"] = fallback
            name = f"+ fallback {fallback}" + (f" (on clip {kw.get('clip') or 'max'})" if clips else "")
        m = copy.deepcopy(base)
        t = time.perf_counter()
        rkw = {k: v for k, v in kw.items() if not k.startswith("_")}
        saved = alpha_search.ALPHA_GRID
        alpha_search.ALPHA_GRID = kw.get("_grid", saved)
        try:
            r = make_recipe("paper", calib=calibration.options, target_ppl_increase=target, **rkw)
            p = prepare(m, fam, r, calibration, fallback_score=select_score or fallback_score)
        finally:
            alpha_search.ALPHA_GRID = saved
        prep_s = time.perf_counter() - t
        t = time.perf_counter()
        val = measure(m)
        cs = fallback_score(m) if fallback_score and kw.get("mode") == "sq" and "fallback" not in kw else None
        r = {"step": name, "value": val, "prepare_s": round(prep_s, 1), "measure_s": round(time.perf_counter() - t, 1),
             "fp16_layers": p.fp16_layers, "quantized": len(p.quantized), "times": {k: round(v, 1) for k, v in p.times.items()},
             "calib_score": cs, "_kw": kw}
        if p.alpha_per_group:
            vals = list(p.alpha_per_group.values())
            r["alpha_hist"] = {str(a): vals.count(a) for a in sorted(set(vals))}
            cache_alpha = p.alpha_per_group
        if "fallback" in p.tune:
            r["fallback"] = {k: v for k, v in p.tune["fallback"].items() if k != "gains"}
        if "clip_ratio" in p.tune:
            cr = p.tune["clip_ratio"]
            r["clip_ratio_median"] = sorted(cr.values())[len(cr) // 2]
        rows.append(r)
        log(json.dumps({k: v for k, v in r.items() if k != "_kw"}, default=str))
        del m
    return rows, cache_alpha


def table(rows, label, fmt, ref_pct=True):
    fp = rows[0]["value"]
    out = [f"| step | {label} | vs FP32 | float Linears | seconds (prepare + measure) |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        pct = f"{(r['value'] / fp - 1) * 100:+.2f} %" if ref_pct and r is not rows[0] else ("-" if r is rows[0] else "")
        nfl = "all" if r is rows[0] else f"{len(r['fp16_layers'])} / {len(r['fp16_layers']) + r['quantized']}"
        out.append(f"| {r['step']} | {fmt(r['value'])} | {pct} | {nfl} | {r['prepare_s']} + {r['measure_s']} |")
    return "\n".join(out)


def smollm2(a):
    import sq_export as sq
    from sq_export.api import text_ids
    from sq_export.families import family_for
    from sq_export.measure.perplexity import torch_perplexity
    from sq_export.quant import fallback

    t = time.perf_counter()
    base, tok = sq.load_model(a.model)
    fam = family_for(base)
    ids = text_ids(tok, None, "eval")
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    calibration = sq.calibrate(base, tok, samples=a.samples, seq_len=a.calib_seq_len, rows=a.rows)
    res = calibration.reservoir
    calib_s = time.perf_counter() - t
    print(f"load {load_s:.0f}s, calibration {a.samples}x{a.calib_seq_len} + row sample ({res.nbytes() / 1e6:.0f} MB) {calib_s:.0f}s", flush=True)
    wins = calibration.scoring_windows(a.fallback_windows)
    score = lambda m: fallback.windows_perplexity(m, wins)  # noqa: E731
    select = None
    if a.fallback_score == "kl":
        select = fallback.KLScore(wins, layers_path=fam.layers_path)
        select.reference(base)  # smoothing is exact in float: the base model's distributions serve every row
    measure = lambda m: torch_perplexity(m, ids, a.seq_len, a.max_tokens, desc="eval")["perplexity"]  # noqa: E731
    only = {int(x) for x in a.steps.split(",")} if a.steps else None
    rows, alphas = run_path(base, fam, calibration, measure, a.clips.split(",") if a.clips else [],
                            a.fallback, score, a.target / 100, only=only, select_score=select)
    return {"model": a.model, "load_s": load_s, "calib_s": calib_s, "rows": rows, "alpha_per_group": alphas,
            "md": table(rows, f"perplexity ({a.max_tokens} held-out tokens)", lambda v: f"{v:.3f}")}


def tiny(a, family):
    import torch

    from sq_export.quant import reservoir
    from sq_export.quant.calibrate import Calibration, calibrate
    from sq_export.quant.recipe import CalibOptions
    from sq_export.synth import make_tiny, token_batches

    base, fam = make_tiny(family)
    res = reservoir.new_reservoir(fam, a.rows)
    act_max = calibrate(base, fam, token_batches(16, 64, seed=0), reservoir=res)
    x = torch.as_tensor(token_batches(8, 64, seed=7))
    with torch.no_grad():
        ref = base(input_ids=x).logits.float()

    def measure(m):
        with torch.no_grad():
            y = m(input_ids=x).logits.float()
        return float((y - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt())

    xc = torch.as_tensor(token_batches(4, 64, seed=0))  # calibration windows: picks the clip for the fallback row
    with torch.no_grad():
        refc = base(input_ids=xc).logits.float()

    def calib_score(m):
        with torch.no_grad():
            return float((m(input_ids=xc).logits.float() - refc).pow(2).mean().sqrt())

    n = max(1, len(fam.quantized_linears()) // 10)
    # tiny configs use random ids: so does smoothing's equivalence check batch
    calibration = Calibration(act_max, res, token_batches(1, 1024, seed=3)[0], CalibOptions(None, 16, 64), check=x[:2, :32])
    rows, _ = run_path(base, fam, calibration, measure, a.clips.split(",") if a.clips else [], str(n), fallback_score=calib_score)
    rows[0]["value"] = 0.0
    return {"model": f"tiny {family}", "rows": rows,
            "md": table(rows, "logits RMS error vs float (relative)", lambda v: f"{v:.4f}", ref_pct=False)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--rows", type=int, default=512, help="row sample per Linear input")
    ap.add_argument("--clips", default="mse,p99.99", help="clipping steps to add (comma list; '' for none)")
    ap.add_argument("--fallback-candidates", type=int, help="Linears measured alone, from the role-screened order (default: 2 x the budget)")
    ap.add_argument("--fallback-windows", type=int, default=4, help="calibration-split windows scoring --fallback auto")
    ap.add_argument("--fallback-score", choices=("kl", "ppl"), default="kl",
                    help="--fallback auto criterion: mean KL to the float model (default, as the CLI) or perplexity")
    ap.add_argument("--fallback", default="auto", help="fallback row spec ('' for none)")
    ap.add_argument("--steps", help="row indices to run (0 FP32, 1 naive, 2 SQ, 3 pairs, 4 auto grid to 1.0, 5 auto, 6.. clips)")
    ap.add_argument("--target", type=float, default=2.0, help="--target-ppl-increase in percent")
    ap.add_argument("--tiny", help="comma list of tiny families (opt,bloom,...) instead of --model")
    ap.add_argument("--json")
    a = ap.parse_args()
    import torch

    torch.manual_seed(0)
    if a.fallback_candidates:
        from sq_export.quant import fallback
        fallback.FALLBACK_CANDIDATES = a.fallback_candidates
    outs = [tiny(a, f) for f in a.tiny.split(",")] if a.tiny else [smollm2(a)]
    for o in outs:
        print(f"\n### {o['model']}\n\n{o['md']}\n", flush=True)
    if a.json:
        for o in outs:
            for r in o["rows"]:
                r.pop("_kw", None)
        Path(a.json).write_text(json.dumps({"args": vars(a), "results": outs}, indent=1, default=str))


if __name__ == "__main__":
    main()
