"""The KV-cache decode interface, in NumPy only (shared by the torch exporter, ONNX Runtime and TensorRT).

A decode graph (``sq-export export --decode``) has
  inputs   input_ids [b, s] int64, attention_mask [b, past+s] int64, position_ids [b, s] int64,
           past_key_values.{i}.key / .value [b, kv_heads, past, head_dim] float
  outputs  logits [b, s, vocab], present.{i}.key / .value [b, kv_heads, past+s, head_dim]

``greedy`` drives any backend through a ``step(feed) -> {name: array}`` callable, so ONNX Runtime
(sq_export.export.decode) and TensorRT (sq_export.engine.generate) decode with the same loop. When a backend cannot take
an empty cache (a TensorRT profile whose past length starts at 1), the loop starts from ``pad_slots`` cache slots
of zeros that the attention mask hides: position ids come from the mask (Hugging Face's rule), so the real tokens
keep positions 0, 1, ... and masked slots get exactly zero attention weight.
"""

from __future__ import annotations

import numpy as np

PAST_PREFIX = "past_key_values."
PRESENT_PREFIX = "present."


def input_names(n_layers: int) -> list[str]:
    return ["input_ids", "attention_mask", "position_ids"] + [f"{PAST_PREFIX}{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]


def output_names(n_layers: int) -> list[str]:
    return ["logits"] + [f"{PRESENT_PREFIX}{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]


def past_names(names) -> list[str]:
    return [n for n in names if n.startswith(PAST_PREFIX)]


def is_decode_graph(input_names_) -> bool:
    return bool(past_names(input_names_)) and "input_ids" in input_names_


def position_ids_for(mask: np.ndarray, s: int) -> np.ndarray:
    """Hugging Face generate's positions: cumsum(mask) - 1, and 1 where masked; the last `s` columns."""
    pos = np.cumsum(mask, axis=1) - 1
    pos = np.where(mask == 0, 1, pos)
    return pos[:, -s:].astype(np.int64)


def _as_set(eos) -> set:
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, (list, tuple, set)) else {eos}


def prefix_length(prefix: dict | None) -> int:
    """Cache slots of an outlier prefix {past input name: [1, kv_heads, P, head_dim]} (0 for none)."""
    return int(next(iter(prefix.values())).shape[2]) if prefix else 0


def greedy(step, ids: np.ndarray, max_new_tokens: int, *, n_layers: int, kv_heads: int, head_dim: int,
           kv_dtype=np.float32, eos_token_id=None, pad_slots: int = 0, prefix: dict | None = None) -> np.ndarray:
    """Greedy decoding through a decode graph: prefill the prompt, then one token per step with the cache.

    step(feed) -> {output name: array}; ids [b, s] int64. Returns the new tokens [b, n <= max_new_tokens]
    (stops early at EOS only for batch 1). `prefix` {past input name: [1, kv_heads, P, head_dim]}: an outlier
    prefix (the decode graph's initial past, sq_export.export.decode.read_prefix): the cache starts with it, the
    mask with P ones, so positions (from the mask) put the prompt at P, P+1, ..."""
    x = np.asarray(ids, dtype=np.int64)
    b = x.shape[0]
    past = {f"{PAST_PREFIX}{i}.{kv}": np.zeros((b, kv_heads, pad_slots, head_dim), kv_dtype) for i in range(n_layers) for kv in ("key", "value")}
    P = prefix_length(prefix)
    if prefix:
        past = {k: np.concatenate([v, np.broadcast_to(prefix[k], (b, *prefix[k].shape[1:])).astype(kv_dtype)], axis=2) for k, v in past.items()}
    mask = np.concatenate([np.zeros((b, pad_slots), np.int64), np.ones((b, P), np.int64), np.ones_like(x)], axis=1)
    step_in = x
    eos = _as_set(eos_token_id)
    toks = []
    for _ in range(max_new_tokens):
        out = step({"input_ids": step_in, "attention_mask": mask, "position_ids": position_ids_for(mask, step_in.shape[1]), **past})
        nxt = np.asarray(out["logits"])[:, -1].argmax(-1)[:, None].astype(np.int64)
        toks.append(nxt)
        past = {name: np.asarray(out[PRESENT_PREFIX + name[len(PAST_PREFIX):]]) for name in past}
        step_in = nxt
        mask = np.concatenate([mask, np.ones_like(nxt)], axis=1)
        if b == 1 and int(nxt[0, 0]) in eos:
            break
    return np.concatenate(toks, axis=1)


def agreement(reference: list, tokens: list) -> dict:
    """How often greedy `tokens` equal `reference` tokens, prompt by prompt (lists of 1-D arrays): per-position
    agreement (%), mean common prefix (tokens before the first divergence) and prompts matching exactly."""
    same = total = exact = 0
    prefix = []
    for a, b in zip(reference, tokens):
        a, b = np.asarray(a).reshape(-1), np.asarray(b).reshape(-1)
        n = min(len(a), len(b))
        eq = a[:n] == b[:n]
        same += int(eq.sum())
        total += n
        exact += int(bool(eq.all()) and len(a) == len(b))
        prefix.append(int(np.argmin(eq)) if not eq.all() else n)
    return {
        "prompts": len(prefix),
        "token_agreement_pct": round(100.0 * same / max(1, total), 2),
        "mean_common_prefix": round(float(np.mean(prefix)), 2) if prefix else 0.0,
        "exact_match_prompts": exact,
    }
