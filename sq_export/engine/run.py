"""Run ONNX graphs (ONNX Runtime) and TensorRT engines on token files; perplexity with sq_export.measure.perplexity.

Token file (written by the torch side, ``sq-export tokens``): an ``.npz`` holding
  input_ids       int64 [n_chunks, seq_len]   the chunks, already cut as eval cuts them (sq_export.measure.perplexity.chunk_tokens)
  attention_mask  int64 [n_chunks, seq_len]   1 on real tokens, 0 on padding
  lengths         int64 [n_chunks] (optional) real length of each chunk; positions >= length are padding and are
                                              excluded from perplexity and from comparisons
Both backends are fed exactly these arrays (cast to the dtype each model's input expects: TensorRT 8.x engines
take int32 where the ONNX graph said int64), and perplexity is summed with the same functions eval uses, so the
numbers differ only by the logits.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sq_export.errors import BadInput
from sq_export.measure.perplexity import PerplexityAccumulator

ENGINE_SUFFIXES = (".engine", ".plan", ".trt")
ONNX_SUFFIXES = (".onnx",)
LOGITS_NAMES = ("logits", "lm_logits", "output", "output_0")


def polygraphy_logging(quiet_level: str = "CRITICAL"):
    """Context: Polygraphy's (and through it TensorRT's) log follows sq-export's -v: DEBUG -> VERBOSE,
    INFO (-v) -> INFO, otherwise only `quiet_level` and above."""
    from polygraphy.logger import G_LOGGER

    root = logging.getLogger()
    if root.isEnabledFor(logging.DEBUG):
        sev = G_LOGGER.VERBOSE
    elif root.isEnabledFor(logging.INFO):
        sev = G_LOGGER.INFO
    else:
        sev = getattr(G_LOGGER, quiet_level)
    try:
        return G_LOGGER.verbosity(sev)
    except Exception:  # pragma: no cover (older Polygraphy)
        return contextlib.nullcontext()


# --------------------------------------------------------------------------------------------------------------
# Tokens
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Tokens:
    input_ids: np.ndarray  # int64 [n, L]
    attention_mask: np.ndarray  # int64 [n, L]
    lengths: np.ndarray  # int64 [n]
    path: str = ""

    @property
    def n_chunks(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    def valid_mask(self, rows=slice(None)) -> np.ndarray:
        """bool [n, L]: positions that are real tokens (< length); L is the longest of these rows' chunks, the width
        `batches` gives them."""
        lens = self.lengths[rows]
        return np.arange(int(lens.max()))[None, :] < lens[:, None]

    @classmethod
    def from_chunks(cls, chunks, path: str = "<chunks>") -> "Tokens":
        """Chunks of token ids (sq_export.measure.perplexity.chunk_tokens), right-padded into one array."""
        L = max(len(c) for c in chunks)
        ids = np.zeros((len(chunks), L), dtype=np.int64)
        for i, c in enumerate(chunks):
            ids[i, : len(c)] = c
        lengths = np.array([len(c) for c in chunks], dtype=np.int64)
        return cls(ids, (np.arange(L)[None] < lengths[:, None]).astype(np.int64), lengths, path=path)

    def batches(self, batch_size: int, max_batches: int | None = None):
        """Yield (row slice, feed dict with int64 input_ids/attention_mask), each batch cut to its longest chunk
        (right padding only, so the real positions see the same tokens: a batch of one is exactly its chunk)."""
        n = 0
        for start in range(0, self.n_chunks, batch_size):
            if max_batches is not None and n >= max_batches:
                return
            rows = slice(start, min(start + batch_size, self.n_chunks))
            L = int(self.lengths[rows].max())
            yield rows, {"input_ids": self.input_ids[rows, :L], "attention_mask": self.attention_mask[rows, :L]}
            n += 1


def load_npz(path, what: str, how: str) -> dict:
    """All arrays of an .npz (no pickles); BadInput naming `what` and `how` to make one otherwise."""
    p = Path(path)
    if not p.is_file():
        raise BadInput(f"{what} {p} does not exist (write one with {how})")
    try:
        with np.load(p, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise BadInput(f"{what} {p} is not a readable .npz ({type(e).__name__}: {str(e)[:120]})") from None


def load_tokens(path) -> Tokens:
    """Read and validate a token file; BadInput with the reason otherwise."""
    p = Path(path)
    arrays = load_npz(p, "token file", "`sq-export tokens`")
    if "input_ids" not in arrays:
        raise BadInput(f"token file {p} has no `input_ids` array (found: {', '.join(sorted(arrays)) or 'nothing'})")
    ids = arrays["input_ids"]
    if ids.ndim != 2 or ids.shape[0] < 1 or ids.shape[1] < 2:
        raise BadInput(f"token file {p}: input_ids must be [n_chunks >= 1, seq_len >= 2], got shape {list(ids.shape)}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise BadInput(f"token file {p}: input_ids must be integers, got {ids.dtype}")
    if ids.min() < 0:
        raise BadInput(f"token file {p}: input_ids holds negative ids")
    n, L = ids.shape
    if "lengths" in arrays:
        lengths = arrays["lengths"]
        if lengths.shape != (n,) or not np.issubdtype(lengths.dtype, np.integer):
            raise BadInput(f"token file {p}: lengths must be integer [{n}], got {lengths.dtype} {list(lengths.shape)}")
        if lengths.min() < 1 or lengths.max() > L:
            raise BadInput(f"token file {p}: lengths must lie in 1..{L}")
    else:
        lengths = np.full((n,), L, dtype=np.int64)
    if "attention_mask" in arrays:
        mask = arrays["attention_mask"]
        if mask.shape != ids.shape or not (np.issubdtype(mask.dtype, np.integer) or mask.dtype == np.bool_):
            raise BadInput(
                f"token file {p}: attention_mask must be integer with input_ids' shape {list(ids.shape)}, "
                f"got {mask.dtype} {list(mask.shape)}"
            )
        if not np.isin(mask, (0, 1)).all():
            raise BadInput(f"token file {p}: attention_mask must hold only 0 and 1")
        if "lengths" not in arrays:  # padding told by the mask alone
            lengths = mask.astype(np.int64).sum(axis=1)
            if lengths.min() < 1:
                raise BadInput(f"token file {p}: a chunk has an all-zero attention_mask")
        expect = (np.arange(L)[None, :] < lengths[:, None]).astype(mask.dtype)
        if not np.array_equal(mask, expect):
            raise BadInput(
                f"token file {p}: attention_mask must be 1 on each chunk's first `length` positions and 0 after "
                "(right padding only)"
            )
    else:
        mask = (np.arange(L)[None, :] < lengths[:, None]).astype(np.int64)
    return Tokens(
        input_ids=np.ascontiguousarray(ids, dtype=np.int64),
        attention_mask=np.ascontiguousarray(mask, dtype=np.int64),
        lengths=np.asarray(lengths, dtype=np.int64),
        path=str(p),
    )


# --------------------------------------------------------------------------------------------------------------
# Runners
# --------------------------------------------------------------------------------------------------------------


def model_kind(path) -> str:
    """"onnx" (ONNX Runtime) or "engine" (TensorRT): by suffix, or for a segment manifest (*.segments.json,
    sq_export.onnxio.segments) by what its members are."""
    from sq_export.onnxio.segments import SEGMENTS_SUFFIX, is_manifest  # (here: that module imports onnx)

    s = str(path).lower()
    if is_manifest(path):
        from sq_export.engine.chain import manifest_kind

        return manifest_kind(path)
    if s.endswith(ONNX_SUFFIXES):
        return "onnx"
    if s.endswith(ENGINE_SUFFIXES):
        return "engine"
    raise BadInput(f"{path}: expected an .onnx graph, a TensorRT engine ({', '.join(ENGINE_SUFFIXES)}) or a segment "
                   f"manifest (*{SEGMENTS_SUFFIX})")


def _check_readable(path, what: str) -> None:
    p = Path(path)
    if not p.is_file():
        raise BadInput(f"{what} {p} does not exist")
    if not os.access(p, os.R_OK):
        raise BadInput(f"{what} {p} is not readable (permission denied)")
    if p.stat().st_size == 0:
        raise BadInput(f"{what} {p} is empty")


def engine_loader(engine_path):
    """A Polygraphy loader returning the deserialized engine (EngineFromBytes: TensorRT 8.6 has no stream reader)."""
    from sq_export.engine.trt_compat import import_tensorrt, require_gpu

    _check_readable(engine_path, "engine")
    import_tensorrt()
    require_gpu()
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes

    return EngineFromBytes(BytesFromPath(str(engine_path)))


def load_engine(engine_path):
    """Deserialize an engine file; BadInput when it is not an engine for this TensorRT."""
    from polygraphy.exception import PolygraphyException

    loader = engine_loader(engine_path)
    try:
        engine = loader()
    except PolygraphyException as e:
        raise BadInput(
            f"{engine_path} could not be deserialized ({str(e).splitlines()[0][:160]}): not a TensorRT engine, or one "
            "built by another TensorRT version / for another GPU; rebuild it with `sq-export build`"
        ) from None
    if engine is None:
        raise BadInput(f"{engine_path} could not be deserialized: rebuild it with `sq-export build`")
    return engine


def open_runner(path, name: str | None = None, providers=None):
    """A Polygraphy runner (not yet activated): OnnxrtRunner for .onnx, TrtRunner for engines, a chain of those for
    a segment manifest (sq_export.engine.chain)."""
    from sq_export.onnxio.segments import is_manifest

    kind = model_kind(path)
    name = name or Path(path).name
    if is_manifest(path):
        from sq_export.engine.chain import chain_runner

        return chain_runner(path, name=name, providers=providers)
    if kind == "onnx":
        _check_readable(path, "ONNX file")
        from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

        if providers and list(providers) != ["cpu"]:
            return OnnxrtRunner(SessionFromOnnx(str(path), providers=providers), name=name)
        from sq_export.measure.perplexity import ort_session  # the one ONNX Runtime session factory

        return OnnxrtRunner(lambda: ort_session(str(path)), name=name)
    from polygraphy.backend.trt import TrtRunner

    return TrtRunner(load_engine(path), name=name)


def input_dtypes(active_runner) -> dict:
    """name -> numpy dtype of each input the (activated) runner expects."""
    meta = active_runner.get_input_metadata(use_numpy_dtypes=True)
    return {name: np.dtype(dtype) for name, (dtype, _shape) in meta.items()}


def feed_for(active_runner, feed: dict, dtypes: dict | None = None) -> dict:
    """Cast/complete a token feed for a runner: the dtype the model expects (int32 for TensorRT 8.x engines),
    only the inputs it has; position_ids are made from the mask when the graph takes them."""
    dtypes = dtypes if dtypes is not None else input_dtypes(active_runner)
    out = {}
    for name, dt in dtypes.items():
        if name in feed:
            arr = feed[name]
        elif name == "position_ids":
            m = feed["attention_mask"]
            arr = np.clip(np.cumsum(m, axis=1) - 1, 0, None)
        else:
            raise BadInput(
                f"model input {name!r} is not in the token file (it has {', '.join(feed)}); the engine side feeds "
                "input_ids, attention_mask (and position_ids)"
            )
        if dt == np.int32 and arr.size and int(arr.max()) > np.iinfo(np.int32).max:
            raise BadInput(f"{name} holds values beyond int32, which this engine's input takes")
        out[name] = np.ascontiguousarray(arr, dtype=dt)
    return out


def pick_logits(outputs: dict) -> tuple[str, np.ndarray]:
    """The logits output: named like logits, else the first rank-3 output."""
    for n in LOGITS_NAMES:
        if n in outputs:
            return n, np.asarray(outputs[n])
    for n, v in outputs.items():
        if np.ndim(v) == 3:
            return n, np.asarray(v)
    raise BadInput(f"no logits output ([batch, seq, vocab]) among the model outputs: {', '.join(outputs)}")


def profile_limits(runner_or_engine) -> dict | None:
    """{input: (min, opt, max)} of a TensorRT engine's profile 0 (an engine, or a TrtRunner, active or not);
    None for other runners. A chain of engines: each graph input's limits from the first segment taking it."""
    own = getattr(runner_or_engine, "profile_limits", None)
    if callable(own):
        return own()
    engine = getattr(runner_or_engine, "engine", None)
    if engine is None:
        inner = getattr(runner_or_engine, "_engine_or_context", None)
        engine = inner if inner is not None and hasattr(inner, "num_io_tensors") else None
    if engine is None and hasattr(runner_or_engine, "num_io_tensors"):
        engine = runner_or_engine
    if engine is None or not hasattr(engine, "num_io_tensors"):
        return None
    lim = {}
    for i in range(engine.num_io_tensors):
        n = engine.get_tensor_name(i)
        try:
            shapes = engine.get_tensor_profile_shape(n, 0)
        except Exception:
            continue
        if shapes:
            lim[n] = tuple(tuple(int(d) for d in s) for s in shapes)
    return lim


