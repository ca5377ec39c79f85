"""What the stages of a run share: the options, OUT, and the models, built lazily and once.

The float model is loaded once per run, lazily (a run whose stages are all up to date loads nothing). Each quantized
model (naive, paper, sq) is prepared from it by `sq_export.quant.prepare.prepare` on a working copy that shares
every tensor preparation does not write, from this run's calibration files (act scales + row sample), exactly as
`export` and `eval` prepare a model; when it is released and needed again it is rebuilt by replaying the first
build's searches (α per group, the fallback's choice), so every stage sees the same model.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from sq_export.errors import BadInput, SqExportError
from sq_export.run.options import ACT_SCALES, CALIB_ROWS, PREFIX, SMOOTHED, RunOptions


class RunContext:
    def __init__(self, model: str, out: Path, options: RunOptions, manifest: dict, echo=None):
        from sq_export.modeling import resolve_model_path

        self.opts = options
        self.model_arg = str(model)
        self.model_path = resolve_model_path(self.model_arg)
        self.out = Path(out)
        self.manifest = manifest
        self.echo = echo or (lambda msg: None)
        self.modes = options.modes()
        self._loaded = None
        self._tok = None  # the tokenizer alone (--stream)
        self._calib = None  # sq_export.quant.calibrate.Calibration read back from the calibrate stage's files
        self._alpha_groups = None  # {group source: α} of --alpha auto, as the smooth stage chose it
        self._quantized: dict = {}  # mode -> model
        self._prepared: dict = {}  # mode -> Prepared (decisions only: no model)

    # ----- recipes -----
    def recipe(self, mode: str = "sq"):
        return self.opts.recipe_for(mode)

    def needs_rows(self) -> bool:
        """Whether the calibrate stage keeps a row sample (never with --stream: the streamed quantization samples
        each layer's rows as it goes)."""
        if self.opts.stream:
            return False
        return any(self.recipe(m).needs_rows() for m in self.modes)

    def alpha(self) -> float | str:
        """The α of the delivered recipe: a number (the family's default when not given) or "auto"."""
        a = self.recipe("sq").alpha
        if a == "auto" or isinstance(a, dict):
            return "auto"
        _, _, fam = self.loaded()
        return fam.default_alpha if a is None else float(a)

    def smooth_alpha(self) -> float | dict:
        """What smoothing uses: the number, or with --alpha auto {group source: α} as the smooth stage chose it
        (recorded in smoothed/config.json, an input of every later stage)."""
        a = self.alpha()
        if a != "auto":
            return a
        if self._alpha_groups is None:
            cfg = json.loads((self.out / SMOOTHED / "config.json").read_text())
            self._alpha_groups = (cfg.get("sq_export") or {}).get("alpha_per_group")
            if not isinstance(self._alpha_groups, dict):
                raise BadInput(f"{self.out / SMOOTHED} records no alpha per group: rerun with --force")
        return self._alpha_groups

    # ----- the float model -----
    def tokenizer(self):
        """The model's tokenizer (the loaded model's, or read alone: a streamed run never loads the model)."""
        if self._loaded is not None:
            return self._loaded[1]
        if self._tok is None:
            from sq_export import api

            self._tok = api.load_tokenizer(self.model_arg)  # BadInput when there is none
            if self._tok is None:
                raise BadInput(f"model {self.model_arg} has no tokenizer: the pipeline needs one for calibration and eval")
        return self._tok

    def loaded(self):
        if self.opts.stream:  # every stage of a streamed run reads the checkpoint a layer (or a tensor) at a time
            raise SqExportError("internal: a --stream run never loads the whole model")
        if self._loaded is None:
            from sq_export import api, progress
            from sq_export.families import family_for

            if progress.QUIET:
                import transformers

                transformers.utils.logging.disable_progress_bar()
            t = time.perf_counter()
            model, tok = api.load_model(self.model_arg, device=self.opts.device, dtype=self.opts.model_dtype)
            if tok is None:
                raise BadInput(f"model {self.model_arg} has no tokenizer: the pipeline needs one for calibration and eval")
            self._loaded = (model, tok, family_for(model))
            self.echo(f"loaded {self.model_arg} in {time.perf_counter() - t:.1f}s")
        return self._loaded

    # ----- calibration, as the calibrate stage wrote it -----
    def calibration(self):
        """The run's Calibration: act scales and (when a recipe needs it) the row sample from OUT, with the
        calibration text's token ids."""
        if self._calib is None:
            from sq_export.quant.calibrate import Calibration, load_act_scales, validate_act_scales
            from sq_export.quant.reservoir import load_rows
            from sq_export.textdata import token_ids

            model, tok, fam = self.loaded()
            act = load_act_scales(self.out / ACT_SCALES)
            validate_act_scales(act, model, fam, f"act scales {self.out / ACT_SCALES}")
            rows = load_rows(self.out / CALIB_ROWS) if self.needs_rows() else None
            ids = token_ids(tok, self.opts.calib.calib_text, "calib")
            self._calib = Calibration(act, rows, ids, self.opts.calib)
            if self.opts.prefix_outliers:
                from sq_export.quant.prefix import load_prefix

                self._calib.prefix = load_prefix(self.out / PREFIX)
        return self._calib

    def prefix(self):
        """The run's outlier prefix (the calibrate stage chose it), or None."""
        return self.calibration().prefix if self.opts.prefix_outliers else None

    def forget_calibration(self) -> None:
        """After the calibrate stage rewrote its files: later stages read them again."""
        self._calib = self._alpha_groups = None
        self._quantized.clear()
        self._prepared.clear()

    def act_max(self) -> dict:
        return self.calibration().act_max

    # ----- the models -----
    def quantized(self, mode: str):
        """The PyTorch model of `mode` (fp: the float model itself)."""
        if mode == "fp":
            return self.loaded()[0]
        if mode not in self._quantized:
            import dataclasses

            from sq_export.families import family_for
            from sq_export.quant.prepare import prepare, working_copy

            model, tok, fam = self.loaded()
            recipe = self.recipe(mode)
            first = self._prepared.get(mode)
            if first is not None:  # built before in this run and released: replay its searches' results
                recipe = first.decisions()
            m = working_copy(model, fam, smoothing=recipe.mode == "sq", linear_pairs=recipe.linear_pairs)
            prep = prepare(m, family_for(m), recipe, self.calibration())
            if mode == "sq" and prep.alpha_per_group is not None and prep.alpha_per_group != self.smooth_alpha():
                raise SqExportError(f"--alpha auto chose {prep.alpha_per_group} here but {self.smooth_alpha()} in the smooth "
                                    "stage (same calibration): rerun with --force")
            self._quantized[mode] = m
            if first is None:
                # the decisions and summaries, not the model (nor the family, which holds the model: eval releases
                # the float model before ONNX Runtime runs, and a reference here kept its 513 MB alive)
                self._prepared[mode] = dataclasses.replace(prep, model=None, family=None)
        return self._quantized[mode]

    def prepared(self, mode: str):
        """What preparing `mode` decided (a Prepared without its model)."""
        if mode not in self._prepared:
            if mode == "fp":
                from sq_export.quant.prepare import Prepared

                self._prepared[mode] = Prepared(None, None, self.recipe("fp"), None, [], {})
            else:
                self.quantized(mode)
        return self._prepared[mode]

    def release(self, *modes: str, model: bool = False) -> None:
        """Drop the quantized models of `modes` (and with `model` the loaded float model too) and give the freed
        memory back. What is dropped is rebuilt on demand (see the module doc)."""
        from sq_export.memory import release_memory

        for m in modes:
            self._quantized.pop(m, None)
        if model and self._loaded is not None:
            self._quantized.clear()
            self._loaded = None
            self._calib = None
        release_memory()

    # ----- texts, records -----
    def calib_text(self) -> Path:
        from sq_export.textdata import default_text

        return Path(self.opts.calib.calib_text) if self.opts.calib.calib_text else default_text("calib")

    def eval_text(self) -> Path:
        from sq_export.textdata import default_text

        return Path(self.opts.eval_text) if self.opts.eval_text else default_text("eval")

    def stage_outputs(self, name: str) -> list[str]:
        rec = self.manifest["stages"].get(name) or {}
        return list((rec.get("outputs") or {}).keys()) if rec.get("status") in ("ran", "skipped") else []
