"""Per-Linear output SQNR (dB) of fake-quantized models against the float model they approximate, Linear by Linear,
on one calibration batch (errors of earlier layers included, as deployed)."""

from __future__ import annotations

import math


def sqnr_db(y, y_hat) -> float:
    """10·log10(‖y‖² / ‖y − ŷ‖²) in float64; inf when ŷ == y."""
    y = y.double()
    err = (y - y_hat.double()).pow(2).sum().item()
    sig = y.pow(2).sum().item()
    if err == 0.0:
        return float("inf")
    return 10.0 * math.log10(max(sig, 1e-300) / err)


def linear_outputs(model, names: list[str], batch) -> dict:
    """{linear: its output (float32)} for one forward pass of `model` on `batch`."""
    store: dict = {}
    _run_hooked(model, names, batch, lambda n, out: store.__setitem__(n, out.detach().float()))
    return store


def sqnr_against(ref: dict, model, names: list[str], batch) -> dict:
    """{linear: SQNR dB of `model`'s output against `ref[linear]`} (None: exactly equal), computed as each output
    appears, so that only the reference outputs are held."""
    got: dict = {}

    def fn(n, out):
        v = sqnr_db(ref[n], out.detach().float())
        got[n] = round(v, 4) if math.isfinite(v) else None  # None: output exactly equal

    _run_hooked(model, names, batch, fn)
    return {n: got[n] for n in names}


def sqnr_in_parts(ref_model, model, names: list[str], batch, parts: int = 3) -> dict:
    """`sqnr_against(linear_outputs(ref_model, names, batch), model, names, batch)`, holding the reference outputs of
    a `parts`-th of the Linears at a time (SmolLM2: 53 instead of 159 MB, at the moment both models are resident):
    each part is one forward of each model, stopped after the part's last Linear. The forwards are the same
    computation on the same batch, so the values are the same."""
    got: dict = {}
    k = -(-len(names) // max(1, parts))
    for i in range(0, len(names), k):
        part = names[i : i + k]
        ref = linear_outputs(ref_model, part, batch)
        got.update(sqnr_against(ref, model, part, batch))
        del ref
    return {n: got[n] for n in names}


class _Done(Exception):
    """Raised by the hook of the last Linear asked for: the rest of the forward is not needed."""


def _run_hooked(model, names, batch, fn) -> None:
    import torch

    left = set(names)

    def hook(n, out):
        fn(n, out)
        left.discard(n)
        if not left:
            raise _Done

    from sq_export.device import to_device

    hooks = [model.get_submodule(n).register_forward_hook(lambda mod, inp, out, n=n: hook(n, out)) for n in names]
    try:
        with torch.no_grad():
            batch = to_device(batch, model)
            model(input_ids=batch, attention_mask=torch.ones_like(batch), use_cache=False)
    except _Done:
        pass
    finally:
        for h in hooks:
            h.remove()


def layer_sqnr(float_model, qmodels: dict, names: list[str], batch) -> dict:
    """{linear: {mode: SQNR dB}}: each quantized Linear's output in the fake-quant model vs the same Linear's output
    in `float_model`, both run end to end on `batch` (so errors of earlier layers are included, as deployed).
    `float_model` must be the float model the quantized ones approximate Linear by Linear: norm smoothing leaves
    every Linear's output unchanged (W·s · x/s = W·x), pair smoothing does not (see `naive_sq_sqnr`)."""
    ref = linear_outputs(float_model, names, batch)
    out = {n: {} for n in names}
    for mode, qm in qmodels.items():
        for n, v in sqnr_against(ref, qm, names, batch).items():
            out[n][mode] = v
    return out


def smoothed_reference(model, family, act_max: dict, alpha, linear_pairs: bool):
    """The float model whose Linear outputs a SmoothQuant model approximates. Norm smoothing keeps every Linear's
    output (W·s · x/s = W·x): that is `model` itself. Pair smoothing (--smooth-pairs) divides the producer's output
    rows (up_proj, v_proj) by s, so their outputs are y/s in the SQ model: then it is a copy of `model` smoothed the
    same way (`alpha`: a number or {group source: α}, as the SQ model was smoothed)."""
    if not linear_pairs:
        return model
    from sq_export.quant.prepare import working_copy
    from sq_export.quant.smooth import apply_smoothing

    ref = working_copy(model, family, smoothing=True, linear_pairs=True)
    apply_smoothing(ref, family, act_max, alpha, linear_pairs=True)
    return ref


def naive_sq_sqnr(float_model, naive, sq, names: list[str], batch, *, family, act_max: dict, alpha, linear_pairs: bool) -> dict:
    """{linear: {"naive": dB, "sq": dB}} (`layer_sqnr`): naive W8A8 vs the float model, SmoothQuant W8A8 vs
    `smoothed_reference` (the float model unless --smooth-pairs). `act_max`: the unsmoothed calibration maxima."""
    ref = smoothed_reference(float_model, family, act_max, alpha, linear_pairs)
    if ref is float_model:
        return layer_sqnr(float_model, {"naive": naive, "sq": sq}, names, batch)
    t_naive = layer_sqnr(float_model, {"naive": naive}, names, batch)
    t_sq = layer_sqnr(ref, {"sq": sq}, names, batch)
    return {n: {**t_naive[n], **t_sq[n]} for n in names}
