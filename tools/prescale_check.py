#!/usr/bin/env python3
"""ONNX Runtime logits of a graph as exported and with `sq-export build`'s norm rewrite (engine/norm_prescale.py),
on the same tokens: how many norms were rewritten, max |Δ logits|, argmax agreement. CPU, torch-free.

    python tools/prescale_check.py GRAPH.onnx --tokens T.npz [--chunks 1]

The rewrite is exact in real arithmetic; on a float graph the difference is float32 rounding. A W8A8 graph can
amplify that rounding (a value moved across an INT8 rounding step changes the next layer's input), which is what
the argmax agreement shows.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("onnx")
    ap.add_argument("--tokens", required=True, help="token file from `sq-export tokens`")
    ap.add_argument("--chunks", type=int, default=1)
    a = ap.parse_args(argv)
    import onnx
    import onnxruntime as ort

    from sq_export.engine.norm_prescale import prescale_norms

    t = np.load(a.tokens)
    m = onnx.load(a.onnx)
    n = len(prescale_norms(m))
    ref = ort.InferenceSession(a.onnx, providers=["CPUExecutionProvider"])
    new = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    del m
    names = {i.name for i in ref.get_inputs()}
    diff, agree, count = 0.0, 0, 0
    for c in range(a.chunks):
        feed = {k: t[k][c : c + 1].astype(np.int64) for k in ("input_ids", "attention_mask") if k in names}
        x, y = ref.run(["logits"], feed)[0], new.run(["logits"], feed)[0]
        diff = max(diff, float(np.abs(x - y).max()))
        agree += int((x.argmax(-1) == y.argmax(-1)).sum())
        count += x.shape[0] * x.shape[1]
    print(f"{a.onnx}: {n} norms prescaled; max |Δ logits| {diff:.3g}; argmax agreement {agree / count:.1%} "
          f"({count} positions)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
