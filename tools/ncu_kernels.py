#!/usr/bin/env python3
"""Where the GPU time of a TensorRT engine goes, per kernel class, from Nsight Compute (TensorRT 8.6's Myelin hides
per-layer timing; kernel names do not lie). Run on the device (ncu is in the CUDA image; torch-free):

    ncu --metrics gpu__time_duration.sum --csv polygraphy run E.engine --model-type engine --trt \
        --iterations 2 --warm-up 0 > E.ncu.csv
    python tools/ncu_kernels.py E.ncu.csv [F.ncu.csv ...]

Prints per file: total kernel time of the last inference and the share of each class (INT8 GEMM, FP16 GEMM,
quantize/dequantize, norms, reformat/copy, softmax/attention, pointwise, other), plus the 12 longest kernels.
"""

from __future__ import annotations

import csv
import re
import sys
from collections import defaultdict

CLASSES = [  # first match wins; Myelin kernels (__myl_*) are named after the ops they fuse (Mea=Mean, Sqr=Sqrt,
    # Rou=Round, Cas=Cast, Sli=Slice, Neg, Mov=copy), so they are told apart by those
    ("int8 gemm", r"i8i8|imma|int8.*gemm|gemm.*int8|_i8_|s8s8|gemm_i8"),
    ("fp16 gemm", r"gemm|hmma|xmma|matmul|cutlass"),
    ("reformat/copy", r"reformat|copy|transpose|shuffle|naiveslice"),
    ("softmax/attn", r"softmax|mha|fmha|attention"),
    ("norm", r"norm|mea\w*sqr"),
    ("q/dq", r"quant|qdq|rou"),
    ("rope/slice", r"__myl_\w*(sli|neg)"),
    ("cast", r"__myl_\w*_cas(mov)?$"),
    ("pointwise", r"pointwise|pwn|elementwise|myl.*(add|mul|relu|gelu|silu|sig)"),
]


def classify(name: str) -> str:
    n = name.lower()
    for cls, rx in CLASSES:
        if re.search(rx, n):
            return cls
    return "other"


def read(path):
    rows = []
    with open(path, newline="") as f:
        lines = [ln for ln in f if ln.startswith('"')]  # ncu prints its own log lines before the CSV
    for r in csv.DictReader(lines):
        if r.get("Metric Name") != "gpu__time_duration.sum":
            continue
        unit = r.get("Metric Unit", "nsecond")
        v = float(str(r["Metric Value"]).replace(",", ""))
        ns = v * {"nsecond": 1, "usecond": 1e3, "msecond": 1e6, "second": 1e9}.get(unit, 1)
        rows.append((r.get("Kernel Name", "?"), ns, int(r.get("ID", len(rows)))))
    return rows


def main(paths):
    for p in paths:
        rows = read(p)
        if not rows:
            print(f"{p}: no kernels")
            continue
        # the last inference: kernels after the last long gap in launch IDs is hard to find; take the second half
        # when --iterations 2 (same kernels twice)
        half = rows[len(rows) // 2:] if len(rows) % 2 == 0 and [r[0] for r in rows[: len(rows) // 2]] == [r[0] for r in rows[len(rows) // 2:]] else rows
        total = sum(r[1] for r in half)
        by = defaultdict(float)
        for name, ns, _ in half:
            by[classify(name)] += ns
        print(f"== {p}: {len(half)} kernels, {total / 1e6:.3f} ms")
        for cls, ns in sorted(by.items(), key=lambda x: -x[1]):
            print(f"   {cls:>14} {ns / 1e6:8.3f} ms  {100 * ns / total:5.1f} %")
        agg = defaultdict(lambda: [0.0, 0])
        for name, ns, _ in half:
            agg[name][0] += ns
            agg[name][1] += 1
        for name, (ns, k) in sorted(agg.items(), key=lambda x: -x[1][0])[:12]:
            print(f"   {ns / 1e6:8.3f} ms  x{k:<3} {name[:150]}")


if __name__ == "__main__":
    main(sys.argv[1:])
