#!/usr/bin/env python3
"""Run the engine-side tests where pytest is not installed (the lent GPU's TensorRT kit: $TRTPY has tensorrt,
polygraphy, onnx, onnxruntime and numpy, but no pytest, and nothing can be installed there).

    PYTHONPATH=. $TRTPY tools/run_trt_tests.py tests/test_engine_*.py      # exit 0: no failures

With pytest importable it simply runs pytest (-q --noconftest: tests/conftest.py needs torch, which the kit
lacks and the engine tests do not use). Otherwise it provides the small part of pytest's API these tests use
(fixtures tmp_path / monkeypatch / capsys and module-level @pytest.fixture functions, mark.parametrize,
importorskip, skip, raises, approx) as a stand-in `pytest` module, runs every `test_*` function of the given
files, and prints one line per test plus a summary. It is a fallback runner, not a pytest replacement.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import io
import math
import os
import re
import shutil
import sys
import tempfile
import time
import traceback
import types
from collections import namedtuple
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


# ---- the stand-in `pytest` module ----------------------------------------------------------------------------


class Skipped(Exception):
    pass


def skip(reason: str = "", allow_module_level: bool = False):
    raise Skipped(reason)


def importorskip(modname: str, minversion=None, reason=None):
    try:
        mod = __import__(modname)
        for part in modname.split(".")[1:]:
            mod = getattr(mod, part)
    except ImportError as e:
        raise Skipped(reason or f"could not import {modname!r}: {e}") from None
    return mod


class _Raises:
    def __init__(self, exc, match=None):
        self.exc, self.match, self.value = exc, match, None

    def __enter__(self):
        return self

    def __exit__(self, et, ev, tb):
        if et is None:
            raise AssertionError(f"DID NOT RAISE {self.exc}")
        if not issubclass(et, self.exc):
            return False
        if self.match is not None and not re.search(self.match, str(ev)):
            raise AssertionError(f"{et.__name__}({ev!s}) does not match {self.match!r}")
        self.value = ev
        return True


def raises(exc, *args, match=None, **kwargs):
    if args:  # raises(Exc, func, *args)
        with _Raises(exc, match) as r:
            args[0](*args[1:], **kwargs)
        return r
    return _Raises(exc, match)


class _Approx:
    def __init__(self, expected, rel=None, abs=None):
        self.expected, self.rel, self.abs = expected, rel, abs

    def __eq__(self, actual):
        rel = 1e-6 if self.rel is None and self.abs is None else (self.rel or 0.0)
        tol = max(rel * math.fabs(self.expected), self.abs or (1e-12 if self.rel is None else 0.0))
        return math.fabs(float(actual) - float(self.expected)) <= tol

    def __repr__(self):
        return f"approx({self.expected}, rel={self.rel}, abs={self.abs})"


def approx(expected, rel=None, abs=None):
    return _Approx(expected, rel, abs)


def fixture(func=None, **kwargs):
    def deco(f):
        f._is_fixture = True
        f._scope = kwargs.get("scope", "function")
        return f

    return deco(func) if callable(func) else deco


class _Mark:
    def __getattr__(self, name):
        if name == "parametrize":
            def parametrize(argnames, argvalues, **_kw):
                names = [n.strip() for n in argnames.split(",")] if isinstance(argnames, str) else list(argnames)

                def deco(f):
                    f._params = getattr(f, "_params", []) + [(names, list(argvalues))]
                    return f

                return deco
            return parametrize
        if name == "skipif":
            def skipif(cond, reason=""):
                def deco(f):
                    if cond:
                        f._skip = reason
                    return f
                return deco
            return skipif

        def marker(*a, **k):
            if len(a) == 1 and callable(a[0]) and not k:
                return a[0]
            return lambda f: f

        return marker


class MonkeyPatch:
    _missing = object()

    def __init__(self):
        self._undo = []

    def setattr(self, target, name, value=_missing, raising=True):
        if value is self._missing:  # setattr("pkg.mod.attr", value)
            value = name
            modname, name = target.rsplit(".", 1)
            target = importlib.import_module(modname)
        old = getattr(target, name, self._missing)
        if old is self._missing and raising:
            raise AttributeError(f"{target} has no attribute {name}")
        self._undo.append(lambda: delattr(target, name) if old is self._missing else setattr(target, name, old))
        setattr(target, name, value)

    def delattr(self, target, name, raising=True):
        old = getattr(target, name, self._missing)
        if old is self._missing:
            if raising:
                raise AttributeError(name)
            return
        self._undo.append(lambda: setattr(target, name, old))
        delattr(target, name)

    def setitem(self, dct, key, value):
        old = dct.get(key, self._missing)
        self._undo.append(lambda: dct.pop(key, None) if old is self._missing else dct.__setitem__(key, old))
        dct[key] = value

    def delitem(self, dct, key, raising=True):
        if key not in dct:
            if raising:
                raise KeyError(key)
            return
        old = dct[key]
        self._undo.append(lambda: dct.__setitem__(key, old))
        del dct[key]

    def setenv(self, name, value):
        self.setitem(os.environ, name, str(value))

    def delenv(self, name, raising=True):
        self.delitem(os.environ, name, raising)

    def chdir(self, path):
        old = os.getcwd()
        self._undo.append(lambda: os.chdir(old))
        os.chdir(path)

    def undo(self):
        while self._undo:
            self._undo.pop()()


CaptureResult = namedtuple("CaptureResult", ["out", "err"])


class CaptureFixture:
    def __init__(self):
        self._out, self._err = io.StringIO(), io.StringIO()
        self._saved = (sys.stdout, sys.stderr)
        sys.stdout, sys.stderr = self._out, self._err

    def readouterr(self):
        r = CaptureResult(self._out.getvalue(), self._err.getvalue())
        self._out.seek(0), self._out.truncate()
        self._err.seek(0), self._err.truncate()
        return r

    def close(self):
        sys.stdout, sys.stderr = self._saved


def install_stand_in():
    m = types.ModuleType("pytest")
    m.__doc__ = "stand-in from tools/run_trt_tests.py (real pytest is not installed)"
    m.skip = skip
    m.skip.Exception = Skipped
    m.importorskip = importorskip
    m.raises = raises
    m.approx = approx
    m.fixture = fixture
    m.mark = _Mark()
    m.MonkeyPatch = MonkeyPatch
    m.STAND_IN = True
    sys.modules["pytest"] = m


# ---- the runner --------------------------------------------------------------------------------------------------


def _load(path: Path):
    name = path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def _cases(func):
    """[(id suffix, kwargs)] from stacked parametrize marks."""
    cases = [("", {})]
    for names, values in reversed(getattr(func, "_params", [])):
        new = []
        for suffix, kw in cases:
            for i, v in enumerate(values):
                vals = v if len(names) > 1 else (v,)
                new.append((f"{suffix}-{i}" if suffix else str(i), {**kw, **dict(zip(names, vals))}))
        cases = new
    return cases


class TmpPathFactory:
    def __init__(self, cleanup: list):
        self.cleanup = cleanup

    def mktemp(self, basename: str = "tmp", numbered: bool = True) -> Path:
        d = Path(tempfile.mkdtemp(prefix=f"sqtest-{basename}-"))
        self.cleanup.append(lambda: shutil.rmtree(d, ignore_errors=True))
        return d


# module-scoped fixture values and their cleanups, per test module (released by run_files after the module)
_MODULE_CACHE: dict = {}
_MODULE_CLEANUP: list = []


def _call(mod, func, given: dict):
    cleanup = []
    cache = {}

    def resolve(name):
        if name in given:
            return given[name]
        if name in cache:
            return cache[name]
        if name == "tmp_path":
            d = Path(tempfile.mkdtemp(prefix="sqtest-"))
            cleanup.append(lambda: shutil.rmtree(d, ignore_errors=True))
            val = d
        elif name == "monkeypatch":
            val = MonkeyPatch()
            cleanup.append(val.undo)
        elif name == "capsys":
            val = CaptureFixture()
            cleanup.append(val.close)
        elif name == "tmp_path_factory":
            val = TmpPathFactory(_MODULE_CLEANUP)
        else:
            fx = getattr(mod, name, None)
            if not getattr(fx, "_is_fixture", False):
                raise LookupError(f"fixture {name!r} not found")
            module_scoped = getattr(fx, "_scope", "function") in ("module", "session")
            if module_scoped and name in _MODULE_CACHE:
                cache[name] = _MODULE_CACHE[name]
                return cache[name]
            args = {p: resolve(p) for p in inspect.signature(fx).parameters}
            res = fx(**args)
            if inspect.isgenerator(res):
                gen = res
                val = next(gen)
                (_MODULE_CLEANUP if module_scoped else cleanup).append(lambda g=gen: next(g, None))
            else:
                val = res
            if module_scoped:
                _MODULE_CACHE[name] = val
        cache[name] = val
        return val

    try:
        args = {p: resolve(p) for p in inspect.signature(func).parameters}
        func(**args)
    finally:
        for c in reversed(cleanup):
            with contextlib.suppress(Exception):
                c()


def run_files(files: list[str], keyword: str | None = None) -> int:
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    counts = {"passed": 0, "failed": 0, "skipped": 0, "error": 0}
    failures = []
    for f in files:
        path = Path(f).resolve()
        try:
            mod = _load(path)
        except Skipped as e:
            print(f"{path.name}: SKIPPED (module): {e}")
            counts["skipped"] += 1
            continue
        except Exception:
            print(f"{path.name}: ERROR importing")
            failures.append((path.name, traceback.format_exc()))
            counts["error"] += 1
            continue
        for name, func in list(vars(mod).items()):
            if not (name.startswith("test_") and inspect.isfunction(func)) or func.__module__ != mod.__name__:
                continue
            if keyword and keyword not in name:
                continue
            for suffix, kw in _cases(func):
                tid = f"{path.name}::{name}" + (f"[{suffix}]" if suffix else "")
                if getattr(func, "_skip", None):
                    print(f"{tid} SKIPPED ({func._skip})")
                    counts["skipped"] += 1
                    continue
                t0 = time.perf_counter()
                try:
                    _call(mod, func, kw)
                except Skipped as e:
                    print(f"{tid} SKIPPED ({e})")
                    counts["skipped"] += 1
                except Exception:
                    print(f"{tid} FAILED ({time.perf_counter() - t0:.1f}s)")
                    failures.append((tid, traceback.format_exc()))
                    counts["failed"] += 1
                else:
                    print(f"{tid} PASSED ({time.perf_counter() - t0:.1f}s)")
                    counts["passed"] += 1
                sys.stdout.flush()
        _MODULE_CACHE.clear()
        for c in reversed(_MODULE_CLEANUP):
            with contextlib.suppress(Exception):
                c()
        _MODULE_CLEANUP.clear()
    for tid, tb in failures:
        print(f"\n==== {tid} ====\n{tb}")
    print("\n" + ", ".join(f"{v} {k}" for k, v in counts.items()) + " (tools/run_trt_tests.py stand-in runner)")
    return 1 if counts["failed"] or counts["error"] else 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    keyword = None
    if "-k" in argv:
        i = argv.index("-k")
        keyword = argv[i + 1]
        del argv[i : i + 2]
    force = "--stand-in" in argv
    argv = [a for a in argv if a != "--stand-in"]
    files = argv or sorted(str(p) for p in (ROOT / "tests").glob("test_engine_*.py"))
    if not force:
        try:
            import pytest  # noqa: F401
        except ImportError:
            pass
        else:
            if not getattr(pytest, "STAND_IN", False):
                extra = ["-k", keyword] if keyword else []
                return int(pytest.main(["-q", "-rs", "--noconftest", "-p", "no:cacheprovider", *extra, *files]))
    install_stand_in()
    return run_files(files, keyword)


if __name__ == "__main__":
    sys.exit(main())
