"""The quantization recipe shared by `eval`, `export` and `run`: load → calibrate → (smooth) → quantize.

Same options and inputs give the same scales whichever command computes them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field


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
    alpha: float | str | dict | None = None  # None: the family's default; "auto": per-group search (sq_export.quant.fallback);
    # {group source: α}: the result of such a search, replayed
    per_channel: bool = True
    act_scales: str | None = None  # a saved act_scales file instead of calibrating
    calib: CalibOptions = field(default_factory=CalibOptions)
    linear_pairs: bool = False  # also smooth Linear → Linear pairs (up→down, v→o), see Family.linear_pairs
    clip: str | None = None  # static ranges: None/"max" (default), "pNN.NN" percentile of |x|, or "mse"
    fallback: str | None = None  # None, "auto", "N", or "name,name": Linears kept in float (FP16 in TensorRT)
    target_ppl_increase: float = 0.02  # --fallback auto: stop when the ppl upper bound ≤ float·(1+this) on calibration windows
    max_fallback: str = "10%"  # --fallback auto: at most this many (count or % of quantized Linears)
    reservoir_rows: int = 512  # rows per Linear input kept during calibration for auto α / clip / fallback

    def needs_rows(self) -> bool:
        return self.mode != "fp" and (self.alpha == "auto" or self.clip not in (None, "max") or self.fallback not in (None, "", "none", "0"))

    def validate(self):
        from sq_export.quant.qlinear import ACT_MODES
        from sq_export.quant.smooth import validate_alpha

        if self.mode not in MODES:
            raise BadInput(f"--mode {self.mode} unknown: choose one of {', '.join(MODES)}")
        if self.act not in ACT_MODES:
            raise BadInput(f"--act {self.act} unknown: choose one of {', '.join(ACT_MODES)}")
        if isinstance(self.alpha, dict):  # {group source: α}: an --alpha auto result, replayed (no search)
            for a in self.alpha.values():
                validate_alpha(a)
        elif self.alpha is not None and self.alpha != "auto":
            validate_alpha(self.alpha)
        from sq_export.quant.clip import parse_clip
        from sq_export.quant.fallback import max_fallback_count, parse_fallback

        parse_clip(self.clip)
        parse_fallback(self.fallback)
        max_fallback_count(self.max_fallback, 100)
        if self.mode == "fp" and (self.clip not in (None, "max") or parse_fallback(self.fallback)):
            raise BadInput("--clip/--fallback apply to quantized modes (naive, sq), not --mode fp")
        if self.act != "static" and self.clip not in (None, "max"):
            raise BadInput(f"--clip sets static activation ranges; it has no effect with --act {self.act}")
