"""TensorRT through another Python interpreter (`run --trt-python PATH`).

TensorRT is often installed apart from torch — another virtual environment or container, or (on this project's
lent GPU) a CPython 3.10 kit beside a 3.12 torch. The pipeline's torch side then runs in one interpreter and its
TensorRT side in the other: each call here runs `PATH -m sq_export ...` (this package first on its PYTHONPATH; the
engine side imports no torch) and reads the one JSON line the command prints last. With `python=None`, build and
perplexity run in this process instead, so callers use one code path either way.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from sq_export.errors import BackendMissing, BadInput

PACKAGE_ROOT = Path(__file__).resolve().parents[2]

_PROBE = (
    "import json\n"
    "from sq_export.engine.trt_compat import import_tensorrt, require_gpu\n"
    "trt = import_tensorrt()\n"
    "print(json.dumps({'tensorrt': trt.__version__, 'gpu': require_gpu()}))\n"
)


def child_env() -> dict:
    """This environment with this package first on PYTHONPATH (for `PYTHON -m sq_export` in a child process)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(PACKAGE_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def last_line(text: str | None) -> str:
    """The last non-blank line of a child's output ("" for none): its error message."""
    lines = [ln for ln in (text or "").strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def _run(python: str, args: list, what: str) -> dict:
    """Run `python args...`; its last stdout line as JSON. BackendMissing when the interpreter cannot run at all,
    BadInput with the child's last error line when the command fails."""
    try:
        p = subprocess.run([python, *args], env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    except OSError as e:
        raise BackendMissing(f"--trt-python {python} cannot be run ({type(e).__name__}: {e.strerror or e})") from None
    if p.returncode != 0:
        msg = last_line(p.stderr) or f"exit {p.returncode}"
        if p.returncode == 3 or "BackendMissing" in msg or "TensorRT is not importable" in msg or "no usable GPU" in msg:
            raise BackendMissing(f"{what} under {python}: {msg}")
        raise BadInput(f"{what} under {python} failed (exit {p.returncode}): {msg}")
    lines = [ln for ln in (p.stdout or "").strip().splitlines() if ln.strip()]
    try:
        return json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        raise BadInput(f"{what} under {python} printed no JSON result (last output: {(lines or ['nothing'])[-1][:200]})") from None


def probe(python: str) -> tuple[str, dict]:
    """(TensorRT version, GPU facts) under `python`; BackendMissing when it has none (in this process:
    trt_compat.import_tensorrt and require_gpu, whose failures `run` reports apart)."""
    got = _run(python, ["-c", _PROBE], "probing TensorRT")
    return str(got["tensorrt"]), dict(got.get("gpu") or {})


def build(onnx_path, engine_path, *, precision: str, batch, seq, python: str | None = None) -> dict:
    """Build one engine (sq_export.engine.build.build_engine's options that `run` uses); its sidecar dict."""
    if python is None:
        from sq_export.engine.build import build_engine

        return build_engine(onnx_path, engine_path, precision=precision, batch=batch, seq=seq)
    args = ["-m", "sq_export", "-q", "build", str(onnx_path), "-o", str(engine_path), "--precision", precision,
            "--batch", ":".join(map(str, batch)), "--seq", ":".join(map(str, seq)), "--json"]
    return _run(python, args, f"building {Path(engine_path).name}")


def perplexity(engine_path, tokens, *, python: str | None = None) -> dict:
    """engine_perplexity of an engine or an engine manifest on `tokens` (sq_export.engine.run.Tokens)."""
    if python is None:
        from sq_export.engine.run import engine_perplexity

        return engine_perplexity(engine_path, tokens)
    with tempfile.TemporaryDirectory(prefix="sq_tokens_") as d:
        f = Path(d) / "tokens.npz"
        np.savez(f, input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, lengths=tokens.lengths)
        return _run(python, ["-m", "sq_export", "eval", str(engine_path), "--tokens", str(f), "--json"],
                    f"measuring {Path(engine_path).name}")


def engines_perplexity(engines: dict, tokens, *, python: str | None = None) -> tuple[dict, dict]:
    """({name: perplexity}, {name: seconds}) of each engine or engine manifest in `engines` ({name: path})."""
    ppl, secs = {}, {}
    for name, path in engines.items():
        t = time.perf_counter()
        ppl[name] = perplexity(path, tokens, python=python)["perplexity"]
        secs[name] = round(time.perf_counter() - t, 2)
    return ppl, secs
