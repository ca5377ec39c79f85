"""The stage driver of `sq-export run`: manifest, content hashes, staging and resumption, for any list of stages.

A stage is an object with `name`, `spec(ctx) -> (inputs {key: path}, options dict)` (raising Skip when it cannot
run here) and `run(ctx, staging) -> summary` (writing its files into `staging`, raising StageFailed after its
outputs are complete but wrong). Each stage's record in OUT/manifest.json holds its inputs and outputs (path +
sha256), its options, tool versions, wall time and summary. A stage is skipped when its record is complete and its
inputs' hashes, its options and its outputs' hashes are all unchanged (`force` redoes everything; `until` stops
after a stage). A stage writes into a staging folder inside OUT; only when it completes are its files moved to
their final paths and the manifest is rewritten (atomically), so an interrupted stage leaves no file at a final
path and the next run redoes just that stage. `observers` (callables (stage name, event)) see each stage start
and end ("start", then "ran"/"skipped"): tools measure per stage without patching the driver.
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
from pathlib import Path

from sq_export.errors import BadInput, SqExportError
from sq_export.fileio import check_output_path, write_text_atomic
from sq_export.run.options import MANIFEST, STAGING_PREFIX

log = logging.getLogger(__name__)

SCHEMA = "sq_export.run/1"


class StageFailed(Exception):
    """Raised by a stage after its outputs were committed: record the stage as failed, then raise `error`."""

    def __init__(self, summary: dict, error: SqExportError):
        super().__init__(str(error))
        self.summary = summary
        self.error = error


class Skip(Exception):
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



class Driver:
    def __init__(self, out_dir, stages: list, options, echo=None, observers=()):
        self.opts = options
        self.out = Path(out_dir)
        self.stage_list = [s.name for s in stages]
        self.stages = {s.name: s for s in stages}
        self.echo = echo or (lambda msg: None)
        self.observers = list(observers)
        self._hashes: dict = {}
        self._versions = None
        self._prepare_out()
        self.manifest = self._read_manifest()
        self.ctx = None  # set by the caller (the context needs the manifest)

    def _notify(self, name: str, event: str) -> None:
        for f in self.observers:
            f(name, event)

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

    # --- the stage driver ---
    def run(self) -> dict:
        from sq_export import progress

        until = self.opts.until or self.stage_list[-1]
        stages = self.stage_list[: self.stage_list.index(until) + 1]
        self.manifest.update(
            {
                "schema": SCHEMA,
                "model": {"arg": self.ctx.model_arg, **self.digest(self.ctx.model_path)},
                "out": str(self.out.resolve()),
                "stage_order": list(self.stage_list),
            }
        )
        last = {"started": now_iso(), "finished": None, "until": until, "force": self.opts.force, "ran": [], "skipped": [], "status": "running"}
        self.manifest["last_run"] = last
        bar = progress.bar(total=len(stages), desc="run", unit="stage")
        try:
            for name in stages:
                bar.set_description(f"run: {name}")
                self._notify(name, "start")
                try:
                    status = self._stage(name)
                except BaseException:
                    self._notify(name, "failed")
                    raise
                self._notify(name, status)
                (last["ran"] if status == "ran" else last["skipped"]).append(name)
                bar.update(1)
            last["status"] = "complete" if until == self.stage_list[-1] else f"stopped after {until}"
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
        stage = self.stages[name]
        spec = lambda: stage.spec(self.ctx)  # noqa: E731
        fn = lambda staging: stage.run(self.ctx, staging)  # noqa: E731
        stages = self.manifest["stages"]
        try:
            inputs_paths, options = spec()
        except Skip as s:
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
            except StageFailed as f:
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


