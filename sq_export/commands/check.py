"""sq-export check MODEL.onnx [--fix OUT.onnx] [--json] [--target tensorrt|ort]

Exit codes: 0 clean, 1 violations (after --fix: of the fixed graph), 2 unreadable input / nothing to check.
"""

from __future__ import annotations

import argparse
import json


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "check",
        help="is smoothing folded? are Q/DQ where TensorRT needs them?",
        description="Check an exported SmoothQuant ONNX graph: smoothing factors folded into norms/weights "
        "(SQ rules) and TensorRT Q/DQ placement (QDQ rules). Exit 0 clean, 1 violations, 2 bad input.",
    )
    p.add_argument("model", metavar="MODEL.onnx", help="the exported ONNX graph")
    p.add_argument("--fix", metavar="OUT.onnx", default=None,
                   help="fold norm -> Mul/Div smoothing into the norm weights, write OUT.onnx and check it")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object on the last line")
    p.add_argument("--target", choices=["tensorrt", "trt", "ort"], default="tensorrt",
                   help="tensorrt (also spelled trt): int8 zero-points (TensorRT); ort: also accept uint8/128 activations (ONNX Runtime)")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from sq_export import api

    report = api.check(args.model, target=args.target, fix=args.fix)
    if args.json:
        print(json.dumps(report.to_json()))
    else:
        print(report.format_text())
    return 0 if report.ok else 1
