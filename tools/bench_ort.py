"""ONNX Runtime prefill speed: INT8 Q/DQ graph vs FP32 graph, side by side in one run.

    python tools/bench_ort.py out/fp.onnx out/sq_ort.onnx [out/sq_ort_head.onnx ...] --batch 4 --seq 256 --threads 2 --runs 10

All graphs get the same random token batch; each is warmed up, then timed `--runs` times in turn (so load
changes on the machine hit all of them); prints median seconds per forward and the FP32/INT8 ratio of each INT8
graph, with the machine's load averages (os.getloadavg) before and after, since the cores may be shared. Use an INT8 graph
exported with `--target ort` (uint8 activations, which ONNX Runtime fuses into MatMulIntegerToFloat); the
`--target tensorrt` form (int8 activations) runs too, mostly unfused. `--optimized-dir` saves ORT's optimized
graphs and counts their fused integer ops. `--profile DIR` runs each graph once more with ONNX Runtime's profiler
(after the timed runs, so it does not disturb them) and prints the time per op type of that run, largest first;
MatMul-like ops whose output's last dimension is the vocabulary are counted as "lm_head (<op>)".
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


def profile_ops(path, threads, feed, prof_dir, name, vocab):
    """{op type: ms} of one profiled forward (ORT's kernel events, summed by op type)."""
    import os

    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.enable_profiling = True
    so.profile_file_prefix = os.path.join(prof_dir, name)
    s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    s.run(["logits"], feed)  # warm-up, also profiled: only the last run's events are summed below
    s.run(["logits"], feed)
    with open(s.end_profiling()) as f:
        events = json.load(f)
    runs = [e for e in events if e.get("name") == "model_run"]
    start = runs[-1]["ts"] if runs else 0
    by_op = collections.Counter()
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time") or e["ts"] < start:
            continue
        args = e.get("args", {})
        op = args.get("op_name", "?")
        shape = (args.get("output_type_shape") or [{}])[0]
        dims = next(iter(shape.values()), []) if isinstance(shape, dict) else []
        if vocab and dims and dims[-1] == vocab and ("MatMul" in op or op == "Gemm"):
            op = f"lm_head ({op})"
        by_op[op] += e["dur"] / 1e3
    return dict(by_op.most_common())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("fp32")
    ap.add_argument("int8", nargs="+", help="one or more INT8 graphs, each compared with the FP32 graph")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--optimized-dir")
    ap.add_argument("--profile", metavar="DIR", help="also profile one forward per graph with ORT's profiler; JSON files go to DIR")
    ap.add_argument("--json")
    a = ap.parse_args()
    import onnx

    vocab = None
    for o in onnx.load(a.fp32, load_external_data=False).graph.output:
        d = o.type.tensor_type.shape.dim
        vocab = d[-1].dim_value or None
    ids = np.random.default_rng(0).integers(3, vocab or 1000, (a.batch, a.seq)).astype(np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    import os

    graphs = [("fp32", a.fp32)] + [("int8" if i == 0 else f"int8_{i + 1}", p) for i, p in enumerate(a.int8)]
    load_before = os.getloadavg()
    sess = {}
    fused = {}
    for name, path in graphs:
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
    load_after = os.getloadavg()
    res = {"batch": a.batch, "seq": a.seq, "threads": a.threads, "runs": a.runs, "graphs": dict(graphs), "median_s": med,
           "fp32_over_int8": med["fp32"] / med["int8"], "fused_ops": fused,
           "ratios": {k: med["fp32"] / v for k, v in med.items() if k != "fp32"},
           "loadavg_before": load_before, "loadavg_after": load_after}
    for k, path in graphs[1:]:
        print(f"prefill {a.batch}x{a.seq}, {a.threads} threads: FP32 {med['fp32'] * 1e3:.1f} ms, {k} ({path}) "
              f"{med[k] * 1e3:.1f} ms, speed-up {med['fp32'] / med[k]:.2f}x")
    print("load average (1/5/15 min) before: %.2f %.2f %.2f, after: %.2f %.2f %.2f" % (*load_before, *load_after))
    if fused:
        print("optimized graph ops:", json.dumps(fused))
    if a.profile:
        os.makedirs(a.profile, exist_ok=True)
        res["profile_ms"] = {}
        del sess  # one session in memory at a time while profiling
        for name, path in graphs:
            ops = profile_ops(path, a.threads, feed, a.profile, name, vocab)
            res["profile_ms"][name] = ops
            total = sum(ops.values())
            print(f"profile {name}: {total:.0f} ms in kernels; " + ", ".join(f"{k} {v:.0f} ({100 * v / total:.0f}%)" for k, v in list(ops.items())[:8]))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
