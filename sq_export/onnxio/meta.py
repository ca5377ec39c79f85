"""sq-export's metadata in an ONNX file (``sq_export.*`` metadata_props), read without torch."""

from __future__ import annotations

from sq_export.errors import BadInput


def read_metadata(path) -> dict:
    import onnx

    try:
        m = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise BadInput(f"{path} is not a readable ONNX file ({type(e).__name__}); export it again") from e
    return {p.key.removeprefix("sq_export."): p.value for p in m.metadata_props if p.key.startswith("sq_export.")}


def onnx_metadata(source_model: str, family, mode: str, prep, calibration: str, *,
                  linear_pairs: bool = False, clip: str | None = None) -> dict:
    """The sq_export.* metadata an exported graph carries (`export` and `run` write it; `eval`, `generate` and
    `compare` read source_model, mode, alpha and fp16_layers back). `prep` is None for a float graph."""
    import json

    meta = {
        "source_model": source_model,
        "family": family.name,
        "mode": mode,
        "act": "static" if mode != "fp" else None,
        "alpha": prep.alpha if prep else None,
        "quantized_layers_total": len(prep.quantized) if prep else 0,
        "fp16_layers": ",".join(prep.fp16_layers) if prep else "",
        "calibration": calibration,
    }
    if linear_pairs:
        meta["smooth_pairs"] = "1"
    if clip not in (None, "max"):
        meta["clip"] = clip
    if prep and prep.alpha_per_group:
        meta["alpha_per_group"] = json.dumps(prep.alpha_per_group, sort_keys=True)
    return meta