def check_fits_profile(runner_or_engine, tokens: Tokens, batch_size: int, clamp: bool = True) -> int:
    """Check the token chunk length (and batch size unless clamp) fits the engine profile; BadInput otherwise.
    Returns the batch size to use (clamped into the profile's batch range when clamp)."""
    lim = profile_limits(runner_or_engine)
    if not lim:
        return batch_size
    for name, (mn, _opt, mx) in lim.items():
        if len(mx) != 2:
            continue
        if not (mn[1] <= tokens.seq_len <= mx[1]):
            raise BadInput(
                f"token chunks are {tokens.seq_len} long but the engine's profile for {name} allows seq "
                f"{mn[1]}..{mx[1]}: rebuild with `sq-export build --seq MIN:OPT:MAX` covering {tokens.seq_len}, or "
                "re-tokenize with another chunk length"
            )
        if not clamp and not (mn[0] <= batch_size <= mx[0]):
            raise BadInput(
                f"batch size {batch_size} is outside the engine's profile for {name} (batch {mn[0]}..{mx[0]}): "
                "choose --batch-size within it, or rebuild with `sq-export build --batch MIN:OPT:MAX`"
            )
        if clamp:
            batch_size = max(min(batch_size, mx[0]), mn[0])
    return batch_size


# --------------------------------------------------------------------------------------------------------------
# Perplexity
# --------------------------------------------------------------------------------------------------------------


