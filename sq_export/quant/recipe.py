"""The quantization recipe: what `prepare` does to a float model, in one object, assembled in one place.

    Recipe()                       the default: the most accurate TensorRT-expressible recipe the project knows
    Recipe.paper()                 the paper's setup: norm folds only, the family's fixed α
    Recipe.naive()                 plain static W8A8, no smoothing (the baseline)
    make_recipe("paper", alpha=0.7, quantize_attention=True)   a preset with options overriding it

Every command (`eval`, `export`, `run`, `diagnose`, `generate`), the Python API and the tools build their recipe
with `make_recipe`, so the same names mean the same thing everywhere and a preset is defined once (RECIPES).
Torch-free: parsing and validating a recipe imports nothing heavy.

The default (measured on SmolLM2-135M, docs/ACCURACY.md): pair smoothing (up→down and v→o folded into the
producer's rows) + α searched per smoothing group + automatic float fallback of the few Linears that cost most,
scored on calibration-split windows, within a budget of 10 % of the Linears. Static per-tensor activation scales
throughout (the only form TensorRT runs).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from sq_export.errors import BadInput

MODES = ("fp", "naive", "sq")
ACT_MODES = ("static", "dynamic-tensor", "dynamic-token", "none")

# The presets: each a set of field values over the dataclass defaults (which are "default" itself).
RECIPES: dict[str, dict] = {
    "default": {},
    "paper": {"alpha": None, "linear_pairs": False, "fallback": None, "rotate_down": None},
    "naive": {"mode": "naive", "alpha": None, "linear_pairs": False, "fallback": None, "rotate_down": None},
    "fp": {"mode": "fp", "alpha": None, "linear_pairs": False, "fallback": None, "rotate_down": None},
}
# the default recipe's down_proj input rotation (block Hadamard order; docs/ACCURACY.md: SmolLM2 +1.40 % -> +1.21 %
# with 2 instead of 12 Linears in float, Gemma-3-270m +4.5 % -> +3.05 % with none, 2026-11-30)
DEFAULT_ROTATE_DOWN = 64
RECIPE_HELP = {
    "default": "pair smoothing + per-group alpha search + down_proj inputs rotated (Hadamard 64) + automatic float fallback (the most accurate)",
    "paper": "SmoothQuant as published: norm folds only, the family's fixed alpha",
    "naive": "static W8A8 without smoothing (the baseline)",
    "fp": "no quantization",
}


@dataclass
class CalibOptions:
    calib_text: str | None = None  # None: the shipped calibration split
    samples: int = 512
    seq_len: int = 512
    batch_size: int = 4

    def validate(self) -> None:
        if self.samples < 1 or self.seq_len < 2 or self.batch_size < 1:
            raise BadInput("--samples and --calib-batch must be >= 1 and --calib-seq-len >= 2")

    def label(self) -> str:
        return f"{self.samples}x{self.seq_len}"


@dataclass
class Recipe:
    mode: str = "sq"  # fp | naive | sq
    act: str = "static"  # static (TensorRT's form) | dynamic-tensor | dynamic-token | none (PyTorch measurement)
    # None: the family's default α; a number in [0, 1]; "auto": per-group search (sq_export.quant.alpha);
    # "kl": one α per Linear-pair kind, by the KL to the float model on calibration-split windows (alpha.search_alpha_kl);
    # {group source: α}: the result of such a search, replayed
    alpha: float | str | dict | None = "auto"
    per_channel: bool = True  # INT8 weight scales per output channel (else per tensor)
    act_scales: str | None = None  # a saved act_scales file instead of calibrating
    calib: CalibOptions = field(default_factory=CalibOptions)
    linear_pairs: bool = True  # also smooth Linear → Linear pairs (up→down, v→o), see Family.linear_pairs
    clip: str | None = None  # static ranges: None/"max", "pNN.NN" percentile of |x|, or "mse"
    fallback: str | None = "auto"  # None, "auto", "N", or "name,name": Linears kept in float (FP16 in TensorRT)
    target_ppl_increase: float = 0.02  # --fallback auto: stop when the ppl upper bound ≤ float·(1+this)
    max_fallback: str = "10%"  # --fallback auto: at most this many (count or % of quantized Linears)
    reservoir_rows: int = 512  # rows per Linear input kept during calibration for auto α / clip / fallback
    quantize_attention: bool = False  # Q/DQ on both inputs of Q·Kᵀ and P·V (sq_export.quant.attention)
    quantize_lm_head: bool = False  # the LM head W8A8 too (sq_export.quant.lm_head)
    # an outlier prefix (PrefixQuant; sq_export.quant.prefix): None/"none", "auto", "N" (tokens), "ids:1,198" or
    # "text:..." — its float KV cache is prefixed to every sequence; static scales are calibrated without it
    prefix_outliers: str | None = None
    # --rotate-down B: the MLP output Linear's input rotated by a block Hadamard of order B before it is quantized
    # (an online transform; sq_export.quant.hadamard); None or "none": no rotation; "default": DEFAULT_ROTATE_DOWN
    # where it applies (SmoothQuant with max ranges), else none — resolved when the recipe is made
    rotate_down: int | str | None = "default"

    def __post_init__(self):
        if self.rotate_down == "default":
            self.rotate_down = DEFAULT_ROTATE_DOWN if self.mode == "sq" and self.clip in (None, "max") else None
        elif isinstance(self.rotate_down, str) and self.rotate_down.strip().lower() in ("none", "off"):
            self.rotate_down = None

    # ----- presets ---------------------------------------------------------------------------------------------
    @classmethod
    def paper(cls, **overrides) -> "Recipe":
        return make_recipe("paper", **overrides)

    @classmethod
    def naive(cls, **overrides) -> "Recipe":
        return make_recipe("naive", **overrides)

    @classmethod
    def fp(cls, **overrides) -> "Recipe":
        return make_recipe("fp", **overrides)

    # ----- what it needs ---------------------------------------------------------------------------------------
    def fallback_spec(self):
        return parse_fallback(self.fallback) if self.mode != "fp" else None

    def needs_rows(self) -> bool:
        """Whether calibration must also keep a row sample (sq_export.quant.reservoir)."""
        if self.mode == "fp":
            return False
        return (self.mode == "sq" and self.alpha == "auto") or self.clip not in (None, "max") or self.fallback_spec() is not None

    def prefix_spec(self):
        return parse_prefix(self.prefix_outliers)

    def needs_statistics(self) -> bool:
        """Whether calibration must measure activation maxima (a float model needs at most its outlier prefix)."""
        return self.mode != "fp"

    def needs_calibration(self) -> bool:
        return self.prefix_spec() is not None or self.mode == "sq" or (self.mode == "naive" and self.act == "static") or self.needs_rows() \
            or (self.mode != "fp" and (self.quantize_attention or self.quantize_lm_head))

    def baseline(self) -> "Recipe":
        """The plain W8A8 baseline with this recipe's calibration and runtime options (what `run` reports beside it)."""
        return dataclasses.replace(self, mode="naive", alpha=None, linear_pairs=False, clip=None, fallback=None, rotate_down=None)

    def validate(self) -> "Recipe":
        if self.mode not in MODES:
            raise BadInput(f"--mode {self.mode} unknown: choose one of {', '.join(MODES)}")
        if self.act not in ACT_MODES:
            raise BadInput(f"--act {self.act} unknown: choose one of {', '.join(ACT_MODES)}")
        if isinstance(self.alpha, dict):  # {group source: α}: an --alpha auto result, replayed (no search)
            for a in self.alpha.values():
                validate_alpha(a)
        elif self.alpha is not None and self.alpha not in ("auto", "kl"):
            validate_alpha(self.alpha)
        parse_clip(self.clip)
        parse_fallback(self.fallback)
        parse_prefix(self.prefix_outliers)
        max_fallback_count(self.max_fallback, 100)
        if not float(self.target_ppl_increase) >= 0.0:
            raise BadInput(f"--target-ppl-increase {self.target_ppl_increase} must be a non-negative fraction")
        if self.reservoir_rows < 1:
            raise BadInput(f"reservoir_rows {self.reservoir_rows} must be at least 1")
        self.calib.validate()
        if self.mode == "fp" and (self.clip not in (None, "max") or parse_fallback(self.fallback)):
            raise BadInput("--clip/--fallback apply to quantized modes (naive, sq), not --mode fp")
        if self.mode == "fp" and self.quantize_lm_head:
            raise BadInput("--quantize-lm-head applies to quantized modes (naive, sq), not --mode fp")
        if self.act != "static" and self.clip not in (None, "max"):
            raise BadInput(f"--clip sets static activation ranges; it has no effect with --act {self.act}")
        if self.rotate_down is not None:
            validate_rotate_down(self.rotate_down)
            if self.mode == "fp":
                raise BadInput("--rotate-down applies to quantized modes (naive, sq), not --mode fp")
            if self.clip not in (None, "max"):
                raise BadInput("--rotate-down takes the rotated inputs' ranges from their max: leave out --clip")
        return self

    def describe(self) -> str:
        """One line: what this recipe does (reports, logs)."""
        if self.mode == "fp":
            return "float"
        if self.mode == "naive":
            parts = ["naive W8A8"]
        else:
            a = self.alpha
            alpha = "alpha auto (per group)" if a == "auto" or isinstance(a, dict) else "alpha kl (per pair kind)" if a == "kl" \
                else f"alpha {a if a is not None else 'family default'}"
            parts = ["SmoothQuant W8A8", "norm + pair smoothing" if self.linear_pairs else "norm smoothing", alpha]
        if self.clip not in (None, "max"):
            parts.append(f"clip {self.clip}")
        fb = self.fallback_spec()
        if fb is not None:
            parts.append(f"fallback {self.fallback} (max {self.max_fallback})")
        if self.quantize_attention:
            parts.append("attention Q/DQ")
        if self.quantize_lm_head:
            parts.append("W8A8 LM head")
        if self.prefix_spec() is not None:
            parts.append(f"outlier prefix {self.prefix_outliers}")
        if self.rotate_down:
            parts.append(f"down_proj input rotated (Hadamard blocks of {self.rotate_down})")
        return ", ".join(parts)


