"""Static per-tensor activation ranges below the calibrated max (`--clip`): a percentile of |x| (`p99.99`) or the
range minimizing the input's fake-quant MSE (`mse`), on the reservoir's rows; never above the calibrated max."""

from __future__ import annotations

import math

import torch

from sq_export.quant.reservoir import RowReservoir, rows_for

MSE_CLIP_RATIOS = tuple(0.92 ** k for k in range(40))  # 1.0 down to ~0.04 of the max




@torch.no_grad()
def fake_quant_tensor(x: torch.Tensor, amax: float) -> torch.Tensor:
    s = max(float(amax), 1e-8) / 127.0
    return torch.fake_quantize_per_tensor_affine(x, s, 0, -128, 127)


@torch.no_grad()
def clip_amax(rows: torch.Tensor, amax_max: float, spec) -> float:
    """Per-tensor activation range for rows (already smoothed) under clip spec (see parse_clip); ≤ amax_max."""
    if spec is None:
        return float(amax_max)
    a = rows.abs().reshape(-1)
    kind, q = spec
    if kind == "pct":
        k = max(1, min(a.numel(), int(math.ceil(a.numel() * q / 100.0))))
        v = float(torch.kthvalue(a, k).values) if k < a.numel() else float(a.max())
        return float(min(amax_max, max(v, 1e-8)))
    # mse: among ratios of the calibrated max, the range whose fake-quant error on the sample is smallest
    x = rows.reshape(-1)
    best, best_err = float(amax_max), float("inf")
    for r in MSE_CLIP_RATIOS:
        am = float(amax_max) * r
        err = float((fake_quant_tensor(x, am) - x).pow(2).sum())
        if err < best_err:
            best, best_err = am, err
    return best



def clipped_scales(family, act_max_smoothed: dict, res: RowReservoir, divs: dict, spec, names) -> tuple[dict, dict]:
    """Static scales with clipped ranges. Returns ({name: scale}, {name: clipped/max ratio})."""
    scales, ratio = {}, {}
    for n in names:
        mx = float(act_max_smoothed[n].max())
        rows = rows_for(res, family, n)
        if divs.get(n) is not None:
            rows = rows / divs[n].to(rows.device, rows.dtype)
        am = clip_amax(rows, mx, spec)
        scales[n] = max(am, 1e-8) / 127.0
        ratio[n] = am / mx if mx > 0 else 1.0
    return scales, ratio
