"""sq-export split MODEL.onnx --segments N: cut an exported graph into segments of consecutive decoder layers.

Torch-free. The segments point into MODEL.onnx's weight bytes (no copy) and are listed in MODEL.segments.json,
which `build`, `compare`, `eval` and `generate` take wherever they take a graph (sq_export.onnxio.segments).
"""

from __future__ import annotations

import json

HELP = "cut an exported graph into segments of consecutive layers (one small engine each: bounded builder memory)"

EXAMPLES = """examples:
  sq-export split out/sq.onnx --segments 8                    # -> out/sq.segments.json + out/sq.seg00..07.onnx
  sq-export build out/sq.segments.json -o out/sq.segments.json --jobs 3   # one engine per segment, 3 builds at once
  sq-export compare out/fp.onnx out/sq.segments.json --tokens out/tokens.npz
Why: TensorRT 8.6's builder holds ~10x a Q/DQ graph's weight bytes in host memory (a 4-layer Llama-2-7B-wide graph:
34 GB); a 7B graph built whole does not fit a 128 GB host, its 4-layer segments do."""


def add_parser(sub):
    import argparse

    p = sub.add_parser("split", help=HELP, description=HELP + ".", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("onnx", metavar="MODEL.onnx", help="a graph from `sq-export export` (logits or --decode graph)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--segments", type=int, metavar="N", help="cut into N segments of near-equal layer counts")
    g.add_argument("--layers-per-segment", type=int, metavar="K", help="cut every K layers")
    p.add_argument("-o", "--output", metavar="MANIFEST", help="manifest to write beside the graph (default MODEL.segments.json)")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON on the last line")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from sq_export.onnxio.segments import split

    man = split(args.onnx, segments=args.segments, layers_per_segment=args.layers_per_segment, out=args.output)
    if args.json:
        print(json.dumps(man, sort_keys=True))
        return 0
    print(f"wrote {man['path']}: {len(man['segments'])} segments of {man['layers']} layers")
    for e in man["segments"]:
        cross = [v for v in e["inputs"] if v not in man["inputs"]]
        print(f"  {e['file']}: layers {e['layers'][0]}-{e['layers'][1]}, {e['nodes']} nodes, "
              f"{e['weight_bytes'] / 2**20:.1f} MiB of weights, takes {len(cross)} value(s) from earlier segments")
    return 0
