"""Text for calibration and evaluation: the shipped Wikipedia splits by default, any UTF-8 text file otherwise."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sq_export.errors import BadInput

CALIB_DIR = Path(__file__).resolve().parent.parent / "calibration"
DEFAULT_CALIB = CALIB_DIR / "calib.txt"
DEFAULT_HELDOUT = CALIB_DIR / "heldout.txt"
CALIB_SEED = 0


def _packaged(name: str) -> Path:
    # Installed non-editable: the splits travel as package data under sq_export/_calibration.
    p = Path(__file__).resolve().parent / "_calibration" / name
    return p


def default_text(kind: str) -> Path:
    p = DEFAULT_CALIB if kind == "calib" else DEFAULT_HELDOUT
    if p.is_file():
        return p
    q = _packaged(p.name)
    if q.is_file():
        return q
    raise BadInput(f"the shipped {kind} text {p} is missing: pass a text file explicitly")


def read_text(path: str | Path | None, kind: str = "calib") -> str:
    """Read a UTF-8 text file; refuse missing, empty, or binary files with one clear line."""
    p = default_text(kind) if path is None else Path(path)
    what = "calibration text" if kind == "calib" else "evaluation text"
    if not p.exists():
        raise BadInput(f"{what} {p} not found: pass an existing UTF-8 text file")
    if not p.is_file():
        raise BadInput(f"{what} {p} is not a file")
    data = p.read_bytes()
    if b"\x00" in data[:65536]:
        raise BadInput(f"{what} {p} looks binary (NUL bytes): pass a UTF-8 text file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadInput(f"{what} {p} is not UTF-8 text ({e.reason} at byte {e.start})") from e
    if not text.strip():
        raise BadInput(f"{what} {p} is empty: pass a file with text in it")
    return text


def tokenize(tokenizer, text: str) -> np.ndarray:
    """The whole text as the tokenizer returns it (one BOS at the start if the tokenizer adds one)."""
    if tokenizer is None:
        raise BadInput("this model has no tokenizer to turn text into token ids: pass --tokenizer PATH (a folder or "
                       ".gguf holding one), or save the tokenizer beside the weights")
    ids = tokenizer(text, return_attention_mask=False)["input_ids"]
    ids = np.asarray(ids, dtype=np.int64)
    check_tokenized(ids, tokenizer, "the text", chars=len(text))
    return ids


def check_tokenized(ids: np.ndarray, tokenizer, what: str, chars: int | None = None) -> None:
    """Text that tokenizes to (almost) nothing means the tokenizer, not the text, is missing or broken (a model
    folder saved with save_pretrained alone gives a tokenizer without a vocabulary): say so."""
    n = int(np.asarray(ids).size)
    if n < 2 and (chars is None or chars >= 16):
        name = type(tokenizer).__name__
        raise BadInput(f"the tokenizer ({name}) turned {what}{f' ({chars} characters)' if chars is not None else ''} into "
                       f"{n} token(s): the model has no usable tokenizer; pass --tokenizer PATH (a folder or .gguf "
                       "holding one) or save the tokenizer beside the weights (tokenizer.save_pretrained)")


_TOKEN_CACHE: dict = {}  # (id(tokenizer), file, size, mtime) -> (weakref to the tokenizer, ids)


def token_ids(tokenizer, path: str | Path | None, kind: str = "calib") -> np.ndarray:
    """`tokenize(tokenizer, read_text(path, kind))`, computed once per tokenizer and file version in a process.

    A run asks for the calibration split's ids up to five times (calibration, the float-equivalence check of
    smoothing, each SQ model built, the SQNR batch); tokenizing the 2 MB split takes ~2 s and ~300 MB of transient
    memory each time, the ids themselves 4 MB. The returned array is read-only (shared by every caller); a file
    whose size or mtime changed is read and tokenized again."""
    import weakref

    p = default_text(kind) if path is None else Path(path)
    try:
        st = p.stat()
        key = (id(tokenizer), str(p.resolve()), st.st_size, st.st_mtime_ns)
    except OSError:
        return tokenize(tokenizer, read_text(path, kind))  # read_text reports the problem
    hit = _TOKEN_CACHE.get(key)
    if hit is not None and hit[0]() is tokenizer:
        return hit[1]
    ids = tokenize(tokenizer, read_text(path, kind))
    ids.flags.writeable = False
    try:
        ref = weakref.ref(tokenizer)
    except TypeError:
        return ids
    for k in [k for k, (r, _) in _TOKEN_CACHE.items() if r() is None or k[:2] == key[:2]]:
        del _TOKEN_CACHE[k]  # dead tokenizers, older versions of the file
    _TOKEN_CACHE[key] = (ref, ids)
    return ids


def calibration_samples(ids: np.ndarray, samples: int, seq_len: int, seed: int = CALIB_SEED) -> np.ndarray:
    """`samples` windows of `seq_len` tokens at seeded random offsets: [samples, seq_len] int64.

    Same text, options and seed give the same windows on every machine (numpy's PCG64).
    """
    if samples < 1 or seq_len < 2:
        raise BadInput(f"--samples must be >= 1 and --calib-seq-len >= 2 (got {samples}, {seq_len})")
    n = len(ids)
    if n < seq_len:
        raise BadInput(
            f"calibration text has {n} tokens, fewer than one sample of --calib-seq-len {seq_len}: "
            "use more text or a shorter --calib-seq-len"
        )
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, n - seq_len + 1, size=samples)
    return np.stack([ids[s : s + seq_len] for s in starts])


def eval_chunks_npz(tokenizer, text_path, seq_len: int, max_tokens: int | None) -> dict:
    """The evaluation chunks as a token file for the engine side (sq_export.engine reads it)."""
    from sq_export.measure.perplexity import chunk_tokens

    chunks = chunk_tokens(tokenize(tokenizer, read_text(text_path, "eval")), seq_len, max_tokens)
    L = max(len(c) for c in chunks)
    ids = np.zeros((len(chunks), L), dtype=np.int64)
    mask = np.zeros_like(ids)
    for i, c in enumerate(chunks):
        ids[i, : len(c)] = c
        mask[i, : len(c)] = 1
    return {"input_ids": ids, "attention_mask": mask, "lengths": np.array([len(c) for c in chunks], dtype=np.int64)}
