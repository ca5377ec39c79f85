"""Stage 1, calibrate: per-input-channel max|x| at every quantized Linear, from real text.

Keys are the Linears' qualified module names in the loaded HF model (`model.layers.0.self_attn.q_proj`), the
layout of mit-han-lab/smoothquant's act_scales/*.pt, which load too. Static per-tensor activation ranges of a
smoothed model follow from these exactly: smoothing divides channel j by s_j > 0, so max|x_j / s_j| =
max|x_j| / s_j (see quantize.static_ranges), and a second pass over the text is not needed.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from sq_export import progress
from sq_export.errors import BadInput
from sq_export.fileio import atomic_file
from sq_export.modeling import in_features
from sq_export.quant.recipe import CalibOptions

ACT_SCALES_FILE = "act_scales.safetensors"


@torch.no_grad()
def run_decoder(model, batches, batch_size: int = 4, desc: str | None = None) -> None:
    """Forward `batches` ([n, L] token ids) through the decoder alone, for the hooks that observe it: the LM head's
    logits are not needed and cost ~20% of a small model's forward."""
    from sq_export.device import fits, model_device

    dev = model_device(model)
    ids = torch.as_tensor(np.asarray(batches))
    body = getattr(model, "base_model", model)
    starts = range(0, len(ids), batch_size)
    with fits(f"a calibration batch of {min(batch_size, len(ids))} x {ids.shape[-1]} tokens", dev):
        for i in progress.bar(starts, desc=desc, unit="batch") if desc else starts:
            b = ids[i : i + batch_size].to(dev)
            body(input_ids=b, attention_mask=torch.ones_like(b), use_cache=False)


@torch.no_grad()
def collect_act_max(model, names: list[str], batches: np.ndarray, batch_size: int = 4, desc="calibrate", reservoir=None) -> dict[str, torch.Tensor]:
    """Run `batches` ([n, L] token ids) through `model`; return {linear name: max|x| per input channel}.

    `reservoir` (optional, e.g. sq_export.quant.fallback.RowReservoir): its `add(name, x)` also sees every input, in the
    same pass, to keep a bounded sample of rows; the returned maxima are the same with or without it. The maxima are
    float32 on the CPU whatever the model's type and device (a max of model-type values is exact in float32)."""
    stats: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(act_max_hook(n, stats, reservoir)) for n in names]
    try:
        run_decoder(model, batches, batch_size, desc)
    finally:
        for h in hooks:
            h.remove()
    return finish_act_max(stats)


def act_max_hook(name: str, stats: dict, reservoir=None):
    """A forward pre-hook recording max|x| per input channel of the module's input into stats[name] (on the
    input's device until `finish_act_max`), and offering the input to `reservoir`."""

    def fn(mod, inputs):
        x = inputs[0].detach()
        m = x.abs().reshape(-1, x.shape[-1]).amax(dim=0).float()
        prev = stats.get(name)
        stats[name] = m if prev is None else torch.maximum(prev, m.to(prev.device))
        if reservoir is not None:
            reservoir.add(name, x)

    return fn


def rows_hook(name: str, reservoir):
    """A forward pre-hook offering the module's input to `reservoir` only (its maxima already known)."""

    def fn(mod, inputs):
        reservoir.add(name, inputs[0].detach())

    return fn


def finish_act_max(stats: dict) -> dict[str, torch.Tensor]:
    """The maxima as float32 CPU tensors; refuse NaN/Inf."""
    out = {n: v.cpu() for n, v in stats.items()}
    for n, v in out.items():
        if not torch.isfinite(v).all():
            raise BadInput(f"activations at {n} hold NaN/Inf during calibration: the model or its weights are broken")
    return out


def calibrate(model, family, batches: np.ndarray, batch_size: int = 4, reservoir=None) -> dict[str, torch.Tensor]:
    return collect_act_max(model, family.quantized_linears(), batches, batch_size, reservoir=reservoir)


def text_fingerprint(batches: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(batches).tobytes()).hexdigest()[:16]