def validate_rotate_down(b) -> int:
    """The --rotate-down block size: a power of two, at least 2 (BadInput naming it otherwise)."""
    if isinstance(b, bool) or not isinstance(b, int) or b < 2 or b & (b - 1):
        raise BadInput(f"--rotate-down {b!r}: the block must be a power of two, at least 2 (e.g. 64), or none (no rotation)")
    return b


def validate_alpha(alpha) -> float:
    try:
        a = float(alpha)
    except (TypeError, ValueError):
        raise BadInput(f"--alpha {alpha!r} is neither a number in [0, 1] nor 'auto' or 'kl'") from None
    if not (0.0 <= a <= 1.0):  # also rejects NaN
        raise BadInput(f"--alpha {alpha} is outside [0, 1]: the migration strength must be between 0 and 1")
    return a


# ----- option parsers (torch-free; clip.py and fallback.py use them too) ---------------------------------------
def parse_clip(spec: str | None):
    """None/'max' → None; 'p99.99' → ('pct', 99.99); 'mse' → ('mse', None)."""
    if spec is None or spec == "max":
        return None
    s = str(spec).strip().lower()
    if s == "mse":
        return ("mse", None)
    if s.startswith("p"):
        try:
            q = float(s[1:])
        except ValueError:
            q = float("nan")
        if 50.0 <= q <= 100.0:
            return ("pct", q)
    raise BadInput(f"--clip {spec} unknown: use max (default), a percentile of |x| such as p99.99 (50-100), or mse")


