"""Issue 17, the PyTorch accuracy experiment: static W8A8 with and without an outlier prefix (PrefixQuant).

For each prefix setting (none, auto, or explicit ids) the model is calibrated once (per-channel max|x| and a row
sample, with every window running after the prefix's float KV cache); the float model is measured with that
prefix, and each recipe (naive W8A8, the paper's SmoothQuant, pairs + auto α with every Linear INT8) is prepared
on a copy and measured. Perplexity: the project's chunking (sq_export.measure.perplexity: chunks of --seq-len from
the start of the held-out split, the first --max-tokens tokens), each chunk after the prefix, prefix positions not
scored. Every row: perplexity, Δ vs the plain float model, Δ vs the float model with the same prefix, float
Linears, seconds (prepare + measure).

    python tools/prefix_experiment.py --samples 16 --max-tokens 8192 --json prefix.json
    python tools/prefix_experiment.py --prefixes none,auto,ids:1 --recipes default
"""

from __future__ import annotations

import argparse
import json
import time


RECIPES = {
    "naive": ("naive W8A8", dict(name="naive")),
    "paper": ("SmoothQuant (paper: norm folds, alpha 0.85)", dict(name="paper")),
    "default": ("pairs + auto alpha, every Linear INT8", dict(name="default", fallback="none")),
    "clip-mse": ("pairs + auto alpha + clip mse, every Linear INT8", dict(name="default", fallback="none", clip="mse")),
    "clip-p99.99": ("pairs + auto alpha + clip p99.99, every Linear INT8", dict(name="default", fallback="none", clip="p99.99")),
    "pairs-0.85": ("pairs + alpha 0.85, every Linear INT8", dict(name="default", fallback="none", alpha=0.85)),
    "fallback": ("pairs + auto alpha + fallback auto", dict(name="default", fallback="auto")),
    "down-fp": ("pairs + auto alpha, every down_proj in float", dict(name="default", fallback="@mlp.down_proj", max_fallback="100%")),
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--prefixes", default="none,auto", help="comma list of --prefix-outliers settings (ids lists: ids:1+198)")
    p.add_argument("--recipes", default="naive,paper,default")
    p.add_argument("--rotate", action="store_true", help="rotate the residual stream first (sq_export.quant.rotate: "
                   "RMSNorm γ folded, random Hadamard; float-exact), then calibrate and quantize the rotated model")
    p.add_argument("--prefixed-fp-ppl", type=float, help="the float model's perplexity with the (first) prefix, measured before: skip that row")
    p.add_argument("--fp-ppl", type=float, help="the plain float model's perplexity on the same tokens, measured before: skip that row")
    p.add_argument("--json", help="write the table there")
    a = p.parse_args(argv)

    import torch

    from sq_export import api
    from sq_export.families import family_for
    from sq_export.measure.perplexity import torch_perplexity
    from sq_export.quant import prefix as prefix_mod
    from sq_export.quant.recipe import CalibOptions, make_recipe

    t0 = time.perf_counter()
    model, tok = api.load_model(a.model)
    fam = family_for(model)
    load_s = time.perf_counter() - t0
    ids = api.text_ids(tok, None, "eval")
    n_lin = len(fam.quantized_linears())
    rows = []

    def ppl(m):
        t = time.perf_counter()
        r = torch_perplexity(m, ids, a.seq_len, a.max_tokens, desc=None)
        return r["perplexity"], r["tokens"], time.perf_counter() - t

    def emit(row):
        rows.append(row)
        fp = rows[0]["perplexity"]
        d = 100 * (row["perplexity"] / fp - 1)
        dp = "" if row.get("vs_prefixed_float_pct") is None else f" ({row['vs_prefixed_float_pct']:+.2f} % vs float with this prefix)"
        print(f"{row['prefix']:<14} {row['row']:<48} {row['perplexity']:9.3f} {d:+7.2f} %{dp}  float Linears {row['float_linears']}/{n_lin}  "
              f"{row['prepare_s']:.1f} + {row['measure_s']:.1f} s", flush=True)
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"args": vars(a), "load_s": round(load_s, 1), "linears": n_lin, "rows": rows}, f, indent=1)

    if a.fp_ppl:
        v, n, s = a.fp_ppl, None, 0.0
    else:
        with torch.no_grad():
            v, n, s = ppl(model)
    emit({"prefix": "none", "row": "FP32" + (" (given)" if a.fp_ppl else ""), "perplexity": v, "tokens": n, "float_linears": n_lin,
          "prepare_s": 0.0, "measure_s": round(s, 1), "vs_prefixed_float_pct": None})
    if a.rotate:
        from sq_export.quant.rotate import rotate_model
        from sq_export.textdata import calibration_samples

        t = time.perf_counter()
        check = torch.as_tensor(calibration_samples(api.text_ids(tok, None, "calib"), 2, 128))
        info = rotate_model(model, fam, seed=0, check_batch=check)
        print(f"rotated: {info} in {time.perf_counter() - t:.1f} s", flush=True)
    for spec in a.prefixes.split(","):
        spec = spec.replace("+", ",")
        t = time.perf_counter()
        calib = api.calibrate(model, tok, samples=a.samples, seq_len=a.calib_seq_len, rows=512,
                              prefix_outliers=None if spec == "none" else spec)
        calib_s = time.perf_counter() - t
        pre = calib.prefix
        label = ("none" if pre is None else spec) + (" +rot" if a.rotate else "")
        fp_pre = None
        if pre is not None:
            print(f"prefix {spec}: tokens {pre.tokens} {pre.text!r} ({pre.info}); calibration {calib_s:.1f} s", flush=True)
            if a.prefixed_fp_ppl:
                v, n, s = a.prefixed_fp_ppl, None, 0.0
            else:
                with prefix_mod.applied(model, pre):
                    v, n, s = ppl(model)
            fp_pre = v
            emit({"prefix": label, "row": "FP32 with the prefix", "perplexity": v, "tokens": n, "float_linears": n_lin,
                  "prepare_s": 0.0, "measure_s": round(s, 1), "vs_prefixed_float_pct": 0.0, "prefix_tokens": pre.tokens,
                  "prefix_text": pre.text, "prefix_info": pre.info, "calibrate_s": round(calib_s, 1)})
        else:
            print(f"no prefix: calibration {calib_s:.1f} s", flush=True)
        for key in a.recipes.split(","):
            if key.startswith("pairs-") and key not in RECIPES:  # pairs-A: pair smoothing with a fixed alpha A
                RECIPES[key] = (f"pairs + alpha {key[6:]}, every Linear INT8", dict(name="default", fallback="none", alpha=float(key[6:])))
            title, kw = RECIPES[key]
            kw = dict(kw)
            if str(kw.get("fallback", "")).startswith("@"):  # every Linear of that role
                kw["fallback"] = ",".join(n for n in fam.quantized_linears() if n.endswith("." + kw["fallback"][1:]))
            r = make_recipe(kw.pop("name"), calib=CalibOptions(None, a.samples, a.calib_seq_len), prefix_outliers=None if pre is None else spec, **kw)
            t = time.perf_counter()
            qm = api.quantize(model, calib, r, copy=True)
            prep_s = time.perf_counter() - t
            v, n, s = ppl(qm.model)
            emit({"prefix": label, "row": title, "perplexity": v, "tokens": n, "float_linears": len(qm.fp16_layers),
                  "prepare_s": round(prep_s, 1), "measure_s": round(s, 1),
                  "vs_prefixed_float_pct": None if fp_pre is None else 100 * (v / fp_pre - 1),
                  "alpha": qm.prepared.alpha, "recipe": r.describe()})
            del qm
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
