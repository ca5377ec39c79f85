"""Outlier tokens: which token positions and token ids carry the largest |x|, per layer, at every quantized
Linear's input and in the residual stream (each decoder layer's output), on calibration windows.

A static per-tensor INT8 scale is set by the single largest |x| the calibration text produces at that input. In
many LLMs a few tokens — the first token of a sequence and some delimiters — carry "massive activations" (SmolLM2:
|x| ≈ 20,000 in the residual stream from layer 12 on, against a few tens for ordinary tokens), and those few
tokens then set every static scale downstream. This module measures that per token:

    stats = token_stats(model, family, windows)           # per site: max|x| over channels, per window and position
    rows = layer_table(stats, tokenizer, top=3)           # per layer: the top tokens, their ratio to the median token
    counts = outlier_counts(stats, "mlp.down_proj", 64)   # per site and window: tokens over 64× the median (PrefixQuant's η)
    ids = frequent_outlier_ids(stats, "mlp.down_proj", 64)  # token ids most often among those, position 0 excluded

Torch is needed for `token_stats` only; the tables and the plot work on the numpy arrays it returns. Nothing here
imports the quantization package (sq_export.quant uses this module to choose an outlier prefix).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

RESIDUAL = "residual"  # the site kind of a decoder layer's output


@dataclass
class TokenStats:
    """Per site (a quantized Linear's input, or a decoder layer's output = the residual stream after that layer):
    the max|x| over channels of every token of every window: `tmax[site index]` is [windows, seq_len]."""

    sites: list[str]
    kinds: list[str]  # the Linear's role relative to its layer ("mlp.down_proj"), or RESIDUAL
    layers: list[int]
    tmax: np.ndarray  # [sites, windows, seq_len] float32
    ids: np.ndarray  # [windows, seq_len] int64: the token ids that ran (the prefix, if any, is not part of them)
    meta: dict = field(default_factory=dict)

    def site_index(self, layer: int, kind: str) -> int | None:
        for i, (l, k) in enumerate(zip(self.layers, self.kinds)):
            if l == layer and k == kind:
                return i
        return None

    def num_layers(self) -> int:
        return max(self.layers) + 1 if self.layers else 0

    def kind_names(self) -> list[str]:
        seen = []
        for k in self.kinds:
            if k not in seen:
                seen.append(k)
        return seen


def token_stats(model, family, windows, batch_size: int = 4, desc: str | None = "token view") -> TokenStats:
    """Run `windows` ([n, L] token ids) through `model`'s decoder (whatever prefix or quantization it has) and
    record, per token, max|x| over channels at every quantized Linear's input and at every decoder layer's output."""
    import torch

    from sq_export import progress
    from sq_export.device import to_device

    windows = np.asarray(windows, dtype=np.int64)
    linears = family.quantized_linears()
    n_layers = family.num_layers()
    pre = family.layers_path + "."
    sites, kinds, layers = [], [], []
    for i in range(n_layers):
        for name in linears:
            if name.startswith(f"{pre}{i}."):
                sites.append(name)
                kinds.append(name[len(f"{pre}{i}."):])
                layers.append(i)
        sites.append(f"{pre}{i}")
        kinds.append(RESIDUAL)
        layers.append(i)
    index = {s: j for j, s in enumerate(sites)}
    n, L = windows.shape
    tmax = np.zeros((len(sites), n, L), dtype=np.float32)
    cur = {"rows": slice(0, 0)}

    def record(site, x):
        x = x[0] if isinstance(x, (tuple, list)) else x
        m = x.detach().abs().amax(dim=-1).float()  # [b, L]
        tmax[index[site], cur["rows"]] = m.cpu().numpy()

    hooks = []
    try:
        for name in linears:
            hooks.append(model.get_submodule(name).register_forward_pre_hook(lambda _m, a, name=name: record(name, a[0])))
        for i in range(n_layers):
            site = f"{pre}{i}"
            hooks.append(model.get_submodule(site).register_forward_hook(lambda _m, _a, o, site=site: record(site, o)))
        body = getattr(model, "base_model", model)
        starts = range(0, n, batch_size)
        with torch.no_grad():
            for s in progress.bar(starts, desc=desc, unit="batch") if desc else starts:
                cur["rows"] = slice(s, min(s + batch_size, n))
                b = to_device(windows[cur["rows"]], model)
                body(input_ids=b, attention_mask=torch.ones_like(b), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return TokenStats(sites, kinds, layers, tmax, windows, {"windows": n, "seq_len": L})


# ----- tables ---------------------------------------------------------------------------------------------------
def top_tokens(stats: TokenStats, site: int, k: int = 3, tokenizer=None) -> dict:
    """The `k` tokens with the largest max|x| at `site` over all windows (window, position, id, text, max, ratio to
    the median token of the site), and the median token's max|x|."""
    t = stats.tmax[site]
    med = float(np.median(t))
    flat = np.argsort(t, axis=None)[::-1][:k]
    rows = []
    for f in flat:
        w, p = np.unravel_index(int(f), t.shape)
        tid = int(stats.ids[w, p])
        rows.append({"window": int(w), "position": int(p), "id": tid, "text": decode(tokenizer, tid),
                     "max": float(t[w, p]), "ratio": float(t[w, p]) / med if med > 0 else math.inf})
    per_window_top = np.argmax(t, axis=1)
    return {"site": stats.sites[site], "median": med, "max": float(t.max()), "top": rows,
            # in how many windows the window's largest token is its first token
            "windows_top_at_0": int((per_window_top == 0).sum()), "windows": int(t.shape[0]),
            # per window, the largest token over the second largest (median over windows): one outlier token per
            # window shows as a large value here
            "top1_over_top2": float(np.median(_ranks(t, 2)[:, 0] / np.maximum(_ranks(t, 2)[:, 1], 1e-30)))}