def model_perplexity(model_path, tokens, batch_size: int = 1, max_batches: int | None = None, desc: str | None = None) -> dict:
    """Perplexity of an ONNX graph (ONNX Runtime) or engine (TensorRT) on a token file (path or Tokens): the one
    perplexity loop of every graph backend (`eval` and `run` of .onnx files come here too)."""
    from sq_export import progress

    tok = tokens if isinstance(tokens, Tokens) else load_tokens(tokens)
    runner = open_runner(model_path)
    acc = PerplexityAccumulator()
    t0 = time.perf_counter()
    n_batches = 0
    with polygraphy_logging(), runner as r:
        dtypes = input_dtypes(r)
        batch_size = check_fits_profile(r, tok, batch_size)
        batches = tok.batches(batch_size, max_batches)
        n_total = -(-tok.n_chunks // batch_size) if max_batches is None else min(max_batches, -(-tok.n_chunks // batch_size))
        for rows, feed in progress.bar(batches, total=n_total, desc=desc, unit="batch") if desc else batches:
            out = r.infer(feed_for(r, feed, dtypes))
            _name, logits = pick_logits(out)
            ids = feed["input_ids"]
            for b in range(ids.shape[0]):
                n = int(tok.lengths[rows][b])
                acc.add(logits[b, :n], ids[b, :n])
            n_batches += 1
    ppl = acc.perplexity
    return {
        "model": str(model_path),
        "backend": "tensorrt" if model_kind(model_path) == "engine" else "onnxruntime",
        "tokens_file": tok.path,
        "chunks": min(tok.n_chunks, n_batches * batch_size),
        "seq_len": tok.seq_len,
        "predicted_tokens": acc.tokens,
        "nll_sum": acc.nll,
        "perplexity": ppl if math.isfinite(ppl) else None,
        "seconds": round(time.perf_counter() - t0, 3),
        "feed_dtypes": {k: str(v) for k, v in dtypes.items()},
    }


def engine_perplexity(engine_path, tokens_npz, batch_size: int = 1, max_batches: int | None = None) -> dict:
    """Perplexity of a TensorRT engine on a token file (needs TensorRT + GPU)."""
    if model_kind(engine_path) != "engine":
        raise BadInput(f"{engine_path} is not a TensorRT engine file ({', '.join(ENGINE_SUFFIXES)})")
    return model_perplexity(engine_path, tokens_npz, batch_size, max_batches)


def onnx_perplexity(onnx_path, tokens_npz, batch_size: int = 1, max_batches: int | None = None) -> dict:
    """Perplexity of an ONNX graph through ONNX Runtime (CPU) on a token file."""
    if model_kind(onnx_path) != "onnx":
        raise BadInput(f"{onnx_path} is not an .onnx file")
    return model_perplexity(onnx_path, tokens_npz, batch_size, max_batches)
