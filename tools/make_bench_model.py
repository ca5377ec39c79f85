"""Export an OPT-6.7B-shaped (hidden 4096, FFN 16384, 32 heads) or Llama-2-7B-shaped (`--family llama`: hidden 4096,
FFN 11008, 32 heads, no biases, SwiGLU, RMSNorm, vocabulary 32000) decoder with random weights through our own
exporter, as the FP32 graph (FP16 engine under TensorRT 8.6) and the SmoothQuant W8A8 Q/DQ graph, for
tools/bench_trt.py.

    python tools/make_bench_model.py --layers 4 --vocab 8192 -o bench/     # writes bench/fp.onnx, bench/sq.onnx
    python tools/make_bench_model.py --family llama --layers 8 -o bench/   # Llama-2-7B shape, vocabulary 32000
        [--decode]               # also bench/fp_dec.onnx, bench/sq_dec.onnx: KV-cache decode graphs (export --decode)
        [--quantize-attention]   # also bench/sq_attn.onnx: Q/DQ on both attention MatMuls too

Random weights are fine for speed (the paper's Figure/Table speed setup uses OPT shapes). The vocabulary is kept
small by default so the un-quantized LM head (FP16 in both engines) does not dilute the decoder comparison; pass
--vocab 50272 for OPT's. Calibration uses random token ids (speed only; accuracy is measured on SmolLM2).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=["opt", "llama"], default="opt", help="opt: OPT-6.7B shape; llama: Llama-2-7B shape")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--ffn", type=int, default=None, help="default: 16384 (opt), 11008 (llama)")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=None, help="default: 8192 (opt), 32000 (llama, as Llama-2)")
    ap.add_argument("--weights", default="qdq", choices=["qdq", "int8"])
    ap.add_argument("--decode", action="store_true", help="also export KV-cache decode graphs fp_dec.onnx / sq_dec.onnx")
    ap.add_argument("--quantize-attention", action="store_true", help="also export sq_attn.onnx (INT8 attention MatMuls)")
    ap.add_argument("--only", default=None, help="comma list of graphs to write (fp,sq,sq_attn,fp_dec,sq_dec); default: all requested")
    ap.add_argument("-o", "--output", required=True)
    a = ap.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, OPTConfig

    from sq_export.quant.calibrate import calibrate
    from sq_export.export.decode import export_decode_onnx
    from sq_export.export.exporter import export_onnx
    from sq_export.families import family_for
    from sq_export.quant.qlinear import quantize_model, static_scales
    from sq_export.quant.smooth import apply_smoothing, smoothed_act_max

    out = Path(a.output)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    if a.family == "llama":
        a.ffn, a.vocab = a.ffn or 11008, a.vocab or 32000
        cfg = LlamaConfig(hidden_size=a.hidden, intermediate_size=a.ffn, num_attention_heads=a.heads, num_key_value_heads=a.heads,
                          num_hidden_layers=a.layers, vocab_size=a.vocab, max_position_embeddings=4096, rms_norm_eps=1e-5,
                          tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    else:
        a.ffn, a.vocab = a.ffn or 16384, a.vocab or 8192
        cfg = OPTConfig(hidden_size=a.hidden, ffn_dim=a.ffn, num_attention_heads=a.heads, num_hidden_layers=a.layers, vocab_size=a.vocab,
                        word_embed_proj_dim=a.hidden, max_position_embeddings=2048, pad_token_id=1, bos_token_id=2, eos_token_id=2)
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    fam = family_for(model)
    print(f"model {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params in {time.perf_counter() - t:.0f}s", flush=True)
    want = set(a.only.split(",")) if a.only else {"fp", "sq"} | ({"fp_dec", "sq_dec"} if a.decode else set()) | ({"sq_attn"} if a.quantize_attention else set())
    meta = {"bench": "llama-2-7b-shape" if a.family == "llama" else "opt-6.7b-shape"}

    def write(name, fn, **kw):
        if name not in want:
            return
        t = time.perf_counter()
        fn(model, fam, out / f"{name}.onnx", meta={**meta, "mode": "fp" if name.startswith("fp") else "sq"}, **kw)
        print(f"{name}.onnx in {time.perf_counter() - t:.0f}s", flush=True)

    write("fp", export_onnx)
    write("fp_dec", export_decode_onnx)
    ids = torch.randint(3, a.vocab, (4, 128), generator=torch.Generator().manual_seed(0)).numpy()
    am = calibrate(model, fam, ids, batch_size=2)
    am = smoothed_act_max(am, fam, apply_smoothing(model, fam, am, fam.default_alpha))
    names = fam.quantized_linears()
    quantize_model(model, names, "static", static_scales(am, names))
    write("sq", export_onnx, weights=a.weights)
    write("sq_dec", export_decode_onnx, weights=a.weights)
    if "sq_attn" in want:
        from sq_export.quant.attention import quantize_attention

        quantize_attention(model, fam, ids, batch_size=2)
        meta["quantize_attention"] = "static"
        write("sq_attn", export_onnx, weights=a.weights)

if __name__ == "__main__":
    main()
