"""The `sq-export run` report: OUT/report.md (headline numbers first), OUT/report.json, OUT/plots/*.png.

Plots (matplotlib, Agg canvas, no pyplot global state):
  act_channels.png     per-input-channel max|x| of one Linear before / after smoothing (the paper's Figure 4 view)
  weight_channels.png  per-input-channel max|W| of the same Linear before / after smoothing
  sqnr.png             per-Linear output SQNR (dB), naive W8A8 vs SmoothQuant W8A8, on a calibration batch
  perplexity.png       perplexity of FP32 / naive / SQ per backend

Everything is read from files in OUT (act scales, channel stats, eval.json, check.json, build.json) and the
manifest, so the report can be redone without the model. Rendering only: what it shows is measured elsewhere
(sq_export.measure: perplexity, per-Linear SQNR, by the eval stage).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from sq_export.errors import BadInput

# what an engine's perplexity was checked against (run.stages.engine_agreement's "reference")
REFERENCE_LABELS = {"onnxruntime": "in ONNX Runtime", "pytorch": "in PyTorch (layer-streamed)"}

MODE_LABEL = {"fp": "FP32", "fp_prefix": "FP32 after the outlier prefix", "naive": "naive W8A8",
              "paper": "SmoothQuant W8A8, paper recipe", "sq": "SmoothQuant W8A8"}
# the delivered model first after the float reference (and, with --prefix-outliers, the float model after the prefix:
# what the quantized models, all run after it, approximate)
ROW_ORDER = ("fp", "fp_prefix", "sq", "paper", "naive")
NOT_MEASURED_LABEL = {"pytorch": "PyTorch perplexity", "onnxruntime": "ONNX Runtime perplexity", "tensorrt": "TensorRT perplexity",
                      "layer_sqnr": "per-Linear SQNR", "engine_vs_graph": "engine vs graph agreement"}
NOT_BUILT_WHY = "each would need a streamed quantization of the whole checkpoint of its own"
BACKEND_LABEL = {"pytorch": "PyTorch", "onnxruntime": "ONNX Runtime", "tensorrt": "TensorRT"}
COLORS = {"fp": "#4c72b0", "fp_prefix": "#64b5cd", "naive": "#dd8452", "paper": "#8172b3", "sq": "#55a868", "before": "#c44e52", "after": "#55a868"}


def mode_label(mode: str, recipe_name: str | None = None) -> str:
    """The delivered model (sq) is named by its recipe ("default recipe") when the run says which."""
    if mode == "sq" and recipe_name:
        return f"SmoothQuant W8A8, {recipe_name} recipe (delivered)"
    return MODE_LABEL[mode]


# ----- helpers --------------------------------------------------------------------------------------------------
def _short(name: str, num_layers_path_hint: str = "") -> str:
    """'model.layers.12.self_attn.q_proj' -> 'L12.q_proj'."""
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return f"L{p}." + ".".join(parts[i + 1 :]).replace("self_attn.", "").replace("mlp.", "").replace("self_attention.", "")
    return name


def artifact_bytes(sizes: dict, name: str) -> int | None:
    """Bytes of one artifact as the run wrote it: `model.sq.onnx` with its external data (`.data`), `model.sq.engine`
    or the segment engines that stand for it (`model.sq.engines.segNN.engine`); None when the run has neither."""
    stem, _, ext = name.rpartition(".")
    parts = [sizes.get(name), sizes.get(f"{name}.data")]
    if ext == "engine":
        parts += [v for k, v in sizes.items() if k.startswith(f"{stem}.engines.seg") and k.endswith(".engine")]
    parts = [p for p in parts if p]
    return sum(parts) if parts else None


def _mb(n) -> str:
    if n is None:
        return "-"
    if n < 1e6:
        return f"{n / 1e3:.1f} kB"
    return f"{n / 1e6:.1f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"


def _fmt_ppl(x) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.3f}"


def _pct(x, ref) -> str:
    if x is None or ref is None or not ref:
        return ""
    return f" ({(x / ref - 1) * 100:+.1f}%)"


def _new_fig(w, h):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> None:
    fig.savefig(str(path), format="png", metadata={"Software": None})


def load_channel_stats(path: Path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("sq_export", "{}"))
    return load_file(str(path)), meta


# ----- plots ----------------------------------------------------------------------------------------------------
def _channel_plot(path: Path, before, after, title: str, ylabel: str, top) -> None:
    import numpy as np

    b, a = np.asarray(before, dtype=np.float64), np.asarray(after, dtype=np.float64)
    x = np.arange(len(b))
    fig = _new_fig(12, 4.2)
    axes = fig.subplots(1, 2, sharey=True)
    floor = max(min(b[b > 0].min() if (b > 0).any() else 1e-6, a[a > 0].min() if (a > 0).any() else 1e-6) / 2, 1e-8)
    for ax, vals, label, col in ((axes[0], b, "before smoothing", COLORS["before"]), (axes[1], a, "after smoothing", COLORS["after"])):
        ax.bar(x, np.maximum(vals, floor), width=1.0, color=col, linewidth=0)
        ax.bar(top, np.maximum(vals[top], floor), width=max(1.0, len(b) / 150), color="black", linewidth=0, label=f"top-{len(top)} channels before")
        ax.set_yscale("log")
        ax.set_xlim(-0.5, len(b) - 0.5)
        med = float(np.median(vals)) if len(vals) else 0.0
        ratio = float(vals.max() / med) if med > 0 else float("inf")
        ax.axhline(med, color="gray", lw=0.8, ls="--", label=f"median {med:.3g}")
        ax.set_title(f"{label}: max {vals.max():.3g}, max/median {ratio:.1f}x", fontsize=10)
        ax.set_xlabel("input channel")
        ax.grid(axis="y", which="major", alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
    axes[0].set_ylabel(ylabel)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    _save(fig, path)


def _sqnr_plot(path: Path, sqnr: dict) -> None:
    import numpy as np

    names = list(sqnr)
    n = len(names)
    naive = np.array([np.nan if sqnr[k].get("naive") is None else sqnr[k]["naive"] for k in names], dtype=np.float64)
    sq = np.array([np.nan if sqnr[k].get("sq") is None else sqnr[k]["sq"] for k in names], dtype=np.float64)
    w = min(30.0, max(8.0, 0.16 * n + 2))
    fig = _new_fig(w, 4.8)
    ax = fig.subplots()
    x = np.arange(n)
    ax.bar(x - 0.2, naive, width=0.4, color=COLORS["naive"], label=f"naive W8A8 (mean {np.nanmean(naive):.1f} dB)")
    ax.bar(x + 0.2, sq, width=0.4, color=COLORS["sq"], label=f"SmoothQuant W8A8 (mean {np.nanmean(sq):.1f} dB)")
    ax.set_xticks(x)
    ax.set_xticklabels([_short(k) for k in names], rotation=90, fontsize=7 if n <= 60 else 5)
    ax.set_xlim(-0.7, n - 0.3)
    ax.set_ylabel("output SQNR (dB), higher is better")
    ax.set_title("Per-Linear quantization error: SQNR = 10·log10(‖y‖² / ‖y − ŷ‖²) vs the float model, calibration batch", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    top = np.nanmax(np.concatenate([naive[np.isfinite(naive)], sq[np.isfinite(sq)], [1.0]]))
    ax.set_ylim(min(0.0, float(np.nanmin(np.concatenate([naive, sq, [0.0]])))), top * 1.22)
    ax.legend(fontsize=9, loc="upper right", ncol=2)
    fig.tight_layout()
    _save(fig, path)


def _ppl_plot(path: Path, ppl: dict, recipe_name: str | None = None) -> None:
    import numpy as np

    backends = [b for b in ("pytorch", "onnxruntime", "tensorrt") if ppl.get(b)]
    modes = [m for m in ROW_ORDER if any(m in ppl[b] for b in backends)]
    fig = _new_fig(7.5, 3.8)
    ax = fig.subplots()
    x = np.arange(len(backends))
    w = 0.8 / max(1, len(modes))
    for i, mode in enumerate(modes):
        vals = [ppl[b].get(mode) for b in backends]
        vals = [np.nan if v is None else v for v in vals]
        bars = ax.bar(x + (i - (len(modes) - 1) / 2) * w, vals, width=w, color=COLORS[mode], label=mode_label(mode, recipe_name))
        for r, v in zip(bars, vals):
            if np.isfinite(v):
                ax.annotate(f"{v:.2f}", (r.get_x() + r.get_width() / 2, v), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x)
    ax.set_xticklabels([BACKEND_LABEL[b] for b in backends])
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title("Perplexity on the held-out text", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    _save(fig, path)


# ----- the report -----------------------------------------------------------------------------------------------
def _read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def write_report(out: Path, manifest: dict, staging: Path, linear: str | None = None) -> dict:
    """Write report.md, report.json and plots/ into `staging` (the pipeline moves them into `out`)."""
    import numpy as np

    out = Path(out)
    stages = manifest.get("stages", {})
    stats, meta = load_channel_stats(out / "channel_stats.safetensors")
    ev = _read_json(out / "eval.json") or {}
    chk = _read_json(out / "check.json") or {}
    build_rec = stages.get("build") or {}
    build = _read_json(out / "build.json") if "build.json" in (build_rec.get("outputs") or {}) else None

    lin = linear or meta.get("default_linear")
    if f"act_before/{lin}" not in stats:
        names = meta.get("linears") or sorted({k.split("/", 1)[1] for k in stats})
        raise BadInput(f"--report-linear {lin} is not a quantized Linear of this model; e.g. {', '.join(names[:3])}")
    smoothed_lin = lin in set(meta.get("smoothed_linears", []))
    act_b, act_a = stats[f"act_before/{lin}"].numpy(), stats[f"act_after/{lin}"].numpy()
    w_b, w_a = stats[f"w_before/{lin}"].numpy(), stats[f"w_after/{lin}"].numpy()
    k = min(5, len(act_b))
    top = np.argsort(-act_b, kind="stable")[:k]

    def ratio(v):
        med = float(np.median(v))
        return float(v.max() / med) if med > 0 else float("inf")

    plots = staging / "plots"
    plots.mkdir()
    alpha = meta.get("alpha")
    _channel_plot(plots / "act_channels.png", act_b, act_a,
                  f"{lin}: input activation max|x| per channel (calibration), alpha {alpha}", "max |x| (log)", top)
    _channel_plot(plots / "weight_channels.png", w_b, w_a,
                  f"{lin}: weight max|W| per input channel, alpha {alpha}", "max |W| (log)", top)
    raw = ev.get("layer_sqnr_db") or []
    sqnr = dict(raw) if isinstance(raw, dict) else {r["linear"]: {k: v for k, v in r.items() if k != "linear"} for r in raw}
    if sqnr:
        _sqnr_plot(plots / "sqnr.png", sqnr)
    ppl = ev.get("perplexity") or {}
    rc = ev.get("recipe") or {}
    if ppl:
        _ppl_plot(plots / "perplexity.png", ppl, rc.get("name"))

    # --- numbers ---
    # the headline's backend: PyTorch; a streamed run (no whole model) has TensorRT at most
    head_backend = next((b for b in ("pytorch", "tensorrt", "onnxruntime") if ppl.get(b)), None)
    pt = ppl.get(head_backend, {}) if head_backend else {}
    fp, nv, sq, paper = pt.get("fp"), pt.get("naive"), pt.get("sq"), pt.get("paper")
    recovered = None
    if None not in (fp, nv, sq) and nv - fp > 1e-9:
        recovered = (nv - sq) / (nv - fp)
    outs = {}
    for rec in stages.values():
        for name, o in (rec.get("outputs") or {}).items():
            outs[name] = o
    sizes = {name: outs[name].get("bytes") for name in sorted(outs)}
    sqnr_mean = {m: float(np.nanmean([np.nan if v.get(m) is None else v[m] for v in sqnr.values()])) for m in ("naive", "sq")} if sqnr else {}
    check_ok = chk.get("ok")
    build_status = build_rec.get("status")
    build_line = (
        "not run" if not build_rec
        else f"skipped: {build_rec.get('reason')}" if build_status == "skipped" and not build_rec.get("outputs")
        else ", ".join(f"{m}: {'built' if v.get('built') else 'not built (' + str(v.get('reason'))[:120] + ')'}" for m, v in (build or {}).items())
    )
    calib = (stages.get("calibrate") or {}).get("options", {})
    recipe = {
        "name": rc.get("name"),
        "describe": rc.get("describe"),
        "alpha": alpha,
        "alpha_per_group": meta.get("alpha_per_group") or rc.get("alpha_per_group"),
        "smooth_pairs": bool(meta.get("smooth_pairs") or rc.get("smooth_pairs")),
        "clip": rc.get("clip", "max"),
        "fallback": rc.get("fallback"),
        **({"fallback_note": rc["fallback_note"]} if rc.get("fallback_note") else {}),
        "quantized_layers_total": rc.get("quantized_layers_total"),
        "fp16_layers": list(rc.get("fp16_layers") or []),
    }
    headline = {
        "model": manifest.get("model", {}).get("arg"),
        "perplexity_backend": head_backend,
        "perplexity_pytorch": {"fp": fp, "naive": nv, "sq": sq, **({"paper": paper} if paper is not None else {})}
        if head_backend == "pytorch" else {},
        "perplexity_headline": {"fp": fp, "naive": nv, "sq": sq, **({"paper": paper} if paper is not None else {})},
        "sq_recovers_fraction_of_naive_gap": recovered,
        "eval_tokens": ev.get("tokens"),
        "check_ok": check_ok,
        "tensorrt": build_line,
        "report_linear": lin,
        "outlier_ratio_max_over_median": {"before": ratio(act_b), "after": ratio(act_a)},
        "mean_sqnr_db": sqnr_mean,
        "fp16_layers": recipe["fp16_layers"],
    }
    stage_rows = [
        {"stage": n, "status": (stages.get(n) or {}).get("status", "not run"), "wall_s": (stages.get(n) or {}).get("wall_s"),
         "finished": (stages.get(n) or {}).get("finished"), "reason": (stages.get(n) or {}).get("reason")}
        for n in manifest.get("stage_order", [])
        if n != "report"
    ]
    doc = {
        "headline": headline,
        "perplexity": ppl,
        "eval": {k: ev.get(k) for k in ("tokens", "seq_len", "max_tokens", "eval_text", "modes", "recipes")},
        # a streamed run (--stream): what it did not measure, and the models it did not build, with the reasons
        "stream": bool(ev.get("stream")),
        "not_measured": ev.get("skipped") or {},
        "not_built": ev.get("not_built") or {},
        "engine_vs_graph": ev.get("engine_vs_graph") or {},
        "alpha": alpha,
        "alpha_per_group": recipe["alpha_per_group"],
        "recipe": recipe,
        "fp16_layers": recipe["fp16_layers"],
        "family": meta.get("family"),
        "calibration": calib,
        "channels": {
            "linear": lin,
            "smoothed": smoothed_lin,
            "top_channels_before": [int(i) for i in top],
            "act_max_before": {"max": float(act_b.max()), "median": float(np.median(act_b)), "ratio": ratio(act_b)},
            "act_max_after": {"max": float(act_a.max()), "median": float(np.median(act_a)), "ratio": ratio(act_a)},
            "w_max_before": {"max": float(w_b.max()), "median": float(np.median(w_b)), "ratio": ratio(w_b)},
            "w_max_after": {"max": float(w_a.max()), "median": float(np.median(w_a)), "ratio": ratio(w_a)},
        },
        "layer_sqnr_db": sqnr,
        "check": {"ok": check_ok, "violations": {k: len(v.get("violations", [])) for k, v in (chk.get("graphs") or {}).items()}},
        "build": build,
        "build_status": build_line,
        "file_bytes": sizes,
        "stages": stage_rows,
        "versions": (stages.get("eval") or stages.get("export") or {}).get("versions"),
        "plots": sorted(f"plots/{p.name}" for p in plots.iterdir()),
    }
    (staging / "report.json").write_text(json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n")
    (staging / "report.md").write_text(_markdown(doc, manifest) + "\n")
    return {"linear": lin, "plots": doc["plots"], "recovered": recovered}


def _recipe_line(r: dict) -> str:
    apg = r.get("alpha_per_group") or {}
    head = f"**{r['name']}** ({r['describe']}): " if r.get("name") and r.get("describe") else ""
    a = f"alpha {r.get('alpha')}" + (f" (per group {min(apg.values()):.2f}..{max(apg.values()):.2f})" if apg else "")
    parts = [a, "norm and Linear→Linear (up→down, v→o) smoothing" if r.get("smooth_pairs") else "norm smoothing",
             f"activation ranges {r.get('clip') or 'max'}"]
    fp16 = r.get("fp16_layers") or []
    if fp16:
        parts.append(f"{len(fp16)} Linear(s) kept in float, no Q/DQ (FP16 in TensorRT; --fallback {r.get('fallback')}): "
                     + ", ".join(f"`{n}`" for n in fp16))
    elif r.get("fallback"):
        parts.append(f"--fallback {r['fallback']}: every Linear stays quantized")
    elif r.get("fallback_note"):
        parts.append(f"--fallback {r['fallback_note']}")
    return head + "; ".join(parts)


def _markdown(doc: dict, manifest: dict) -> str:
    h = doc["headline"]
    p = h["perplexity_headline"]
    ev = doc["eval"]
    ch = doc["channels"]
    L = []
    L.append(f"# SmoothQuant W8A8 report: {h['model']}")
    L.append("")
    rname = doc["recipe"].get("name")
    beside = [f"{MODE_LABEL[m]} {_fmt_ppl(p[m])}{_pct(p[m], p['fp'])}" for m in ("paper", "naive") if p.get(m) is not None]
    backend = h.get("perplexity_backend")
    if backend:
        L.append(f"**Perplexity** ({BACKEND_LABEL[backend]}, {ev.get('tokens')} predicted tokens of {ev.get('eval_text')}, chunks of {ev.get('seq_len')}): "
                 f"{mode_label('sq', rname)} **{_fmt_ppl(p['sq'])}**{_pct(p['sq'], p['fp'])} vs FP32 **{_fmt_ppl(p['fp'])}**"
                 + ("; beside it: " + " · ".join(beside) if beside else ""))
    else:
        why = doc["not_measured"].get("tensorrt") or doc["not_measured"].get("pytorch") or "the eval stage did not run"
        L.append(f"**Perplexity**: not measured ({why}).")
    L.append("")
    if doc.get("stream"):
        L.append("Layer-streamed run (`--stream`): the model was never loaded whole. Built: "
                 + ", ".join(mode_label(m, rname) for m in (ev.get("modes") or []))
                 + "; not built: " + ", ".join(f"{MODE_LABEL[m]}" for m in doc["not_built"]) + " (" + NOT_BUILT_WHY + ").")
        L.append("")
    bullets = []
    if h["sq_recovers_fraction_of_naive_gap"] is not None:
        bullets.append(f"The delivered recipe closes **{h['sq_recovers_fraction_of_naive_gap'] * 100:.0f}%** of the naive-INT8 perplexity gap"
                       + (f" (the paper recipe: {(p['naive'] - p['paper']) / (p['naive'] - p['fp']) * 100:.0f}%)." if p.get("paper") is not None else "."))
    if h["mean_sqnr_db"]:
        bullets.append(f"Mean per-Linear output SQNR: naive {h['mean_sqnr_db']['naive']:.1f} dB → SmoothQuant {h['mean_sqnr_db']['sq']:.1f} dB.")
    r = h["outlier_ratio_max_over_median"]
    bullets.append(f"Activation outliers at `{ch['linear']}`: max/median of per-channel max|x| {r['before']:.1f}× before smoothing, {r['after']:.1f}× after.")
    bullets.append("Graph check: " + ("**OK**, no violations" if h["check_ok"] else "**FAILED**" if h["check_ok"] is False else "not run")
                   + (" (" + ", ".join(f"{k}: {v}" for k, v in doc["check"]["violations"].items()) + " violations)" if doc["check"]["violations"] else ""))
    bullets.append(f"TensorRT: {h['tensorrt']}.")
    sz = doc["file_bytes"]
    size = []
    for what, sq_b, fp_b in (("graph", artifact_bytes(sz, "model.sq.onnx"), artifact_bytes(sz, "model.fp.onnx")),
                             ("TensorRT engine", artifact_bytes(sz, "model.sq.engine"), artifact_bytes(sz, "model.fp.engine"))):
        if sq_b and fp_b:
            size.append(f"{what} {_mb(sq_b)} vs {_mb(fp_b)} ({sq_b / fp_b:.2f}×)")
    if size:
        bullets.append("Size, SmoothQuant vs FP32: " + "; ".join(size) + ".")
    bullets.append("Recipe: " + _recipe_line(doc["recipe"]) + ".")
    L += [f"- {b}" for b in bullets]
    L.append("")

    L.append("## Perplexity")
    L.append("")
    if doc["not_measured"]:
        L.append("Not measured in this run:")
        L.append("")
        for k, why in sorted(doc["not_measured"].items()):
            L.append(f"- {NOT_MEASURED_LABEL.get(k, k)}: {why}")
        L.append("")
    backends = [b for b in ("pytorch", "onnxruntime", "tensorrt") if doc["perplexity"].get(b)]
    if backends:
        L.append("| model | " + " | ".join(BACKEND_LABEL[b] for b in backends) + (" | TensorRT |" if "tensorrt" not in backends else " |"))
        L.append("|---|" + "---:|" * (len(backends) + (0 if "tensorrt" in backends else 1)))
        for m in [m for m in ROW_ORDER if any(m in doc["perplexity"][b] for b in backends)]:
            cells = [_fmt_ppl(doc["perplexity"][b].get(m)) for b in backends]
            if "tensorrt" not in backends:
                cells.append("n/a")
            L.append(f"| {mode_label(m, rname)} | " + " | ".join(cells) + " |")
        L.append("")
        L.append(f"Evaluation: first {ev.get('max_tokens') or 'all'} tokens, non-overlapping chunks of {ev.get('seq_len')}. "
                 "Same chunking and arithmetic on every backend (sq_export.measure.perplexity), so the columns differ only by their logits.")
        L.append("")
    for m, v in (doc.get("engine_vs_graph") or {}).items():
        if not v.get("ok", True):
            ref = v.get("reference", "onnxruntime")
            L.append(f"**The TensorRT engine of {mode_label(m, rname)} does not compute its graph** (perplexity {v['engine']:.4g} vs "
                     f"{v[ref]:.4g} {REFERENCE_LABELS.get(ref, ref)}, {v['ratio']:.3g}x): do not deploy it; rebuild with "
                     "`sq-export build --no-fp16` (docs/TENSORRT.md).")
            L.append("")
    if Path("plots/perplexity.png").name in {Path(x).name for x in doc["plots"]}:
        L.append("![perplexity](plots/perplexity.png)")
        L.append("")

    L.append(f"## Activation outliers at `{ch['linear']}`")
    L.append("")
    b, a = ch["act_max_before"], ch["act_max_after"]
    L.append(f"Per-input-channel max|x| over the calibration text, before and after smoothing (log scale). Before: max {b['max']:.3g}, "
             f"median {b['median']:.3g} ({b['ratio']:.1f}×); after: max {a['max']:.3g}, median {a['median']:.3g} ({a['ratio']:.1f}×). "
             f"Largest channels before: {', '.join(map(str, ch['top_channels_before']))} (black)."
             + ("" if ch["smoothed"] else " This Linear is not fed by a smoothing norm, so it is unchanged."))
    L.append("")
    L.append("![activation max per channel](plots/act_channels.png)")
    L.append("")
    wb, wa = ch["w_max_before"], ch["w_max_after"]
    L.append(f"Weights of the same Linear, max|W| per input channel: the difficulty moves here (max/median {wb['ratio']:.1f}× → {wa['ratio']:.1f}×).")
    L.append("")
    L.append("![weight max per channel](plots/weight_channels.png)")
    L.append("")

    sq = doc["layer_sqnr_db"]
    if sq:
        L.append("## Per-Linear quantization error")
        L.append("")
        ref = (" SmoothQuant with Linear→Linear pairs is compared with the smoothed float model (up_proj/v_proj outputs are "
               "divided by the smoothing factors there too), naive with the original." if doc["recipe"].get("smooth_pairs") else "")
        L.append("SQNR (dB) of each quantized Linear's output vs the float model, both run end to end on a calibration batch."
                 + ref + " Lowest naive SQNR first:")
        L.append("")
        L.append("| Linear | naive dB | SmoothQuant dB | Δ dB |")
        L.append("|---|---:|---:|---:|")
        def db(x):
            return "exact" if x is None else f"{x:.1f}"

        worst = sorted(sq, key=lambda k: math.inf if sq[k].get("naive") is None else sq[k]["naive"])[:8]
        for k in worst:
            a, b = sq[k].get("naive"), sq[k].get("sq")
            d = "" if a is None or b is None else f"{b - a:+.1f}"
            L.append(f"| `{k}` | {db(a)} | {db(b)} | {d} |")
        L.append("")
        L.append("![per-Linear SQNR](plots/sqnr.png)")
        L.append("")

    apg = doc["recipe"].get("alpha_per_group")
    if apg:
        L.append("## Alpha per smoothing group (--alpha auto)")
        L.append("")
        L.append("Per group, the alpha minimizing the group's static W8A8 output error on calibration rows:")
        L.append("")
        L.append("| group (smoothing source) | alpha |")
        L.append("|---|---:|")
        for src, a in apg.items():
            L.append(f"| `{src}` | {a:.2f} |")
        L.append("")

    L.append("## Files")
    L.append("")
    L.append("| file | size |")
    L.append("|---|---:|")
    for name, n in doc["file_bytes"].items():
        L.append(f"| {name} | {_mb(n)} |")
    L.append("")
    L.append("## Stages")
    L.append("")
    L.append("| stage | last run | wall time | note |")
    L.append("|---|---|---:|---|")
    for s in doc["stages"]:
        w = s["wall_s"]
        note = (s["reason"] or "") if s["status"] != "ran" else ""
        L.append(f"| {s['stage']} | {s['status']} | {'-' if w is None else f'{w:.1f} s'} | {note} |")
    L.append("")
    L.append("Wall time is that of the run that produced the stage's outputs; `skipped` stages were up to date. "
             "Inputs, options, outputs (sha256) and tool versions per stage: manifest.json.")
    L.append("")
    c = doc["calibration"]
    v = doc["versions"] or {}
    L.append("## Settings")
    L.append("")
    L.append(f"- family {doc['family']}; {_recipe_line(doc['recipe'])}; calibration {c}")
    L.append("- versions: " + ", ".join(f"{k} {val}" for k, val in sorted(v.items())))
    return "\n".join(L)
