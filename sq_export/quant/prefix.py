"""The outlier prefix (PrefixQuant, Chen et al. 2024, arXiv 2410.05265): a few tokens whose float KV cache is
computed once, offline, and prefixed to every sequence, so that the tokens which would carry massive activations
at run time (the first token of a sequence, some delimiters) never run through the quantized layers.

In many LLMs the first token of every sequence — whatever its id — and a few frequent delimiter tokens carry
|x| in the thousands in the residual stream (SmolLM2-135M: ≈ 24,800 from layer 11 on, 230× the next token; see
`sq-export diagnose --tokens`), and those few tokens set every static per-tensor scale downstream. With the prefix
in the cache, the real tokens start at position P: the attention sink is one of the prefix tokens, whose keys and
values are constants, and the static scales (calibrated on the real tokens only: the prefix's activations never
run at inference) fit the ordinary tokens.

    spec = parse_prefix("auto")                                    # sq_export.quant.recipe
    tokens = choose_tokens(model, family, windows, spec, tokenizer)  # from calibration statistics
    prefix = compute_prefix(model, tokens)                         # the float KV cache, once
    with applied(model, prefix):                                   # every forward of `model` now runs after it
        ...

`install` puts a forward pre-hook on the decoder body (the module holding the decoder layers): a forward without a cache gets a
fresh copy of the prefix cache, its attention mask widened by P ones and its positions offset by P; a forward with
an empty cache gets the prefix filled in first; a forward with a non-empty cache (decoding on) is taken to hold
the prefix already, and only its mask is widened when it does not count the prefix. The logits cover the caller's
tokens only (the prefix positions are never scored). Callers never see the prefix: their masks and positions count
their own tokens.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from sq_export.errors import BadInput

PREFIX_WINDOWS = 16  # calibration windows whose statistics choose the tokens ('auto', 'N')
OUTLIER_RATIO = 64.0  # PrefixQuant's η: a token is an outlier at a down_proj input over 64× its window's median token
OUTLIER_KIND = "mlp.down_proj"  # where the outliers are counted (the paper's choice); families without it: the residual


@dataclass
class OutlierPrefix:
    """The prefix tokens and their float KV cache: per layer keys and values [1, kv_heads, P, head_dim]."""

    tokens: list[int]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    text: str = ""
    info: dict = field(default_factory=dict)  # how the tokens were chosen (spec, counts, frequent ids)

    def __len__(self) -> int:
        return len(self.tokens)

    def cache(self, batch: int = 1, into=None, device=None):
        """A DynamicCache holding the prefix for `batch` sequences (a fresh object each time: a forward appends to
        its cache), on `device` (None: where the cache was computed). `into`: an empty cache to fill instead."""
        from transformers import DynamicCache

        kv = [(k.to(device).expand(batch, -1, -1, -1), v.to(device).expand(batch, -1, -1, -1)) for k, v in zip(self.keys, self.values)]
        if into is None:
            return DynamicCache(ddp_cache_data=kv)
        for i, (k, v) in enumerate(kv):
            into.update(k, v, i)
        return into

    def summary(self) -> dict:
        return {"tokens": list(self.tokens), "text": self.text, "length": len(self), **self.info}


# ----- choosing the tokens --------------------------------------------------------------------------------------
def start_token(tokenizer, model) -> int | None:
    """The token PrefixQuant ends the prefix with: BOS (the tokenizer's, else the config's), else EOS."""
    for src in (tokenizer, getattr(model, "config", None)):
        for attr in ("bos_token_id", "eos_token_id"):
            v = getattr(src, attr, None) if src is not None else None
            if isinstance(v, (list, tuple)):
                v = v[0] if v else None
            if v is not None:
                return int(v)
    return None


def choose_tokens(model, family, windows, spec, tokenizer=None, *, threshold: float = OUTLIER_RATIO) -> tuple[list[int], dict]:
    """The prefix token ids for `spec` (recipe.parse_prefix) and how they were chosen.

    ('auto', _): PrefixQuant's rule on `windows` (calibration text, float model): n = ceil(max over layers of the
    mean number per window of tokens over `threshold` × the window's median token at the down_proj inputs); the n
    token ids most often among those outliers, the first position of each window excluded (the first token is an
    outlier whatever its id: the prefix's own first token takes that role), a lone id seen in under 10 % of the
    windows dropped; then BOS. ('n', N): the N−1 most frequent outlier ids (fewer if fewer were seen), then BOS.
    ('ids', [...]): those. ('text', s): `s` tokenized without special tokens."""
    from sq_export.measure import outliers

    kind, arg = spec
    if kind == "ids":
        return [int(t) for t in arg], {"spec": "ids"}
    if kind == "text":
        if tokenizer is None:
            raise BadInput("--prefix-outliers text:... needs the model's tokenizer")
        ids = tokenizer(arg, add_special_tokens=False)["input_ids"]
        if not ids:
            raise BadInput(f"--prefix-outliers text:{arg!r} tokenizes to nothing")
        return [int(t) for t in ids], {"spec": "text"}
    if kind == "n" and arg < 1:
        raise BadInput("--prefix-outliers N must be at least 1")
    windows = np.asarray(windows)[:PREFIX_WINDOWS]
    with applied(model, None):  # the statistics of the model as it runs without any prefix
        st = outliers.token_stats(model, family, windows, desc="prefix tokens")
    site = OUTLIER_KIND if OUTLIER_KIND in st.kinds else outliers.RESIDUAL
    counts = outliers.outlier_counts(st, site, threshold)
    freq = outliers.frequent_outlier_ids(st, site, threshold)
    n_auto = int(math.ceil(float(counts.mean(axis=1).max()))) if counts.size else 0
    if kind == "auto":
        n = n_auto
        if len(freq) == 1 and freq[0][1] < 0.1 * len(windows):  # the paper's corner case: a rare lone id
            n = max(0, n - 1)
            freq = []
    else:
        n = arg - 1
    chosen = [t for t, _ in freq[:n]]
    bos = start_token(tokenizer, model)
    if bos is not None:
        chosen.append(bos)
    if not chosen:
        raise BadInput("--prefix-outliers: no outlier token was found and the model has no BOS/EOS token: pass ids:...")
    info = {"spec": kind if kind == "auto" else str(arg), "site": site, "threshold": threshold, "windows": int(len(windows)),
            "outliers_per_window_max_mean": float(counts.mean(axis=1).max()) if counts.size else 0.0, "n_auto": n_auto,
            "frequent_outlier_ids": [[int(t), int(c)] for t, c in freq[:10]]}
    return chosen, info


# ----- the KV cache ---------------------------------------------------------------------------------------------
@torch.no_grad()
def compute_prefix(model, tokens: list[int], tokenizer=None, info: dict | None = None) -> OutlierPrefix:
    """The float KV cache of `tokens` in `model` as it is now (call it on the float — smoothed, if smoothing — model,
    before its Linears are quantized: the cache holds what the float model computes)."""
    if not tokens:
        raise BadInput("an outlier prefix needs at least one token")
    vocab = model.get_input_embeddings().weight.shape[0]
    bad = [t for t in tokens if not 0 <= int(t) < vocab]
    if bad:
        raise BadInput(f"--prefix-outliers: token id {bad[0]} is outside the model's vocabulary (0..{vocab - 1})")
    from sq_export.device import to_device

    x = to_device(np.asarray([list(tokens)], dtype=np.int64), model)
    with applied(model, None):
        out = model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=True)
    cache = getattr(out, "past_key_values", None) or getattr(out, "cache", None)
    keys = [layer.keys.detach().clone() for layer in cache.layers]
    values = [layer.values.detach().clone() for layer in cache.layers]
    text = ""
    if tokenizer is not None:
        try:
            text = tokenizer.decode(list(tokens))
        except Exception:  # noqa: BLE001
            text = ""
    return OutlierPrefix([int(t) for t in tokens], keys, values, text, dict(info or {}))


# ----- on disk (the calibrate stage of `run` writes it; the later stages read it) -----------------------------------
def save_prefix(path, prefix: OutlierPrefix) -> None:
    """The prefix's KV cache as safetensors (keys.{layer}, values.{layer}), its tokens, text and info as metadata;
    written atomically."""
    import json

    from safetensors.torch import save_file

    from sq_export.fileio import atomic_file

    tensors = {f"keys.{i}": k.detach().cpu().contiguous() for i, k in enumerate(prefix.keys)}
    tensors.update({f"values.{i}": v.detach().cpu().contiguous() for i, v in enumerate(prefix.values)})
    meta = {"sq_export_prefix": json.dumps({"tokens": list(prefix.tokens), "text": prefix.text, "info": prefix.info,
                                            "layers": len(prefix.keys)}, sort_keys=True)}
    with atomic_file(path, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load_prefix(path) -> OutlierPrefix:
    import json

    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["sq_export_prefix"])
            n = int(meta["layers"])
            keys = [f.get_tensor(f"keys.{i}") for i in range(n)]
            values = [f.get_tensor(f"values.{i}") for i in range(n)]
    except (OSError, KeyError, ValueError) as e:
        raise BadInput(f"outlier prefix file {path} is unreadable ({e}): rerun the calibrate stage (--force)") from None
    return OutlierPrefix([int(t) for t in meta["tokens"]], keys, values, meta.get("text", ""), dict(meta.get("info") or {}))


# ----- running with it ------------------------------------------------------------------------------------------
def body_of(model):
    """The module whose forward takes the cache, mask and positions: the one holding the decoder layers (Llama's
    `model`, OPT's `model.decoder`, GPT-2's `transformer`), which every forward of the model goes through."""
    from sq_export.families import family_for

    path = family_for(model).layers_path.rpartition(".")[0]
    return model.get_submodule(path) if path else model


def installed(model) -> OutlierPrefix | None:
    return body_of(model).__dict__.get("_sq_prefix")


def install(model, prefix: OutlierPrefix | None) -> None:
    """Every forward of `model` (and of its decoder body) runs after `prefix` from now on; None: no prefix.
    The hook is a plain function reading an attribute of the body, so a deep copy of the model (prepare's
    working_copy) carries the prefix along."""
    body = body_of(model)
    body.__dict__["_sq_prefix"] = prefix
    if prefix is not None and not any(h is _prefix_hook for h in body._forward_pre_hooks.values()):
        body.register_forward_pre_hook(_prefix_hook, with_kwargs=True)


@contextlib.contextmanager
def applied(model, prefix: OutlierPrefix | None):
    """`install(model, prefix)` for the block, then whatever was installed before."""
    old = installed(model)
    install(model, prefix)
    try:
        yield model
    finally:
        install(model, old)


def _cache_key(module, kwargs) -> str:
    for k in ("cache", "past_key_values"):
        if k in kwargs:
            return k
    params = inspect.signature(module.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _prefix_hook(module, args, kwargs):
    prefix = module.__dict__.get("_sq_prefix")
    if prefix is None:
        return None
    kwargs = dict(kwargs)
    if args:  # input_ids given positionally
        kwargs["input_ids"] = args[0]
        args = args[1:]
    x = kwargs.get("input_ids")
    if x is None:
        x = kwargs.get("inputs_embeds")
    # sizes stay tensors-of-shape (no int()) so that an ONNX export traces them: batch and length stay dynamic
    b, L = x.shape[0], x.shape[1]
    P = len(prefix)
    key = _cache_key(module, kwargs)
    cache = kwargs.get(key)
    if cache is None:
        kwargs[key] = prefix.cache(b, device=x.device)
        past = P
    else:
        past = cache.get_seq_length()
        if past == 0:
            prefix.cache(b, into=cache, device=x.device)
            past = P
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.dim() == 2 and mask.shape[1] + P == past + L:  # the caller's mask omits the prefix
        kwargs["attention_mask"] = torch.cat([torch.ones(b, P, dtype=mask.dtype, device=mask.device), mask], dim=1)
    pos = kwargs.get("position_ids")
    if pos is not None:  # callers' positions count their own tokens; without any, the model counts from the cache
        kwargs["position_ids"] = pos + P
    return args, kwargs
