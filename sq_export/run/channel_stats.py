"""channel_stats.safetensors: the per-input-channel statistics the report plots (sq_export.report), written by the
smooth stage of a whole-model run and of a streamed one alike.

Per quantized Linear n: act_before/n (max|x| per input channel, calibration), act_after/n (the same after
smoothing: max|x|/s), w_before/n and w_after/n (max|W| per input channel before / after smoothing), float32; the
metadata (key "sq_export", JSON) names the family, α, the Linears and the report's default Linear.
"""

from __future__ import annotations

import json
from pathlib import Path

FORMAT = "channel_stats/1"


def default_linear(fam) -> str:
    """The Linear the report plots unless told: the first Linear of the first smoothing group of layer n//2."""
    prefix = fam.layer_prefix(fam.num_layers() // 2)
    groups = fam.groups()
    mid = [g for g in groups if g.source.startswith(prefix)]
    return (mid or groups)[0].linears[0]


def save_channel_stats(path: Path, fam, model_type: str, act_before: dict, act_after: dict, w_before: dict,
                       w_after: dict, *, alpha, pairs: bool, alpha_groups: dict | None) -> str:
    """Write the four statistics of every quantized Linear of `fam` to `path`; return the default report Linear."""
    from safetensors.torch import save_file

    names = fam.quantized_linears()
    stats = {}
    for n in names:
        stats[f"act_before/{n}"] = act_before[n].float().clone().contiguous()
        stats[f"act_after/{n}"] = act_after[n].float().clone().contiguous()
        stats[f"w_before/{n}"] = w_before[n].float().cpu().contiguous()
        stats[f"w_after/{n}"] = w_after[n].float().cpu().contiguous()
    lin = default_linear(fam)
    meta = {
        "format": FORMAT,
        "alpha": alpha,
        "family": fam.name,
        "model_type": model_type,
        "num_layers": fam.num_layers(),
        "default_linear": lin,
        "linears": names,
        "smoothed_linears": sorted({n for g in fam.groups(include_linear_pairs=pairs) for n in g.linears}),
        "smooth_pairs": pairs,
        "alpha_per_group": alpha_groups,
    }
    save_file(dict(sorted(stats.items())), str(path), metadata={"sq_export": json.dumps(meta, sort_keys=True)})
    return lin
