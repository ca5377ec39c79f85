"""Export an OPT-6.7B-shaped decoder (hidden 4096, FFN 16384, 32 heads; random weights) with our own exporter,
as the FP32 graph (FP16 engine under TensorRT 8.6) and the SmoothQuant W8A8 Q/DQ graph, for tools/bench_trt.py.

    python tools/make_bench_model.py --layers 4 --vocab 8192 -o bench/     # writes bench/fp.onnx, bench/sq.onnx

Random weights are fine for speed (the paper's Figure/Table speed setup uses OPT shapes). The vocabulary is kept
small by default so the un-quantized LM head (FP16 in both engines) does not dilute the decoder comparison; pass
--vocab 50272 for OPT's. Calibration uses random token ids (speed only; accuracy is measured on SmolLM2).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--ffn", type=int, default=16384)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--weights", default="qdq", choices=["qdq", "int8"])
    ap.add_argument("-o", "--output", required=True)
    a = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, OPTConfig

    from sq_export.calibrate import calibrate
    from sq_export.export import export_onnx
    from sq_export.families import family_for
    from sq_export.quantize import quantize_model, static_scales
    from sq_export.smooth import apply_smoothing, smoothed_act_max

    out = Path(a.output)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    cfg = OPTConfig(hidden_size=a.hidden, ffn_dim=a.ffn, num_attention_heads=a.heads, num_hidden_layers=a.layers, vocab_size=a.vocab,
                    word_embed_proj_dim=a.hidden, max_position_embeddings=2048, pad_token_id=1, bos_token_id=2, eos_token_id=2)
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    fam = family_for(model)
    print(f"model {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params in {time.perf_counter() - t:.0f}s", flush=True)
    t = time.perf_counter()
    export_onnx(model, fam, out / "fp.onnx", meta={"mode": "fp", "bench": "opt-6.7b-shape"})
    print(f"fp.onnx in {time.perf_counter() - t:.0f}s", flush=True)
    ids = torch.randint(3, a.vocab, (4, 128), generator=torch.Generator().manual_seed(0)).numpy()
    am = calibrate(model, fam, ids, batch_size=2)
    am = smoothed_act_max(am, fam, apply_smoothing(model, fam, am, fam.default_alpha))
    names = fam.quantized_linears()
    quantize_model(model, names, "static", static_scales(am, names))
    t = time.perf_counter()
    export_onnx(model, fam, out / "sq.onnx", weights=a.weights, meta={"mode": "sq", "bench": "opt-6.7b-shape"})
    print(f"sq.onnx in {time.perf_counter() - t:.0f}s", flush=True)


if __name__ == "__main__":
    main()