def save_act_scales(path: str | Path, scales: dict[str, torch.Tensor], meta: dict | None = None) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().float().contiguous().cpu() for k, v in sorted(scales.items())}
    # one metadata key: safetensors writes its metadata map in arbitrary order, which would break byte identity
    md = {"sq_export": json.dumps({"format": "act_scales/1", **(meta or {})}, sort_keys=True)}
    with atomic_file(path, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata=md)


def load_act_scales(path: str | Path) -> dict[str, torch.Tensor]:
    """Read act_scales.safetensors, or a mit-han-lab/smoothquant act_scales .pt (dict name → tensor)."""
    p = Path(path)
    if not p.is_file():
        raise BadInput(f"act scales {p} not found: run `sq-export calibrate` first or pass the right file")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            d = load_file(str(p))
        else:
            d = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:
        raise BadInput(f"act scales {p} unreadable ({type(e).__name__}): expected a .safetensors or .pt dict of tensors") from e
    if not isinstance(d, dict) or not d or not all(isinstance(v, torch.Tensor) for v in d.values()):
        raise BadInput(f"act scales {p} is not a dict of tensors")
    return {k: v.float() for k, v in d.items()}


def act_scales_meta(path: str | Path) -> dict:
    """What save_act_scales recorded beside the maxima (model type, samples, calib_seq_len, tokens_fingerprint); {}
    for a file without (a mit-han-lab .pt)."""
    p = Path(path)
    if p.suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    with safe_open(str(p), framework="pt") as f:
        return json.loads((f.metadata() or {}).get("sq_export", "{}"))


def validate_act_scales(scales: dict[str, torch.Tensor], model, family, source: str = "act scales") -> None:
    """Refuse scales computed for another model: every quantized Linear needs a key of its input width."""
    names = family.quantized_linears()
    missing = [n for n in names if n not in scales]
    if missing:
        raise BadInput(
            f"{source} do not match this model: {len(missing)} of {len(names)} Linears have no entry (e.g. {missing[0]}); "
            "calibrate this model"
        )
    for n in names:
        want = in_features(model.get_submodule(n))
        got = tuple(scales[n].shape)
        if got != (want,):
            raise BadInput(f"{source} do not match this model: {n} has shape {got}, the Linear takes {want} channels")
        if not torch.isfinite(scales[n]).all() or (scales[n] < 0).any():
            raise BadInput(f"{source}: {n} holds NaN/Inf or negative values")


@dataclass
class Calibration:
    """What calibration measured and the token stream it came from: everything `prepare` needs besides the model.

    `act_max`: per quantized Linear, max|x| per input channel (keys: qualified module names). `reservoir`: the row
    sample (sq_export.quant.reservoir) when the recipe needs one (α search, clipping, fallback). `ids`: the whole
    calibration text's token ids; the calibration windows, the float-equivalence check batch and the fallback's
    scoring windows are all drawn from it with fixed seeds, so the same text and options give the same scales."""

    act_max: dict
    reservoir: object | None = None
    ids: np.ndarray | None = None
    options: CalibOptions = field(default_factory=CalibOptions)
    meta: dict = field(default_factory=dict)
    check: object | None = None  # token ids [n, L] for the float-equivalence check instead of calibration windows
    prefix: object | None = None  # the outlier prefix the statistics were taken after (sq_export.quant.prefix)

    def _ids(self) -> np.ndarray:
        if self.ids is None:
            raise BadInput("this Calibration holds no token ids (calibrate with text to get them)")
        return self.ids

    def windows(self) -> np.ndarray:
        """The calibration windows: [samples, seq_len] token ids (what the statistics were taken on)."""
        from sq_export.textdata import calibration_samples

        return calibration_samples(self._ids(), self.options.samples, self.options.seq_len)

    def check_batch(self):
        """Two windows of ≤128 tokens: the float-equivalence check of smoothing runs on them (`check` when given)."""
        from sq_export.textdata import calibration_samples

        if self.check is not None:
            return torch.as_tensor(self.check)
        ids = self._ids()
        return torch.as_tensor(calibration_samples(ids, 2, min(128, self.options.seq_len, len(ids))))

    def scoring_windows(self, n: int, seed: int = 1) -> np.ndarray:
        """`n` calibration-split windows of ≤512 tokens at another seed than calibration (`--fallback auto` scores
        on them: never the held-out text)."""
        from sq_export.textdata import calibration_samples

        ids = self._ids()
        return calibration_samples(ids, n, min(self.options.seq_len, 512, len(ids)), seed=seed)


