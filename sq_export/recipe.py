"""The quantization recipe shared by `eval`, `export` and `run`: load → calibrate → (smooth) → quantize.

Same options and inputs give the same scales whichever command computes them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from sq_export.errors import BadInput

log = logging.getLogger(__name__)

MODES = ("fp", "naive", "sq")


@dataclass
class CalibOptions:
    calib_text: str | None = None
    samples: int = 512
    seq_len: int = 512
    batch_size: int = 4


@dataclass
class Recipe:
    mode: str = "sq"
    act: str = "static"
    alpha: float | None = None  # None: the family's default
    per_channel: bool = True
    act_scales: str | None = None  # a saved act_scales file instead of calibrating
    calib: CalibOptions = field(default_factory=CalibOptions)
    linear_pairs: bool = False

    def validate(self):
        from sq_export.quantize import ACT_MODES
        from sq_export.smooth import validate_alpha

        if self.mode not in MODES:
            raise BadInput(f"--mode {self.mode} unknown: choose one of {', '.join(MODES)}")
        if self.act not in ACT_MODES:
            raise BadInput(f"--act {self.act} unknown: choose one of {', '.join(ACT_MODES)}")
        if self.alpha is not None:
            validate_alpha(self.alpha)


@dataclass
class Prepared:
    model: object
    tokenizer: object
    family: object
    alpha: float | None
    quantized: list
    times: dict
    act_max: dict | None = None
    factors: dict | None = None
    smooth_delta: float | None = None


def get_act_max(model, family, tokenizer, recipe: Recipe):
    from sq_export.calibrate import load_act_scales, run_calibration, validate_act_scales

    if recipe.act_scales:
        d = load_act_scales(recipe.act_scales)
        validate_act_scales(d, model, family, f"act scales {recipe.act_scales}")
        return d, None
    c = recipe.calib
    d, meta = run_calibration(model, family, tokenizer, c.calib_text, c.samples, c.seq_len, c.batch_size)
    return d, meta


def check_batch(tokenizer, recipe: Recipe) -> torch.Tensor:
    """A small calibration batch for the float-equivalence check (first window of the calibration windows)."""
    from sq_export.textdata import calibration_samples, read_text, tokenize

    ids = tokenize(tokenizer, read_text(recipe.calib.calib_text, "calib"))
    return torch.as_tensor(calibration_samples(ids, 2, min(128, recipe.calib.seq_len, len(ids))))


def prepare(model, tokenizer, family, recipe: Recipe) -> Prepared:
    """Calibrate, smooth (mode sq) and swap Linears for QLinears (mode naive/sq), in place."""
    from sq_export.quantize import quantize_model, static_scales
    from sq_export.smooth import smooth_checked, smoothed_act_max

    recipe.validate()
    times = {}
    alpha = recipe.alpha if recipe.alpha is not None else family.default_alpha
    if recipe.mode == "fp":
        return Prepared(model, tokenizer, family, None, [], times)
    need_calib = recipe.mode == "sq" or recipe.act == "static"
    act_max = factors = delta = None
    if need_calib:
        t = time.perf_counter()
        act_max, _ = get_act_max(model, family, tokenizer, recipe)
        times["calibrate_s"] = time.perf_counter() - t
    if recipe.mode == "sq":
        t = time.perf_counter()
        factors, delta = smooth_checked(model, family, act_max, alpha, check_batch(tokenizer, recipe), linear_pairs=recipe.linear_pairs)
        act_max = smoothed_act_max(act_max, family, factors, recipe.linear_pairs)
        times["smooth_s"] = time.perf_counter() - t
    names = family.quantized_linears()
    scales = static_scales(act_max, names) if recipe.act == "static" else None
    quantized = quantize_model(model, names, recipe.act, scales, recipe.per_channel)
    return Prepared(model, tokenizer, family, alpha if recipe.mode == "sq" else None, quantized, times, act_max, factors, delta)
