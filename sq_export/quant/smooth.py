"""Stage 2, smooth: s_j = max|X_j|^α / max|W_j|^(1-α), folded into the norm (γ/s, β/s) and the Linears' input
columns (W·s), so the float model computes the same function with easier-to-quantize activations.

The math is the same as mit-han-lab/smoothquant's smooth_ln_fcs (tests compare against it bit for bit).
Whatever the model's type and device: the factors are computed in float32 on the CPU (from max|W| per channel,
exact in float32, and the float32 act maxima), so a GPU half-precision run and a CPU float32 run of the same
weights get the same factors; a half-precision weight is folded in float32 and rounded to its type once. A model
dispatched by accelerate with weights offloaded to the CPU is folded into the offloaded weights themselves
(sq_export.dispatch.resident).
"""

from __future__ import annotations

import logging

import torch

from sq_export.errors import BadInput, SmoothingChangedOutputs
from sq_export.families import Family, SmoothGroup
from sq_export.modeling import abs_max, check_plain_norm, fp_tolerance, weight_oi

log = logging.getLogger(__name__)


@torch.no_grad()
def smoothing_factors(act_max: torch.Tensor, weights_oi: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """Per input channel: max|X_j|^α / max_k|W_kj|^(1-α), both clamped away from 0 (as smooth_ln_fcs). float32 on
    the CPU whatever the weights' type and device (max|W| of half weights is exact in float32)."""
    return factors_from_maxima(act_max, weight_col_max(weights_oi), alpha)


@torch.no_grad()
def weight_col_max(weights_oi: list[torch.Tensor]) -> torch.Tensor:
    """max_k|W_kj| per input channel j over the given [out, in] weights, clamped at 1e-5 (float32, CPU)."""
    return torch.stack([abs_max(w, 0).float().cpu() for w in weights_oi]).amax(dim=0).clamp(min=1e-5)


def factors_from_maxima(act_max: torch.Tensor, w_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^α / max|W_j|^(1-α) (clamped at 1e-5) from the two per-channel maxima (`weight_col_max`)."""
    act = act_max.float().cpu()
    return (act.pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-5)


@torch.no_grad()
def divided_norm_weight(weight: torch.Tensor, s: torch.Tensor, form: str = "gamma") -> torch.Tensor:
    """The norm weight whose gain is the old gain divided by s (a new tensor).

    form "gamma": the gain is γ, so γ' = γ/s. form "one_plus_gamma" (Gemma: (1+γ)·f(x)): the gain is 1+γ, so
    1+γ' = (1+γ)/s, i.e. γ' = (1+γ)/s − 1, computed in float64 and rounded once: the gain the norm computes,
    1+γ' in float32, is (1+γ)/s to within float32 rounding of numbers near 1 (absolute ≤ 1.2e-7; relatively
    larger only where (1+γ)/s is tiny, which the float-equivalence check after smoothing bounds)."""
    if form == "one_plus_gamma":
        return ((1.0 + weight.double()) / s.double() - 1.0).to(weight.dtype)
    if form == "gamma":
        return weight / s
    raise ValueError(f"unknown norm form {form!r}")


def scale_(t: torch.Tensor, s: torch.Tensor, divide: bool = False) -> None:
    """t ·= s (or /= s) in place, broadcasting s over t's last dimension (shape it with view). A float32 tensor is
    changed in place (no temporary); a half one is computed in float32 and rounded to its type once."""
    s = s.to(t.device)
    if t.dtype == torch.float32:
        t.div_(s) if divide else t.mul_(s)
        return
    t.copy_(t.float() / s if divide else t.float() * s)


@torch.no_grad()
def fold_into_norm(norm, linears, s: torch.Tensor, form: str = "gamma") -> None:
    """Divide the norm's per-channel gain (γ, or 1+γ for `form` "one_plus_gamma") and β by s, and multiply the
    Linears' input columns by s."""
    if form == "gamma":
        scale_(norm.weight, s, divide=True)
    else:
        norm.weight.copy_(divided_norm_weight(norm.weight, s.to(norm.weight.device), form))
    if getattr(norm, "bias", None) is not None:
        scale_(norm.bias, s, divide=True)
    for lin in linears:
        scale_(weight_oi(lin), s.view(1, -1))


def row_ranges(rows, n_rows: int) -> list[tuple[int, int]]:
    """SmoothGroup.rows as a checked list of (start, stop) ranges of the producer's rows (all rows when empty)."""
    if not rows:
        return [(0, n_rows)]
    out = [(int(a), int(b)) for a, b in rows]
    if any(not (0 <= a < b <= n_rows) for a, b in out):
        raise BadInput(f"producer row ranges {out[:4]}... fall outside its {n_rows} output rows")
    return out


@torch.no_grad()
def fold_into_linear(producer, consumer, s_consumer: torch.Tensor, kv_repeat: int = 1, head_dim: int | None = None,
                     rows=()) -> None:
    """Divide the producer's output rows by s and multiply the consumer's input columns by s.

    With grouped-query attention (v_proj → o_proj) one v row feeds `kv_repeat` o columns (head h reads kv head
    h // kv_repeat); s is equal across those columns (smoothing_factors_for_group makes it so).
    `rows` (SmoothGroup.rows): the (start, stop) ranges of the producer's rows that feed the consumer, in the
    consumer's column order, when only part of a fused producer does (the v rows of a fused qkv projection, the up
    half of a fused gate_up); the other rows are left alone.
    """
    w_p = weight_oi(producer)
    ranges = row_ranges(rows, w_p.shape[0])
    n_rows = sum(b - a for a, b in ranges)
    s_rows = s_consumer
    if s_consumer.shape[0] != n_rows * kv_repeat:
        raise BadInput(f"cannot pair {n_rows} producer rows with {s_consumer.shape[0]} consumer columns")
    if kv_repeat > 1:
        if not head_dim:
            raise BadInput("pairing grouped-query attention rows needs the head size")
        s_rows = s_consumer.view(-1, kv_repeat, head_dim)[:, 0, :].reshape(-1)
    bias = getattr(producer, "bias", None)
    off = 0
    for a, b in ranges:
        part = s_rows[off : off + b - a]
        scale_(w_p[a:b], part.view(-1, 1), divide=True)
        if bias is not None:
            scale_(bias[a:b], part, divide=True)
        off += b - a
    scale_(weight_oi(consumer), s_consumer.view(1, -1))


def group_act_max(group: SmoothGroup, act_max: dict[str, torch.Tensor]) -> torch.Tensor:
    # All Linears of a group see the same input tensor; the max over them guards against float noise.
    return torch.stack([act_max[n] for n in group.linears]).amax(dim=0)


def smoothing_factors_for_group(model, group: SmoothGroup, act_max, alpha: float, head_dim: int | None = None):
    return factors_from_maxima(*group_maxima(model, group, act_max, head_dim), alpha)


def group_maxima(model, group: SmoothGroup, act_max, head_dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(max|X_j|, max|W_j|) per input channel of the group, the two inputs of its smoothing factors for any α
    (`factors_from_maxima`); with grouped-query pairs both are shared across the heads that read one v row."""
    lins = [model.get_submodule(n) for n in group.linears]
    a = group_act_max(group, act_max)
    ws = [weight_oi(l) for l in lins]
    if group.kind == "linear" and group.kv_repeat > 1:
        # share one factor across the heads that read the same v row: [kv, rep, d] → max over rep
        rep = group.kv_repeat
        d = head_dim
        a = a.view(-1, rep, d).amax(dim=1, keepdim=True).expand(-1, rep, -1).reshape(-1)
        ws = [abs_max(w, 0).float().cpu().view(-1, rep, d).amax(dim=1, keepdim=True).expand(-1, rep, -1).reshape(1, -1) for w in ws]
    return a, weight_col_max(ws)


@torch.no_grad()
def apply_smoothing(model, family: Family, act_max: dict[str, torch.Tensor], alpha: float | dict, *, linear_pairs=False) -> dict[str, torch.Tensor]:
    """Fold smoothing into `model` in place. `alpha` is one value or {group source: value}. Returns {source: s}
    (float32, CPU)."""
    return apply_smoothing_groups(model, family.groups(include_linear_pairs=linear_pairs), act_max, alpha, family.norm_form)


@torch.no_grad()
def apply_smoothing_groups(model, groups, act_max: dict[str, torch.Tensor], alpha: float | dict,
                           norm_form: str = "gamma") -> dict[str, torch.Tensor]:
    """`apply_smoothing` on the given groups only (a layer's, when streaming), in their order; `norm_form`: the
    family's (Family.norm_form)."""
    from sq_export.dispatch import resident

    factors = {}
    for g in groups:
        a = alpha[g.source] if isinstance(alpha, dict) else alpha
        with resident(model, [g.source, *g.linears]):
            src = model.get_submodule(g.source)
            if g.kind == "norm":
                check_plain_norm(src, g.source, norm_form)
                s = smoothing_factors_for_group(model, g, act_max, a)
                fold_into_norm(src, [model.get_submodule(n) for n in g.linears], s, norm_form)
            else:
                hd = head_dim(model.config)
                s = smoothing_factors_for_group(model, g, act_max, a, head_dim=hd)
                fold_into_linear(src, model.get_submodule(g.linears[0]), s, g.kv_repeat, hd, g.rows)
        factors[g.source] = s
    return factors


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def smoothed_act_max(act_max: dict[str, torch.Tensor], family: Family, factors: dict[str, torch.Tensor], linear_pairs=False):
    """Per-channel max|x| at each Linear's input after smoothing: max|x_j|/s_j (exact up to float rounding)."""
    out = dict(act_max)
    for g in family.groups(include_linear_pairs=linear_pairs):
        for n in g.linears:
            out[n] = out[n] / factors[g.source]
    return out


def divisors(family, factors: dict | None, linear_pairs: bool) -> dict[str, torch.Tensor | None]:
    """Per quantized Linear: the smoothing vector its input was divided by (None: unsmoothed)."""
    d = {n: None for n in family.quantized_linears()}
    if factors:
        for g in family.groups(include_linear_pairs=linear_pairs):
            if g.source in factors:
                for n in g.linears:
                    d[n] = factors[g.source] if d[n] is None else d[n] * factors[g.source]
    return d


@torch.no_grad()
def logits_of(model, batch: torch.Tensor) -> torch.Tensor:
    from sq_export.device import fits, model_device, to_device

    with fits(f"the float-equivalence check batch ({list(batch.shape)} tokens)", model_device(model)):
        b = to_device(batch, model)
        return model(input_ids=b, attention_mask=torch.ones_like(b), use_cache=False).logits.float()


def check_unchanged(ref_logits: torch.Tensor, new_logits: torch.Tensor, what: str = "smoothing") -> float:
    """Refuse when float logits moved more than float32 rounding allows (1e-3 of the logit scale)."""
    diff = float((ref_logits - new_logits.to(ref_logits.device)).abs().max())
    tol = fp_tolerance(ref_logits)
    if not diff <= tol:
        raise SmoothingChangedOutputs(
            f"{what} changed the float logits by {diff:.3g} (tolerance {tol:.3g}): the fold is not exact for this "
            "model; nothing was written"
        )
    log.info("%s: max |Δlogits| %.3g (tolerance %.3g)", what, diff, tol)
    return diff


def smooth_checked(model, family, act_max, alpha, check_batch: torch.Tensor, *, linear_pairs=False, after=None):
    """apply_smoothing + the float-equivalence check on `check_batch`. Returns (factors, max |Δlogits|) for a float32
    model; a half model (float16/bfloat16) is checked decoder layer by decoder layer in float32 instead, whose
    logits carry their own rounding (sq_export.quant.equivalence): then the max relative change of a layer.
    `after()` runs between smoothing and the check (prepare recomputes an outlier prefix's cache there)."""
    from sq_export.device import model_dtype

    if model_dtype(model) != torch.float32:
        if after is not None:
            raise BadInput("an outlier prefix with a half-precision model is not supported yet: use --model-dtype float32")
        from sq_export.quant.equivalence import smooth_checked_per_layer

        return smooth_checked_per_layer(model, family, act_max, alpha, check_batch, linear_pairs=linear_pairs)
    ref = logits_of(model, check_batch)
    factors = apply_smoothing(model, family, act_max, alpha, linear_pairs=linear_pairs)
    if after is not None:
        after()
    return factors, check_unchanged(ref, logits_of(model, check_batch))
