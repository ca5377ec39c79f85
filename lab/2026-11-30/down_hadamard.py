"""Issue 17: does a block Hadamard rotation of the down_proj input remove what is left of the token outliers under
one static per-tensor scale? (An online transform: x → x·R before the down_proj's QuantizeLinear, R block-diagonal
Hadamard, its inverse folded into the weight, W' = Rᵀ·W, exact in float.) SmolLM2-135M, calibration 16 × 512 after
--prefix-outliers auto, pairs, every Linear INT8, α 0.85 with up→down 0.8 (`--alpha kl`'s choice); KL(float+prefix
‖ quantized) on the fallback's 4 calibration-split windows, then held-out perplexity (first --max-tokens tokens) of
the baseline and the best block size. PyTorch fake quantization; static scales of the rotated inputs calibrated on
the smoothed float model (after the prefix), as every other scale.

    PYTHONPATH=. python lab/2026-11-30/down_hadamard.py --blocks 64,128,256,512 --json lab/2026-11-30/logs/down_hadamard.json
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch


def hadamard(n: int) -> torch.Tensor:
    """Sylvester Hadamard of order n (a power of two), scaled orthonormal."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / h.shape[0] ** 0.5


def block_rotation(k: int, b: int) -> torch.Tensor:
    return torch.block_diag(*[hadamard(b)] * (k // b))


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--blocks", default="64,128,256,512")
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--samples", type=int, default=16, help="calibration windows of 512 tokens")
    p.add_argument("--heldout", default="best", help="block sizes whose held-out perplexity to measure: 'best' (by KL) or a list")
    p.add_argument("--cache", default="/tmp/sq_calib_prefix_auto.pt")
    p.add_argument("--json")
    a = p.parse_args(argv)
    torch.set_grad_enabled(False)

    from sq_export import api
    from sq_export.families import family_for
    from sq_export.measure.perplexity import torch_perplexity
    from sq_export.quant import prefix as prefix_mod
    from sq_export.quant.fallback import KLScore
    from sq_export.quant.qlinear import weight_scale
    from sq_export.quant.recipe import CalibOptions, make_recipe
    from sq_export.textdata import calibration_samples

    out = {"args": vars(a), "rows": {}}

    def dump():
        if a.json:
            os.makedirs(os.path.dirname(a.json), exist_ok=True)
            with open(a.json, "w") as f:
                json.dump(out, f, indent=1)

    t0 = time.perf_counter()
    model, tok = api.load_model("smollm2")
    fam = family_for(model)
    calib = torch.load(a.cache, weights_only=False) if os.path.exists(a.cache) else None
    if calib is None:
        calib = api.calibrate(model, tok, samples=a.samples, seq_len=512, rows=512, prefix_outliers="auto")
        torch.save(calib, a.cache)
    print(f"calibrated {time.perf_counter() - t0:.0f} s; prefix {calib.prefix.tokens}", flush=True)
    score = KLScore(calib.scoring_windows(4), layers_path=fam.layers_path)
    with prefix_mod.applied(model, calib.prefix):
        score.reference(model)
    fp = score.reference_ppl()
    groups = [g.source for g in fam.groups(include_linear_pairs=True)]
    alpha = {g: (0.8 if g.endswith(".mlp.up_proj") else 0.85) for g in groups}
    r = make_recipe("default", calib=CalibOptions(None, a.samples, 512), prefix_outliers="auto", fallback="none", alpha=alpha)
    q = api.quantize(model, calib, r, copy=True)
    m = q.model
    downs = [n for n in fam.quantized_linears() if n.endswith("mlp.down_proj")]
    qls = {n: m.get_submodule(n) for n in downs}
    orig = {n: (ql.w_kn.data.clone(), ql.w_scale.clone(), ql.act_scale) for n, ql in qls.items()}
    windows = calibration_samples(calib._ids(), a.samples, 512)  # the calibration windows

    def kl():
        v = score(m)
        return v, 100 * (score.last_ppl / fp - 1)

    # the smoothed float model's down_proj inputs (every QLinear computing in float), after the prefix
    def float_inputs(fn):
        saved = {}
        for name, mod in m.named_modules():
            if type(mod).__name__ == "QLinear":
                saved[name] = (mod.act, mod.quantized_weight)
                mod.act = "none"
                mod.quantized_weight = (lambda mod=mod: mod.w_kn)
        hooks = [qls[n].register_forward_pre_hook(lambda mod, args, n=n: fn(n, args[0])) for n in downs]
        try:
            assert prefix_mod.installed(m) is not None  # the smoothed model's prefix cache (prepare installs it)
            for i in range(0, len(windows), 4):
                x = torch.as_tensor(windows[i:i + 4])
                m(input_ids=x, attention_mask=torch.ones_like(x))
        finally:
            for h in hooks:
                h.remove()
            for name, (act, qw) in saved.items():
                mod = m.get_submodule(name)
                mod.act = act
                del mod.quantized_weight  # back to the class method
    k0, p0 = kl()
    print(f"baseline (every Linear INT8): KL {k0:.5f} ({p0:+.2f} % on the windows)", flush=True)
    out["rows"]["none"] = {"kl": k0, "window_pct": p0}
    # token view: max|x| of the largest token over the median token's, per layer, before / after the rotation
    K = qls[downs[0]].in_features
    blocks = [int(b) for b in a.blocks.split(",")]
    rots = {b: block_rotation(K, b) for b in blocks}
    amax = {b: {n: 0.0 for n in downs} for b in [0, *blocks]}
    tok_ratio = {b: {n: [] for n in downs} for b in [0, *blocks]}

    def observe(n, x):
        x = x.reshape(-1, x.shape[-1]).float()
        for b in [0, *blocks]:
            y = x if b == 0 else x @ rots[b]
            t = y.abs().amax(-1)
            amax[b][n] = max(amax[b][n], float(t.max()))
            tok_ratio[b][n].append(float(t.max() / t.median()))
    float_inputs(observe)
    for b in [0, *blocks]:
        ratios = [max(tok_ratio[b][n]) for n in downs]
        out["rows"].setdefault(str(b) if b else "none", {})["token_ratio_max_by_layer"] = ratios
        print(f"block {b or 'none':>4}: largest token / median token max|x| at the down_proj input: median over layers "
              f"{np.median(ratios):.1f}, max {max(ratios):.1f}", flush=True)

    def rotate(b):
        R = rots[b]
        for n, ql in qls.items():
            w, _, _ = orig[n]
            ql.w_kn.data = (R.t() @ w.float()).to(w.dtype)
            ql.w_scale = weight_scale(ql.w_kn.data, True)
            ql.act_scale = max(amax[b][n], 1e-8) / 127.0
            ql._rot = R
        return [ql.register_forward_pre_hook(lambda mod, args: (args[0] @ mod._rot.to(args[0].dtype),)) for ql in qls.values()]

    def unrotate(hooks):
        for h in hooks:
            h.remove()
        for n, ql in qls.items():
            ql.w_kn.data, ql.w_scale, ql.act_scale = orig[n][0].clone(), orig[n][1].clone(), orig[n][2]

    best = (k0, None)
    for b in blocks:
        hooks = rotate(b)
        k, pp = kl()
        unrotate(hooks)
        print(f"block Hadamard {b:4d} on every down_proj input: KL {k:.5f} ({pp:+.2f} % on the windows); online cost "
              f"{K * b / (K * qls[downs[0]].out_features):.0%} of the down_proj's MACs", flush=True)
        out["rows"][str(b)].update({"kl": k, "window_pct": pp})
        dump()
        if k < best[0]:
            best = (k, b)
    ids = np.array(api.text_ids(tok, None, "eval"))
    fpp = None
    chosen = [best[1]] if a.heldout == "best" else [int(x) for x in a.heldout.split(",")]
    for label, b in [("none", None)] + [(str(c), c) for c in chosen if c]:
        hooks = rotate(b) if b else []
        ppl = torch_perplexity(m, ids, 512, a.max_tokens)["perplexity"]  # after the installed prefix
        unrotate(hooks)
        if fpp is None:
            with prefix_mod.applied(model, None):
                fpp = torch_perplexity(model, ids, 512, a.max_tokens)["perplexity"]
            out["fp32_heldout"] = fpp
        out["rows"][label]["heldout"] = ppl
        print(f"held-out ({a.max_tokens} tokens) {label}: {ppl:.3f} ({100 * (ppl / fpp - 1):+.2f} % vs FP32 {fpp:.3f})", flush=True)
        dump()
    print(f"total {time.perf_counter() - t0:.0f} s", flush=True)
    dump()


if __name__ == "__main__":
    main()
