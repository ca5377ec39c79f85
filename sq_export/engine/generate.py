"""Greedy decoding through a TensorRT engine built from a decode graph (`sq-export export --decode`).

Torch-free (Python 3.10+, numpy, Polygraphy, TensorRT): the same loop as ONNX Runtime's (sq_export.kvcache.greedy);
the KV cache is fed back through the host each step (simple and exact; a serving runtime keeps it on the device).
When the engine's profile starts the past length at 1 (TensorRT 8.6 builds are safest without empty tensors),
decoding starts from one masked zero slot, which changes no token (tested in ONNX Runtime).

Prompt files (written by the torch side, ``sq-export tokens --prompts N``, since the kit's Python has no
tokenizer) hold ``prompts`` int64 [n, prompt_tokens] and optionally ``reference`` int64 [n, new_tokens]: greedy
tokens of the float model in PyTorch, which ``generate_file`` scores agreement against.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from sq_export.errors import BadInput
from sq_export.kvcache import agreement, greedy, output_names, past_names, prefix_length


class EngineDecoder:
    """A TensorRT decode engine as a `step(feed) -> outputs` callable; use as a context manager."""

    def __init__(self, engine_path, prefix: dict | None = None):
        """`engine_path`: an engine, or a segment manifest (its engines run as one chain, sq_export.engine.chain).
        `prefix`: the outlier prefix of the graph it was built from ({past input name: [1, kv_heads, P, head_dim]},
        sq_export.export.decode.read_prefix): every sequence starts from it as its past."""
        from sq_export.engine.run import open_runner

        self.path = str(engine_path)
        self.prefix = prefix or None
        self.prefix_len = prefix_length(prefix)
        self._runner = open_runner(engine_path, name=Path(self.path).name)  # deserializes the engine(s) now
        self.runner = None

    def __enter__(self):
        from sq_export.engine.run import input_dtypes, profile_limits

        self.runner = self._runner.__enter__()
        self.dtypes = input_dtypes(self.runner)
        pasts = past_names(self.dtypes)
        if "input_ids" not in self.dtypes or not pasts:
            self.__exit__(None, None, None)
            raise BadInput(f"{self.path} is not a decode engine (no past_key_values inputs): build it from `sq-export export --decode`")
        self.n_layers = len(pasts) // 2
        lim = profile_limits(self.runner) or {}
        mn, _opt, mx = lim.get(pasts[0], ((1, 0, 0, 0), None, (0, 0, 0, 0)))
        self.kv_heads, self.head_dim = int(mx[1]), int(mx[3])
        self.past_min, self.past_max = int(mn[2]), int(mx[2])
        ids_lim = lim.get("input_ids")
        self.batch_max = int(ids_lim[2][0]) if ids_lim else 1
        self.seq_max = int(ids_lim[2][1]) if ids_lim else 1
        self.kv_dtype = self.dtypes[pasts[0]]
        self.outputs = output_names(self.n_layers)
        return self

    def __exit__(self, *exc):
        if self.runner is not None:
            self.runner.__exit__(*exc)
            self.runner = None

    def __call__(self, feed: dict) -> dict:
        fed = {k: np.ascontiguousarray(v, dtype=self.dtypes[k]) for k, v in feed.items() if k in self.dtypes}
        # Polygraphy reuses its host output buffers between calls: copy before the next step overwrites them
        return {k: np.array(v) for k, v in self.runner.infer(fed).items()}

    def check_fits(self, ids: np.ndarray, max_new_tokens: int) -> int:
        """Cache slots to pad with (the profile's minimum past beyond the prefix); BadInput when the prefix, the prompt and
        the new tokens do not fit the profile."""
        b, s = ids.shape
        pad = max(0, self.past_min - self.prefix_len)
        if b > self.batch_max:
            raise BadInput(f"batch {b} exceeds the engine profile's batch max {self.batch_max}: rebuild with `sq-export build --batch`")
        if s > self.seq_max:
            raise BadInput(f"prompt of {s} tokens exceeds the engine profile's seq max {self.seq_max}: rebuild with a larger `--seq` max")
        need = pad + self.prefix_len + s + max_new_tokens - 1
        if need > self.past_max:
            pre = f"outlier prefix ({self.prefix_len}) + " if self.prefix_len else ""
            raise BadInput(
                f"{pre}prompt ({s}) + new tokens ({max_new_tokens}) need a past length of {need}, the engine profile allows "
                f"{self.past_max}: rebuild with a larger `--past` max or generate fewer tokens"
            )
        return pad

    def generate(self, ids, max_new_tokens: int, eos_token_id=None) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        pad = self.check_fits(ids, max_new_tokens)
        return greedy(self, ids, max_new_tokens, n_layers=self.n_layers, kv_heads=self.kv_heads, head_dim=self.head_dim,
                      kv_dtype=self.kv_dtype, eos_token_id=eos_token_id, pad_slots=pad, prefix=self.prefix)


def load_prompts(path) -> dict:
    from sq_export.engine.run import load_npz

    p = Path(path)
    d = load_npz(p, "prompt file", "`sq-export tokens MODEL --prompts N`")
    pr = d.get("prompts")
    if pr is None or pr.ndim != 2 or pr.shape[0] < 1 or pr.shape[1] < 1 or not np.issubdtype(pr.dtype, np.integer):
        raise BadInput(f"prompt file {p} needs `prompts` int64 [n >= 1, tokens >= 1] (write it with `sq-export tokens --prompts`)")
    ref = d.get("reference")
    if ref is not None and (ref.ndim != 2 or ref.shape[0] != pr.shape[0]):
        raise BadInput(f"prompt file {p}: `reference` must be [{pr.shape[0]}, new_tokens]")
    return {"prompts": pr.astype(np.int64), "reference": None if ref is None else ref.astype(np.int64), "path": str(p)}


def generate_file(step_model, prompts: dict, max_new_tokens: int) -> dict:
    """Greedy tokens for every prompt (one at a time, as a chat runtime would) and, when the prompt file holds
    reference tokens, the agreement with them. step_model: an EngineDecoder (entered) or any object with
    .generate(ids, n)."""
    out, t0 = [], time.perf_counter()
    for row in prompts["prompts"]:
        out.append(step_model.generate(row[None, :], max_new_tokens)[0])
    secs = time.perf_counter() - t0
    res = {
        "prompts": len(out),
        "new_tokens": max_new_tokens,
        "tokens": [[int(t) for t in o] for o in out],
        "seconds": round(secs, 3),
        "tokens_per_s_host_loop": round(sum(len(o) for o in out) / secs, 1) if secs > 0 else None,
    }
    if prompts.get("reference") is not None:
        ref = [r[:max_new_tokens] for r in prompts["reference"]]
        res["agreement_with_reference"] = agreement(ref, out)
    return res
