"""first-order vs measured --fallback auto ranking on SmolLM2 (16 x 512 calibration, held-out 4096 tokens):
    PYTHONPATH=. python lab/2026-11-29/fallback_ranking.py first-order,measured 4096   (writes lab/2026-11-29/logs/fallback_ranking.json)
"""
import time, sys, json, dataclasses
import sq_export as sq
from sq_export.quant import fallback
from sq_export.quant.recipe import Recipe
t0 = time.perf_counter()
model, tok = sq.load_model("smollm2")
calib = sq.calibrate(model, tok, samples=16, seq_len=512)
from sq_export.families import family_for
fam = family_for(model)
from sq_export.quant.alpha import search_alpha
t = time.perf_counter()
ag = search_alpha(model, fam, calib.act_max, calib.reservoir, True)
print("alpha search s", round(time.perf_counter() - t, 1), flush=True)
MAXT = int(sys.argv[2]) if len(sys.argv) > 2 else 4096
out = {}
fp = sq.perplexity(model, tok, max_tokens=MAXT)["perplexity"]
print("fp", fp, flush=True)
for ranking in sys.argv[1].split(","):
    fallback.FALLBACK_RANKING = ranking
    r = dataclasses.replace(Recipe(), alpha=ag)
    t = time.perf_counter()
    qm = sq.quantize(model, calib, r, copy=True)
    dt = time.perf_counter() - t
    fb = qm.prepared.tune["fallback"]
    p = sq.perplexity(qm, tok, max_tokens=MAXT)["perplexity"]
    out[ranking] = {"s": round(dt, 1), "times": {k: round(v, 1) for k, v in qm.prepared.times.items()}, "fp16": qm.fp16_layers,
                    "tried": fb.get("tried"), "final_ppl_windows": fb.get("final_ppl"), "fp_ppl_windows": fb.get("fp_ppl"),
                    "quant_ppl_windows": fb.get("quant_ppl"), "heldout_ppl": p, "heldout_fp": fp, "pct": 100 * (p / fp - 1)}
    print(json.dumps({ranking: out[ranking]}), flush=True)
    del qm
json.dump(out, open("lab/2026-11-29/logs/fallback_ranking.json", "w"), indent=1)