def parse_fallback(spec: str | None):
    """None → None; 'auto' → ('auto', None); '5' → ('n', 5); 'a.b,c.d' → ('names', [...])."""
    if spec is None or spec in ("", "none", "0"):
        return None
    s = str(spec).strip()
    if s == "auto":
        return ("auto", None)
    if s.isdigit():
        return ("n", int(s))
    return ("names", [x.strip() for x in s.split(",") if x.strip()])


def stream_fallback(fallback: str | None, recipe: Recipe) -> tuple[str | None, bool]:
    """The --fallback of a layer-streamed quantization (`run --stream`, `export --stream DIR`): `fallback` as given;
    none given (None), "none": the presets' --fallback auto scores whole-model logits for every candidate, which a
    streamed quantization never has (an explicit auto is refused, with the alternatives). `recipe`: the recipe as
    built without a --fallback. Returns (the --fallback to build the recipe with, whether it replaced that recipe's
    fallback: the callers say so)."""
    if fallback is not None:
        return fallback, False
    return "none", recipe.fallback is not None


def parse_prefix(spec) -> tuple | None:
    """--prefix-outliers: None/'none'/'0' → None; 'auto' → ('auto', None) (PrefixQuant's choice from calibration
    statistics); 'N' → ('n', N) (N tokens: the N-1 most frequent outlier token ids, then BOS); 'ids:1,198' or a
    comma list of two or more ids → ('ids', [1, 198]); 'text:STRING' → ('text', STRING) (tokenized, no special
    tokens)."""
    if spec is None:
        return None
    if str(spec).startswith("text:") and len(str(spec)) > 5:  # the text as given: whitespace is a token too
        return ("text", str(spec)[5:])
    s = str(spec).strip()
    if s.lower() in ("", "none", "0", "off"):
        return None
    if s.lower() == "auto":
        return ("auto", None)
    if s.isdigit():
        return ("n", int(s))
    body = s[4:] if s.startswith("ids:") else s
    parts = [p.strip() for p in body.split(",") if p.strip()]
    if parts and all(p.isdigit() for p in parts) and (s.startswith("ids:") or len(parts) > 1):
        return ("ids", [int(p) for p in parts])
    raise BadInput(f"--prefix-outliers {spec} unknown: none, auto, a token count N, ids:ID,ID,... or text:STRING")


