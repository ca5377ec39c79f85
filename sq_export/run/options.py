"""What `sq-export run` is asked to do: the recipe (a preset and its overrides, as `export` takes them), the graph
options, evaluation and the driver's controls; the artifact names in OUT."""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass, field

from sq_export.errors import BadInput
from sq_export.quant.recipe import CalibOptions, Recipe, make_recipe, stream_fallback

STAGES = ("calibrate", "smooth", "export", "check", "build", "eval", "report")

MANIFEST = "manifest.json"
ACT_SCALES = "act_scales.safetensors"
CALIB_ROWS = "calib_rows.safetensors"
SMOOTHED = "smoothed"
CHANNEL_STATS = "channel_stats.safetensors"
PREFIX = "prefix.safetensors"  # the outlier prefix's tokens and float KV cache (--prefix-outliers)
CHECK = "check.json"
BUILD = "build.json"
EVAL = "eval.json"
STAGING_PREFIX = ".staging-"


def onnx_name(mode: str) -> str:
    return f"model.{mode}.onnx"


def engine_name(mode: str) -> str:
    return f"model.{mode}.engine"


def segments_name(mode: str) -> str:
    """`--segments`: the graph's segment manifest (sq_export.onnxio.segments), beside model.{mode}.onnx."""
    return f"model.{mode}.segments.json"


def engine_segments_name(mode: str) -> str:
    """`--segments`: the engine manifest (one engine per segment: model.{mode}.engines.segNN.engine)."""
    return f"model.{mode}.engines.segments.json"


