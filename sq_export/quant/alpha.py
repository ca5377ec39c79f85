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
