"""`sq-export run`: the whole pipeline into one folder, resumable and deterministic.

    manifest = run_pipeline("smollm2", "out/", RunOptions(alpha=0.85))

Stages, in order (each writes into OUT):

  calibrate  act_scales.safetensors                        per-channel max|x| at every quantized Linear input
             (+ calib_rows.safetensors)                     bounded row sample per Linear input, only when --alpha auto,
                                                           --clip or --fallback need it (sq_export.quant.fallback)
  smooth     smoothed/ (HF folder), channel_stats.safetensors  norm (and with --smooth-pairs Linear→Linear) smoothing,
                                                           α fixed or searched per group (--alpha auto); float-equivalence
                                                           checked; per-channel stats for the report
  export     model.fp.onnx, model.naive.onnx, model.sq.onnx  naive: plain static W8A8 (the baseline); sq: the full recipe
                                                           (sq_export.quant.prepare.prepare: pairs, α, --clip, --fallback)
  check      check.json                                    sq_export.passes.check.run_check on the quantized graphs; violations fail (exit 1)
  build      model.*.engine (+ .json), build.json            TensorRT when importable, else recorded as skipped with the reason
  eval       eval.json                                     perplexity: PyTorch fp/naive/sq, ONNX Runtime per ONNX, TensorRT per engine;
                                                           per-Linear SQNR (naive vs SQ) on a calibration batch
  report     report.md, report.json, plots/*.png           sq_export.report

Each stage's record in OUT/manifest.json holds its inputs and outputs (path + sha256), its options, tool versions,
wall time and a small summary; the recipe options (--alpha, --smooth-pairs, --clip, --fallback ...) are part of the
options of every stage they affect, so changing one reruns exactly those stages and the ones downstream. A stage is skipped when its record is complete and its inputs' hashes, its options and
its outputs' hashes are all unchanged (`force` redoes everything; `until` stops after a stage). A stage writes into a
staging folder inside OUT; only when it completes are its files moved to their final paths and the manifest is
rewritten (atomically), so an interrupted stage leaves no file at a final path and the next run redoes just that
stage. The model is loaded once per run, lazily (a run whose stages are all up to date loads nothing), and copied
(deepcopy) before smoothing or quantizing.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sq_export.errors import BadInput, GraphCheckFailed, SqExportError
from sq_export.export.exporter import export_onnx
from sq_export.fileio import check_output_path, write_text_atomic
from sq_export.onnxio.meta import onnx_metadata
from sq_export.quant.prepare import working_copy
from sq_export.quant.recipe import CalibOptions
from sq_export.quant.reservoir import load_rows, save_rows

log = logging.getLogger(__name__)

SCHEMA = "sq_export.run/1"
STAGES = ("calibrate", "smooth", "export", "check", "build", "eval", "report")
MODES = ("fp", "naive", "sq")

MANIFEST = "manifest.json"
ACT_SCALES = "act_scales.safetensors"
CALIB_ROWS = "calib_rows.safetensors"
SMOOTHED = "smoothed"
CHANNEL_STATS = "channel_stats.safetensors"
ONNX = {m: f"model.{m}.onnx" for m in MODES}
ENGINES = {m: f"model.{m}.engine" for m in MODES}
CHECK = "check.json"
BUILD = "build.json"
EVAL = "eval.json"
STAGING_PREFIX = ".staging-"


@dataclass
class RunOptions:
    alpha: float | str | None = None  # None: the family's default; "auto": per-group search (sq_export.quant.fallback)
    act_scales: str | None = None  # use saved act scales instead of calibrating
    per_channel: bool = True
    weights: str = "int8"  # int8 | qdq (see `sq-export export --weights`)
    calib: CalibOptions = field(default_factory=CalibOptions)
    eval_text: str | None = None
    max_tokens: int | None = 4096
    seq_len: int = 512
    report_linear: str | None = None  # default: first Linear of the first smoothing group of layer n//2
    force: bool = False
    until: str | None = None
    # accuracy options, as sq_export.quant.recipe.Recipe (and `eval` / `export`)
    linear_pairs: bool = False  # --smooth-pairs
    clip: str | None = None  # None/"max", "pNN.NN", "mse"
    fallback: str | None = None  # None, "auto", "N", "name,name"
    target_ppl_increase: float = 0.02
    max_fallback: str = "10%"
    reservoir_rows: int = 512

    def recipe(self, mode: str = "sq"):
        from sq_export.quant.recipe import Recipe

        return Recipe(mode=mode, alpha=self.alpha, per_channel=self.per_channel, act_scales=self.act_scales, calib=self.calib,
                      linear_pairs=self.linear_pairs, clip=self.clip, fallback=self.fallback,
                      target_ppl_increase=self.target_ppl_increase, max_fallback=self.max_fallback,
                      reservoir_rows=self.reservoir_rows)

    def validate(self) -> None:
        self.recipe().validate()  # alpha (number in [0, 1] or "auto"), --clip, --fallback, --max-fallback
        if self.weights not in ("int8", "qdq"):
            raise BadInput(f"--weights {self.weights} unknown: int8 (TensorRT 10+) or qdq (TensorRT 8.6)")
        if self.until is not None and self.until not in STAGES:
            raise BadInput(f"--until {self.until} unknown: choose one of {', '.join(STAGES)}")
        if self.seq_len < 2:
            raise BadInput(f"--seq-len {self.seq_len} must be at least 2")
        if self.reservoir_rows < 1:
            raise BadInput(f"reservoir_rows {self.reservoir_rows} must be at least 1")
        if self.max_tokens is not None and self.max_tokens < 2:
            raise BadInput(f"--max-tokens {self.max_tokens} must be at least 2 (or 0 for all)")
        c = self.calib
        if c.samples < 1 or c.seq_len < 2 or c.batch_size < 1:
            raise BadInput("--samples and --calib-batch must be >= 1 and --calib-seq-len >= 2")


class _StageFailed(Exception):
    """Raised by a stage after its outputs were committed: record the stage as failed, then raise `error`."""

    def __init__(self, summary: dict, error: SqExportError):
        super().__init__(str(error))
        self.summary = summary
        self.error = error


class _Skip(Exception):
    """A stage that cannot run here (TensorRT missing): recorded as skipped with the reason."""


# ----- hashing -------------------------------------------------------------------------------------------------
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _dir_files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds")


def tool_versions() -> dict:
    import onnx
    import onnxruntime
    import torch
    import transformers

    import sq_export

    v = {
        "sq_export": sq_export.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }
    return v


# ----- the run -------------------------------------------------------------------------------------------------
class Pipeline:
    def __init__(self, model: str, out_dir, options: RunOptions, echo=None):
        from sq_export.modeling import resolve_model_path

        options.validate()
        self.opts = options
        self.model_arg = str(model)
        self.model_path = resolve_model_path(self.model_arg)
        self.out = Path(out_dir)
        self.echo = echo or (lambda msg: None)
        self._hashes: dict = {}
        self._versions = None
        # lazily built state (one model load per run)
        self._loaded = None
        self._act = None
        self._rows = None  # tune.RowReservoir read back from CALIB_ROWS
        self._alpha_groups = None  # {group source: α} of --alpha auto, as the smooth stage chose it
        self._quantized: dict = {}  # mode -> model
        self._prepared: dict = {}  # mode -> recipe.Prepared
        self._prepare_out()
        self.manifest = self._read_manifest()

    # --- folder, manifest ---
    def _prepare_out(self) -> None:
        if self.out.exists() and not self.out.is_dir():
            raise BadInput(f"-o {self.out} is a file: give a folder for the run's artifacts")
        check_output_path(self.out)  # the parent must exist and be writable
        self.out.mkdir(exist_ok=True)
        check_output_path(self.out / MANIFEST)
        # leftovers of a killed run (SIGKILL skips cleanup): staging folders and atomic-write temp files
        for p in self.out.iterdir():
            n = p.name
            if n.startswith(STAGING_PREFIX) or (n.startswith(".") and (".tmp" in n or n.endswith(".old"))):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)

    def _read_manifest(self) -> dict:
        p = self.out / MANIFEST
        fresh = {"schema": SCHEMA, "stages": {}}
        if not p.is_file():
            return fresh
        try:
            m = json.loads(p.read_text())
        except (OSError, ValueError):
            log.warning("%s is unreadable; every stage will run again", p)
            return fresh
        if not isinstance(m, dict) or m.get("schema") != SCHEMA or not isinstance(m.get("stages"), dict):
            log.warning("%s has another schema; every stage will run again", p)
            return fresh
        return m

    def _write_manifest(self) -> None:
        write_text_atomic(self.out / MANIFEST, json.dumps(self.manifest, indent=2, sort_keys=False) + "\n")

    def versions(self) -> dict:
        if self._versions is None:
            self._versions = tool_versions()
        v = dict(self._versions)
        import sys

        if "tensorrt" in sys.modules:  # imported by the build stage, if at all
            v["tensorrt"] = getattr(sys.modules["tensorrt"], "__version__", None)
        return v

    # --- hashing with a per-run cache ---
    def rel(self, p: Path) -> str:
        p = Path(p)
        try:
            return p.resolve().relative_to(self.out.resolve()).as_posix()
        except ValueError:
            return str(p.resolve())

    def digest(self, p: Path) -> dict:
        p = Path(p)
        if not p.exists():
            raise BadInput(f"{p} is missing")
        if p.is_dir():
            files = _dir_files(p)
            key = (str(p.resolve()), tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files))
            if key not in self._hashes:
                h = hashlib.sha256()
                size = 0
                for f in files:
                    h.update(f"{f.relative_to(p).as_posix()}\0{self._file_hash(f)}\n".encode())
                    size += f.stat().st_size
                self._hashes[key] = {"sha256": h.hexdigest(), "bytes": size, "files": len(files)}
            return {"path": self.rel(p), **self._hashes[key]}
        return {"path": self.rel(p), "sha256": self._file_hash(p), "bytes": p.stat().st_size}

    def _file_hash(self, p: Path) -> str:
        st = p.stat()
        key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
        if key not in self._hashes:
            self._hashes[key] = sha256_file(p)
        return self._hashes[key]

    def _intact(self, outputs: dict) -> bool:
        for o in outputs.values():
            p = self.out / o["path"]
            if not p.exists():
                return False
            d = self.digest(p)
            if d["sha256"] != o["sha256"]:
                return False
        return True

    # --- lazily built state ---
    def loaded(self):
        if self._loaded is None:
            from sq_export.families import family_for
            from sq_export.modeling import env_threads, load_model

            env_threads()
            from sq_export import progress

            if progress.QUIET:
                import transformers

                transformers.utils.logging.disable_progress_bar()
            t = time.perf_counter()
            model, tok, _ = load_model(self.model_arg, with_tokenizer=True)
            if tok is None:
                raise BadInput(f"model {self.model_arg} has no tokenizer: the pipeline needs one for calibration and eval")
            self._loaded = (model, tok, family_for(model))
            self.echo(f"loaded {self.model_arg} in {time.perf_counter() - t:.1f}s")
        return self._loaded

    def alpha(self) -> float | str:
        """The --alpha of the run: a number (the family's default when not given) or "auto"."""
        if self.opts.alpha == "auto":
            return "auto"
        _, _, fam = self.loaded()
        return fam.default_alpha if self.opts.alpha is None else float(self.opts.alpha)

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

    def recipe(self, mode: str = "sq"):
        return self.opts.recipe(mode)

    def needs_rows(self) -> bool:
        return self.recipe().needs_rows()

    def act_max(self) -> dict:
        if self._act is None:
            from sq_export.quant.calibrate import load_act_scales, validate_act_scales

            model, _, fam = self.loaded()
            self._act = load_act_scales(self.out / ACT_SCALES)
            validate_act_scales(self._act, model, fam, f"act scales {self.out / ACT_SCALES}")
        return self._act

    def rows(self):
        """The calibration row sample (tune.RowReservoir) the calibrate stage wrote (--alpha auto, --clip, --fallback)."""
        if self._rows is None:
            self._rows = load_rows(self.out / CALIB_ROWS)
        return self._rows

    def quantized(self, mode: str):
        """The PyTorch model of `mode` (fp: the float model itself). naive: plain static W8A8, the baseline (no
        smoothing, clipping or fallback); sq: the run's recipe, through sq_export.quant.prepare.prepare as `eval` and
        `export` build it, from this run's calibration (act scales + row sample)."""
        if mode == "fp":
            return self.loaded()[0]
        if mode not in self._quantized:
            from dataclasses import replace

            from sq_export.quant.prepare import CalibStats, prepare

            model, tok, fam = self.loaded()
            recipe = self.recipe(mode)
            if mode == "naive":
                recipe = replace(recipe, alpha=None, linear_pairs=False, clip=None, fallback=None)
            first = self._prepared.get(mode)
            if first is not None:  # built before in this run and released: replay its searches' results
                if first.alpha_per_group is not None:
                    recipe = replace(recipe, alpha=dict(first.alpha_per_group))
                if recipe.fallback not in (None, "", "none", "0"):
                    recipe = replace(recipe, fallback=",".join(first.fp16_layers) or None)
            m = working_copy(model, fam, smoothing=mode == "sq", linear_pairs=recipe.linear_pairs)
            stats = CalibStats(self.act_max(), self.rows() if self.recipe(mode).needs_rows() else None)
            prep = prepare(m, tok, fam, recipe, stats=stats)
            if mode == "sq" and prep.alpha_per_group is not None and prep.alpha_per_group != self.smooth_alpha():
                raise SqExportError(f"--alpha auto chose {prep.alpha_per_group} here but {self.smooth_alpha()} in the smooth "
                                    "stage (same calibration): rerun with --force")
            self._quantized[mode] = m
            if first is None:
                # the decisions and summaries, not the model (nor the family, which holds the float model: eval
                # releases that before ONNX Runtime runs, and a reference here kept its 513 MB alive)
                self._prepared[mode] = replace(prep, model=None, family=None, tokenizer=None)
        return self._quantized[mode]

    def prepared(self, mode: str):
        if mode not in self._prepared:
            self.quantized(mode)
        return self._prepared[mode]

    def release(self, *modes: str, model: bool = False) -> None:
        """Drop the quantized models of `modes` (and with `model` the loaded float model too; the tokenizer and the
        family stay) and give the freed memory back. What is dropped is rebuilt on demand: a quantized model from
        the float one, replaying the first build's α search and fallback choice; the float model by loading again."""
        from sq_export.memory import release_memory

        for m in modes:
            self._quantized.pop(m, None)
        if model and self._loaded is not None:
            self._quantized.clear()
            self._loaded = None
        release_memory()

    def calib_text(self) -> Path:
        from sq_export.textdata import default_text

        return Path(self.opts.calib.calib_text) if self.opts.calib.calib_text else default_text("calib")

    def eval_text(self) -> Path:
        from sq_export.textdata import default_text

        return Path(self.opts.eval_text) if self.opts.eval_text else default_text("eval")

    # --- the stage driver ---
    def run(self) -> dict:
        from sq_export import progress

        until = self.opts.until or STAGES[-1]
        stages = STAGES[: STAGES.index(until) + 1]
        self.manifest.update(
            {
                "schema": SCHEMA,
                "model": {"arg": self.model_arg, **self.digest(self.model_path)},
                "out": str(self.out.resolve()),
                "stage_order": list(STAGES),
            }
        )
        last = {"started": now_iso(), "finished": None, "until": until, "force": self.opts.force, "ran": [], "skipped": [], "status": "running"}
        self.manifest["last_run"] = last
        bar = progress.bar(total=len(stages), desc="run", unit="stage")
        try:
            for name in stages:
                bar.set_description(f"run: {name}")
                status = self._stage(name)
                (last["ran"] if status == "ran" else last["skipped"]).append(name)
                bar.update(1)
            last["status"] = "complete" if until == STAGES[-1] else f"stopped after {until}"
        except KeyboardInterrupt:
            last["status"] = "interrupted"
            raise
        except BaseException:
            last["status"] = "failed"
            raise
        finally:
            bar.close()
            last["finished"] = now_iso()
            self._write_manifest()
        return self.manifest

    def _stage(self, name: str) -> str:
        spec = getattr(self, f"_spec_{name}")
        fn = getattr(self, f"_run_{name}")
        stages = self.manifest["stages"]
        try:
            inputs_paths, options = spec()
        except _Skip as s:
            stages[name] = {"status": "skipped", "reason": str(s), "inputs": {}, "options": {}, "outputs": {},
                            "versions": self.versions(), "wall_s": 0.0, "finished": now_iso(), "summary": {}}
            self._write_manifest()
            self.echo(f"{name}: skipped ({s})")
            return "skipped"
        inputs = {k: self.digest(p) for k, p in inputs_paths.items()}
        options = json.loads(json.dumps(options))  # the form it takes in the manifest (tuples → lists ...)
        rec = stages.get(name)
        if (
            not self.opts.force
            and isinstance(rec, dict)
            and rec.get("status") in ("ran", "skipped")
            and rec.get("outputs")
            and rec.get("inputs") == inputs
            and rec.get("options") == options
            and self._intact(rec["outputs"])
        ):
            rec["status"] = "skipped"
            rec["reason"] = "up to date: inputs, options and outputs unchanged"
            self._write_manifest()
            self.echo(f"{name}: up to date, skipped")
            return "skipped"

        staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{name}-", dir=self.out))
        t0 = time.perf_counter()
        failure = None
        try:
            try:
                summary = fn(staging) or {}
            except _StageFailed as f:
                summary, failure = f.summary, f.error
            produced = self._commit(staging)
        except BaseException as e:
            stages[name] = {
                "status": "interrupted" if isinstance(e, KeyboardInterrupt) else "failed",
                "reason": f"{type(e).__name__}: {e}"[:500],
                "inputs": inputs, "options": options, "outputs": {}, "versions": self.versions(),
                "wall_s": round(time.perf_counter() - t0, 3), "finished": now_iso(), "summary": {},
            }
            self._write_manifest()
            raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            from sq_export.memory import release_memory

            release_memory()
        wall = time.perf_counter() - t0
        stages[name] = {
            "status": "failed" if failure else "ran",
            "reason": str(failure) if failure else None,
            "inputs": inputs,
            "options": options,
            "outputs": {n: self.digest(self.out / n) for n in produced},
            "versions": self.versions(),
            "wall_s": round(wall, 3),
            "finished": now_iso(),
            "summary": summary,
        }
        self._write_manifest()
        self.echo(f"{name}: {'FAILED' if failure else 'done'} in {wall:.1f}s")
        if failure:
            raise failure
        return "ran"

    def _commit(self, staging: Path) -> list[str]:
        """Move everything the stage wrote to its final path (each move atomic); folders replace folders."""
        names = sorted(p.name for p in staging.iterdir() if not p.name.startswith("."))
        for n in names:
            src, dst = staging / n, self.out / n
            if src.is_dir():
                if dst.exists():
                    old = Path(tempfile.mkdtemp(prefix=f".{n}.", suffix=".old", dir=self.out))
                    os.replace(dst, old / "x")
                    os.replace(src, dst)
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    os.replace(src, dst)
            else:
                if dst.is_dir():
                    shutil.rmtree(dst)
                os.replace(src, dst)
        return names

    def _stage_outputs(self, name: str) -> list[str]:
        rec = self.manifest["stages"].get(name) or {}
        return list((rec.get("outputs") or {}).keys()) if rec.get("status") in ("ran", "skipped") else []

    # ----- calibrate -----
    def _spec_calibrate(self):
        c = self.opts.calib
        calib = {"samples": c.samples, "calib_seq_len": c.seq_len, "calib_batch": c.batch_size}
        # the row sample only when a recipe option needs it ("row_sample" absent otherwise, so runs without those
        # options keep their records); the act max of a pass is the same with or without it
        rows = {"row_sample": self.opts.reservoir_rows} if self.needs_rows() else {}
        if self.opts.act_scales:
            inputs = {"model": self.model_path, "act_scales": Path(self.opts.act_scales)}
            if rows:  # the maxima come from the file; the row sample still needs a pass over the calibration text
                inputs["calib_text"] = self.calib_text()
                return inputs, {"act_scales": "given", **calib, **rows}
            return inputs, {"act_scales": "given"}
        options = {**calib, **rows}
        prev = (self.manifest["stages"].get("calibrate") or {}).get("options") or {}
        if not rows and prev.get("row_sample") and {k: v for k, v in prev.items() if k != "row_sample"} == options:
            options = prev  # the calibration that also sampled rows serves a recipe that needs none: no recalibration
        return {"model": self.model_path, "calib_text": self.calib_text()}, options

    def _run_calibrate(self, staging: Path) -> dict:
        from sq_export.quant.calibrate import load_act_scales, run_calibration, save_act_scales, validate_act_scales
        from sq_export.quant.reservoir import new_reservoir

        model, tok, fam = self.loaded()
        c = self.opts.calib
        res = new_reservoir(fam, self.opts.reservoir_rows) if self.needs_rows() else None
        if self.opts.act_scales:
            scales = load_act_scales(self.opts.act_scales)
            validate_act_scales(scales, model, fam, f"act scales {self.opts.act_scales}")
            meta = {"source": Path(self.opts.act_scales).name}
            if res is not None:
                run_calibration(model, fam, tok, c.calib_text, c.samples, c.seq_len, c.batch_size, reservoir=res)
        else:
            scales, meta = run_calibration(model, fam, tok, c.calib_text, c.samples, c.seq_len, c.batch_size, reservoir=res)
            meta.pop("seconds", None)  # no times in artifacts
        save_act_scales(staging / ACT_SCALES, scales, {"model_type": model.config.model_type, **meta})
        summary = {"linears": len(scales), **meta}
        if res is not None:
            save_rows(staging / CALIB_ROWS, res)
            summary["row_sample"] = {"rows": res.rows, "inputs": len(res.data), "bytes": res.nbytes()}
        elif (self.out / CALIB_ROWS).exists():
            (self.out / CALIB_ROWS).unlink()  # a stale sample of an earlier calibration must not be read
        # reload from the files: later stages use exactly what was written
        self._act = self._rows = self._alpha_groups = None
        self._quantized.clear()
        self._prepared.clear()
        return summary

    # ----- smooth -----
    def _recipe_options(self, *keys) -> dict:
        """The recipe options a stage records (so changing one reruns it): smooth_pairs, clip, fallback (+ the
        --fallback auto budget and criterion only when they apply)."""
        o = self.opts
        d = {}
        if "smooth_pairs" in keys:
            d["smooth_pairs"] = o.linear_pairs
        if "clip" in keys:
            d["clip"] = o.clip or "max"
        if "fallback" in keys:
            d["fallback"] = o.fallback or None
            if o.fallback == "auto":
                from sq_export.quant.fallback import FALLBACK_CRITERION

                d.update({"target_ppl_increase": o.target_ppl_increase, "max_fallback": o.max_fallback,
                          "fallback_windows_seq_len": o.calib.seq_len, "fallback_criterion": FALLBACK_CRITERION})
        return d

    def _rows_input(self) -> dict:
        return {"calib_rows": self.out / CALIB_ROWS} if self.needs_rows() else {}

    def _spec_smooth(self):
        o = self.opts
        inputs = {"model": self.model_path, "act_scales": self.out / ACT_SCALES, "calib_text": self.calib_text()}
        options = {"alpha": o.alpha, "check_seq_len": min(128, o.calib.seq_len), **self._recipe_options("smooth_pairs")}
        if o.alpha == "auto":  # the search reads the row sample and quantizes weights at this granularity
            inputs.update(self._rows_input())
            options["weight_granularity"] = "channel" if o.per_channel else "tensor"
        return inputs, options

    def _run_smooth(self, staging: Path) -> dict:
        import torch
        from safetensors.torch import save_file

        from sq_export.modeling import abs_max, weight_oi
        from sq_export.quant.prepare import check_batch
        from sq_export.quant.smooth import smooth_checked, smoothed_act_max

        model, tok, fam = self.loaded()
        o = self.opts
        pairs = o.linear_pairs
        alpha = self.alpha()
        act = self.act_max()
        alpha_groups = None
        t_search = None
        if alpha == "auto":
            from sq_export.quant.alpha import search_alpha

            t = time.perf_counter()
            alpha_groups = search_alpha(model, fam, act, self.rows(), pairs, per_channel=o.per_channel)
            t_search = round(time.perf_counter() - t, 2)
        m = working_copy(model, fam, smoothing=True, linear_pairs=pairs)  # shares what smoothing does not change
        # the same check as `smooth`/`eval`/`export`: the smoothed float model (pairs folded too) must give the
        # original logits, or nothing is written (exit 4)
        factors, delta = smooth_checked(m, fam, act, alpha_groups or alpha, check_batch(tok, self.recipe()), linear_pairs=pairs)
        dest = staging / SMOOTHED
        dest.mkdir()
        m.config.sq_export = {"smoothed": True, "alpha": alpha, "family": fam.name}
        if pairs:
            m.config.sq_export["smooth_pairs"] = True
        if alpha_groups is not None:
            m.config.sq_export["alpha_per_group"] = alpha_groups
        m.save_pretrained(dest, safe_serialization=True)
        del m.config.sq_export
        tok.save_pretrained(dest)
        save_file({k: v.contiguous() for k, v in sorted(factors.items())}, str(dest / "smoothing_factors.safetensors"))

        # per-channel statistics of every quantized Linear, before and after, for the report
        after = smoothed_act_max(act, fam, factors, pairs)
        names = fam.quantized_linears()
        stats = {}
        with torch.no_grad():
            for n in names:
                stats[f"act_before/{n}"] = act[n].float().clone().contiguous()
                stats[f"act_after/{n}"] = after[n].float().clone().contiguous()
                stats[f"w_before/{n}"] = abs_max(weight_oi(model.get_submodule(n)), 0).float().contiguous()
                stats[f"w_after/{n}"] = abs_max(weight_oi(m.get_submodule(n)), 0).float().contiguous()
        n_layers = fam.num_layers()
        prefix = fam.layer_prefix(n_layers // 2)
        groups = fam.groups()
        mid = [g for g in groups if g.source.startswith(prefix)]
        default_linear = (mid or groups)[0].linears[0]
        smoothed_names = sorted({n for g in fam.groups(include_linear_pairs=pairs) for n in g.linears})
        meta = {
            "format": "channel_stats/1",
            "alpha": alpha,
            "family": fam.name,
            "model_type": model.config.model_type,
            "num_layers": n_layers,
            "default_linear": default_linear,
            "linears": names,
            "smoothed_linears": smoothed_names,
            "smooth_pairs": pairs,
            "alpha_per_group": alpha_groups,
        }
        save_file(dict(sorted(stats.items())), str(staging / CHANNEL_STATS), metadata={"sq_export": json.dumps(meta, sort_keys=True)})
        self._alpha_groups = alpha_groups
        self._quantized.pop("sq", None)
        self._prepared.pop("sq", None)
        summary = {"alpha": alpha, "smooth_pairs": pairs, "groups": len(factors), "max_abs_logit_change": delta,
                   "default_report_linear": default_linear}
        if alpha_groups is not None:
            summary["alpha_per_group"] = alpha_groups
            summary["alpha_search_s"] = t_search
        return summary

    # ----- export -----
    def _spec_export(self):
        inputs = {"model": self.model_path, "act_scales": self.out / ACT_SCALES, "smoothed": self.out / SMOOTHED, **self._rows_input()}
        if self.opts.fallback == "auto":  # scored on calibration-split windows
            inputs["calib_text"] = self.calib_text()
        return (
            inputs,
            {"alpha": self.opts.alpha, "weights": self.opts.weights, "weight_granularity": "channel" if self.opts.per_channel else "tensor",
             "act": "static", "target": "tensorrt", **self._recipe_options("smooth_pairs", "clip", "fallback")},
        )

    def _run_export(self, staging: Path) -> dict:
        _, _, fam = self.loaded()
        c = self.opts.calib
        summary = {}
        o = self.opts
        for mode in MODES:
            m = self.quantized(mode)
            prep = self._prepared.get(mode)
            n_q = len(prep.quantized) if prep else 0
            fp16 = list(prep.fp16_layers) if prep else []
            calibration = f"{c.samples}x{c.seq_len}" if not o.act_scales else Path(o.act_scales).name
            sq = mode == "sq"  # naive is the plain baseline: no pairs, no clipping
            meta = onnx_metadata(self.model_arg, fam, mode, prep, calibration,
                                 linear_pairs=sq and o.linear_pairs, clip=o.clip if sq else None)
            res = export_onnx(m, fam, staging / ONNX[mode], weights=o.weights, target="tensorrt", meta=meta)
            del m
            self.release(mode)  # one quantized model at a time (eval rebuilds it, replaying the searches)
            summary[mode] = {"bytes": res["bytes"], "nodes": res["nodes"], "quantized_linears": n_q}
            if mode == "sq":
                summary[mode]["fp16_layers"] = fp16
                if prep.tune.get("fallback"):
                    summary[mode]["fallback"] = prep.tune["fallback"]
                if prep.tune.get("clip_ratio"):
                    summary[mode]["clip_ratio_min"] = min(prep.tune["clip_ratio"].values())
        return summary

    # ----- check -----
    def _spec_check(self):
        return {m: self.out / ONNX[m] for m in ("naive", "sq")}, {"target": "trt", "graphs": ["naive", "sq"]}

    def _run_check(self, staging: Path) -> dict:
        from sq_export.passes.check import run_check

        reports = {}
        for m in ("naive", "sq"):
            r = run_check(self.out / ONNX[m], target="trt")
            d = r.to_json()
            d["source"] = ONNX[m]
            reports[ONNX[m]] = d
        ok = all(d["ok"] for d in reports.values())
        doc = {"ok": ok, "graphs": reports}
        (staging / CHECK).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        summary = {"ok": ok, "violations": {k: len(d["violations"]) for k, d in reports.items()}}
        if not ok:
            bad = [f"{k}: {v['rule']} {v['node']}" for k, d in reports.items() for v in d["violations"]][:3]
            n = sum(summary["violations"].values())
            raise _StageFailed(summary, GraphCheckFailed(f"check found {n} violation(s) ({'; '.join(bad)}); see {self.out / CHECK}"))
        return summary

    # ----- build -----
    def _trt(self):
        from sq_export.engine.trt_compat import import_tensorrt, require_gpu
        from sq_export.errors import BackendMissing

        try:
            trt = import_tensorrt()
        except BackendMissing as e:
            import re

            m = re.search(r"\((.*?)\)", str(e))
            raise _Skip(f"TensorRT not installed ({m.group(1) if m else str(e)[:200]})") from None
        try:
            gpu = require_gpu()
        except BackendMissing as e:
            raise _Skip(f"no usable GPU for TensorRT {trt.__version__} ({str(e)[:200]})") from None
        return trt, gpu

    def build_profile(self):
        L = self.opts.seq_len
        return {"batch": [1, 1, 4], "seq": [1, min(128, L), max(L, 2)]}

    def _spec_build(self):
        trt, gpu = self._trt()
        return (
            {m: self.out / ONNX[m] for m in MODES},
            {"tensorrt": trt.__version__, "gpu": gpu.get("name"), **self.build_profile()},
        )

    def _run_build(self, staging: Path) -> dict:
        from sq_export.engine.build import build_engine

        prof = self.build_profile()
        out = {}
        for mode in MODES:
            precision = "fp16" if mode == "fp" else "int8"
            dest = staging / ENGINES[mode]
            try:
                side = build_engine(self.out / ONNX[mode], dest, precision=precision, batch=prof["batch"], seq=prof["seq"])
            except BadInput as e:
                if mode != "fp":
                    raise
                out[mode] = {"built": False, "reason": str(e)}  # e.g. TensorRT 10+: an FP32 graph gives no FP16 engine
                continue
            side["engine"] = ENGINES[mode]
            side["onnx"] = ONNX[mode]
            write_text_atomic(str(dest) + ".json", json.dumps(side, indent=2) + "\n")
            out[mode] = {"built": True, "engine": ENGINES[mode], "bytes": side["engine_bytes"], "build_seconds": side["build_seconds"],
                         "precision": precision, "tensorrt_version": side["tensorrt_version"]}
        (staging / BUILD).write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
        return out

    def engines(self) -> dict:
        """{mode: engine path} of engines the build stage produced (and that are up to date)."""
        produced = set(self._stage_outputs("build"))
        return {m: self.out / ENGINES[m] for m in MODES if ENGINES[m] in produced}

    # ----- eval -----
    def _spec_eval(self):
        inputs = {"model": self.model_path, "act_scales": self.out / ACT_SCALES, "smoothed": self.out / SMOOTHED,
                  "eval_text": self.eval_text(), "calib_text": self.calib_text(), **self._rows_input()}
        inputs.update({f"onnx_{m}": self.out / ONNX[m] for m in MODES})
        inputs.update({f"engine_{m}": p for m, p in self.engines().items()})
        return inputs, {
            "max_tokens": self.opts.max_tokens,
            "seq_len": self.opts.seq_len,
            "alpha": self.opts.alpha,
            "weight_granularity": "channel" if self.opts.per_channel else "tensor",
            "sqnr_batch": [2, min(128, self.opts.calib.seq_len)],
            **self._recipe_options("smooth_pairs", "clip", "fallback"),
        }

    def _run_eval(self, staging: Path) -> dict:
        import numpy as np

        from sq_export.measure.perplexity import onnx_perplexity, torch_perplexity
        from sq_export.quant.prepare import check_batch
        from sq_export.measure.sqnr import linear_outputs, smoothed_reference, sqnr_against, sqnr_in_parts
        from sq_export.textdata import token_ids

        model, tok, fam = self.loaded()
        o = self.opts
        ids = np.array(token_ids(tok, o.eval_text, "eval"))  # a writable copy for torch.as_tensor
        ppl: dict = {"pytorch": {}, "onnxruntime": {}}
        secs: dict = {"pytorch": {}, "onnxruntime": {}}
        tokens = None
        # PyTorch: the float model, then one quantized model at a time (built, measured, released); the per-Linear
        # SQNR of each against the float model it approximates (naive: the float model; SQ: with --smooth-pairs the
        # smoothed float model, report.smoothed_reference). The float model's reference outputs (~160 MB for
        # SmolLM2) are taken after the perplexity pass, a third of the Linears at a time (report.sqnr_in_parts: the
        # float model is resident anyway, so recomputing them per mode is a few small forwards); the smoothed
        # reference of --smooth-pairs is taken whole before the SQ model is built, so that its model copy and the
        # SQ model never coexist
        names = fam.quantized_linears()
        batch = check_batch(tok, self.recipe())
        t_sqnr = 0.0
        sqnr = {n: {} for n in names}
        for mode in MODES:
            ref = None
            if mode == "sq" and o.linear_pairs:
                t = time.perf_counter()
                smoothed = smoothed_reference(model, fam, self.act_max(), self.smooth_alpha(), True)
                ref = linear_outputs(smoothed, names, batch)
                del smoothed
                t_sqnr += time.perf_counter() - t
            t = time.perf_counter()
            m = self.quantized(mode)
            r = torch_perplexity(m, ids, o.seq_len, o.max_tokens, desc=f"eval pytorch {mode}")
            ppl["pytorch"][mode], tokens = r["perplexity"], r["tokens"]
            secs["pytorch"][mode] = round(time.perf_counter() - t, 2)
            if mode != "fp":
                t = time.perf_counter()
                if ref is None:  # the float model's outputs, a third at a time (the SQ model is resident too)
                    got = sqnr_in_parts(model, m, names, batch)
                else:
                    got = sqnr_against(ref, m, names, batch)
                for n, v in got.items():
                    sqnr[n][mode] = v
                del got
                del m, ref
                self.release(mode)
                t_sqnr += time.perf_counter() - t
            else:
                del m
                self.release()  # the forward passes' freed activations, back to the OS
        prep = self.prepared("sq")
        alpha = self.alpha()
        del model, fam  # (the family holds the model too)
        self.release(model=True)  # ONNX Runtime and TensorRT below need no torch model
        for mode in MODES:
            t = time.perf_counter()
            r = onnx_perplexity(str(self.out / ONNX[mode]), ids, o.seq_len, o.max_tokens)
            self.release()  # ONNX Runtime frees a session's memory into the heap, where it stayed resident (+750 MB)
            ppl["onnxruntime"][mode] = r["perplexity"]
            secs["onnxruntime"][mode] = round(time.perf_counter() - t, 2)
        engines = self.engines()
        if engines:
            from sq_export.engine.run import Tokens, engine_perplexity
            from sq_export.measure.perplexity import chunk_tokens

            chunks = chunk_tokens(ids, o.seq_len, o.max_tokens)
            L = max(len(c) for c in chunks)
            arr = np.zeros((len(chunks), L), dtype=np.int64)
            for i, c in enumerate(chunks):
                arr[i, : len(c)] = c
            lengths = np.array([len(c) for c in chunks], dtype=np.int64)
            toks = Tokens(arr, (np.arange(L)[None] < lengths[:, None]).astype(np.int64), lengths, path="<eval text>")
            ppl["tensorrt"], secs["tensorrt"] = {}, {}
            for mode, p in engines.items():
                t = time.perf_counter()
                ppl["tensorrt"][mode] = engine_perplexity(p, toks)["perplexity"]
                secs["tensorrt"][mode] = round(time.perf_counter() - t, 2)
        engine_check = engine_agreement(ppl.get("tensorrt", {}), ppl["onnxruntime"])
        sqnr = [{"linear": n, **v} for n, v in sqnr.items()]  # a list: model order survives sort_keys
        secs["sqnr"] = round(t_sqnr, 2)
        recipe = {
            "alpha": alpha,
            "alpha_per_group": prep.alpha_per_group,
            "smooth_pairs": o.linear_pairs,
            "clip": o.clip or "max",
            "fallback": o.fallback or None,
            "quantized_layers_total": len(prep.quantized),
            "fp16_layers": list(prep.fp16_layers),
        }
        doc = {
            "recipe": recipe,
            "tokens": tokens,
            "seq_len": o.seq_len,
            "max_tokens": o.max_tokens,
            "eval_text": self.eval_text().name,
            "perplexity": ppl,
            "engine_vs_graph": engine_check,
            "layer_sqnr_db": sqnr,
            "sqnr_batch": list(batch.shape),
        }
        (staging / EVAL).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        return {"tokens": tokens, "perplexity": ppl, "seconds": secs, "fp16_layers": recipe["fp16_layers"],
                "engine_vs_graph": engine_check}

    # ----- report -----
    def _prior_records_digest(self) -> str:
        """What the report shows of the earlier stages' records (not this run's ran/skipped status)."""
        keep = {}
        for n in STAGES[:-1]:
            r = self.manifest["stages"].get(n)
            if r:
                keep[n] = {k: r.get(k) for k in ("inputs", "options", "outputs", "wall_s", "summary")}
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()

    def _spec_report(self):
        inputs = {"act_scales": self.out / ACT_SCALES, "channel_stats": self.out / CHANNEL_STATS, "eval": self.out / EVAL,
                  "check": self.out / CHECK}
        if BUILD in self._stage_outputs("build"):
            inputs["build"] = self.out / BUILD
        return inputs, {"linear": self.opts.report_linear, "stages_digest": self._prior_records_digest()}

    def _run_report(self, staging: Path) -> dict:
        from sq_export.report import write_report

        return write_report(self.out, self.manifest, staging, linear=self.opts.report_linear)


ENGINE_PPL_TOLERANCE = 0.05  # an engine more than 5 % above its own graph's perplexity computes something else


def engine_agreement(engine_ppl: dict, graph_ppl: dict, tol: float = ENGINE_PPL_TOLERANCE) -> dict:
    """{mode: {engine, onnxruntime, ratio, ok}}: each TensorRT engine's perplexity against ONNX Runtime's on the
    graph it was built from (same tokens). FP16 and INT8 engines land within 0.1 % of their graphs when they compute
    the graph's function; an FP16 overflow inside an engine shows up as a ratio of 100-1000x."""
    import math

    out = {}
    for mode, e in engine_ppl.items():
        g = graph_ppl.get(mode)
        if g is None:
            continue
        ratio = e / g if g and math.isfinite(e) else float("inf")
        out[mode] = {"engine": e, "onnxruntime": g, "ratio": ratio, "ok": bool(ratio <= 1 + tol)}
    return out


def run_pipeline(model, out_dir, options: RunOptions | None = None, echo=None) -> dict:
    """Run (or resume) the pipeline into `out_dir`; return the manifest (also in OUT/manifest.json)."""
    return Pipeline(model, out_dir, options or RunOptions(), echo=echo).run()


def options_dict(o: RunOptions) -> dict:
    return asdict(o)
