"""A Hugging Face checkpoint's safetensors, read one tensor at a time (memory-mapped by safetensors), never whole.

    ck = Checkpoint(folder)                      # model.safetensors, or the shards of model.safetensors.index.json
    t = ck.tensor("model.layers.3.mlp.up_proj.weight", device, dtype)
    ck.key("model.layers.3.mlp.up_proj.weight")  # the name it has in the files (base-model prefix tolerated)
    ck.stored_dtype("model.layers.3.mlp.up_proj.weight")  # "F16", "BF16", "F32", ... (the header's, no data read)

Names are the loaded model's parameter names; a checkpoint saved from the base model (keys without the
`model.` / `transformer.` prefix, e.g. facebook/opt-*) is read too.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from sq_export.errors import BadInput

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class Checkpoint:
    def __init__(self, folder: str | Path, base_prefix: str | None = None):
        self.folder = Path(folder)
        if not (self.folder / "config.json").is_file():
            raise BadInput(f"{self.folder} is not a Hugging Face model folder (no config.json): streaming reads a folder "
                           "of safetensors (a .gguf file: save it once with save_pretrained)")
        self.base_prefix = base_prefix
        self.files: dict[str, str] = {}  # key in the files -> file name
        idx = self.folder / INDEX
        if idx.is_file():
            self.files = dict(json.loads(idx.read_text())["weight_map"])
        else:
            from safetensors import safe_open

            shards = sorted(p.name for p in self.folder.glob("*.safetensors"))
            if not shards:
                raise BadInput(f"{self.folder} has no safetensors files: streaming reads safetensors (a .bin checkpoint: "
                               "save it once with save_pretrained(safe_serialization=True))")
            for fname in shards:
                with safe_open(str(self.folder / fname), framework="pt") as f:
                    for k in f.keys():
                        self.files[k] = fname
        self._open: dict | None = None  # open files, inside `reading()`
        self.alias: dict[str, str] = {}  # model parameter name -> key in the files, where they differ (renames)

    def use_renames_of(self, model) -> "Checkpoint":
        """Also find tensors that transformers renames when it loads this model (GPT-NeoX saves its LM head as
        `embed_out.weight`, loads it as `lm_head.weight`): each key in the files is renamed as from_pretrained
        would (transformers' conversion mapping, where this transformers version has one)."""
        try:
            from transformers.conversion_mapping import WeightRenaming, get_model_conversion_mapping

            renames = [r for r in get_model_conversion_mapping(model) if isinstance(r, WeightRenaming)]
        except (ImportError, AttributeError, TypeError):
            return self
        for k in self.files:
            name = k
            for r in renames:
                name = r.rename_source_key(name)[0]
            if name != k:
                self.alias.setdefault(name, k)
        return self

    def keys(self) -> list[str]:
        return list(self.files)

    def key(self, name: str) -> str | None:
        """The key holding parameter `name` of the loaded model (None when absent)."""
        if name in self.files:
            return name
        if name in self.alias:
            return self.alias[name]
        if self.base_prefix and name.startswith(self.base_prefix + "."):
            short = name[len(self.base_prefix) + 1:]
            if short in self.files:
                return short
        return None

    def _handle(self, fname: str):
        from safetensors import safe_open

        h = self._open.get(fname) if self._open is not None else None
        if h is None:
            try:
                h = safe_open(str(self.folder / fname), framework="pt", device="cpu")
            except Exception as e:  # a truncated or foreign file
                raise BadInput(f"{self.folder / fname} unreadable ({type(e).__name__}: {str(e)[:120]})") from e
            if self._open is not None:
                self._open[fname] = h
        return h

    @contextlib.contextmanager
    def reading(self):
        """Keep the files open (memory-mapped) for the block, e.g. while one layer's tensors are read; outside such
        a block each tensor opens and closes its file, so the pages read do not stay mapped into the process (the
        host RSS of a streamed run would otherwise grow to the whole checkpoint's size, in page cache)."""
        outer = self._open is not None
        if not outer:
            self._open = {}
        try:
            yield self
        finally:
            if not outer:
                self._open = None

    def tensor(self, name: str, device=None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Parameter `name` as a tensor of its own memory (a floating one cast to `dtype`), on `device`."""
        k = self.key(name)
        if k is None:
            raise BadInput(f"{self.folder}: no tensor {name} in the checkpoint's safetensors")
        t = self._handle(self.files[k]).get_tensor(k)
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)
        elif device is None or torch.device(device).type == "cpu":
            t = t.clone()  # not a view of the memory map
        return t if device is None or t.device == torch.device(device) else t.to(device)

    def stored_dtype(self, name: str) -> str:
        """The safetensors type parameter `name` is stored in ("F16", "BF16", "F32", ...), from the file's header
        (no data read)."""
        k = self.key(name)
        if k is None:
            raise BadInput(f"{self.folder}: no tensor {name} in the checkpoint's safetensors")
        return str(self._handle(self.files[k]).get_slice(k).get_dtype())

    def close(self) -> None:
        self._open = None
