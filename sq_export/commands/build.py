"""sq-export build MODEL.onnx -o model.engine: a TensorRT engine (and model.engine.json) from an exported graph.

Torch-free: runs under a bare TensorRT Python (e.g. the lent GPU's $TRTPY). TensorRT is imported in `run`.
"""

from __future__ import annotations

import json
import sys

HELP = "build a TensorRT engine (INT8 Q/DQ or FP16) from an exported ONNX graph"

EXAMPLES = """examples:
  sq-export build out/sq.onnx -o out/sq.engine                         # INT8 (explicit Q/DQ), batch 1:1:4, seq 1:128:512
  sq-export build out/fp16.onnx -o out/fp16.engine --precision fp16 --seq 1:256:1024
  sq-export build out/sq.onnx -o out/sq.engine --timing-cache out/tc.bin --tactic-sources CUBLAS CUBLAS_LT
  sq-export build out/dec.onnx -o out/dec.engine --seq 1:1:64 --past 1:64:256   # decode graph (export --decode)
TensorRT 8.x: INT8+FP16 builder flags, weights must be float -> Q -> DQ (export with --weights qdq), int64 inputs
become int32. TensorRT 10+: strongly typed network (the graph's dtypes decide; FP16 engines need an FP16 graph)."""


def add_parser(sub):
    import argparse

    p = sub.add_parser(
        "build",
        help=HELP,
        description=HELP + ".",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("onnx", metavar="MODEL.onnx", help="graph from `sq-export export` (inputs input_ids, attention_mask), or a segment manifest from `sq-export split`")
    p.add_argument("-o", "--output", required=True, metavar="ENGINE", help="engine file to write (plus ENGINE.json); for a segment manifest, the engine manifest (*.segments.json) beside which the segment engines go")
    p.add_argument("--precision", choices=["int8", "fp16"], default="int8", help="int8: Q/DQ graph (default); fp16: float graph")
    p.add_argument("--batch", default="1:1:4", metavar="MIN:OPT:MAX", help="batch range of the profile (default 1:1:4)")
    p.add_argument("--seq", default="1:128:512", metavar="MIN:OPT:MAX", help="sequence-length range (default 1:128:512)")
    p.add_argument("--past", default=None, metavar="MIN:OPT:MAX", help="decode graphs (export --decode): past-length range of the KV cache (default 1:128:512; min >= 1, generate starts from one masked slot)")
    p.add_argument("--kv-fp16", action="store_true", help="decode graphs, TensorRT 8.x: KV cache in and out as FP16 (half the cache traffic; default FP32 like the graph)")
    p.add_argument("--timing-cache", metavar="FILE", help="tactic timing cache to read and update (speeds up rebuilds)")
    p.add_argument(
        "--tactic-sources",
        nargs="*",
        default=None,
        metavar="NAME",
        help="TensorRT tactic sources to enable, e.g. CUBLAS CUBLAS_LT CUDNN (default: none, i.e. TensorRT's own kernels;"
        " the lent GPU's kit has no real cuBLAS/cuDNN)",
    )
    p.add_argument("--fp16-norms", action="store_true", help="let TensorRT 8.x run norm math in FP16 (default: pinned to FP32; FP16 overflows on real residual streams)")
    p.add_argument("--no-fp16-matmuls", action="store_true", help="TensorRT 8.x: do not pin the un-quantized MatMuls to FP16 (INT8 engines: attention, LM head; FP16 engines: all of them); next to the FP32 norms 8.6 then runs them in FP32")
    p.add_argument("--fp32-nodes", metavar="REGEX", help="TensorRT 8.x: also pin the layers of ONNX nodes whose name matches REGEX to FP32 (Q/DQ and INT8 GEMMs excluded), e.g. 'layers\\.\\d+/Add(_1)?$' for the residual adds")
    f16 = p.add_mutually_exclusive_group()
    f16.add_argument("--no-fp16", action="store_true", help="TensorRT 8.x, --precision int8: no FP16 flag, layers outside Q/DQ run in FP32 (slower; tells FP16 range problems from INT8 ones)")
    f16.add_argument("--fp16", action="store_true", help="TensorRT 8.x, --precision int8: the FP16 flag even where the graph asks for none (Gemma-3 graphs: their family's default, for accuracy)")
    p.add_argument("--no-prescale-norms", action="store_true", help="TensorRT 8.x with FP16: build the norms as exported (default: each decomposed norm divides by its token's max |x| before squaring, exact, so its statistics cannot overflow FP16 whichever precision TensorRT picks; without it SmoothQuant INT8 engines of SmolLM2 are garbage)")
    p.add_argument("--opt-level", type=int, default=None, metavar="0-5", help="TensorRT builder optimization level (lower builds faster; default TensorRT's, 3)")
    p.add_argument("--workspace", type=float, default=None, metavar="GIB", help="builder workspace limit in GiB")
    p.add_argument("--jobs", type=int, default=1, metavar="J", help="segment manifests (`sq-export split`): build J segments at once, each in its own process (default 1; host memory is the limit)")
    p.add_argument("--gpus", metavar="LIST", help="segment manifests: spread the builds running at once over these CUDA devices, e.g. 0,1 (default: the visible ones as CUDA picks)")
    p.add_argument("--json", action="store_true", help="print the sidecar as JSON on the last line")
    p.set_defaults(func=run)
    return p


# the options every segment's build gets, as `sq-export build` arguments (flag, attribute, kind)
_FORWARD = [("--precision", "precision", "value"), ("--batch", "batch", "value"), ("--seq", "seq", "value"),
            ("--past", "past", "value"), ("--kv-fp16", "kv_fp16", "flag"), ("--timing-cache", "timing_cache", "value"),
            ("--fp16-norms", "fp16_norms", "flag"), ("--no-fp16-matmuls", "no_fp16_matmuls", "flag"),
            ("--fp32-nodes", "fp32_nodes", "value"), ("--no-fp16", "no_fp16", "flag"), ("--fp16", "fp16", "flag"),
            ("--no-prescale-norms", "no_prescale_norms", "flag"), ("--opt-level", "opt_level", "value"),
            ("--workspace", "workspace", "value")]


def forwarded(args) -> list:
    out = []
    for flag, attr, kind in _FORWARD:
        v = getattr(args, attr)
        if kind == "flag" and v:
            out.append(flag)
        elif kind == "value" and v is not None:
            out += [flag, str(v)]
    if args.tactic_sources is not None:
        out += ["--tactic-sources", *args.tactic_sources]
    return out


def run(args) -> int:
    from sq_export.engine.build import build_engine, parse_range
    from sq_export.onnxio.segments import is_manifest

    import contextlib

    if is_manifest(args.onnx):
        from sq_export.engine.chain import build_segments

        with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
            man = build_segments(args.onnx, args.output, jobs=args.jobs, build_args=forwarded(args),
                                 gpus=args.gpus.split(",") if args.gpus else None)
        if args.json:
            sys.stdout.write(json.dumps(man, sort_keys=True) + "\n")
            return 0
        print(f"wrote {man['path']}: {len(man['segments'])} engines, {man['engine_bytes'] / 2**20:.1f} MiB in "
              f"{man['wall_seconds']:.0f} s ({args.jobs} at a time)")
        for e in man["segments"]:
            print(f"  {e['file']}: layers {e['layers'][0]}-{e['layers'][1]}, {e['engine_bytes'] / 2**20:.1f} MiB, "
                  f"built in {e['build_seconds']} s")
        return 0
    batch = parse_range(args.batch, "batch")
    seq = parse_range(args.seq, "seq")
    past = parse_range(args.past, "past") if args.past else None
    # With --json, stdout carries only the JSON line: Polygraphy/TensorRT log lines go to stderr.
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        side = build_engine(
            args.onnx,
            args.output,
            precision=args.precision,
            batch=batch,
            seq=seq,
            timing_cache=args.timing_cache,
            tactic_sources=args.tactic_sources,
            workspace_gb=args.workspace,
            opt_level=args.opt_level,
            fp32_norms=not args.fp16_norms,
            past=past,
            kv_fp16=args.kv_fp16,
            fp16=True if args.fp16 else False if args.no_fp16 else None,
            fp16_float_matmuls=not args.no_fp16_matmuls,
            fp32_nodes=args.fp32_nodes,
            prescale_norms=not args.no_prescale_norms,
        )
    if args.json:
        sys.stdout.write(json.dumps(side, sort_keys=True) + "\n")
        return 0
    lp = side["layer_precisions"]
    counts = ", ".join(f"{k}: {v}" for k, v in lp.get("precision_counts", {}).items()) or lp.get("reason", "-")
    print(
        f"wrote {side['engine']} ({side['engine_bytes'] / 2**20:.1f} MiB) in {side['build_seconds']:.1f}s: "
        f"TensorRT {side['tensorrt_version']} on {side['gpu'] or 'GPU'}, {side['precision']}, "
        f"{'strongly typed' if side['plan']['strongly_typed'] else 'flags ' + '+'.join(k for k in ('int8', 'fp16') if side['plan'][k + '_flag'])}"
    )
    prof = side["profile"]
    past_txt = f", past {':'.join(map(str, prof['past']))}" if "past" in prof else ""
    print(f"  profile batch {':'.join(map(str, prof['batch']))}, seq {':'.join(map(str, prof['seq']))}{past_txt}")
    print(f"  layers: {counts}")
    for note in side["plan"]["notes"]:
        print(f"  note: {note}")
    print(f"  sidecar: {side['engine']}.json")
    return 0