def calibrate_ids(model, family, ids: np.ndarray, options: CalibOptions | None = None, *, rows: int | None = None,
                  act_scales: str | None = None, prefix=None, tokenizer=None, stats: bool = True) -> Calibration:
    """Calibrate `model` on windows of the token stream `ids`. `rows`: also keep a row sample of that many rows per
    Linear input. `act_scales`: take the maxima from that file (validated against the model); a row sample, if
    asked for, still needs the pass over the windows. `prefix`: an outlier prefix spec (recipe.parse_prefix) or an
    OutlierPrefix: the tokens are chosen on the calibration windows (float model, no prefix), their float KV cache
    computed, and the statistics taken with every window running after it (the prefix's own activations are not
    part of them: they never run at inference); `model` is left without it. `stats=False` (a float model with a
    prefix): only the prefix, no pass over the windows (the maxima stay empty)."""
    from sq_export.quant import prefix as prefix_mod
    from sq_export.quant.reservoir import new_reservoir
    from sq_export.textdata import calibration_samples

    o = options or CalibOptions()
    o.validate()
    ids = np.asarray(ids)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab and len(ids) and int(ids.max()) >= vocab:
        raise BadInput(f"the calibration text's token ids reach {int(ids.max())} but the model's vocabulary has {vocab} "
                       "entries: the tokenizer is not this model's (--tokenizer)")
    res = new_reservoir(family, rows) if rows else None
    meta: dict = {"samples": o.samples, "calib_seq_len": o.seq_len}
    batches = calibration_samples(ids, o.samples, o.seq_len)
    pre = prefix
    if pre is not None and not isinstance(pre, prefix_mod.OutlierPrefix):
        t = time.perf_counter()
        tokens, info = prefix_mod.choose_tokens(model, family, batches, pre, tokenizer)
        pre = prefix_mod.compute_prefix(model, tokens, tokenizer, {**info, "seconds": round(time.perf_counter() - t, 1)})
    if pre is not None:
        meta["prefix_outliers"] = list(pre.tokens)
    if not stats:
        return Calibration({}, None, ids, o, {**meta, "statistics": "none (float model)"}, prefix=pre)
    if act_scales and res is None:
        act = load_act_scales(act_scales)
        validate_act_scales(act, model, family, f"act scales {act_scales}")
        return Calibration(act, None, ids, o, {"source": Path(act_scales).name}, prefix=pre)
    t = time.perf_counter()
    with prefix_mod.applied(model, pre):
        act = calibrate(model, family, batches, o.batch_size, reservoir=res)
    meta.update({"tokens_fingerprint": text_fingerprint(batches), "seconds": round(time.perf_counter() - t, 1)})
    if act_scales:
        act = load_act_scales(act_scales)
        validate_act_scales(act, model, family, f"act scales {act_scales}")
        meta = {"source": Path(act_scales).name}
    return Calibration(act, res, ids, o, meta, prefix=pre)


def calibrate_for(model, family, tokenizer, recipe) -> Calibration:
    """The calibration `recipe` needs (its text and options; a row sample when it searches α, clips or falls back;
    its --act-scales file when given), on the tokenizer's ids of the calibration text."""
    from sq_export.textdata import token_ids

    ids = token_ids(tokenizer, recipe.calib.calib_text, "calib")
    return calibrate_ids(model, family, ids, recipe.calib, rows=recipe.reservoir_rows if recipe.needs_rows() else None,
                         act_scales=recipe.act_scales, prefix=recipe.prefix_spec(), tokenizer=tokenizer,
                         stats=recipe.needs_statistics())
