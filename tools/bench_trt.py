#!/usr/bin/env python3
"""FP16 vs INT8 (explicit Q/DQ) TensorRT engines of the same model: GPU time per forward and engine size.

    source /opt/trt86/env.sh
    PYTHONPATH=. $TRTPY tools/bench_trt.py FP16_READY.onnx INT8_QDQ.onnx [MORE_INT8.onnx ...] [--shape 4x256]
                                          [--large 8x512] [--runs 50] [--warmup 10] [--workdir DIR] [--json FILE]
    PYTHONPATH=. $TRTPY tools/bench_trt.py --decode FP_DECODE.onnx SQ_DECODE.onnx [--past 512] [--batches 1,8]
                                          [--kv-fp16]

Prefill (default): every INT8 graph after the first (e.g. one exported with --quantize-attention) is built and
timed too and reported against the same FP16 engine.
Decode (--decode, graphs from `export --decode`): one engine per precision and batch with a static profile
(batch b, 1 new token, --past cached tokens), timing one decode step; tokens/s = b / step time.

Builds both engines with sq_export.engine.build.build_engine (one profile: batch 1..max, seq 1..max, optimized
for --shape), then for each engine and each shape (--shape and --large): token inputs are copied to the GPU
once, one TrtRunner.infer(copy_outputs_to_host=False) binds them, and every timed run is one
execute_async_v3 between two CUDA events on the runner's stream (GPU time only, no copies). Reports the median
(and p10/p90) over --runs after --warmup, Polygraphy's host-inclusive last_inference_time() median for
reference, the INT8/FP16 speed ratio and the engine size ratio. Torch-free; Python 3.10+.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sq_export.engine.build import build_engine  # noqa: E402
from sq_export.engine.run import input_dtypes, load_engine, load_tokens, polygraphy_logging  # noqa: E402
from sq_export.engine.trt_compat import graph_facts, import_tensorrt, require_gpu  # noqa: E402
from sq_export.fileio import write_text_atomic  # noqa: E402


def parse_shape(s: str) -> tuple[int, int]:
    b, _, t = s.lower().partition("x")
    return int(b), int(t)


def vocab_hint(onnx_path) -> int | None:
    """Rows of the embedding table (a 2-D initializer gathered by input_ids), so random ids stay in range."""
    import onnx

    m = onnx.load(str(onnx_path), load_external_data=False)
    inits = {t.name: t for t in m.graph.initializer}
    for n in m.graph.node:
        if n.op_type == "Gather" and len(n.input) > 1 and n.input[1] == "input_ids" and n.input[0] in inits:
            dims = list(inits[n.input[0]].dims)
            if len(dims) == 2:
                return int(dims[0])
    return None


class CudaEvents:
    """CUDA events through the CUDA runtime Polygraphy loads (polygraphy.cuda.wrapper().handle)."""

    def __init__(self):
        from polygraphy import cuda

        self.lib = cuda.wrapper().handle

    def _check(self, rc, what):
        if rc != 0:
            raise RuntimeError(f"{what} failed with CUDA error {rc}")

    def create(self):
        ev = ctypes.c_void_p()
        self._check(self.lib.cudaEventCreate(ctypes.byref(ev)), "cudaEventCreate")
        return ev

    def record(self, ev, stream_ptr):
        self._check(self.lib.cudaEventRecord(ev, ctypes.c_void_p(stream_ptr)), "cudaEventRecord")

    def elapsed_ms(self, start, end):
        self._check(self.lib.cudaEventSynchronize(end), "cudaEventSynchronize")
        ms = ctypes.c_float()
        self._check(self.lib.cudaEventElapsedTime(ctypes.byref(ms), start, end), "cudaEventElapsedTime")
        return float(ms.value)

    def destroy(self, ev):
        self.lib.cudaEventDestroy(ev)

    def capture(self, stream_ptr, enqueue):
        """One enqueue captured as a CUDA graph (TensorRT's documented pattern: enqueue once after a shape change,
        then capture the next enqueue): returns (graph, executable graph) for launch()/release()."""
        s = ctypes.c_void_p(stream_ptr)
        self._check(self.lib.cudaStreamBeginCapture(s, ctypes.c_int(0)), "cudaStreamBeginCapture")  # global mode
        ok = enqueue()
        graph = ctypes.c_void_p()
        self._check(self.lib.cudaStreamEndCapture(s, ctypes.byref(graph)), "cudaStreamEndCapture")
        if not ok:
            raise RuntimeError("execute_async_v3 failed during CUDA graph capture")
        exe = ctypes.c_void_p()
        # cudaGraphInstantiateWithFlags has one signature in CUDA 11.4+ and 12 (cudaGraphInstantiate's changed)
        self._check(self.lib.cudaGraphInstantiateWithFlags(ctypes.byref(exe), graph, ctypes.c_ulonglong(0)), "cudaGraphInstantiateWithFlags")
        return graph, exe

    def launch(self, exe, stream_ptr):
        self._check(self.lib.cudaGraphLaunch(exe, ctypes.c_void_p(stream_ptr)), "cudaGraphLaunch")

    def release(self, graph, exe):
        self.lib.cudaGraphExecDestroy(exe)
        self.lib.cudaGraphDestroy(graph)


# HBM bandwidth per GPU name (TB/s, the vendor's figure): the decode bound is the bytes one step must read / this
BANDWIDTH_TBS = {"H200": 4.8, "H100 SXM": 3.35, "H100 PCIe": 2.0, "H100": 3.35, "A100-SXM4-80GB": 2.04, "A100": 1.555, "L40S": 0.864}


def bandwidth_tbs(gpu_name: str | None, override: float | None) -> float | None:
    if override:
        return override
    for k, v in BANDWIDTH_TBS.items():
        if gpu_name and k in gpu_name:
            return v
    return None


def weight_bytes(onnx_path, precision: str) -> dict:
    """Bytes of weights one forward must read in an engine of `precision` built from this graph: every initializer
    of two or more dimensions except a table only gathered from (the embedding: one row per token is read);
    INT8 (1 byte) where it feeds Q/DQ in an INT8 engine, else 2 bytes (FP16). Norm vectors and scales are ignored."""
    import onnx

    m = onnx.load(str(onnx_path), load_external_data=False)
    g = m.graph
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    # follow Cast (qdq16: FP16 -> Cast -> Q) to what the weight really feeds
    def ops(name, depth=0):
        out = []
        for n in consumers.get(name, []):
            if n.op_type == "Cast" and depth < 2:
                out += ops(n.output[0], depth + 1)
            else:
                out.append(n.op_type)
        return out

    int8 = fp16 = gathered = 0
    for t in g.initializer:
        if len(t.dims) < 2:
            continue
        n = 1
        for d in t.dims:
            n *= int(d)
        used = ops(t.name)
        if used and all(o == "Gather" for o in used):
            gathered += n
        elif precision == "int8" and any(o in ("QuantizeLinear", "DequantizeLinear") for o in used):
            int8 += n
        else:
            fp16 += n
    return {"int8_weight_bytes": int8, "fp16_weight_bytes": 2 * fp16, "bytes": int8 + 2 * fp16, "gathered_table_elements": gathered}


def make_tokens(shape, vocab, tokens_file=None, seed=0):
    b, t = shape
    if tokens_file:
        tok = load_tokens(tokens_file)
        reps = int(np.ceil(b / tok.n_chunks))
        ids = np.tile(tok.input_ids, (reps, int(np.ceil(t / tok.seq_len))))[:b, :t]
    else:
        ids = np.random.default_rng(seed).integers(0, vocab or 100, size=(b, t), dtype=np.int64)
    return {"input_ids": ids, "attention_mask": np.ones((b, t), np.int64)}


def decode_feed(shape, vocab, past_len, cache_shapes: dict, seed=0):
    """Inputs of one decode step: b sequences, 1 new token each, past_len cached tokens (random cache values).
    cache_shapes: {past input name: (kv_heads, head_dim)}."""
    b, _ = shape
    rng = np.random.default_rng(seed)
    feed = {
        "input_ids": rng.integers(0, vocab or 100, size=(b, 1), dtype=np.int64),
        "attention_mask": np.ones((b, past_len + 1), np.int64),
        "position_ids": np.full((b, 1), past_len, np.int64),
    }
    for name, (kvh, hd) in cache_shapes.items():
        feed[name] = rng.standard_normal((b, kvh, past_len, hd), dtype=np.float32)
    return feed


def time_engine(engine_path, shapes, runs, warmup, vocab, tokens_file=None, past_len=None, cuda_graph=False) -> list[dict]:
    from polygraphy import cuda
    from polygraphy.backend.trt import TrtRunner

    from sq_export.engine.run import profile_limits

    ev = CudaEvents()
    rows = []
    with polygraphy_logging("ERROR"), TrtRunner(load_engine(engine_path)) as runner:
        dtypes = input_dtypes(runner)
        lim = profile_limits(runner) or {}
        for shape in shapes:
            if past_len is None:
                host = make_tokens(shape, vocab, tokens_file)
            else:
                cache = {n: (lim[n][2][1], lim[n][2][3]) for n in dtypes if n.startswith("past_key_values.")}
                host = decode_feed(shape, vocab, past_len, cache)
            dev = {}
            for name, dt in dtypes.items():
                arr = np.ascontiguousarray(host[name], dtype=dt)
                d = cuda.DeviceArray(shape=arr.shape, dtype=arr.dtype)
                d.copy_from(arr)
                dev[name] = d
            host_times = []
            for _ in range(max(1, warmup)):
                runner.infer(dev, copy_outputs_to_host=False)
            for _ in range(min(runs, 20)):
                runner.infer(dev, copy_outputs_to_host=False)
                host_times.append(runner.last_inference_time() * 1e3)
            start, end = ev.create(), ev.create()
            gpu = []
            for _ in range(runs):
                ev.record(start, runner.stream.ptr)
                if not runner.context.execute_async_v3(runner.stream.ptr):
                    raise RuntimeError("execute_async_v3 failed")
                ev.record(end, runner.stream.ptr)
                gpu.append(ev.elapsed_ms(start, end))
            graph_ms = graph_err = None
            if cuda_graph:
                # the same step replayed as one CUDA graph: what launch gaps between the engine's kernels cost
                try:
                    stream = runner.stream.ptr
                    graph, exe = ev.capture(stream, lambda: runner.context.execute_async_v3(stream))
                    for _ in range(max(1, warmup)):
                        ev.launch(exe, stream)
                    gt = []
                    for _ in range(runs):
                        ev.record(start, stream)
                        ev.launch(exe, stream)
                        ev.record(end, stream)
                        gt.append(ev.elapsed_ms(start, end))
                    ev.release(graph, exe)
                    graph_ms = statistics.median(gt)
                except RuntimeError as e:  # reported, not fatal: the plain timing stands
                    graph_err = str(e)
            ev.destroy(start), ev.destroy(end)
            for d in dev.values():
                d.free()
            gpu.sort()
            med = statistics.median(gpu)
            new_tokens = shape[0] * (1 if past_len is not None else shape[1])
            rows.append(
                {
                    "shape": list(shape),
                    **({"past": past_len} if past_len is not None else {}),
                    "tokens": new_tokens,
                    "gpu_ms_median": med,
                    "gpu_ms_p10": gpu[len(gpu) // 10],
                    "gpu_ms_p90": gpu[(9 * len(gpu)) // 10],
                    "host_inclusive_ms_median": statistics.median(host_times),
                    "tokens_per_s": new_tokens / (med / 1e3),
                    "runs": runs,
                    **({"cuda_graph_ms_median": graph_ms} if graph_ms is not None else {}),
                    **({"cuda_graph_error": graph_err} if graph_err else {}),
                }
            )
    return rows


def _build_or_reuse(onnx_path, eng: Path, prec: str, reuse: bool, **kw) -> dict:
    if reuse and eng.exists() and Path(str(eng) + ".json").exists():
        return json.loads(Path(str(eng) + ".json").read_text())
    facts = graph_facts(onnx_path)
    print(f"building {eng.name} from {onnx_path} ({facts.float_dtype}, Q/DQ: {facts.has_qdq}) ...", flush=True)
    side = build_engine(onnx_path, eng, precision=prec, **kw)
    print(f"  {side['build_seconds']:.1f}s, {side['engine_bytes'] / 2**20:.1f} MiB", flush=True)
    return side


def _entry(onnx_path, eng, side, rows, t0) -> dict:
    return {
        "onnx": str(onnx_path),
        "engine": str(eng),
        "engine_bytes": side["engine_bytes"],
        "build_seconds": side.get("build_seconds"),
        "layer_precision_counts": side.get("layer_precisions", {}).get("precision_counts"),
        "timings": rows,
        "timing_seconds": round(time.perf_counter() - t0, 1),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("fp16_onnx", help="float graph for the FP16 engine (TensorRT 10+: an FP16 graph)")
    ap.add_argument("int8_onnx", nargs="+", help="SmoothQuant Q/DQ graph(s) for INT8 engines (TensorRT 8.x: --weights qdq form)")
    ap.add_argument("--shape", default="4x256", help="BATCHxSEQ the profile is optimized for and timed (default 4x256)")
    ap.add_argument("--large", default="8x512", help="a larger BATCHxSEQ also timed; sets the profile max (default 8x512)")
    ap.add_argument("--decode", action="store_true", help="decode graphs: time one KV-cache decode step per batch size")
    ap.add_argument("--past", type=int, default=512, help="--decode: cached tokens (default 512)")
    ap.add_argument("--batches", default="1,8,32", help="--decode: batch sizes (default 1,8,32)")
    ap.add_argument("--kv-fp16", action="store_true", help="--decode: KV cache in/out as FP16 (TensorRT 8.x)")
    ap.add_argument("--opt-level", type=int, default=None, help="builder optimization level (default TensorRT's)")
    ap.add_argument("--static", action="store_true", help="prefill: a static profile of exactly --shape (only --shape timed)")
    ap.add_argument("--no-fp32-norms", action="store_true", help="do not pin norm layers to FP32 (diagnosis: what pinning costs)")
    ap.add_argument("--int8-gemm-output", choices=["fp16", "fp32"], default=None, help="experimental: output type of the INT8 GEMMs (default TensorRT's choice)")
    ap.add_argument("--no-fp16-matmuls", action="store_true", help="do not pin un-quantized MatMuls of INT8 engines to FP16 (diagnosis)")
    ap.add_argument("--cuda-graph", action="store_true", help="also time each forward replayed as one captured CUDA graph")
    ap.add_argument("--bandwidth", type=float, default=None, help="HBM TB/s for the decode bound (default: by GPU name, e.g. H200 4.8)")
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--tokens", help="token file to take ids from (default: random ids below the vocabulary size)")
    ap.add_argument("--workdir", default=os.environ.get("OUT", "."), help="where engines go (default $OUT or .)")
    ap.add_argument("--json", default=None, help="JSON report path (default WORKDIR/bench_trt.json)")
    ap.add_argument("--reuse", action="store_true", help="reuse engines already in WORKDIR")
    ap.add_argument("--build-only", action="store_true", help="build the engines and stop (then time them with --reuse,"
                    " so builds can run in parallel while timings do not share the GPU)")
    ap.add_argument("--labels", default=None, help="with --build-only: build only these engines (comma list of fp16, int8, int8:STEM)")
    a = ap.parse_args(argv)

    trt = import_tensorrt()
    gpu = require_gpu()
    bw = bandwidth_tbs(gpu.get("name"), a.bandwidth)
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    vocab = vocab_hint(a.int8_onnx[0]) or vocab_hint(a.fp16_onnx)
    graphs = [("fp16", "fp16", a.fp16_onnx)] + [
        ("int8" if i == 0 else f"int8:{Path(p).stem}", "int8", p) for i, p in enumerate(a.int8_onnx)
    ]
    if a.labels:
        if not a.build_only:
            ap.error("--labels needs --build-only")
        want = set(a.labels.split(","))
        # the first INT8 graph is labelled "int8"; "int8:STEM" names it too
        graphs = [g for i, g in enumerate(graphs) if g[0] in want or (i == 1 and f"int8:{Path(g[2]).stem}" in want)]
        if not graphs:
            ap.error(f"--labels {a.labels}: no engine has that label (fp16, int8, int8:STEM of a further INT8 graph)")
    report = {"tensorrt_version": trt.__version__, "gpu": gpu.get("name"), "hbm_tbs": bw, "mode": "decode" if a.decode else "prefill",
              "fp32_norms": not a.no_fp32_norms, "fp16_float_matmuls": not a.no_fp16_matmuls, "engines": {}}

    if a.decode:
        batches = [int(x) for x in a.batches.split(",") if x.strip()]
        report["profile"] = {"per_engine": "static: batch b, seq 1, past --past", "past": a.past, "batches": batches, "kv_fp16": a.kv_fp16}
        for label, prec, onnx_path in graphs:
            rows, sizes, t0 = [], {}, time.perf_counter()
            for b in batches:
                eng = work / f"dec_{label.replace(':', '_')}_b{b}.engine"
                side = _build_or_reuse(onnx_path, eng, prec, a.reuse, batch=(b, b, b), seq=(1, 1, 1), past=(a.past,) * 3,
                                       kv_fp16=a.kv_fp16, opt_level=a.opt_level, fp32_norms=not a.no_fp32_norms, fp16_float_matmuls=not a.no_fp16_matmuls, int8_gemm_output=a.int8_gemm_output)
                rows += time_engine(eng, [(b, 1)], a.runs, a.warmup, vocab, past_len=a.past, cuda_graph=a.cuda_graph)
                sizes[b] = side
            if a.build_only:
                continue
            entry = _entry(onnx_path, eng, sizes[batches[0]], rows, t0)
            wb = weight_bytes(onnx_path, prec)
            entry["weight_bytes"] = wb
            if bw:
                for r in rows:  # the step must read every weight once: its time at full HBM bandwidth
                    r["weight_bound_ms"] = wb["bytes"] / (bw * 1e12) * 1e3
                    r["over_weight_bound"] = r["gpu_ms_median"] / r["weight_bound_ms"]
                    if "cuda_graph_ms_median" in r:
                        r["cuda_graph_over_weight_bound"] = r["cuda_graph_ms_median"] / r["weight_bound_ms"]
            report["engines"][label] = entry
        col = "batch"
    else:
        shape, large = parse_shape(a.shape), parse_shape(a.large)
        if a.static:
            large = shape
        batch = (shape[0],) * 3 if a.static else (1, shape[0], max(shape[0], large[0]))
        seq = (shape[1],) * 3 if a.static else (1, shape[1], max(shape[1], large[1]))
        report["profile"] = {"batch": list(batch), "seq": list(seq)}
        for label, prec, onnx_path in graphs:
            eng = work / f"bench_{label.replace(':', '_')}.engine"
            side = _build_or_reuse(onnx_path, eng, prec, a.reuse, batch=batch, seq=seq, opt_level=a.opt_level,
                                   fp32_norms=not a.no_fp32_norms, fp16_float_matmuls=not a.no_fp16_matmuls, int8_gemm_output=a.int8_gemm_output)
            if a.build_only:
                continue
            t0 = time.perf_counter()
            rows = time_engine(eng, [shape, large] if large != shape else [shape], a.runs, a.warmup, vocab, a.tokens, cuda_graph=a.cuda_graph)
            report["engines"][label] = _entry(onnx_path, eng, side, rows, t0)
        col = "shape"

    if a.build_only:
        print("engines built (--build-only); time them with --reuse")
        return 0
    f16 = report["engines"]["fp16"]
    report["size_ratio_int8_over_fp16"] = {k: e["engine_bytes"] / f16["engine_bytes"] for k, e in report["engines"].items() if k != "fp16"}
    def speedups(key: str) -> dict:  # {engine: {shape or batch: FP16 time / its time}} where both have `key`
        return {
            k: {("b" + str(r16["shape"][0]) if a.decode else "x".join(map(str, r16["shape"]))): r16[key] / r8[key]
                for r16, r8 in zip(f16["timings"], e["timings"]) if key in r16 and key in r8}
            for k, e in report["engines"].items() if k != "fp16"
        }

    report["speedup_over_fp16"] = speedups("gpu_ms_median")
    report["speedup_int8_over_fp16"] = report["speedup_over_fp16"]["int8"]
    if a.cuda_graph:
        report["cuda_graph_speedup_over_fp16"] = speedups("cuda_graph_ms_median")

    what = f"decode step, past {a.past}{', KV FP16' if a.kv_fp16 else ''}" if a.decode else "prefill"
    print(f"\nTensorRT {trt.__version__} on {gpu.get('name')}, {what}; median of {a.runs} runs after {a.warmup} warm-up (GPU time, CUDA events)")
    hdr = f"{'engine':>24} {col:>8} {'ms':>9} {'speedup vs FP16':>16} {'tokens/s':>12} {'host-incl. ms':>14} {'MiB':>8}"
    if a.cuda_graph:
        hdr += f" {'graph ms':>9} {'graph speedup':>14}"
    if a.decode and bw:
        hdr += f" {'bound ms':>9} {'x bound':>8}"
    print(hdr)
    print("-" * len(hdr))
    for label, e in report["engines"].items():
        for r, r16 in zip(e["timings"], f16["timings"]):
            s = f"b{r['shape'][0]}" if a.decode else "x".join(map(str, r["shape"]))
            line = (f"{label:>24} {s:>8} {r['gpu_ms_median']:9.3f} {r16['gpu_ms_median'] / r['gpu_ms_median']:15.2f}x "
                    f"{r['tokens_per_s']:12.0f} {r['host_inclusive_ms_median']:14.3f} {e['engine_bytes'] / 2**20:8.1f}")
            if a.cuda_graph:
                g, g16 = r.get("cuda_graph_ms_median"), r16.get("cuda_graph_ms_median")
                line += f" {g:9.3f} {g16 / g:13.2f}x" if g and g16 else f" {'failed':>9} {'':>14}"
            if "weight_bound_ms" in r:
                best = min(x for x in (r["gpu_ms_median"], r.get("cuda_graph_ms_median")) if x)
                line += f" {r['weight_bound_ms']:9.3f} {best / r['weight_bound_ms']:7.2f}x"
            print(line)
            if r.get("cuda_graph_error"):
                print(f"{'':>24} CUDA graph: {r['cuda_graph_error']}")
    if a.decode and bw:
        print(f"bound: the engine's weight bytes (INT8 where Q/DQ feeds them, else FP16; not the gathered embedding) / {bw} TB/s; x bound uses the faster of plain and graph")
    for k, v in report["size_ratio_int8_over_fp16"].items():
        print(f"engine size {k}/FP16 = {v:.2f}")
    out = Path(a.json) if a.json else work / ("bench_trt_decode.json" if a.decode else "bench_trt.json")
    write_text_atomic(out, json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    from sq_export.errors import SqExportError

    try:
        sys.exit(main())
    except SqExportError as e:
        print(f"bench_trt: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
