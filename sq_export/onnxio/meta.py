"""sq-export's metadata in an ONNX file (``sq_export.*`` metadata_props): one schema, written and read here, torch-free."""

from __future__ import annotations

from sq_export.errors import BadInput


def read_metadata(path) -> dict:
    """{key: value} of the graph's sq_export.* metadata (the weights are not read)."""
    from sq_export.onnxio.read import load_graph_only

    try:
        m = load_graph_only(path)
    except Exception as e:
        raise BadInput(f"{path} is not a readable ONNX file ({type(e).__name__}); export it again") from e
    return {p.key.removeprefix("sq_export."): p.value for p in m.metadata_props if p.key.startswith("sq_export.")}


def graph_metadata(source_model: str, prep, calibration: str, family=None) -> dict:
    """The sq_export.* metadata an exported graph carries, from what `prepare` did (`prep`: a Prepared; a float
    model's Prepared has mode fp; `family`: when `prep` no longer holds it). `eval`, `generate`, `compare` and the engine side read source_model, mode, alpha
    and fp16_layers back."""
    import json

    r = prep.recipe
    quantized = r.mode != "fp"
    meta = {
        "source_model": source_model,
        "family": (family or prep.family).name,
        "mode": r.mode,
        "act": "static" if quantized else None,
        "alpha": prep.alpha,
        "quantized_layers_total": len(prep.quantized),
        "fp16_layers": ",".join(prep.fp16_layers),
        "calibration": calibration,
    }
    if quantized and not getattr(family or prep.family, "int8_engine_fp16", True):  # read by engine/trt_compat.plan_build
        meta["int8_fp16"] = "0"
    if r.mode == "sq" and r.linear_pairs:
        meta["smooth_pairs"] = "1"
    if quantized and r.clip not in (None, "max"):
        meta["clip"] = r.clip
    if prep.alpha_per_group:
        meta["alpha_per_group"] = json.dumps(prep.alpha_per_group, sort_keys=True)
    meta.update({k: v for k, v in prep.graph_meta.items() if k in ("quantize_attention", "quantize_lm_head", "lm_head_alpha", "rotate_down", "rotated_linears")})
    pre = getattr(prep, "prefix", None)
    if pre is not None:  # the outlier prefix the graph runs after (sq_export.quant.prefix; check: passes/prefix_kv.py)
        meta["prefix_outliers"] = ",".join(str(t) for t in pre.tokens)
        meta["prefix_length"] = str(len(pre))
    return meta


def write_metadata(model_proto, meta: dict) -> None:
    """Replace the model's metadata_props with `meta` as sq_export.<key> (keys sorted: same metadata, same bytes)."""
    del model_proto.metadata_props[:]
    for k in sorted(meta):
        p = model_proto.metadata_props.add()
        p.key = f"sq_export.{k}"
        p.value = "" if meta[k] is None else str(meta[k])
