"""`--rotate-down B`: a block Hadamard rotation of the MLP output Linear's input (down_proj, fc2, dense_4h_to_h, ...).

After the outlier prefix and pair smoothing, what is left of SmolLM2's every-Linear-INT8 error sits at the down_proj
inputs (82 % of the KL, docs/ACCURACY.md): a few channels of a few tokens still set the one static per-tensor scale.
An orthogonal rotation R spreads each token's values over its channels, so the per-tensor range fits them better,
and its inverse folds into the weight, exactly in float (QuaRot, Ashkboos et al. 2024; SpinQuant):

    y = x·W = (x·R)·(Rᵀ·W)        R = diag(H_B, ..., H_B), H_B the orthonormal Sylvester Hadamard of order B

Unlike smoothing, R cannot be folded into the layer in front (x = act(gate)·up is an element-wise product), so it
runs online: the exported graph computes x·R as Reshape → MatMul with the constant H_B [B, B] → Reshape before the
QuantizeLinear (a float MatMul: FP16 in TensorRT, B·K multiply-adds per token for a K-wide input, i.e. B / N of
the down_proj's own K·N). The static range of x·R is calibrated on the smoothed float model like every other
range (one more pass over the calibration windows).
"""

from __future__ import annotations

import torch

from sq_export.errors import BadInput
from sq_export.quant.recipe import validate_rotate_down


def hadamard(b: int) -> torch.Tensor:
    """The orthonormal Sylvester Hadamard matrix of order `b` (a power of two), float32 (symmetric: H = Hᵀ = H⁻¹)."""
    validate_rotate_down(b)
    h = torch.ones(1, 1)
    while h.shape[0] < b:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / b ** 0.5


def block_rotate(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """x·diag(h, ..., h) over x's last dimension (a multiple of h's order), as the graph computes it."""
    b = h.shape[0]
    # -1 and the trailing constants keep the graph's Reshape shapes inferable (ONNX shape inference, segments)
    return torch.matmul(x.reshape(*x.shape[:-1], -1, b), h).reshape(*x.shape[:-1], -1)


def targets(family) -> list[str]:
    """The Linears whose input is rotated: each layer's MLP output Linear (Family.mlp_out)."""
    return [family.layer_prefix(i) + family.mlp_out for i in range(family.num_layers())]


def check_block(model, names: list[str], b: int) -> torch.Tensor:
    """H_b, after checking that every named Linear's input width is a multiple of `b` (one line naming the first that
    is not)."""
    from sq_export.modeling import weight_oi

    h = hadamard(b)
    for n in names:
        k = weight_oi(model.get_submodule(n)).shape[1]
        if k % b:
            raise BadInput(f"--rotate-down {b}: {n} takes {k} inputs, not a multiple of {b}: choose a power of two dividing {k}")
    return h


def max_hook(amax: dict, name: str, h: torch.Tensor):
    """A forward pre-hook that raises amax[name] to max|x·R| of the Linear's input x (float32), R = diag(h, ..., h)."""
    def hook(mod, args):
        x = args[0].float()
        amax[name] = max(amax[name], float(block_rotate(x, h.to(x.device)).abs().max()))
    return hook


@torch.no_grad()
def rotated_maxima(model, names: list[str], h: torch.Tensor, batches, batch_size: int = 4) -> dict[str, float]:
    """max|x·R| of each named Linear's input over `batches` ([n, L] token ids) through `model` as it is now (the
    smoothed float model, after the outlier prefix if one is installed): the static ranges of the rotated inputs."""
    from sq_export.quant.calibrate import run_decoder

    amax = {n: 0.0 for n in names}
    hooks = [model.get_submodule(n).register_forward_pre_hook(max_hook(amax, n, h)) for n in names]
    try:
        run_decoder(model, batches, batch_size, desc="rotated ranges")
    finally:
        for hk in hooks:
            hk.remove()
    return amax


def rotated_scale(amax: float) -> float:
    """The static input scale of a rotated input whose calibrated max|x·R| is `amax` (as QLinear stores scales)."""
    from sq_export.quant.qlinear import scale_from_amax

    return float(max(float(scale_from_amax(amax)), 1e-8))


def metadata(block: int, rotated: int) -> dict[str, str]:
    """The graph metadata of a rotated model: the block size and how many Linears are rotated (passes/rotation.py
    counts the rotations against it: a Linear the fallback kept in float is not rotated)."""
    return {"rotate_down": str(block), "rotated_linears": str(rotated)}


def rotate_qlinear(ql, h: torch.Tensor, per_channel: bool = True, amax: float | None = None, w_kn: torch.Tensor | None = None) -> None:
    """Give QLinear `ql` the input rotation diag(h, ..., h): its weight becomes Rᵀ·W (a new tensor: the float Linear
    it views stays as it was, for the fallback; `w_kn` given: that tensor instead, e.g. a placeholder whose values
    are Rᵀ·W, sq_export.stream.lazy), its per-channel weight scales are recomputed, and with `amax` (max|x·R| on
    calibration) its static input scale becomes amax / 127 (None: the scale it has, e.g. a recorded one, stays)."""
    from sq_export.quant.qlinear import weight_scale

    w = ql.w_kn  # [K, N]
    hh = h.to(device=w.device)
    if w_kn is None:
        w_kn = block_rotate(w.float().t(), hh).t().to(w.dtype).contiguous()  # Rᵀ·W = (Wᵀ·R)ᵀ
    ql.w_kn = torch.nn.Parameter(w_kn, requires_grad=False)
    ql.w_scale = weight_scale(ql.w_kn, per_channel)
    ql.rot = hh
    if amax is not None and ql.act == "static":
        ql.act_scale = rotated_scale(amax)


def rotate_inputs(model, names: list[str], h: torch.Tensor, maxima: dict[str, float] | None, per_channel: bool = True) -> list[str]:
    """rotate_qlinear on each named QLinear of `model` (with its rotated input maximum from `maxima`; None: the
    static scales they have stay, as when a layer-streamed record's are loaded). Linears left in float (not QLinears)
    are skipped. Returns the names rotated."""
    from sq_export.quant.qlinear import QLinear

    done = []
    for n in names:
        ql = model.get_submodule(n)
        if isinstance(ql, QLinear):
            rotate_qlinear(ql, h, per_channel, None if maxima is None else maxima[n])
            done.append(n)
    return done
