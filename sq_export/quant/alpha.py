"""`--alpha auto`: per smoothing group, the α ∈ ALPHA_GRID minimizing Σ over the group's Linears of
‖Q_w(W·s)·Q_a(x/s) − W·x‖² on the reservoir's rows, with the static scale deployment would use (max over channels
of calibrated max|x_j|/s_j, / 127). Groups are independent (float inputs): one pass over the cached rows per α, no
model forward."""

from __future__ import annotations

import numpy as np
import torch

from sq_export.quant.clip import fake_quant_tensor
from sq_export.quant.reservoir import RowReservoir, rows_for

# 0.30 .. 0.95. Extending it with 0.975 and 1.0 was measured worse on SmolLM2 (docs/ACCURACY.md, 2026-11-22
# 16:37): 65/90 groups then choose α=1.0 by the local output MSE, and held-out perplexity goes from +2.90 % to +3.53 %.
ALPHA_GRID = tuple(round(0.3 + 0.05 * i, 2) for i in range(14))


@torch.no_grad()
def _fq_weight_oi(w_oi: torch.Tensor, per_channel: bool = True) -> torch.Tensor:
    amax = w_oi.abs().amax(dim=1) if per_channel else w_oi.abs().amax().expand(w_oi.shape[0])
    scale = (amax.clamp(min=1e-8) / 127.0).float().contiguous()
    return torch.fake_quantize_per_channel_affine(w_oi, scale, torch.zeros_like(scale, dtype=torch.int32), 0, -128, 127)


@torch.no_grad()
def group_error(model, group, act_max, rows: torch.Tensor, alpha: float, head_dim=None, per_channel=True, float_outputs=None,
                maxima=None) -> float:
    """Σ over the group's Linears of the squared output error of static W8A8 after smoothing with α (bias cancels).
    `float_outputs`: the group's (float32 weight, float output on `rows`) per Linear, and `maxima` its
    (max|X_j|, max|W_j|) (`smooth.group_maxima`), which do not depend on α (computed here when not given)."""
    from sq_export.modeling import weight_oi
    from sq_export.quant.smooth import factors_from_maxima, group_act_max, group_maxima

    maxima = maxima or group_maxima(model, group, act_max, head_dim)
    s = factors_from_maxima(*maxima, alpha).float()
    amax = float((group_act_max(group, act_max) / s).max())
    # on the weights' device, in float32 (rows are float32 on the CPU; a half weight is widened, exactly)
    dev = weight_oi(model.get_submodule(group.linears[0])).device
    rows, s = rows.to(dev), s.to(dev)
    xs = rows / s
    xq = fake_quant_tensor(xs, amax)
    err = 0.0
    for w, y in float_outputs or float_outputs_of(model, group, rows):
        yq = xq @ _fq_weight_oi(w * s.view(1, -1), per_channel).t()
        err += float((yq - y).pow(2).sum())
    return err


@torch.no_grad()
def float_outputs_of(model, group, rows: torch.Tensor) -> list:
    """[(float32 weight [out, in], rows @ weightᵀ)] for each Linear of the group."""
    from sq_export.modeling import weight_oi

    out = []
    for n in group.linears:
        w = weight_oi(model.get_submodule(n)).float()
        out.append((w, rows.to(w.device) @ w.t()))
    return out


@torch.no_grad()
def search_alpha(model, family, act_max, res: RowReservoir, linear_pairs: bool, grid=None, per_channel=True) -> dict:
    """{group source: best α} on the unsmoothed float model (call before apply_smoothing). grid: ALPHA_GRID."""
    return search_alpha_groups(model, family.groups(include_linear_pairs=linear_pairs), act_max,
                               lambda n: rows_for(res, family, n), grid, per_channel)


@torch.no_grad()
def search_alpha_groups(model, groups, act_max, rows_of, grid=None, per_channel=True) -> dict:
    """`search_alpha` on the given groups (a layer's, when streaming); `rows_of(linear name)`: its row sample."""
    from sq_export.dispatch import resident
    from sq_export.quant.smooth import group_maxima, head_dim

    grid = ALPHA_GRID if grid is None else tuple(grid)
    hd = head_dim(model.config)
    out = {}
    for g in groups:
        rows = rows_of(g.linears[0])
        with resident(model, g.linears, write=False):
            g_hd = hd if g.kind == "linear" else None
            ref = float_outputs_of(model, g, rows)  # the same for every α: computed once per group
            mx = group_maxima(model, g, act_max, g_hd)
            errs = [group_error(model, g, act_max, rows, a, g_hd, per_channel, ref, mx) for a in grid]
        out[g.source] = float(grid[int(np.argmin(errs))])
    return out


