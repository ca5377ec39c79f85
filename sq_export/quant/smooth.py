"""Stage 2, smooth: s_j = max|X_j|^α / max|W_j|^(1-α), folded into the norm (γ/s, β/s) and the Linears' input
columns (W·s), so the float model computes the same function with easier-to-quantize activations.

The math is the same as mit-han-lab/smoothquant's smooth_ln_fcs (tests compare against it bit for bit).
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
    """Per input channel: max|X_j|^α / max_k|W_kj|^(1-α), both clamped away from 0 (as smooth_ln_fcs)."""
    w_max = torch.stack([abs_max(w, 0) for w in weights_oi]).amax(dim=0).clamp(min=1e-5)
    act = act_max.to(w_max.dtype)
    return (act.pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-5)


@torch.no_grad()
def fold_into_norm(norm, linears, s: torch.Tensor) -> None:
    norm.weight.div_(s)
    if getattr(norm, "bias", None) is not None:
        norm.bias.div_(s)
    for lin in linears:
        weight_oi(lin).mul_(s.view(1, -1))


@torch.no_grad()
def fold_into_linear(producer, consumer, s_consumer: torch.Tensor, kv_repeat: int = 1, head_dim: int | None = None) -> None:
    """Divide the producer's output rows by s and multiply the consumer's input columns by s.

    With grouped-query attention (v_proj → o_proj) one v row feeds `kv_repeat` o columns (head h reads kv head
    h // kv_repeat); s is equal across those columns (smoothing_factors_for_group makes it so).
    """
    w_p = weight_oi(producer)
    s_rows = s_consumer
    if kv_repeat > 1:
        if s_consumer.shape[0] != w_p.shape[0] * kv_repeat or not head_dim:
            raise BadInput(f"cannot pair {w_p.shape[0]} producer rows with {s_consumer.shape[0]} consumer columns")
        s_rows = s_consumer.view(-1, kv_repeat, head_dim)[:, 0, :].reshape(-1)
    w_p.div_(s_rows.view(-1, 1))
    if getattr(producer, "bias", None) is not None:
        producer.bias.div_(s_rows)
    weight_oi(consumer).mul_(s_consumer.view(1, -1))


def group_act_max(group: SmoothGroup, act_max: dict[str, torch.Tensor]) -> torch.Tensor:
    # All Linears of a group see the same input tensor; the max over them guards against float noise.
    return torch.stack([act_max[n] for n in group.linears]).amax(dim=0)


def smoothing_factors_for_group(model, group: SmoothGroup, act_max, alpha: float, head_dim: int | None = None):
    lins = [model.get_submodule(n) for n in group.linears]
    a = group_act_max(group, act_max)
    ws = [weight_oi(l) for l in lins]
    if group.kind == "linear" and group.kv_repeat > 1:
        # share one factor across the heads that read the same v row: [kv, rep, d] → max over rep
        rep = group.kv_repeat
        d = head_dim
        a = a.view(-1, rep, d).amax(dim=1, keepdim=True).expand(-1, rep, -1).reshape(-1)
        ws = [abs_max(w, 0).view(-1, rep, d).amax(dim=1, keepdim=True).expand(-1, rep, -1).reshape(1, -1) for w in ws]
    return smoothing_factors(a, ws, alpha)


@torch.no_grad()
def apply_smoothing(model, family: Family, act_max: dict[str, torch.Tensor], alpha: float | dict, *, linear_pairs=False) -> dict[str, torch.Tensor]:
    """Fold smoothing into `model` in place. `alpha` is one value or {group source: value}. Returns {source: s}."""
    factors = {}
    for g in family.groups(include_linear_pairs=linear_pairs):
        a = alpha[g.source] if isinstance(alpha, dict) else alpha
        src = model.get_submodule(g.source)
        if g.kind == "norm":
            check_plain_norm(src, g.source)
            s = smoothing_factors_for_group(model, g, act_max, a)
            fold_into_norm(src, [model.get_submodule(n) for n in g.linears], s)
        else:
            hd = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
            s = smoothing_factors_for_group(model, g, act_max, a, head_dim=hd)
            fold_into_linear(src, model.get_submodule(g.linears[0]), s, g.kv_repeat, hd)
        factors[g.source] = s
    return factors


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
    return model(input_ids=batch, attention_mask=torch.ones_like(batch), use_cache=False).logits.float()


def check_unchanged(ref_logits: torch.Tensor, new_logits: torch.Tensor, what: str = "smoothing") -> float:
    """Refuse when float logits moved more than float32 rounding allows (1e-3 of the logit scale)."""
    diff = float((ref_logits - new_logits).abs().max())
    tol = fp_tolerance(ref_logits)
    if not diff <= tol:
        raise SmoothingChangedOutputs(
            f"{what} changed the float logits by {diff:.3g} (tolerance {tol:.3g}): the fold is not exact for this "
            "model; nothing was written"
        )
    log.info("%s: max |Δlogits| %.3g (tolerance %.3g)", what, diff, tol)
    return diff


def smooth_checked(model, family, act_max, alpha, check_batch: torch.Tensor, *, linear_pairs=False, after=None):
    """apply_smoothing + the float-equivalence check on `check_batch`. Returns (factors, max |Δlogits|). `after()`
    runs between smoothing and the check (prepare recomputes an outlier prefix's cache there)."""
    ref = logits_of(model, check_batch)
    factors = apply_smoothing(model, family, act_max, alpha, linear_pairs=linear_pairs)
    if after is not None:
        after()
    return factors, check_unchanged(ref, logits_of(model, check_batch))
