#!/usr/bin/env python3
"""Take selected quantized Linears of a Q/DQ graph back to float, by graph surgery (diagnosis: which Linears make a
TensorRT INT8 engine diverge from its ONNX graph). Torch-free (runs under the TensorRT kit's $TRTPY).

    python tools/qdq_bypass.py IN.onnx OUT.onnx --match REGEX [--match REGEX ...] [--invert]

A quantized Linear is a MatMul/Gemm whose two inputs are DequantizeLinear outputs. Those whose node name matches
any REGEX (re.search; e.g. 'layers\\.(1[5-9]|2[0-9])/' or 'mlp/(gate|up)_proj') get their float input and their
float weight back (activation Q/DQ skipped; weight: the float initializer under `--weights qdq`, or the INT8
initializer dequantized); Q/DQ nodes nobody reads any more are removed. With --invert, the Linears that do NOT match
are taken back to float. Prints how many Linears it changed; exits 2 when none matched.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def bypass(model, patterns: list[str], invert: bool = False) -> list[str]:
    from onnx import numpy_helper

    from sq_export.onnxio.index import GraphIndex

    g = model.graph
    ix = GraphIndex(g)
    producer, const_array = ix.producer, ix.array
    rx = [re.compile(p) for p in patterns]
    changed = []
    for n, dq_a, dq_w in list(ix.quantized_matmuls()):
        if any(r.search(n.name) for r in rx) == invert:
            continue
        for k, dq in enumerate((dq_a, dq_w)):
            q = producer.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear":  # activation, or float weight -> Q -> DQ
                n.input[k] = q.input[0]
            else:  # INT8 initializer -> DQ: store the dequantized float weight
                w = const_array(dq.input[0]).astype(np.float32)
                s = const_array(dq.input[1]).astype(np.float32)
                axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
                shape = [1] * w.ndim
                shape[axis] = -1
                zp = const_array(dq.input[2]).astype(np.float32).reshape(shape) if len(dq.input) > 2 and dq.input[2] else 0.0
                t = numpy_helper.from_array(((w - zp) * s.reshape(shape) if s.ndim else (w - zp) * s).astype(np.float32), dq.input[0] + "_float")
                g.initializer.append(t)
                n.input[k] = t.name
        changed.append(n.name)
    # drop what nobody reads any more (Q/DQ pairs, their Constant scales), keeping graph outputs
    keep_out = {o.name for o in g.output}
    while True:
        used = {i for m in g.node for i in m.input} | keep_out
        dead = [m for m in g.node if m.op_type in ("QuantizeLinear", "DequantizeLinear", "Constant") and not any(o in used for o in m.output)]
        if not dead:
            break
        for m in dead:
            g.node.remove(m)
    used = {i for m in g.node for i in m.input}
    for t in [t for t in g.initializer if t.name not in used]:
        g.initializer.remove(t)
    return changed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input")
    ap.add_argument("output")
    ap.add_argument("--match", action="append", required=True, help="regex over MatMul node names (repeatable)")
    ap.add_argument("--invert", action="store_true", help="take the NON-matching Linears back to float")
    a = ap.parse_args(argv)
    import onnx

    m = onnx.load(a.input)
    changed = bypass(m, a.match, a.invert)
    if not changed:
        print(f"qdq_bypass: no quantized Linear of {a.input} matched {a.match}", file=sys.stderr)
        return 2
    onnx.save(m, a.output)
    print(f"{a.output}: {len(changed)} Linears back to float (e.g. {changed[0]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