def parse_percent(v, what: str) -> float:
    """'2', '2%', 2.0 → 0.02."""
    s = str(v).strip().rstrip("%")
    try:
        f = float(s)
    except ValueError:
        raise BadInput(f"{what} {v} is not a percentage (e.g. 2 or 2%)") from None
    if not (0 <= f <= 1000):
        raise BadInput(f"{what} {v} is outside 0..1000 %")
    return f / 100.0


def max_fallback_count(spec, total: int) -> int:
    """'10%' (default) → 10 % of `total` (at least 1); '7' → 7."""
    s = str(spec if spec is not None else "10%").strip()
    if s.endswith("%"):
        return max(1, int(math.floor(total * parse_percent(s, "--max-fallback"))))
    if s.isdigit():
        return int(s)
    raise BadInput(f"--max-fallback {spec} must be a count or a percentage such as 10%")


FIELDS = tuple(f.name for f in dataclasses.fields(Recipe))


def make_recipe(name: str | None = "default", *, calib: CalibOptions | None = None, **overrides) -> Recipe:
    """The one place a recipe is assembled: preset `name` (RECIPES), then every option given (not None) on top.

    `overrides` take Recipe's field names; None means "not given" (so a CLI passes its parsed options as they are):
    to switch an option off, give its off value (`fallback="none"`, `linear_pairs=False`). `alpha` "default"
    means the family's default α."""
    name = name or "default"
    if name not in RECIPES:
        raise BadInput(f"--recipe {name} unknown: choose one of {', '.join(RECIPES)}")
    unknown = sorted(set(overrides) - set(FIELDS))
    if unknown:
        raise TypeError(f"make_recipe: unknown option(s) {', '.join(unknown)}")
    values = dict(RECIPES[name])
    values.update({k: v for k, v in overrides.items() if v is not None})
    if values.get("alpha") == "default":
        values["alpha"] = None
    if values.get("fallback") in ("", "none", "0"):
        values["fallback"] = None
    if isinstance(values.get("alpha"), str) and values["alpha"] not in ("auto", "kl"):
        values["alpha"] = validate_alpha(values["alpha"])
    r = Recipe(calib=calib or CalibOptions(), **values)
    return r.validate()
