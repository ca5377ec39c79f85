"""Export a Hugging Face causal LM as a SmoothQuant W8A8 ONNX graph for TensorRT, and check it.

    python examples/export_int8.py smollm2 out/          # any HF folder or .gguf works in place of smollm2
"""

import sys
from pathlib import Path

import sq_export as sq

model_path, out = sys.argv[1], Path(sys.argv[2])
samples = int(sys.argv[3]) if len(sys.argv) > 3 else 64
out.mkdir(parents=True, exist_ok=True)

model, tok = sq.load_model(model_path)                        # or a model + tokenizer the script already has
calib = sq.calibrate(model, tok, samples=samples, seq_len=512)  # the shipped real-text split; any text works
ppl_fp = sq.perplexity(model, tok, max_tokens=2048)["perplexity"]

qm = sq.quantize(model, calib, sq.Recipe())                  # the accurate recipe (in place, like mtq.quantize)
print("recipe:", qm.recipe.describe(), "| kept in float:", qm.fp16_layers)
ppl_q = sq.perplexity(qm, tok, max_tokens=2048)["perplexity"]
print(f"perplexity: float {ppl_fp:.3f}, W8A8 {ppl_q:.3f} ({(ppl_q / ppl_fp - 1) * 100:+.2f} %)")

graph = sq.export_onnx(qm, out / "model.onnx", weights="qdq")  # TensorRT 8.6 form; weights="int8" for 10+
sq.check(graph.path).raise_for_violations()                    # smoothing folded, Q/DQ where TensorRT needs them
print(f"wrote {graph.path} ({graph.bytes / 1e6:.1f} MB), graph check clean")

try:                                                            # TensorRT and a GPU, where present
    from sq_export.engine import build_engine                # torch-free

    build_engine(graph.path, out / "model.engine", precision="int8")
    print("built", out / "model.engine")
except sq.errors.BackendMissing as e:
    print("no engine here:", e)
