"""Stage 4, export: torch.onnx (TorchScript exporter, opset 17) of the fake-quantized model.

QLinear's fake-quant ops export as QuantizeLinear → DequantizeLinear with int8 zero-points: activations
per-tensor (scalar scale), weights per output channel on axis 1 of the [K, N] MatMul weight; a tensor feeding
several QLinears (the norm output feeding q/k/v) gets one shared Q/DQ pair after the dedup pass. LayerNorm
exports as one LayerNormalization op (opset 17). Post-export graph passes (sq_export.passes) turn float
W → Q → DQ into INT8 initializers → DQ (`--weights int8`, TensorRT 10+) and, for `--target ort`, rewrite
activation Q/DQ to uint8/128 (same grid) for ONNX Runtime's integer kernels.

Files are written atomically; the same inputs give a byte-identical file (no timestamps; names and constants
come from module names and deterministic calibration).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import warnings
from pathlib import Path

import torch

from sq_export.errors import BadInput
from sq_export.fileio import check_output_path
from sq_export.onnx_meta import read_metadata  # noqa: F401 (re-exported: callers import it from here)

log = logging.getLogger(__name__)

OPSET = 17
TWO_GB = 2**31 - 1


class LogitsOnly(torch.nn.Module):
    """input_ids, attention_mask (int64 [batch, seq]) → logits; no KV cache."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def _example_inputs(batch=2, seq=16, vocab=100):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, max(2, vocab), (batch, seq), generator=g)
    return ids, torch.ones_like(ids)


def torch_export(model, family, path: Path, opset: int = OPSET) -> None:
    wrapper = LogitsOnly(model).eval()
    ids, mask = _example_inputs(vocab=model.config.vocab_size)
    with contextlib.ExitStack() as stack:
        for patch in family.export_patches:
            stack.enter_context(patch(model))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapper,
                (ids, mask),
                str(path),
                dynamo=False,
                opset_version=opset,
                input_names=["input_ids", "attention_mask"],
                output_names=["logits"],
                dynamic_axes={
                    "input_ids": {0: "batch", 1: "sequence"},
                    "attention_mask": {0: "batch", 1: "sequence"},
                    "logits": {0: "batch", 1: "sequence"},
                },
                do_constant_folding=True,
            )


def save_model(model_proto, path: str | Path) -> None:
    """Atomic save; graphs over 2 GB go to `path` + `.data` external data beside it."""
    import onnx

    final = check_output_path(path)
    big = model_proto.ByteSize() > TWO_GB if _byte_size_ok(model_proto) else True
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        tmp = tmpdir / final.name
        if big:
            onnx.save_model(model_proto, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True, location=final.name + ".data", size_threshold=1024)
            os.replace(tmpdir / (final.name + ".data"), final.parent / (final.name + ".data"))
        else:
            onnx.save_model(model_proto, str(tmp))
        os.replace(tmp, final)
    finally:
        import shutil

        shutil.rmtree(tmpdir, ignore_errors=True)


def _byte_size_ok(model_proto) -> bool:
    try:
        model_proto.ByteSize()
        return True
    except Exception:
        return False


def _drop_unused_initializers(model_proto) -> None:
    """Initializers left behind by the passes (e.g. zero-points of folded weight Q nodes) are removed."""
    used = {i for n in model_proto.graph.node for i in n.input} | {o.name for o in model_proto.graph.output}
    keep = [t for t in model_proto.graph.initializer if t.name in used]
    if len(keep) != len(model_proto.graph.initializer):
        del model_proto.graph.initializer[:]
        model_proto.graph.initializer.extend(keep)


def set_metadata(model_proto, meta: dict) -> None:
    del model_proto.metadata_props[:]
    for k in sorted(meta):
        p = model_proto.metadata_props.add()
        p.key = f"sq_export.{k}"
        p.value = "" if meta[k] is None else str(meta[k])


def export_onnx(model, family, path, *, weights: str = "int8", target: str = "tensorrt", meta: dict | None = None, exporter=None) -> dict:
    """Export `model` (already prepared: QLinears in place for naive/sq) to `path`. Returns a summary.

    `exporter(model, family, raw_path) -> dict | None` writes the raw torch.onnx graph (default: `torch_export`,
    logits only; sq_export.decode passes its KV-cache graph); its dict joins the metadata and the summary.
    """
    import onnx

    from sq_export import passes

    if weights not in ("int8", "qdq"):
        raise BadInput(f"--weights {weights} unknown: int8 (TensorRT 10+) or qdq (TensorRT 8.6)")
    if target not in ("tensorrt", "ort"):
        raise BadInput(f"--target {target} unknown: tensorrt or ort")
    final = check_output_path(path)
    with tempfile.TemporaryDirectory(prefix=".sq_export.", dir=final.parent) as td:
        raw = Path(td) / "raw.onnx"
        extra = (exporter or torch_export)(model, family, raw) or {}
        mp = onnx.load(str(raw))
    # TorchScript's CSE already gives a tensor feeding several QLinears (q/k/v) one shared Q/DQ pair.
    mp = passes.tidy_qdq_constants(mp)
    if weights == "int8":
        mp = passes.weights_to_int8(mp)
    if target == "ort":
        mp = passes.activations_to_uint8(mp)
    _drop_unused_initializers(mp)
    mp.producer_name = "sq_export"
    mp.doc_string = ""
    mp.graph.doc_string = ""
    set_metadata(mp, {**(meta or {}), "weights": weights, "target": target, **extra})
    save_model(mp, final)
    size = final.stat().st_size + (os.path.getsize(str(final) + ".data") if os.path.exists(str(final) + ".data") else 0)
    return {"onnx": str(final), "bytes": size, "nodes": len(mp.graph.node), **extra}