@dataclass
class RunOptions:
    # the delivered model's recipe: a preset (sq_export.quant.recipe.RECIPES) and the options overriding it (None:
    # the preset's value), exactly as `export` takes them
    recipe: str = "default"
    alpha: float | str | None = None  # a number, "auto" (per-group search), "default" (the family's)
    act_scales: str | None = None  # use saved act scales instead of calibrating
    per_channel: bool = True
    linear_pairs: bool | None = None  # --smooth-pairs / --no-smooth-pairs
    clip: str | None = None  # None/"max", "pNN.NN", "mse"
    fallback: str | None = None  # "auto", "none", "N", "name,name"
    target_ppl_increase: float | None = None
    max_fallback: str | None = None
    reservoir_rows: int = 512
    quantize_attention: bool = False
    quantize_lm_head: bool = False
    prefix_outliers: str | None = None  # an outlier prefix for every quantized model (sq_export.quant.prefix)
    rotate_down: int | None = None  # the delivered recipe's down_proj input rotation (sq_export.quant.hadamard)
    calib: CalibOptions = field(default_factory=CalibOptions)
    # the graphs
    weights: str = "int8"  # int8 | qdq | qdq16 (see `sq-export export --weights`)
    target: str = "tensorrt"  # tensorrt | ort
    dtype: str = "fp32"  # fp32 | fp16 (the ONNX graphs' float type)
    segments: int | None = None  # cut each graph into N segments of consecutive layers, one engine each
    build_jobs: int = 1  # --segments: segment engines built at once (host memory is the bound)
    trt_python: str | None = None  # build and measure the engines under this Python (TensorRT there; engine.external)
    # the PyTorch side (sq_export.device): where the model runs and its float type there
    device: str | None = None  # cuda | cuda:N | cpu | None (cuda when torch sees a GPU)
    model_dtype: str = "auto"  # auto (the checkpoint's on cuda, float32 on cpu) | float32 | float16 | bfloat16
    # evaluation and the report
    eval_text: str | None = None
    max_tokens: int | None = 4096
    seq_len: int = 512
    report_linear: str | None = None  # default: first Linear of the first smoothing group of layer n//2
    # layer-streamed (a model larger than memory: sq_export.run.streamed): fp and sq only, never the whole model
    stream: bool = False
    # the driver
    force: bool = False
    until: str | None = None

    def recipe_for(self, mode: str = "sq") -> Recipe:
        """The recipe of each model the run builds: sq is the delivered one (the run's recipe); paper the paper's
        setup and naive plain W8A8 beside it, with the same calibration and graph options; fp the float model."""
        runtime = dict(quantize_attention=self.quantize_attention or None, quantize_lm_head=self.quantize_lm_head or None,
                       per_channel=self.per_channel, act_scales=self.act_scales, reservoir_rows=self.reservoir_rows,
                       prefix_outliers=self.prefix_outliers)
        if mode == "fp":
            return make_recipe("fp", calib=self.calib)
        if mode == "paper":
            return make_recipe("paper", calib=self.calib, **runtime)
        main = make_recipe(self.recipe, calib=self.calib, alpha=self.alpha, linear_pairs=self.linear_pairs, clip=self.clip,
                           fallback=self.sq_fallback(), target_ppl_increase=self.target_ppl_increase,
                           max_fallback=self.max_fallback, rotate_down=self.rotate_down, **runtime)
        if mode == "naive":
            return main.baseline()
        if mode == "sq":
            return main
        raise KeyError(mode)

    def sq_fallback(self) -> str | None:
        """The delivered recipe's --fallback: the user's; with --stream, sq_export.quant.recipe.stream_fallback's
        (none unless given)."""
        return self._stream_fallback()[0] if self.stream else self.fallback

    def stream_fallback_defaulted(self) -> bool:
        """Whether --stream replaced the recipe's --fallback auto by none (the run says so)."""
        return self.stream and self._stream_fallback()[1]

    def _stream_fallback(self) -> tuple[str | None, bool]:
        return stream_fallback(self.fallback, make_recipe(self.recipe))

    def modes(self) -> tuple[str, ...]:
        """The models the run builds, in order: fp, naive, paper (unless the run's recipe is the paper's), sq; with
        --stream fp and sq only (naive and paper would each need a streamed quantization of their own)."""
        main = self.recipe_for("sq")
        if main.mode != "sq":
            raise BadInput(f"--recipe {self.recipe}: run delivers a SmoothQuant model (default or paper); the float and "
                           "naive models are always built beside it")
        if self.stream:
            return ("fp", "sq")
        return ("fp", "naive", "sq") if main == self.recipe_for("paper") else ("fp", "naive", "paper", "sq")

    def validate(self) -> None:
        if self.stream:
            self.validate_stream()
        if self.recipe_for("sq").alpha == "kl":  # (the preset and every recipe option: make_recipe validates)
            raise BadInput("--alpha kl is not a `run` option yet: use `eval` or `export` (or the API) with it")
        self.modes()
        if self.weights not in ("int8", "qdq", "qdq16"):
            raise BadInput(f"--weights {self.weights} unknown: int8 (TensorRT 10+), qdq or qdq16 (TensorRT 8.6)")
        if self.target not in ("tensorrt", "ort"):
            raise BadInput(f"--target {self.target} unknown: tensorrt or ort")
        if self.dtype not in ("fp32", "fp16"):
            raise BadInput(f"--dtype {self.dtype} unknown: fp32 or fp16")
        if self.model_dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise BadInput(f"--model-dtype {self.model_dtype} unknown: auto, float32, float16 or bfloat16")
        if self.until is not None and self.until not in STAGES:
            raise BadInput(f"--until {self.until} unknown: choose one of {', '.join(STAGES)}")
        if self.seq_len < 2:
            raise BadInput(f"--seq-len {self.seq_len} must be at least 2")
        if self.segments is not None and self.segments < 1:
            raise BadInput(f"--segments {self.segments} must be at least 1")
        if self.trt_python is not None and not (os.access(self.trt_python, os.X_OK) and os.path.isfile(self.trt_python)
                                                or shutil.which(self.trt_python)):
            raise BadInput(f"--trt-python {self.trt_python} is not an executable Python: give the path of the interpreter "
                           "that has TensorRT (e.g. /opt/trt/bin/python3)")
        if self.build_jobs < 1:
            raise BadInput(f"--build-jobs {self.build_jobs} must be at least 1")
        if self.build_jobs > 1 and self.segments is None:
            raise BadInput("--build-jobs builds segment engines at once: give --segments N too")
        if self.reservoir_rows < 1:
            raise BadInput(f"reservoir_rows {self.reservoir_rows} must be at least 1")
        if self.max_tokens is not None and self.max_tokens < 2:
            raise BadInput(f"--max-tokens {self.max_tokens} must be at least 2 (or 0 for all)")

    def validate_stream(self) -> None:
        """What --stream cannot do, refused in one line each with the alternative."""
        from sq_export.quant.recipe import parse_fallback

        if self.fallback is not None and (parse_fallback(self.fallback) or ("",))[0] == "auto":
            raise BadInput("--fallback auto scores whole-model logits for every candidate, which --stream never has: "
                           "use --fallback none (the --stream default), N or NAMES, or run without --stream")
        for flag, given, alt in (
            ("--quantize-attention", self.quantize_attention, "run without --stream"),
            ("--quantize-lm-head", self.quantize_lm_head, "run without --stream"),
            ("--act-scales", self.act_scales, "leave it out (--stream calibrates as it goes)"),
            ("--prefix-outliers", self.prefix_outliers, "run without --stream"),
        ):
            if given:
                raise BadInput(f"{flag} is not available with --stream (it needs the whole model): {alt}")
        if self.dtype != "fp32":
            raise BadInput(f"--dtype {self.dtype} is not available with --stream (graphs are written from placeholder "
                           "weights, float32 logits graphs only): use --weights qdq16 for compact graphs")

    def validate_model(self, model: str) -> None:
        """With --stream, MODEL must be a Hugging Face folder of safetensors (each layer is read from them)."""
        if not self.stream:
            return
        from sq_export.modeling import ALIASES, resolve_model_path

        if model in ALIASES:
            raise BadInput(f"--stream reads a Hugging Face folder of safetensors; {model} is a .gguf alias: run without "
                           "--stream, or save it once with save_pretrained(safe_serialization=True)")
        p = resolve_model_path(model)
        if not p.is_dir():
            raise BadInput(f"--stream reads a Hugging Face folder of safetensors, not {p.name}: run without --stream, or "
                           "save the model once with save_pretrained(safe_serialization=True)")
        if not any(p.glob("*.safetensors")):
            raise BadInput(f"--stream reads safetensors and {model} has none: save it once with "
                           "save_pretrained(safe_serialization=True)")

    def to_dict(self) -> dict:
        return asdict(self)
