"""ONNX Runtime prefill speed: INT8 Q/DQ graph vs FP32 graph, side by side in one run.

    python tools/bench_ort.py out/fp.onnx out/sq_ort.onnx --batch 4 --seq 256 --threads 2 --runs 10

Both graphs get the same random token batch; each is warmed up, then timed `--runs` times alternately (so load
changes on the machine hit both); prints median seconds per forward and the FP32/INT8 ratio. Use an INT8 graph
exported with `--target ort` (uint8 activations, which ONNX Runtime fuses into MatMulIntegerToFloat); the
`--target tensorrt` form (int8 activations) runs too, mostly unfused. `--optimized-dir` saves ORT's optimized
graphs and counts their fused integer ops.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import time

import numpy as np


def session(path, threads, optimized=None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if optimized:
        so.optimized_model_filepath = optimized
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("fp32")
    ap.add_argument("int8")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--optimized-dir")
    ap.add_argument("--json")
    a = ap.parse_args()
    import onnx

    vocab = None
    for o in onnx.load(a.fp32, load_external_data=False).graph.output:
        d = o.type.tensor_type.shape.dim
        vocab = d[-1].dim_value or None
    ids = np.random.default_rng(0).integers(3, vocab or 1000, (a.batch, a.seq)).astype(np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    sess = {}
    fused = {}
    for name, path in (("fp32", a.fp32), ("int8", a.int8)):
        opt = f"{a.optimized_dir}/{name}.optimized.onnx" if a.optimized_dir else None
        sess[name] = session(path, a.threads, opt)
        if opt:
            ops = collections.Counter(n.op_type for n in onnx.load(opt, load_external_data=False).graph.node)
            fused[name] = {k: v for k, v in ops.items() if "Integer" in k or k.startswith("QLinear") or k in ("MatMul", "DequantizeLinear", "QuantizeLinear", "DynamicQuantizeLinear")}
    for s in sess.values():
        for _ in range(a.warmup):
            s.run(["logits"], feed)
    times = {k: [] for k in sess}
    for _ in range(a.runs):
        for k, s in sess.items():
            t = time.perf_counter()
            s.run(["logits"], feed)
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    res = {"batch": a.batch, "seq": a.seq, "threads": a.threads, "runs": a.runs, "median_s": med, "fp32_over_int8": med["fp32"] / med["int8"], "fused_ops": fused}
    print(f"prefill {a.batch}x{a.seq}, {a.threads} threads: FP32 {med['fp32'] * 1e3:.1f} ms, INT8 {med['int8'] * 1e3:.1f} ms, speed-up {res['fp32_over_int8']:.2f}x")
    if fused:
        print("optimized graph ops:", json.dumps(fused))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