def _ranks(t: np.ndarray, k: int) -> np.ndarray:
    """[windows, k]: each window's k largest token values, largest first."""
    k = min(k, t.shape[1])
    return -np.sort(-t, axis=1)[:, :k]


def layer_table(stats: TokenStats, tokenizer=None, top: int = 3) -> list[dict]:
    """Per decoder layer: the residual stream's top tokens, and the quantized Linear input whose largest token is
    farthest above its median token (with its top tokens); plus every Linear's top token in `linears`."""
    out = []
    for layer in range(stats.num_layers()):
        res = stats.site_index(layer, RESIDUAL)
        lin = [j for j, (l, k) in enumerate(zip(stats.layers, stats.kinds)) if l == layer and k != RESIDUAL]
        per_lin = {stats.kinds[j]: top_tokens(stats, j, top, tokenizer) for j in lin}
        worst = max(per_lin, key=lambda k: per_lin[k]["top"][0]["ratio"]) if per_lin else None
        out.append({
            "layer": layer,
            "residual": top_tokens(stats, res, top, tokenizer) if res is not None else None,
            "worst_linear": worst,
            "linears": per_lin,
        })
    return out


def position_share(stats: TokenStats, threshold: float = 64.0, kinds=None) -> dict:
    """Of all tokens whose max|x| exceeds `threshold` × their window's median token at a site (sites of `kinds`, or
    all): how many, and which share sits at position 0 (the first token of a window)."""
    total = at0 = 0
    positions: Counter = Counter()
    for j, k in enumerate(stats.kinds):
        if kinds is not None and k not in kinds:
            continue
        t = stats.tmax[j]
        med = np.median(t, axis=1, keepdims=True)
        hit = t > threshold * np.maximum(med, 1e-30)
        total += int(hit.sum())
        at0 += int(hit[:, 0].sum())
        positions.update(np.nonzero(hit)[1].tolist())
    return {"threshold": threshold, "outlier_tokens": total, "at_position_0": at0,
            "share_position_0": at0 / total if total else 0.0, "positions": dict(positions.most_common(10))}


def outlier_counts(stats: TokenStats, kind: str = "mlp.down_proj", threshold: float = 64.0) -> np.ndarray:
    """[layers, windows]: per layer and window, the number of tokens whose max|x| at the `kind` site exceeds
    `threshold` × the window's median token there (PrefixQuant's outlier-token count, η = 64 at down_proj)."""
    out = np.zeros((stats.num_layers(), stats.tmax.shape[1]), dtype=np.int64)
    for j, (l, k) in enumerate(zip(stats.layers, stats.kinds)):
        if k == kind:
            t = stats.tmax[j]
            med = np.median(t, axis=1, keepdims=True)
            out[l] = (t > threshold * np.maximum(med, 1e-30)).sum(axis=1)
    return out


def frequent_outlier_ids(stats: TokenStats, kind: str = "mlp.down_proj", threshold: float = 64.0,
                         skip_first: bool = True) -> list[tuple[int, int]]:
    """(token id, count) of the outlier tokens at the `kind` sites (over `threshold` × the window's median), most
    frequent first; with `skip_first` the window's first position is not counted (the first token is an outlier
    whatever its id: the prefix's own first token takes that role)."""
    c: Counter = Counter()
    for j, k in enumerate(stats.kinds):
        if k != kind:
            continue
        t = stats.tmax[j]
        med = np.median(t, axis=1, keepdims=True)
        w, p = np.nonzero(t > threshold * np.maximum(med, 1e-30))
        for wi, pi in zip(w.tolist(), p.tolist()):
            if skip_first and pi == 0:
                continue
            c[int(stats.ids[wi, pi])] += 1
    return c.most_common()


def decode(tokenizer, tid: int) -> str:
    if tokenizer is None:
        return ""
    try:
        return tokenizer.decode([int(tid)])
    except Exception:  # noqa: BLE001  (a tokenizer that cannot decode one id: show none)
        return ""


