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
