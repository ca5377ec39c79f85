"""Stage 3, quantize: symmetric INT8 fake quantization that computes exactly what the exported Q/DQ graph does.

- weights: per output channel (default) or per tensor, scale = max|W|/127, zero-point 0, range [-128, 127];
- activations: `static` per-tensor scale from calibration (O3, the only form TensorRT runs), `dynamic-tensor`
  (O2) or `dynamic-token` (O1) computed on the fly (PyTorch measurement only), or `none` (W8A16);
- rounding half to even, as ONNX QuantizeLinear (torch.fake_quantize_* and torch.round both do).

QLinear keeps its weight as [in, out] (MatMul's [K, N]), so the ONNX export is W → Q(axis=1) → DQ(axis=1) →
MatMul with no Transpose between DQ and MatMul, the layout TensorRT's Q/DQ fusion wants.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from sq_export.modeling import abs_max, is_conv1d
from sq_export.quant.hadamard import block_rotate
from sq_export.quant.recipe import ACT_MODES

QMIN, QMAX = -128, 127


def scale_from_amax(amax: torch.Tensor | float) -> torch.Tensor:
    return torch.as_tensor(amax, dtype=torch.float32).clamp(min=1e-8) / 127.0


_STE = [False]


@contextlib.contextmanager
def straight_through():
    """Within it, a backward pass goes straight through the rounding of `qdq_exact` / `fake_quant_dynamic` (as
    torch.fake_quantize_* do), for fallback.first_order_gains; outside it their values are exactly Q→DQ's."""
    _STE[0] = True
    try:
        yield
    finally:
        _STE[0] = False


