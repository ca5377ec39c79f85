"""A Hugging Face checkpoint written shard by shard: one safetensors file per call of `flush` (a decoder layer, the
embedding part), and `model.safetensors.index.json` mapping every tensor to its file at `close`. Only the tensors of
the shard being written are held, so a checkpoint of any size is written with one layer in memory."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sq_export.stream.checkpoint import INDEX


class ShardWriter:
    def __init__(self, folder: str | Path, dtype: torch.dtype | None = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.dtype = dtype
        self.pending: dict[str, torch.Tensor] = {}
        self.weight_map: dict[str, str] = {}
        self.total = 0

    def add(self, key: str, t: torch.Tensor) -> None:
        t = t.detach()
        if self.dtype is not None and t.is_floating_point():
            t = t.to(self.dtype)
        self.pending[key] = t.cpu().contiguous()

    def flush(self, fname: str) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        # one metadata key, sorted tensors: the same tensors give the same bytes
        save_file({k: self.pending[k] for k in sorted(self.pending)}, str(self.folder / fname), metadata={"format": "pt"})
        for k, t in self.pending.items():
            self.weight_map[k] = fname
            self.total += t.numel() * t.element_size()
        self.pending = {}

    def close(self) -> None:
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.folder / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