def report(stats: TokenStats, tokenizer=None, top: int = 3, threshold: float = 64.0) -> dict:
    """The token view as one JSON-able dict: per-layer table, position-0 share, PrefixQuant's counts and ids."""
    counts = outlier_counts(stats, "mlp.down_proj", threshold) if "mlp.down_proj" in stats.kinds else None
    freq = frequent_outlier_ids(stats, "mlp.down_proj" if counts is not None else RESIDUAL, threshold)
    return {
        **stats.meta,
        "threshold": threshold,
        "layers": layer_table(stats, tokenizer, top),
        "position_0": {"residual": position_share(stats, threshold, (RESIDUAL,)),
                       "linear_inputs": position_share(stats, threshold, [k for k in stats.kind_names() if k != RESIDUAL])},
        "down_proj_outliers_per_window": None if counts is None else {
            "mean_per_layer": [round(float(x), 3) for x in counts.mean(axis=1)],
            "max_mean": float(counts.mean(axis=1).max()) if counts.size else 0.0,
        },
        "frequent_outlier_ids": [{"id": i, "text": decode(tokenizer, i), "count": n} for i, n in freq[:10]],
    }


def format_table(rep: dict) -> str:
    """The per-layer text table of `report`."""
    def tok(r):
        return f"p{r['position']:<4} {r['id']:>6} {r['text']!r:<12.12} {r['max']:>10.1f} {r['ratio']:>8.1f}x"

    lines = [f"{'layer':>5}  {'residual stream: top token (pos id text max ratio)':<50}  {'top@p0 top1/top2':<17}  "
             f"{'worst Linear input':<20} {'top token (pos id text max ratio)':<44}"]
    for row in rep["layers"]:
        r = row["residual"]
        top = r["top"] if r else []
        w = row["worst_linear"]
        wt = row["linears"][w]["top"][0] if w else None
        at0 = f"{r['windows_top_at_0']}/{r['windows']} {r['top1_over_top2']:6.1f}x" if r else ""
        lines.append(f"{row['layer']:>5}  {tok(top[0]) if top else '':<50}  {at0:<17}  {w or '':<20} {tok(wt) if wt else ''}")
    p = rep["position_0"]
    lines.append(f"tokens over {rep['threshold']:g}x their window's median token: residual {p['residual']['outlier_tokens']} "
                 f"({100 * p['residual']['share_position_0']:.0f} % at position 0), Linear inputs "
                 f"{p['linear_inputs']['outlier_tokens']} ({100 * p['linear_inputs']['share_position_0']:.0f} % at position 0)")
    if rep["frequent_outlier_ids"]:
        lines.append("most frequent outlier token ids after position 0: " + ", ".join(
            f"{d['id']} {d['text']!r} ×{d['count']}" for d in rep["frequent_outlier_ids"][:6]))
    return "\n".join(lines)


# ----- plot -----------------------------------------------------------------------------------------------------
def plot(path: str | Path, stats: TokenStats, kinds=(RESIDUAL, "mlp.down_proj"), title: str = "") -> None:
    """Per layer, for each site kind: each window's largest, 2nd and 3rd token max|x| (median over the windows) and
    the median token (log scale); layers where the largest token over all windows is a first token are marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    kinds = [k for k in kinds if k in stats.kinds]
    fig = Figure(figsize=(10, 3.2 * max(1, len(kinds))), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(kinds), 1, squeeze=False)[:, 0]
    for ax, kind in zip(axes, kinds):
        xs, tops, meds, first = [], [], [], []
        for layer in range(stats.num_layers()):
            j = stats.site_index(layer, kind)
            if j is None:
                continue
            t = stats.tmax[j]
            xs.append(layer)
            tops.append(np.median(_ranks(t, 3), axis=0))
            meds.append(float(np.median(t)))
            w, p = np.unravel_index(int(np.argmax(t)), t.shape)
            first.append(p == 0)
        tops = np.array(tops)
        x = np.array(xs)
        for i, (lbl, c) in enumerate((("largest token", "#c44e52"), ("2nd", "#dd8452"), ("3rd", "#ccb974"))):
            ax.plot(x, tops[:, i], marker="o", ms=3, color=c, label=f"{lbl} (per window)")
        ax.plot(x, meds, marker="s", ms=3, color="#4c72b0", label="median token")
        f = np.array(first, dtype=bool)
        if f.any():
            ax.scatter(x[f], tops[f, 0], s=60, facecolors="none", edgecolors="k", label="largest at position 0")
        ax.set_yscale("log")
        ax.set_xlabel("decoder layer")
        ax.set_ylabel("token max |x|")
        ax.set_title(("residual stream (decoder layer output)" if kind == RESIDUAL else f"{kind} input") + (f" — {title}" if title else ""), fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=5, loc="upper left")
    fig.tight_layout()
    fig.savefig(str(path), format="png", metadata={"Software": None})
