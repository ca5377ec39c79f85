#!/usr/bin/env python3
"""Ranges inside the INT8 GEMMs of a Q/DQ graph, on real tokens (ONNX Runtime, CPU; torch-free): for every quantized
MatMul, max |int32 accumulator| = max |q_x · q_w|, and max |output|, compared with FP16's largest finite value
(65,504). An engine that keeps an accumulator or a rescaled output in FP16 breaks where these exceed it.

    python tools/int8_ranges.py SQ.onnx --tokens T.npz [--chunks 2] [--top 15] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

FP16_MAX = 65504.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("onnx")
    ap.add_argument("--tokens", required=True, help="token file from `sq-export tokens`")
    ap.add_argument("--chunks", type=int, default=2)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    import onnx
    import onnxruntime as ort

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from sq_export.engine.run import load_tokens

    from sq_export.onnxio.index import GraphIndex

    m = onnx.load(a.onnx)
    g = m.graph
    ix = GraphIndex(g)
    producer, arr = ix.producer, ix.array
    linears = []  # (matmul name, activation Q output, weight int8 array [K, N], act scale, weight scales, output name)
    for n, *dqs in ix.quantized_matmuls():
        if n.op_type != "MatMul":  # (Gemm: transB layouts not handled here)
            continue
        qa = producer[dqs[0].input[0]]
        s_x = float(arr(dqs[0].input[1]))
        wsrc = producer.get(dqs[1].input[0])
        s_w = arr(dqs[1].input[1]).astype(np.float64)
        if wsrc is not None and wsrc.op_type == "QuantizeLinear":
            w = arr(wsrc.input[0]).astype(np.float64)
            qw = np.clip(np.round(w / s_w), -128, 127)
        else:
            qw = arr(dqs[1].input[0]).astype(np.float64)
        linears.append((n.name, qa.output[0], qw, s_x, s_w, n.output[0]))
    have = {o.name for o in g.output}
    for _, qout, _, _, _, out in linears:
        for t in (qout, out):
            if t not in have:
                g.output.append(onnx.helper.make_empty_tensor_value_info(t))
                have.add(t)
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    tok = load_tokens(a.tokens)
    stats = {name: {"acc": 0.0, "out": 0.0, "in_q127": 0.0} for name, *_ in linears}
    names = [o.name for o in sess.get_outputs()]
    for c in range(min(a.chunks, tok.n_chunks)):
        ids = tok.input_ids[c: c + 1].astype(np.int64)
        res = dict(zip(names, sess.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})))
        for name, qout, qw, s_x, s_w, out in linears:
            qx = res[qout].astype(np.float64).reshape(-1, qw.shape[0])
            acc = qx @ qw
            st = stats[name]
            st["acc"] = max(st["acc"], float(np.abs(acc).max()))
            st["out"] = max(st["out"], float(np.abs(res[out]).max()))
            st["in_q127"] = max(st["in_q127"], float((np.abs(qx) >= 127).mean()))
    rows = sorted(((n, s) for n, s in stats.items()), key=lambda x: -x[1]["acc"])
    print(f"{len(rows)} quantized MatMuls; FP16 max {FP16_MAX:.0f}")
    print(f"{'MatMul':<58} {'max|acc|':>12} {'max|out|':>10} {'sat. inputs':>11}")
    for n, s in rows[: a.top]:
        print(f"{n[:58]:<58} {s['acc']:12.0f} {s['out']:10.1f} {100 * s['in_q127']:10.3f}%")
    over = [n for n, s in rows if s["acc"] > FP16_MAX]
    by_layer = {}
    for n in over:
        mm = re.search(r"layers\.(\d+)", n)
        by_layer.setdefault(int(mm.group(1)) if mm else -1, []).append(n.split("/")[-2])
    print(f"accumulators beyond FP16: {len(over)} of {len(rows)}; by layer: "
          + ", ".join(f"{k}:{'+'.join(v)}" for k, v in sorted(by_layer.items())))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"fp16_max": FP16_MAX, "linears": stats, "over_fp16": over}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