def _straight_through(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return x + (q - x).detach() if _STE[0] and x.requires_grad else q


def qdq_exact(x: torch.Tensor, scale) -> torch.Tensor:
    """Q→DQ as ONNX computes it: saturate(round_half_even(x / scale)) · scale (scale broadcasts over x's last
    dimension). torch.fake_quantize_* multiply by 1/scale instead: the same except where x / scale is a tie (k + ½)
    or within an ulp of one, which float32 weights almost never are but half-valued ones often are (bfloat16
    weights of the tiny Llama: 10 of 73,728 INT8 weights differed). The half model's QLinear uses this, so its
    INT8 values are exactly the exported graph's."""
    q = torch.clamp(torch.round(x / scale), QMIN, QMAX) * scale
    return _straight_through(x, q)


def fake_quant_dynamic(x: torch.Tensor, per_token: bool) -> torch.Tensor:
    amax = x.abs().amax(dim=-1, keepdim=True) if per_token else x.abs().amax()
    s = amax.clamp(min=1e-8) / 127.0
    q = torch.round(x / s).clamp(QMIN, QMAX) * s
    return _straight_through(x, q)


def weight_scale(w_kn: torch.Tensor, per_channel: bool = True) -> torch.Tensor:
    """The symmetric INT8 weight scale of a [K, N] weight: per output channel (max |w| over K) or one for all."""
    amax = abs_max(w_kn, 0) if per_channel else abs_max(w_kn).expand(w_kn.shape[1])
    return scale_from_amax(amax).contiguous()


class QLinear(nn.Module):
    """W8A8 replacement for nn.Linear / transformers' Conv1D."""

    def __init__(self, linear: nn.Module, act: str = "static", act_scale: float | None = None, per_channel: bool = True):
        super().__init__()
        if act not in ACT_MODES:
            raise ValueError(act)
        if act == "static" and act_scale is None:
            raise ValueError("static activation quantization needs a calibrated scale")
        # the float weight itself, as a [K, N] view (no copy): a working copy that shares the float model's Linears
        # (naive W8A8) costs no weight memory; nothing writes into w_kn (the fake-quantized weight is a new tensor)
        w_kn = linear.weight.detach() if is_conv1d(linear) else linear.weight.detach().t()
        self.w_kn = nn.Parameter(w_kn, requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.register_buffer("w_scale", weight_scale(w_kn, per_channel))
        self.register_buffer("w_zero", torch.zeros(w_kn.shape[1], dtype=torch.int32, device=w_kn.device))
        self.act = act
        self.act_scale = None if act_scale is None else float(max(float(act_scale), 1e-8))
        self.in_features, self.out_features = w_kn.shape
        # --rotate-down: the input is rotated by diag(rot, ..., rot) before it is quantized, and w_kn holds the weight
        # rotated back (sq_export.quant.hadamard); None: no rotation
        self.register_buffer("rot", None)

    def _rotated(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.rot is None else block_rotate(x, self.rot.to(x.dtype))

    def quantized_weight(self) -> torch.Tensor:
        wq = torch.fake_quantize_per_channel_affine(self.w_kn, self.w_scale, self.w_zero, 1, QMIN, QMAX)
        # w_kn of an nn.Linear is a transposed view and the fake-quantized weight keeps its layout: made contiguous
        # [K, N], the matmul runs the same kernel on the same memory layout as with a contiguous copy of the weight
        # (same rounding, same logits); when tracing for ONNX the layout is not part of the graph
        return wq if wq.is_contiguous() or torch.jit.is_tracing() else wq.contiguous()

    def quantized_weight_float(self) -> torch.Tensor:
        """The fake-quantized weight [K, N] in float32 (a half w_kn widened exactly first; scales are float32), by
        division as ONNX QuantizeLinear computes (see `qdq_exact`)."""
        return qdq_exact(self.w_kn.float(), self.w_scale.to(self.w_kn.device)).contiguous()

    def quant_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.act == "static":
            return torch.fake_quantize_per_tensor_affine(x, self.act_scale, 0, QMIN, QMAX)
        if self.act == "dynamic-tensor":
            return fake_quant_dynamic(x, per_token=False)
        if self.act == "dynamic-token":
            return fake_quant_dynamic(x, per_token=True)
        return x

    def forward(self, x):
        if self.w_kn.dtype != torch.float32 and not torch.jit.is_tracing():
            # a half model (float16/bfloat16 weights, e.g. on the GPU): fake quantization and the matmul in float32,
            # as an INT8 GEMM computes (exact products, wide accumulation, float32 rescale), then the model's type;
            # in the half type the dequantized values q·s would be rounded off the INT8 grid (bfloat16: 8 bits)
            xf = self._rotated(x.float())
            xq = qdq_exact(xf, self.act_scale) if self.act == "static" else self.quant_input(xf)
            y = torch.matmul(xq, self.quantized_weight_float())
            y = y if self.bias is None else y + self.bias.float()
            return y.to(x.dtype)
        if x.dtype != self.w_kn.dtype:
            # a float16 model (export --dtype fp16; w_kn and the scales stay float32): fake quantization in float32
            # between Casts, which sq_export.passes.fp16_qdq turns into float16 Q/DQ (opset 19) with the same grid; a
            # rotation runs in the model's float16 before the Cast (as TensorRT runs it), so the Cast feeds the Q
            y = torch.matmul(self.quant_input(self._rotated(x).float()).to(x.dtype), self.quantized_weight().to(x.dtype))
            return y if self.bias is None else y + self.bias.to(x.dtype)
        y = torch.matmul(self.quant_input(self._rotated(x)), self.quantized_weight())
        return y if self.bias is None else y + self.bias

    def extra_repr(self):
        s = f"in={self.in_features}, out={self.out_features}, act={self.act}" + (f", rotated {self.rot.shape[0]}" if self.rot is not None else "")
        return s + (f", act_scale={self.act_scale:.4g}" if self.act_scale is not None else "")


def static_scales(act_max: dict[str, torch.Tensor], names) -> dict[str, float]:
    """Per-tensor static scales (O3): max over channels of max|x|, / 127."""
    return {n: float(scale_from_amax(act_max[n].max())) for n in names}


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


@torch.no_grad()
def quantize_model(model, names, act: str = "static", scales: dict[str, float] | None = None, per_channel=True, skip=()):
    """Swap each named Linear for a QLinear in place. Returns the names actually quantized."""
    done = []
    for n in names:
        if n in skip:
            continue
        lin = model.get_submodule(n)
        replace_module(model, n, QLinear(lin, act, (scales or {}).get(n), per_channel))
        done.append(n)
    return done
