"""Layer-streamed smoothing and quantization: a smoothed checkpoint and its static INT8 scales, written one decoder
layer at a time (the whole model is never in memory).

    res = quantize_streamed(folder, "out/", ids, recipe)   # out/: smoothed HF folder + sq_quant.json + scales

Per decoder layer i: load it, run the cached calibration batches through it with the hooks (act max + row sample of
its Linears), keep its float outputs (layer i+1's inputs: the whole-model path calibrates the float model), search α
for its groups (--alpha auto), smooth it (its norm groups and Linear pairs: every group lives in one layer), check
the fold on the first cached batch in float32 (quant.equivalence), compute its static scales (clipped with --clip,
from its rows) and, for --fallback N, its Linears' local SQNR; write its smoothed tensors as one safetensors shard,
free it, drop its rows. Same recipe, same calibration text: the same smoothed weights, α per group, static scales
and fallback as `prepare` on the whole model (bit-identical on the CPU in float32: tests/test_stream.py). Given a
calibration's act maxima (run --stream's calibrate stage), the hooks take the row sample only, and without a row
sample to take only the first cached batch runs (quantize_streamed's `calibration`).

What needs more than one layer, and is refused here with the reason:
- `--fallback auto` scores whole-model logits (mean KL to the float model on calibration windows) for every
  candidate: (roles + 2 × budget) full forwards, each of which would stream every layer again (a 7B model with the
  10 % budget: ~50 forwards × 32 layer loads). `--fallback N` (the N lowest local SQNR, per layer) and names work.
- `--quantize-attention` and `--quantize-lm-head` calibrate on the quantized model's forward (a second streamed
  pass over the quantized layers; not implemented).
The float-equivalence check is per layer (float32, the first cached batch) instead of the whole-model logits.

`--rotate-down B` streams: after layer i is smoothed, the cached batches run through it once more and the range
of its MLP output Linear's rotated input (max|x·R|, sq_export.quant.hadamard) becomes that Linear's static scale,
as `prepare` measures it on the smoothed model (its inputs there come from the smoothed layers before it, here from
the float ones: equal up to float rounding, not bit-identical). The checkpoint keeps the weights unrotated (it is
still the float model); sq_quant.json names the Linears whose input is rotated ("rotated"), and every reader of the
record (api.load_quantized, lazy export, perplexity_streamed) rotates them when it builds the QLinears.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from sq_export import progress
from sq_export.errors import BadInput
from sq_export.quant.recipe import Recipe

QUANT_FILE = "sq_quant.json"
FORMAT = "sq_stream/1"


def read_quant_record(folder: str | Path) -> dict | None:
    """The sq_quant.json of a `quantize_streamed` folder (None when the folder has none); BadInput for another
    format."""
    f = Path(folder) / QUANT_FILE
    if not f.is_file():
        return None
    rec = json.loads(f.read_text())
    if rec.get("format") != FORMAT:
        raise BadInput(f"{f}: format {rec.get('format')!r}, expected {FORMAT}")
    return rec


def act_scales_of(rec: dict) -> dict[str, float]:
    """{Linear name: static input scale} of a record (read_quant_record)."""
    return {n: float(v) for n, v in rec["act_scales"].items()}


def rotation_of(rec: dict):
    """(names, H_B) of a record whose MLP output Linears' inputs are rotated (--rotate-down B, sq_quant.json's
    "rotated"), else None: its readers give those QLinears the rotation (hadamard.rotate_inputs / rotate_qlinear)
    with the recorded scales."""
    names = rec.get("rotated")
    if not names:
        return None
    from sq_export.quant.hadamard import hadamard

    return list(names), hadamard(int(rec["recipe"]["rotate_down"]))


def quantize_as_recorded(model, rec: dict, names=None) -> list[str]:
    """Swap the record's quantized Linears (those among `names`, when given: a streamed layer's) in `model` for static
    QLinears with the recorded scales, and give those the record names the input rotation (their recorded scales are
    the rotated inputs' already). Returns the names swapped."""
    from sq_export.quant.hadamard import rotate_inputs
    from sq_export.quant.qlinear import quantize_model

    recipe = recipe_from_json(rec["recipe"])
    recorded = set(rec["quantized"])
    want = rec["quantized"] if names is None else [n for n in names if n in recorded]
    quantized = quantize_model(model, want, recipe.act, act_scales_of(rec), recipe.per_channel)
    rot = rotation_of(rec)
    if rot is not None:
        done = set(quantized)
        rotate_inputs(model, [n for n in rot[0] if n in done], rot[1], None, recipe.per_channel)
    return quantized


def check_streamable(recipe: Recipe) -> None:
    if recipe.mode == "fp":
        raise BadInput("streamed quantization needs a quantized recipe (naive or sq), not --mode fp")
    if recipe.act != "static":
        raise BadInput(f"streamed quantization writes static scales; --act {recipe.act} is a PyTorch measurement mode")
    fb = recipe.fallback_spec()
    if fb is not None and fb[0] == "auto":
        raise BadInput("--fallback auto scores whole-model logits for every candidate (roles + 2x the budget full "
                       "forwards, each streaming every layer again): stream with --fallback N or NAMES (or none), or "
                       "use the whole-model path")
    if recipe.quantize_attention or recipe.quantize_lm_head:
        raise BadInput("--quantize-attention / --quantize-lm-head calibrate on the quantized model's forward: not "
                       "available streamed; use the whole-model path")
    if recipe.act_scales:
        raise BadInput("streamed quantization calibrates as it goes: --act-scales is for the whole-model path")


@dataclass
class StreamedQuantization:
    folder: Path
    recipe: Recipe
    alpha: float | str | None
    alpha_per_group: dict | None
    quantized: list
    fp16_layers: list
    scales: dict
    factors: dict
    act_max: dict  # unsmoothed, as calibration measured it
    max_layer_change: float | None
    times: dict = field(default_factory=dict)
    tune: dict = field(default_factory=dict)


def _recipe_json(r: Recipe) -> dict:
    return dataclasses.asdict(r)


def recipe_from_json(d: dict) -> Recipe:
    from sq_export.quant.recipe import CalibOptions

    d = dict(d)
    d["calib"] = CalibOptions(**d["calib"])
    return Recipe(**d)


def _layer_groups(family, i: int, pairs: bool):
    pre = family.layer_prefix(i)
    return [g for g in family.groups(include_linear_pairs=pairs) if g.source.startswith(pre)]


def _smoothed(act: dict, groups, factors: dict) -> dict:
    """smooth.smoothed_act_max on the given groups only (the same divisions in the same order)."""
    out = dict(act)
    for g in groups:
        for n in g.linears:
            out[n] = out[n] / factors[g.source]
    return out


def _checkpoint_keys(ls, module_name: str) -> list[tuple[str, str]]:
    """(parameter name, checkpoint key) of every tensor of `module_name` the checkpoint holds."""
    mod = ls.model.get_submodule(module_name)
    out = []
    for sub_name, sub in mod.named_modules():
        pre = f"{module_name}.{sub_name}." if sub_name else f"{module_name}."
        for kind in ("_parameters", "_buffers"):
            for k, t in getattr(sub, kind).items():
                key = ls.ckpt.key(pre + k)
                if t is not None and key is not None:
                    out.append((pre + k, key))
    return out


@torch.no_grad()
def quantize_streamed(folder: str | Path, out: str | Path, ids: np.ndarray, recipe: Recipe | None = None, *,
                      device=None, dtype="auto", cache_device=None, source_model: str | None = None,
                      calibration=None) -> StreamedQuantization:
    """Calibrate, smooth and quantize the model in `folder` layer by layer with `recipe` on the token stream `ids`;
    write `out` (atomically): the smoothed Hugging Face folder (loadable by from_pretrained; shards per layer),
    sq_quant.json (the recipe's decisions: static scales, α per group, fallback), act_scales.safetensors (the
    unsmoothed maxima, as `calibrate` writes them) and smoothing_factors.safetensors.

    `calibration`: the act maxima of this model on the recipe's calibration windows, already measured
    (sq_export.stream.calibrate.calibrate_streamed's Calibration, or act_scales.safetensors read back with its
    metadata; refused in one line when taken on other windows or for another model): they are not measured again.
    The layers still run on the cached batches where the recipe needs more than the maxima: every batch when it
    needs the row sample (α search, --clip, --fallback N; taken one layer at a time, so that host memory holds one
    layer's rows, and dropped after it), each layer's float outputs being the next layer's inputs; otherwise the
    first batch only (the per-layer float-equivalence check's). The outputs are the bytes of a run without it."""
    from safetensors.torch import save_file

    from sq_export.fileio import atomic_dir
    from sq_export.quant import recipe as recipe_mod
    from sq_export.quant.alpha import search_alpha_groups
    from sq_export.quant.calibrate import finish_act_max, save_act_scales, text_fingerprint
    from sq_export.quant.clip import clipped_scales
    from sq_export.decoder_layers import layer_input
    from sq_export.quant.equivalence import check_layer_unchanged, layer_output_f32
    from sq_export.quant import hadamard
    from sq_export.quant.fallback import least_sqnr, linear_sqnr
    from sq_export.quant.qlinear import QLinear, static_scales
    from sq_export.quant.reservoir import input_keys, new_reservoir, rows_for
    from sq_export.quant.smooth import apply_smoothing_groups, divisors
    from sq_export.stream.calibrate import calibrate_layer, layer_linears, open_stream, rotated_layer_maxima
    from sq_export.stream.writer import ShardWriter
    from sq_export.textdata import calibration_samples

    recipe = (recipe or Recipe(fallback=None)).validate()
    check_streamable(recipe)
    o = recipe.calib
    batches = calibration_samples(np.asarray(ids), o.samples, o.seq_len)
    fb = recipe.fallback_spec()
    clip = recipe_mod.parse_clip(recipe.clip) if recipe.act == "static" else None
    pairs = recipe.linear_pairs and recipe.mode == "sq"
    times: dict = {}
    t0 = time.perf_counter()
    ls = open_stream(folder, device, dtype, cache_device)
    fam = ls.family
    alpha = recipe.alpha if recipe.alpha is not None else fam.default_alpha
    bad = [n for n in fb[1] if n not in set(fam.quantized_linears())] if fb and fb[0] == "names" else []
    rot_names = hadamard.targets(fam) if recipe.rotate_down else []  # the Linears whose input is rotated
    try:  # refused before any work; the stream's files are closed first
        if bad:
            raise BadInput(f"--fallback: {bad[0]} is not a quantized Linear of this model (e.g. {fam.quantized_linears()[0]})")
        if alpha == "kl":
            raise BadInput("--alpha kl scores the whole model: not available layer-streamed (use --alpha auto or a number)")
        rot_h = hadamard.check_block(ls.model, rot_names, recipe.rotate_down) if rot_names else None
    except BadInput:
        ls.close()
        raise
    rot_targets = set(rot_names)
    searched = dict(alpha) if isinstance(alpha, dict) else None
    if searched is not None:
        alpha = "auto"
    res = new_reservoir(fam, recipe.reservoir_rows) if recipe.needs_rows() else None
    keys_of = input_keys(fam)
    stats, act, factors, scales, sens, alpha_groups, clip_ratio = {}, {}, {}, {}, {}, {}, {}
    worst = None
    try:
        given = _given_act_max(calibration, ls.model, fam, o, batches) if calibration is not None else None
        with atomic_dir(out) as tmp:
            w = ShardWriter(tmp, ls.dtype)
            layer_keys = set()
            for i in range(ls.num_layers):
                layer_keys.update(k for _, k in _checkpoint_keys(ls, ls.layer_name(i)))
            for key in ls.ckpt.keys():  # the embedding part, the final norm, the LM head: unchanged, copied
                if key not in layer_keys:
                    w.add(key, ls.ckpt.tensor(key))
            w.flush("model-rest.safetensors")
            # the maxima given and no row sample or rotated range needed: the float-equivalence check's batch (the
            # first) is all that runs through the layers
            few = given is not None and res is None and rot_h is None
            ls.capture(batches[: o.batch_size] if few else batches, o.batch_size)
            times["capture_s"] = round(time.perf_counter() - t0, 2)
            for i in progress.bar(range(ls.num_layers), desc="quantize (streamed)", unit="layer"):
                layer = ls.load(i)
                # float outputs: the next layer's inputs (given the maxima, only the row sample is taken)
                outs = calibrate_layer(ls, i, layer, stats if given is None else None, res)
                names = layer_linears(fam, i)
                act.update(finish_act_max({n: stats.pop(n) for n in names}) if given is None else {n: given[n] for n in names})
                groups = _layer_groups(fam, i, pairs) if recipe.mode == "sq" else []
                f_i = {}
                if recipe.mode == "sq":
                    if alpha == "auto":
                        a = {g.source: searched[g.source] for g in groups} if searched is not None else \
                            search_alpha_groups(ls.model, groups, act, lambda n: rows_for(res, fam, n),
                                                per_channel=recipe.per_channel)
                        alpha_groups.update(a)
                    else:
                        a = alpha
                    args, kw = ls.layer_args(i, 0)
                    ref = layer_output_f32(layer, args, kw)
                    f_i = apply_smoothing_groups(ls.model, groups, act, a, fam.norm_form)
                    new = layer_output_f32(layer, args, kw)
                    d = check_layer_unchanged(ref, new, layer_input(args, kw), ls.dtype, f"decoder layer {i}")
                    worst = d if worst is None else max(worst, d)
                    factors.update(f_i)
                sm = _smoothed({n: act[n] for n in names}, groups, f_i)
                if clip is None:
                    scales.update(static_scales(sm, names))
                else:
                    divs = divisors(fam, factors, pairs)
                    sc, ratio = clipped_scales(fam, sm, res, divs, clip, names)
                    scales.update(sc)
                    clip_ratio.update(ratio)
                rot_i = [n for n in names if n in rot_targets]
                if rot_i:  # the rotated inputs' ranges, on the smoothed layer: they replace those Linears' scales
                    rmax = rotated_layer_maxima(ls, i, layer, rot_i, rot_h)
                    scales.update({n: hadamard.rotated_scale(rmax[n]) for n in rot_i})
                if fb is not None and fb[0] == "n":
                    divs = divisors(fam, factors, pairs)
                    for n in names:
                        lin = ls.model.get_submodule(n)
                        ql = QLinear(lin, recipe.act, scales.get(n), recipe.per_channel)
                        if n in rot_targets:
                            hadamard.rotate_qlinear(ql, rot_h, recipe.per_channel)
                        sens[n] = linear_sqnr(lin, ql, rows_for(res, fam, n), divs.get(n))
                for name, key in _checkpoint_keys(ls, ls.layer_name(i)):
                    w.add(key, ls.model.get_parameter(name) if _is_param(ls.model, name) else ls.model.get_buffer(name))
                w.flush(f"model-layer-{i:05d}.safetensors")
                ls.free(i)
                ls.advance(outs)
                if res is not None:  # this layer's rows are spent
                    for n in names:
                        res.data.pop(keys_of[n], None)
                        res.prio.pop(keys_of[n], None)
            w.close()
            times["layers_s"] = round(time.perf_counter() - t0, 2)
            all_names = fam.quantized_linears()
            if fb is None:
                fp16 = []
            elif fb[0] == "names":
                fp16 = list(fb[1])
            else:  # ('n', N): the N lowest local SQNR, as fallback.select_fallback
                fp16 = least_sqnr(all_names, sens, fb[1])
            quantized = [n for n in all_names if n not in set(fp16)]
            a_out = alpha if recipe.mode == "sq" else None
            src = str(source_model if source_model is not None else folder)
            _write_config(ls.folder, tmp, ls.dtype, fam, recipe, a_out, alpha_groups or None, pairs)
            meta = {"samples": o.samples, "calib_seq_len": o.seq_len, "tokens_fingerprint": text_fingerprint(batches)}
            save_act_scales(tmp / "act_scales.safetensors", act, {"model_type": ls.model.config.model_type, **meta})
            if factors:
                save_file({k: v.contiguous() for k, v in sorted(factors.items())}, str(tmp / "smoothing_factors.safetensors"))
            record = {"format": FORMAT, "source_model": src, "recipe": _recipe_json(recipe), "alpha": a_out,
                      "alpha_per_group": alpha_groups or None, "quantized": quantized, "fp16_layers": fp16,
                      "act_scales": {n: scales[n] for n in all_names}, "calibration": o.label(), "calibration_meta": meta,
                      "max_layer_change": worst, "dtype": str(ls.dtype).removeprefix("torch."),
                      "tune": {"clip_ratio": clip_ratio} if clip_ratio else {}}
            if rot_h is not None:  # the quantized ones (a fallback Linear stays float, unrotated)
                kept = set(quantized)
                record["rotated"] = [n for n in rot_names if n in kept]
            (tmp / QUANT_FILE).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    finally:
        ls.close()
    times["total_s"] = round(time.perf_counter() - t0, 2)
    return StreamedQuantization(Path(out), recipe, a_out, alpha_groups or None, quantized, fp16, scales, factors, act,
                                worst, times, {"clip_ratio": clip_ratio} if clip_ratio else {})


def _given_act_max(calibration, model, fam, o, batches: np.ndarray) -> dict:
    """The maxima of a Calibration given to quantize_streamed, checked to be this model's on these windows."""
    from sq_export.quant.calibrate import text_fingerprint, validate_act_scales

    meta = calibration.meta or {}
    want = {"samples": o.samples, "calib_seq_len": o.seq_len, "tokens_fingerprint": text_fingerprint(batches)}
    got = {k: meta.get(k) for k in want}
    if got != want:
        raise BadInput(f"the calibration given was taken on other windows ({got['samples']}x{got['calib_seq_len']}, "
                       f"tokens {got['tokens_fingerprint']}) than the recipe's ({o.label()}, tokens "
                       f"{want['tokens_fingerprint']}): calibrate with the same text, --samples and --calib-seq-len, "
                       "or give none")
    validate_act_scales(calibration.act_max, model, fam, "the calibration given")
    return calibration.act_max


def _is_param(model, name: str) -> bool:
    mod_name, _, attr = name.rpartition(".")
    return attr in model.get_submodule(mod_name)._parameters


def _write_config(src: Path, dest: Path, dtype, fam, recipe, alpha, alpha_groups, pairs) -> None:
    """config.json (with the model's type and what was done) and every other file of the source folder that is not
    a weight file (tokenizer, generation config)."""
    cfg = json.loads((src / "config.json").read_text())
    cfg["dtype"] = str(dtype).removeprefix("torch.")
    cfg.pop("torch_dtype", None)
    cfg["sq_export"] = {"smoothed": recipe.mode == "sq", "alpha": alpha, "family": fam.name, "streamed": True,
                        **({"smooth_pairs": True} if pairs else {}), **({"alpha_per_group": alpha_groups} if alpha_groups else {})}
    (dest / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    for p in src.iterdir():
        if p.is_file() and p.name != "config.json" and not p.name.endswith(".safetensors") and \
                p.name != "model.safetensors.index.json" and not p.name.endswith((".bin", ".pt", ".gguf")):
            shutil.copy2(p, dest / p.name)
