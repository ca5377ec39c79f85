"""A bounded, seeded uniform sample of input rows (tokens) per distinct Linear input, taken in the calibration pass.

Rows, not |x| values, because the smoothing factor s depends on α: the smoothed input is x/s, computed from the
same rows for any α. Linears of one norm group share their input, so one sample serves the group
(`input_keys`). `save_rows` / `load_rows` keep a sample on disk between the stages of `run`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from sq_export.errors import BadInput

RESERVOIR_ROWS = 512


class RowReservoir:
    """Uniform sample (without replacement) of at most `rows` input rows per key, from a stream of batches.

    Priority sampling: every row gets a seeded uniform key; the `rows` largest keys are kept. Memory is bounded by
    rows × width per key, whatever the calibration size; same seed and stream give the same sample. Each key has its
    own generator (seeded from the seed and the key), so a key's sample depends only on its own stream of rows, not
    on the order in which keys are fed: the whole-model pass (batch by batch, all layers) and the layer-streamed
    pass (layer by layer, all batches) keep the same rows. Rows are kept float32 on the CPU whatever the model's
    type and device; only the rows that enter the sample leave the device."""

    def __init__(self, keys, rows: int = RESERVOIR_ROWS, seed: int = 0):
        self.keys = set(keys)
        self.rows = int(rows)
        self.seed = int(seed)
        self.gens: dict[str, torch.Generator] = {}
        self.data: dict[str, torch.Tensor] = {}
        self.prio: dict[str, torch.Tensor] = {}
        self.seen: dict[str, int] = {}

    def _gen(self, key: str) -> torch.Generator:
        g = self.gens.get(key)
        if g is None:
            h = hashlib.sha256(f"{self.seed}:{key}".encode()).digest()
            g = self.gens[key] = torch.Generator().manual_seed(int.from_bytes(h[:8], "little") & ((1 << 63) - 1))
        return g

    @torch.no_grad()
    def add(self, key: str, x: torch.Tensor) -> None:
        if key not in self.keys:
            return
        x = x.detach().reshape(-1, x.shape[-1])
        n_new = x.shape[0]
        p = torch.rand(n_new, generator=self._gen(key))
        self.seen[key] = self.seen.get(key, 0) + n_new
        old, old_p = self.data.get(key), self.prio.get(key)
        n_old = 0 if old is None else old.shape[0]
        if old_p is not None:
            p = torch.cat([old_p, p])
        if n_old + n_new > self.rows:
            top = torch.topk(p, self.rows).indices.sort().values
            keep_old, keep_new = top[top < n_old], top[top >= n_old] - n_old
        else:
            top, keep_old, keep_new = None, None, None
        # the same rows, in the same order (kept old rows, then kept new rows), as selecting from the concatenation
        new = x if keep_new is None else x[keep_new.to(x.device)]
        new = new.float().cpu()
        if old is not None:
            new = torch.cat([old if keep_old is None else old[keep_old], new])
        elif keep_new is not None or new.data_ptr() == x.data_ptr():
            new = new.clone()
        self.data[key], self.prio[key] = new, (p if top is None else p[top])

    def __getitem__(self, key) -> torch.Tensor:
        return self.data[key]

    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.data.values())


def input_keys(family, linear_pairs: bool = True) -> dict[str, str]:
    """{quantized Linear: the Linear whose input row sample it shares} (one key per distinct input tensor)."""
    key = {n: n for n in family.quantized_linears()}
    for g in family.groups(include_linear_pairs=False):
        for n in g.linears:
            key[n] = g.linears[0]
    return key


def new_reservoir(family, rows: int = RESERVOIR_ROWS, seed: int = 0) -> RowReservoir:
    return RowReservoir(set(input_keys(family).values()), rows, seed)


def rows_for(res: RowReservoir, family, name: str) -> torch.Tensor:
    return res[input_keys(family)[name]]


def save_rows(path: Path, res) -> None:
    """tune.RowReservoir → safetensors: {input key: rows}, plus the bound and the rows seen per key."""
    from safetensors.torch import save_file

    meta = {"format": "calib_rows/1", "rows": res.rows, "seen": dict(sorted(res.seen.items()))}
    save_file({k: res.data[k].contiguous() for k in sorted(res.data)}, str(path), metadata={"sq_export": json.dumps(meta, sort_keys=True)})


def load_rows(path: Path):
    """The RowReservoir `save_rows` wrote (the sampled rows; tune.rows_for reads them)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise BadInput(f"{path} is missing: rerun (the calibrate stage writes it when --alpha auto, --clip or --fallback is set)")
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("sq_export", "{}"))
    data = load_file(str(path))
    res = RowReservoir(set(data), int(meta.get("rows", 0)) or max((v.shape[0] for v in data.values()), default=1))
    res.data = dict(data)
    res.seen = {k: int(v) for k, v in (meta.get("seen") or {}).items()}
    return res
