"""Build the KV-cache decode fixtures in graphs/ that the TensorRT decode tests use (the kit's Python has no torch).

    python tools/make_decode_fixtures.py       # writes graphs/decode_llama_{fp,sq}.onnx and graphs/decode_llama.npz

A tiny Llama (tests/conftest.py config: 2 layers, hidden 64, 4 heads over 2 KV heads, vocab 256) with outlier
channels, exported by our own exporter as a decode graph in float and as SmoothQuant W8A8 (`--weights qdq`, the form
TensorRT 8.6 takes). Its lm_head is scaled ×30 so greedy choices are not near-ties that FP16 rounding could flip.
The .npz holds `prompts` [4, 8], `reference` [4, 8] (PyTorch float greedy tokens), `ort_fp` and `ort_sq` (ONNX
Runtime greedy tokens of each graph). tests/test_decode.py checks that ONNX Runtime still reproduces them.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

PROMPTS, PROMPT_TOKENS, NEW_TOKENS = 4, 8, 8


def tiny_llama():
    from conftest import make_tiny

    model, fam = make_tiny("llama", outliers=True, seed=3)
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    return model, fam


def build(out_dir: Path) -> dict:
    from conftest import token_batches

    from sq_export.quant.calibrate import calibrate
    from sq_export.export.decode import export_decode_onnx
    from sq_export.measure.generate import greedy_onnx, greedy_torch
    from sq_export.measure.perplexity import ort_session
    from sq_export.quant.qlinear import quantize_model, static_scales
    from sq_export.quant.smooth import apply_smoothing, smoothed_act_max

    out_dir.mkdir(parents=True, exist_ok=True)
    model, fam = tiny_llama()
    prompts = token_batches(n=PROMPTS, seq=PROMPT_TOKENS, seed=11).astype(np.int64)
    ref = np.concatenate([greedy_torch(model, p[None], NEW_TOKENS) for p in prompts])
    fp = out_dir / "decode_llama_fp.onnx"
    export_decode_onnx(model, fam, fp, meta={"mode": "fp", "fixture": "tools/make_decode_fixtures.py"})
    am = calibrate(model, fam, token_batches(n=8, seq=32, seed=0))
    am = smoothed_act_max(am, fam, apply_smoothing(model, fam, am, fam.default_alpha))
    names = fam.quantized_linears()
    quantize_model(model, names, "static", static_scales(am, names))
    sq = out_dir / "decode_llama_sq.onnx"
    export_decode_onnx(model, fam, sq, weights="qdq", meta={"mode": "sq", "fixture": "tools/make_decode_fixtures.py"})
    data = {
        "prompts": prompts,
        "reference": ref.astype(np.int64),
        "ort_fp": np.concatenate([greedy_onnx(ort_session(fp), p[None], NEW_TOKENS) for p in prompts]).astype(np.int64),
        "ort_sq": np.concatenate([greedy_onnx(ort_session(sq), p[None], NEW_TOKENS) for p in prompts]).astype(np.int64),
    }
    buf = io.BytesIO()
    np.savez(buf, **data)
    (out_dir / "decode_llama.npz").write_bytes(buf.getvalue())
    return data


if __name__ == "__main__":
    torch.set_num_threads(2)
    d = build(ROOT / "graphs")
    agree = lambda a, b: float((a == b).mean())  # noqa: E731
    print(f"wrote graphs/decode_llama_fp.onnx, decode_llama_sq.onnx, decode_llama.npz; ORT fp = PyTorch: {agree(d['ort_fp'], d['reference']):.2f}, ORT sq = PyTorch fp: {agree(d['ort_sq'], d['reference']):.2f}")
