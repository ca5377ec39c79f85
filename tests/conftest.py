"""Fixtures: tiny models of every registered family (sq_export.synth: transformers configs in-process, outlier
channels injected), saved model folders with a tokenizer trained in-process, small calibration/eval texts."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

warnings.filterwarnings("ignore")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

from sq_export.synth import (FAMILIES, HIDDEN, OUTLIER_CHANNELS, OUTLIER_GAIN, VOCAB, inject_outliers,  # noqa: F401
                             make_tiny, tiny_config, token_batches)


@pytest.fixture(params=FAMILIES)
def family_name(request):
    return request.param


def train_tokenizer(vocab_size: int = VOCAB):
    """A byte-level BPE trained in-process on the shipped calibration text (no downloads): sq_export.synth's."""
    from sq_export.synth import train_tokenizer as _train

    return _train(vocab_size)


_TOK = {}


def tokenizer():
    if "t" not in _TOK:
        _TOK["t"] = train_tokenizer(VOCAB + 64)  # byte alphabet (256) + merges; ids past VOCAB are clipped below
    return _TOK["t"]


def save_tiny(family: str, path, outliers=True, seed=0, half=False):
    """A tiny model folder (config, safetensors, tokenizer) that `sq-export MODEL` commands load; `half`: the
    weights saved in float16 (as Llama-2-7B's checkpoint is)."""
    model, fam = make_tiny_vocab(family, outliers, seed)
    (model.half() if half else model).save_pretrained(path, safe_serialization=True)
    tokenizer().save_pretrained(path)
    return model, fam


def make_tiny_vocab(family, outliers=True, seed=0):
    return make_tiny(family, outliers, seed, vocab_size=len(tokenizer()))


def tiny_dir_factory(tmp_path_factory, prefix="tiny", **save_kw):
    """family -> a saved tiny model folder (save_tiny(**save_kw)), built on first use and kept for the session."""
    cache = {}

    def get(family):
        if family not in cache:
            d = tmp_path_factory.mktemp(f"{prefix}_{family}")
            save_tiny(family, d, **save_kw)
            cache[family] = d
        return cache[family]

    return get


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """One saved tiny model folder per family (built lazily)."""
    return tiny_dir_factory(tmp_path_factory)


@pytest.fixture(scope="session")
def small_text(tmp_path_factory):
    from sq_export.textdata import DEFAULT_CALIB, DEFAULT_HELDOUT

    d = tmp_path_factory.mktemp("text")
    (d / "calib.txt").write_text(DEFAULT_CALIB.read_text()[:20000])
    (d / "eval.txt").write_text(DEFAULT_HELDOUT.read_text()[:8000])
    return d



def FixedCalibration(act_max, reservoir=None, check=None, ids=None):
    """A Calibration of random-token statistics: its float-equivalence check batch is `check` (token ids [n, L]);
    its fallback scoring windows come from `ids` (default: random tokens)."""
    import numpy as np

    from sq_export.quant.calibrate import Calibration

    return Calibration(act_max, reservoir, np.asarray(ids if ids is not None else token_batches(1, 256, seed=7)[0]), check=check)
