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
from pathlib import Path

import numpy as np
import torch

from sq_export import progress
from sq_export.errors import BadInput
from sq_export.fileio import atomic_file
from sq_export.modeling import in_features

ACT_SCALES_FILE = "act_scales.safetensors"


@torch.no_grad()
def run_decoder(model, batches, batch_size: int = 4, desc: str | None = None) -> None:
    """Forward `batches` ([n, L] token ids) through the decoder alone, for the hooks that observe it: the LM head's
    logits are not needed and cost ~20% of a small model's forward."""
    ids = torch.as_tensor(np.asarray(batches))
    body = getattr(model, "base_model", model)
    starts = range(0, len(ids), batch_size)
    for i in progress.bar(starts, desc=desc, unit="batch") if desc else starts:
        b = ids[i : i + batch_size]
        body(input_ids=b, attention_mask=torch.ones_like(b), use_cache=False)


@torch.no_grad()
def collect_act_max(model, names: list[str], batches: np.ndarray, batch_size: int = 4, desc="calibrate", reservoir=None) -> dict[str, torch.Tensor]:
    """Run `batches` ([n, L] token ids) through `model`; return {linear name: max|x| per input channel}.

    `reservoir` (optional, e.g. sq_export.quant.fallback.RowReservoir): its `add(name, x)` also sees every input, in the
    same pass, to keep a bounded sample of rows; the returned maxima are the same with or without it."""
    stats: dict[str, torch.Tensor] = {}
    hooks = []

    def hook(name):
        def fn(mod, inputs):
            x = inputs[0].detach()
            m = x.abs().reshape(-1, x.shape[-1]).amax(dim=0).float()
            prev = stats.get(name)
            stats[name] = m if prev is None else torch.maximum(prev, m)
            if reservoir is not None:
                reservoir.add(name, x)

        return fn

    for n in names:
        hooks.append(model.get_submodule(n).register_forward_pre_hook(hook(n)))
    try:
        run_decoder(model, batches, batch_size, desc)
    finally:
        for h in hooks:
            h.remove()
    for n, v in stats.items():
        if not torch.isfinite(v).all():
            raise BadInput(f"activations at {n} hold NaN/Inf during calibration: the model or its weights are broken")
    return stats


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


def run_calibration(model, family, tokenizer, calib_text=None, samples=512, seq_len=512, batch_size=4, reservoir=None):
    """Text → windows → act max (and, with `reservoir`, a bounded row sample in the same pass). Returns (scales, meta)."""
    from sq_export.textdata import calibration_samples, token_ids

    ids = token_ids(tokenizer, calib_text, "calib")
    batches = calibration_samples(ids, samples, seq_len)
    t = time.perf_counter()
    scales = calibrate(model, family, batches, batch_size, reservoir=reservoir)
    meta = {
        "samples": samples,
        "calib_seq_len": seq_len,
        "tokens_fingerprint": text_fingerprint(batches),
        "seconds": round(time.perf_counter() - t, 1),
    }
    return scales, meta