# `--alpha kl`: one α per Linear→Linear pair kind (up→down, v→o), chosen by the model-level error instead of each
# group's local output error; the norm groups keep the family's α. The local criterion picks α 0.95 for every
# up→down pair of SmolLM2 after the outlier prefix, where the KL to the float model is lowest at 0.8 (held-out
# +1.36 % instead of +2.02 % at 0.85 everywhere). The norm kinds move the KL on 4 windows only within its noise, and
# searching them too (norms=True) chose input norms 0.8 there and gave +2.15 % held-out (docs/ACCURACY.md, 2026-11-29,
# issue 17).
KL_ALPHA_GRID = (0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)
KL_ALPHA_MIN_GAIN = 0.02  # a kind's α moves off the start only when the KL drops by more than this fraction


def group_kind(source: str) -> str:
    """A smoothing group's kind: its source's name with the layer index starred (as fallback.role_of)."""
    import re

    return re.sub(r"\.\d+\.", ".*.", source)


@torch.no_grad()
def search_alpha_kl(model, family, act_max, score, linear_pairs: bool, start: float, *, per_channel=True, grid=None,
                    min_gain=None, prefix=None, norms: bool = False, rotate=None) -> tuple[dict, dict]:
    """({group source: α}, record): coordinate search over group kinds (the Linear→Linear pair kinds; with `norms`
    then the norm kinds too), each kind's α on `grid` (default KL_ALPHA_GRID) for all its layers at once, the others
    held, starting from `start` everywhere (a kind not searched stays there); a trial is a copy of `model` (unsmoothed float) smoothed with those α, every Linear static
    W8A8 (scales from `act_max`), scored by `score` (fallback.KLScore, its float reference already taken: mean KL to
    the float model on calibration-split windows). A kind keeps its best α only when that lowers the KL by more than
    `min_gain` (default KL_ALPHA_MIN_GAIN) of the current KL: smaller differences are the windows' noise. `prefix`:
    the outlier prefix (its cache is recomputed for each smoothed copy, as prepare does). `rotate`: (Linear names, H,
    windows, batch size) of --rotate-down: each trial rotates those Linears' inputs as prepare does (their rotated
    ranges measured on the smoothed copy over `windows`), so the α chosen is the best one with the rotation (without
    it, SmolLM2's up→down pairs chose 0.95, and 0.85 is better once the down_proj inputs are rotated)."""
    from sq_export.quant import prefix as prefix_mod
    from sq_export.quant.hadamard import rotate_inputs, rotated_maxima
    from sq_export.quant.prepare import working_copy
    from sq_export.quant.qlinear import quantize_model, static_scales
    from sq_export.quant.smooth import apply_smoothing, smoothed_act_max

    grid = KL_ALPHA_GRID if grid is None else tuple(grid)
    min_gain = KL_ALPHA_MIN_GAIN if min_gain is None else float(min_gain)
    groups = family.groups(include_linear_pairs=linear_pairs)
    kinds: dict[str, list] = {}
    for g in sorted(groups, key=lambda g: g.kind != "linear"):  # pairs first: they carry most of the damage
        if norms or g.kind == "linear":
            kinds.setdefault(group_kind(g.source), []).append(g.source)
    names = family.quantized_linears()

    def trial(alphas: dict) -> float:
        m = working_copy(model, family, smoothing=True, linear_pairs=linear_pairs)
        f = apply_smoothing(m, family, act_max, alphas, linear_pairs=linear_pairs)
        if prefix is not None:
            prefix_mod.install(m, prefix_mod.compute_prefix(m, prefix.tokens, info=prefix.info))
        # with the rotation: its ranges on the smoothed float copy, as prepare measures them
        rmax = rotated_maxima(m, *rotate) if rotate is not None else None
        quantize_model(m, names, "static", static_scales(smoothed_act_max(act_max, family, f, linear_pairs), names), per_channel)
        if rmax is not None:
            rotate_inputs(m, rotate[0], rotate[1], rmax, per_channel)
        return float(score(m))

    cur_alpha = {g.source: float(start) for g in groups}
    cur = trial(cur_alpha)
    record = {"start": float(start), "start_kl": cur, "kinds": {}, **({"rotate_down": int(rotate[1].shape[0])} if rotate is not None else {})}
    for kind, sources in kinds.items():
        a0 = cur_alpha[sources[0]]
        tried = {a0: cur}
        for v in grid:
            if v != a0:
                tried[v] = trial({**cur_alpha, **{s: float(v) for s in sources}})
        best = min(tried, key=tried.get)
        if tried[best] < cur * (1 - min_gain):
            cur = tried[best]
            cur_alpha.update({s: float(best) for s in sources})
        record["kinds"][kind] = {"kl": {str(k): v for k, v in tried.items()}, "alpha": cur_alpha[sources[0]]}
    record["final_kl"] = cur
    return cur_alpha, record
