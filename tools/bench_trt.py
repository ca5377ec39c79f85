#!/usr/bin/env python3
"""FP16 vs INT8 (explicit Q/DQ) TensorRT engines of the same model: GPU time per forward and engine size.

    source /opt/trt86/env.sh
    PYTHONPATH=. $TRTPY tools/bench_trt.py FP16_READY.onnx INT8_QDQ.onnx [MORE_INT8.onnx ...] [--shape 4x256]
                                          [--large 8x512] [--runs 50] [--warmup 10] [--workdir DIR] [--json FILE]
    PYTHONPATH=. $TRTPY tools/bench_trt.py --decode FP_DECODE.onnx SQ_DECODE.onnx [--past 512] [--batches 1,8]
                                          [--kv-fp16]
    PYTHONPATH=. $TRTPY tools/bench_trt.py --engines FP16.segments.json INT8.segments.json [MORE ...] [--shape 4x256]
                                          [--large 8x512 | --static] [--cuda-graph]
    PYTHONPATH=. $TRTPY tools/bench_trt.py --engines --decode FP_DEC.segments.json SQ_DEC.segments.json [--past 512]
                                          [--batches 8] [--cuda-graph]

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

Engines already built (--engines): the positional arguments are engine manifests (`sq-export split` then
`sq-export build MANIFEST -o OUT.segments.json`: a 32-layer 7B graph builds under TensorRT 8.6 only as segments)
or single engines (timed as above, time_engine), the first the FP16 reference; nothing is built and build options
are refused. Each is timed at its own profile: the requested shapes (prefill --shape/--large, decode --batches at
--past) must fit it, else one error says which input does not (a decode engine built with a static batch is
timed at that batch: one --batches value per run). A manifest is timed as one chain (time_chain): one execution
context per segment engine, all on one CUDA stream, device buffers allocated once (plan_chain_buffers: the residual
stream one buffer that segment k writes and segment k+1 reads, zero copies; each graph input one buffer bound to
every segment taking it); one timed run is every segment's execute_async_v3 in order between two CUDA events, and
--cuda-graph captures the whole chain as one CUDA graph. Its host-inclusive column is perf_counter around
enqueueing the chain and a stream sync. The decode weight bound of a manifest is the sum over its segments of
weight_bytes(the segment's ONNX): the "onnx" each manifest entry names, found beside the engine manifest (build it
beside the split), else the path in the segment engine's sidecar; without those graphs the bound is left out with
a note. Run on the CPU only (no TensorRT there): the chain planning (chain_bindings, plan_chain_buffers), the
manifest weight count, the argument checks, and time_chain against fake TensorRT/Polygraphy objects
(tests/test_bench_tools.py); the TensorRT path itself has not run yet.
"""

from __future__ import annotations

import argparse
import contextlib
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
from sq_export.engine.run import ENGINE_SUFFIXES, input_dtypes, load_engine, load_tokens, polygraphy_logging  # noqa: E402
from sq_export.engine.trt_compat import graph_facts, import_tensorrt, require_gpu  # noqa: E402
from sq_export.errors import BadInput  # noqa: E402
from sq_export.fileio import write_text_atomic  # noqa: E402
from sq_export.onnxio.segments import SEGMENTS_SUFFIX, check_chain, is_manifest  # noqa: E402


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


def profile_misfit(shapes: dict, limits: dict) -> str | None:
    """The first input whose shape lies outside its profile (min..max per dimension), as words; None when all fit.
    shapes: {input: shape}; limits: {input: (min, opt, max)} (sq_export.engine.run.profile_limits)."""
    for name, shape in shapes.items():
        if name not in limits:
            continue
        mn, _opt, mx = limits[name]
        if len(mn) != len(shape) or any(not (a <= int(d) <= b) for a, d, b in zip(mn, shape, mx)):
            return f"{name} {list(shape)} is outside its profile {list(mn)}..{list(mx)}"
    return None


def _check_profile(what, shapes: dict, limits: dict, decode: bool) -> None:
    bad = profile_misfit(shapes, limits)
    if bad:
        how = "--batches/--past" if decode else "--shape/--large (or --static)"
        raise BadInput(f"{what}: {bad}; time shapes within the engine's profile ({how}), or build engines whose profile covers them")


def _time_enqueue(ev, stream: int, enqueue, runs: int, warmup: int, cuda_graph: bool):
    """`runs` GPU times (ms, sorted) of one enqueue between two CUDA events on `stream`; with cuda_graph, the median
    of the same enqueue replayed as one captured CUDA graph (or None and the error: reported, not fatal)."""
    start, end = ev.create(), ev.create()
    gpu = []
    for _ in range(runs):
        ev.record(start, stream)
        if not enqueue():
            raise RuntimeError("execute_async_v3 failed")
        ev.record(end, stream)
        gpu.append(ev.elapsed_ms(start, end))
    graph_ms = graph_err = None
    if cuda_graph:
        # the same step replayed as one CUDA graph: what launch gaps between the engine's kernels cost
        try:
            graph, exe = ev.capture(stream, enqueue)
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
    gpu.sort()
    return gpu, graph_ms, graph_err


def _timing_row(shape, past_len, gpu: list, host_times: list, runs: int, graph_ms, graph_err) -> dict:
    med = statistics.median(gpu)
    new_tokens = shape[0] * (1 if past_len is not None else shape[1])
    return {
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
            _check_profile(engine_path, {n: host[n].shape for n in dtypes if n in host}, lim, past_len is not None)
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
            stream = runner.stream.ptr
            gpu, graph_ms, graph_err = _time_enqueue(ev, stream, lambda: runner.context.execute_async_v3(stream), runs, warmup, cuda_graph)
            for d in dev.values():
                d.free()
            rows.append(_timing_row(shape, past_len, gpu, host_times, runs, graph_ms, graph_err))
    return rows


def chain_bindings(graph_inputs, segment_io) -> list[dict]:
    """Which buffer each segment's input and output binds to: [{tensor: buffer}] per segment. A graph input is one
    buffer shared by every segment taking it; a tensor a segment returns is one buffer, which the later segments
    taking it bind too (segment k's residual-stream output is segment k+1's input: zero copies). Buffers are named
    after their tensor. BadInput when a segment takes a tensor that neither the graph inputs nor an earlier segment
    give, or returns one that a graph input or an earlier segment names already."""
    check_chain(graph_inputs, segment_io)
    return [{n: n for n in [*ins, *outs]} for ins, outs in segment_io]


def plan_chain_buffers(graph_inputs, segment_io, segment_tensors) -> tuple[list[dict], dict]:
    """The device buffers a chain of segment engines needs, allocated once: (bindings, buffers).

    graph_inputs: the manifest's inputs; segment_io: [(inputs, outputs)] per segment, in order; segment_tensors:
    [{tensor: (shape, numpy dtype)}] per segment, for each of its inputs and outputs (shapes concrete: the ones
    set on, or reported by, that segment's execution context). bindings: chain_bindings; buffers: {buffer: {"shape",
    "dtype", "bytes"}}. BadInput when a segment's view of a shared tensor (shape or dtype) differs from the buffer's:
    one buffer cannot serve both without a copy."""
    bindings = chain_bindings(graph_inputs, segment_io)
    buffers: dict[str, dict] = {}
    for k, (bind, tensors) in enumerate(zip(bindings, segment_tensors)):
        for n, buf in bind.items():
            if n not in tensors:
                raise BadInput(f"segment {k}: no shape/dtype for its tensor {n}")
            shape, dtype = tensors[n]
            shape, dtype = tuple(int(d) for d in shape), np.dtype(dtype)
            if any(d < 0 for d in shape):
                raise BadInput(f"segment {k}: {n} has an unresolved shape {list(shape)} (an input shape was not set)")
            if buf in buffers:
                have = buffers[buf]
                if (have["shape"], have["dtype"]) != (shape, dtype):
                    raise BadInput(f"segment {k} binds {n} as {dtype} {list(shape)}, but its buffer is {have['dtype']} "
                                   f"{list(have['shape'])}: the segments disagree; build them with the same options")
                continue
            buffers[buf] = {"shape": shape, "dtype": dtype, "bytes": int(np.prod(shape, dtype=np.int64)) * dtype.itemsize}
    return bindings, buffers


def time_chain(manifest_path, shapes, runs, warmup, vocab, tokens_file=None, past_len=None, cuda_graph=False) -> list[dict]:
    """time_engine for an engine manifest (sq_export.onnxio.segments): one execution context per segment engine,
    all enqueued on one CUDA stream (the first runner's), device buffers allocated once per shape
    (plan_chain_buffers: the residual stream one buffer between segments, graph inputs one buffer each), and one
    timed run is every segment's execute_async_v3 in order between two CUDA events; --cuda-graph captures the
    whole chain as one graph. host_inclusive_ms_median: perf_counter around enqueueing the chain + stream sync.
    The contexts share one activation-memory buffer (sq_export.engine.chain.SharedScratch): the largest segment's."""
    from polygraphy import cuda

    from sq_export.engine.chain import engine_runners
    from sq_export.engine.run import feed_for, profile_limits
    from sq_export.onnxio.segments import member_paths, read_manifest

    trt = import_tensorrt()
    man = read_manifest(manifest_path)
    graph_inputs = list(man["inputs"])
    segment_io = [(list(e["inputs"]), list(e["outputs"])) for e in man["segments"]]
    members = member_paths(man)
    ev = CudaEvents()
    rows = []
    with polygraphy_logging("ERROR"), contextlib.ExitStack() as stack:
        opened, scratch = engine_runners(members, [p.name for p in members])  # one shared activation buffer
        runners = [stack.enter_context(r) for r in opened]
        scratch.attach([r.context for r in runners])
        stack.callback(scratch.free)
        for k, r in enumerate(runners):  # the engine's own I/O names: the manifest's, or the manifest is stale
            names = [r.engine.get_tensor_name(i) for i in range(r.engine.num_io_tensors)]
            ins, outs = segment_io[k]
            extra = [n for n in names if n not in ins and n not in outs]
            if extra:
                raise BadInput(f"{members[k]}: engine tensor {extra[0]} is not in segment {k} of {manifest_path}: the "
                               "manifest and its engines do not match; build the manifest again")
            segment_io[k] = ([n for n in ins if n in names], [n for n in outs if n in names])
        chain_bindings(graph_inputs, segment_io)
        stream_obj = runners[0].stream
        stream = stream_obj.ptr  # ONE stream for every segment
        lims = [profile_limits(r) or {} for r in runners]

        def dtype_of(r, n):
            return np.dtype(trt.nptype(r.engine.get_tensor_dtype(n)))

        gdt = {}  # graph input -> dtype, from the first segment taking it
        for r, (ins, _outs) in zip(runners, segment_io):
            for n in ins:
                if n in graph_inputs and n not in gdt:
                    gdt[n] = dtype_of(r, n)
        for shape in shapes:
            if past_len is None:
                host = feed_for(None, make_tokens(shape, vocab, tokens_file), gdt)
            else:
                cache = {n: (lim[n][2][1], lim[n][2][3]) for lim, (ins, _o) in zip(lims, segment_io) for n in ins
                         if n.startswith("past_key_values.")}
                raw = decode_feed(shape, vocab, past_len, cache)
                missing = [n for n in gdt if n not in raw]
                if missing:
                    raise BadInput(f"{manifest_path}: graph input {missing[0]} is not one a decode step feeds (input_ids, "
                                   "attention_mask, position_ids, past_key_values.*): is this a decode graph's manifest?")
                host = {n: np.ascontiguousarray(raw[n], dtype=dt) for n, dt in gdt.items()}
            # every context's input shapes, in order: a segment's outputs' shapes are known once its inputs are set
            known = {n: tuple(a.shape) for n, a in host.items()}
            seg_tensors = []
            for k, (r, (ins, outs)) in enumerate(zip(runners, segment_io)):
                _check_profile(f"{manifest_path} segment {k} ({members[k].name})", {n: known[n] for n in ins}, lims[k], past_len is not None)
                for n in ins:
                    if not r.context.set_input_shape(n, known[n]):
                        raise BadInput(f"{members[k].name}: TensorRT refused {n} shape {list(known[n])}")
                t = {n: (known[n], dtype_of(r, n)) for n in ins}
                for n in outs:
                    known[n] = tuple(r.context.get_tensor_shape(n))
                    t[n] = (known[n], dtype_of(r, n))
                seg_tensors.append(t)
            bindings, buffers = plan_chain_buffers(graph_inputs, segment_io, seg_tensors)
            dev = {b: cuda.DeviceArray(shape=v["shape"], dtype=v["dtype"]) for b, v in buffers.items()}
            for n, arr in host.items():
                if n in dev:
                    dev[n].copy_from(arr)
            for k, (r, bind) in enumerate(zip(runners, bindings)):
                for n, b in bind.items():
                    if not r.context.set_tensor_address(n, dev[b].ptr):
                        raise RuntimeError(f"{members[k].name}: set_tensor_address({n}) failed")

            def enqueue():
                for r in runners:
                    if not r.context.execute_async_v3(stream):
                        return False
                return True

            for _ in range(max(1, warmup)):
                if not enqueue():
                    raise RuntimeError("execute_async_v3 failed")
            stream_obj.synchronize()
            host_times = []
            for _ in range(min(runs, 20)):
                t0 = time.perf_counter()
                if not enqueue():
                    raise RuntimeError("execute_async_v3 failed")
                stream_obj.synchronize()
                host_times.append((time.perf_counter() - t0) * 1e3)
            gpu, graph_ms, graph_err = _time_enqueue(ev, stream, enqueue, runs, warmup, cuda_graph)
            stream_obj.synchronize()
            for d in dev.values():
                d.free()
            row = _timing_row(shape, past_len, gpu, host_times, runs, graph_ms, graph_err)
            row["segments"] = len(runners)
            row["device_buffer_bytes"] = sum(v["bytes"] for v in buffers.values())
            rows.append(row)
    return rows


def _sidecar(engine_path) -> dict:
    side = Path(str(engine_path) + ".json")
    try:
        return json.loads(side.read_text()) if side.is_file() else {}
    except (OSError, ValueError):
        return {}


def engine_weight_graphs(path) -> list[Path | None]:
    """The ONNX graph each engine of `path` (an engine manifest, or one engine) was built from: a manifest's
    segment's "onnx" beside the manifest (where `sq-export build` puts the engines when -o sits beside the split),
    else the path in the segment engine's sidecar; one engine's from its sidecar. None where neither exists."""
    from sq_export.onnxio.segments import member_paths, read_manifest

    if not is_manifest(path):
        o = _sidecar(path).get("onnx")
        return [Path(o) if o and Path(o).is_file() else None]
    man = read_manifest(path)
    out = []
    for e, eng in zip(man["segments"], member_paths(man)):
        cand = [Path(man["path"]).parent / e["onnx"]] if e.get("onnx") else []
        if _sidecar(eng).get("onnx"):
            cand.append(Path(_sidecar(eng)["onnx"]))
        out.append(next((c for c in cand if c.is_file()), None))
    return out


def engines_weight_bytes(graphs, precision: str) -> dict:
    """weight_bytes of an engine manifest: the sum over its segments of weight_bytes(segment ONNX) (graphs:
    engine_weight_graphs). Exact for the chain: each segment's engine holds and reads its own initializers (a small
    one that two segments both compute from counts twice, as both engines hold it; a tied embedding is gathered in
    the first segment and a MatMul weight in the last, as in the whole graph)."""
    total: dict = {}
    for g in graphs:
        for k, v in weight_bytes(g, precision).items():
            total[k] = total.get(k, 0) + v
    total["graphs"] = len(graphs)
    return total


def engines_facts(path) -> dict:
    """The sidecar-like facts _entry reports for an engine manifest or one engine: engine_bytes, build_seconds,
    layer_precisions.precision_counts (summed over the segments' sidecars, where present)."""
    from sq_export.onnxio.segments import member_paths, read_manifest

    if is_manifest(path):
        man = read_manifest(path)
        engines = member_paths(man)
        build_s = man.get("wall_seconds")
    else:
        engines = [Path(path)]
        build_s = _sidecar(path).get("build_seconds")
    counts: dict = {}
    for eng in engines:
        for k, v in ((_sidecar(eng).get("layer_precisions") or {}).get("precision_counts") or {}).items():
            counts[k] = counts.get(k, 0) + v
    return {"engine_bytes": sum(e.stat().st_size for e in engines), "build_seconds": build_s,
            "layer_precisions": {"precision_counts": counts or None}, "segments": len(engines)}


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


def _add_weight_bound(entry: dict, rows: list, wb: dict, bw: float | None) -> None:
    entry["weight_bytes"] = wb
    if bw:
        for r in rows:  # the step must read every weight once: its time at full HBM bandwidth
            r["weight_bound_ms"] = wb["bytes"] / (bw * 1e12) * 1e3
            r["over_weight_bound"] = r["gpu_ms_median"] / r["weight_bound_ms"]
            if "cuda_graph_ms_median" in r:
                r["cuda_graph_over_weight_bound"] = r["cuda_graph_ms_median"] / r["weight_bound_ms"]


def _stem(path) -> str:
    """A label's STEM: the file name without .onnx / .engine / .segments.json."""
    name = Path(path).name
    return name[: -len(SEGMENTS_SUFFIX)] if is_manifest(name) else Path(name).stem


BUILD_OPTIONS = {"build_only": "--build-only", "labels": "--labels", "reuse": "--reuse", "kv_fp16": "--kv-fp16",
                 "opt_level": "--opt-level", "no_fp32_norms": "--no-fp32-norms", "int8_gemm_output": "--int8-gemm-output",
                 "no_fp16_matmuls": "--no-fp16-matmuls"}


def _check_engine_args(ap, a, paths) -> None:
    """--engines: every path an engine manifest or an engine file, and no option that only a build uses."""
    from sq_export.engine.chain import manifest_kind

    for key, flag in BUILD_OPTIONS.items():
        if getattr(a, key) not in (None, False):
            ap.error(f"{flag} is a build option; --engines times engines already built (drop {flag}, or build them again)")
    for p in paths:
        if is_manifest(p):
            if manifest_kind(p) != "engine":
                ap.error(f"{p} lists ONNX segments: build them first (sq-export build {p} -o OUT.segments.json) and pass OUT.segments.json")
        elif str(p).lower().endswith(ENGINE_SUFFIXES):
            if not Path(p).is_file():
                ap.error(f"engine {p} does not exist")
        else:
            ap.error(f"{p}: --engines takes engine manifests (*{SEGMENTS_SUFFIX}) or engines ({', '.join(ENGINE_SUFFIXES)})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("fp16_onnx", help="float graph for the FP16 engine (TensorRT 10+: an FP16 graph); with --engines, the "
                    "FP16 engine manifest (*.segments.json) or engine")
    ap.add_argument("int8_onnx", nargs="+", help="SmoothQuant Q/DQ graph(s) for INT8 engines (TensorRT 8.x: --weights qdq form); "
                    "with --engines, INT8 engine manifest(s) or engine(s)")
    ap.add_argument("--engines", action="store_true", help="the positional arguments are engines already built (`sq-export "
                    "build`): engine manifests (*.segments.json, timed as one chain) or single engines; nothing is built")
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
    paths = [a.fp16_onnx, *a.int8_onnx]
    if a.engines:
        _check_engine_args(ap, a, paths)
    else:
        for p in paths:
            if is_manifest(p) or str(p).lower().endswith(ENGINE_SUFFIXES):
                ap.error(f"{p} is not an ONNX graph to build: pass --engines to time engines (or engine manifests) already built")

    trt = import_tensorrt()
    gpu = require_gpu()
    bw = bandwidth_tbs(gpu.get("name"), a.bandwidth)
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    if a.engines:
        first = [g for g in (engine_weight_graphs(a.int8_onnx[0])[0], engine_weight_graphs(a.fp16_onnx)[0]) if g is not None]
        vocab = next((v for v in map(vocab_hint, first) if v), None)
    else:
        vocab = vocab_hint(a.int8_onnx[0]) or vocab_hint(a.fp16_onnx)
    graphs = [("fp16", "fp16", a.fp16_onnx)] + [
        ("int8" if i == 0 else f"int8:{_stem(p)}", "int8", p) for i, p in enumerate(a.int8_onnx)
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

    if a.engines:  # engines already built: their own profiles, nothing built; build options were refused above
        report.update(fp32_norms=None, fp16_float_matmuls=None, prebuilt_engines=True)
        if a.decode:
            batches = [int(x) for x in a.batches.split(",") if x.strip()]
            shapes = [(b, 1) for b in batches]
            report["profile"] = {"per_engine": "prebuilt: the engines' own profile", "past": a.past, "batches": batches, "kv_fp16": None}
        else:
            shape, large = parse_shape(a.shape), parse_shape(a.large)
            shapes = [shape] if a.static or large == shape else [shape, large]
            report["profile"] = {"per_engine": "prebuilt: the engines' own profile", "shapes": [list(x) for x in shapes]}
        for label, prec, path in graphs:
            t0 = time.perf_counter()
            timer = time_chain if is_manifest(path) else time_engine
            rows = timer(path, shapes, a.runs, a.warmup, vocab, None if a.decode else a.tokens,
                         past_len=a.past if a.decode else None, cuda_graph=a.cuda_graph)
            facts = engines_facts(path)
            weight_graphs = engine_weight_graphs(path)
            entry = _entry([str(g) if g else None for g in weight_graphs], path, facts, rows, t0)
            entry["segments"] = facts["segments"]
            if a.decode:
                missing = [i for i, g in enumerate(weight_graphs) if g is None]
                if missing:
                    print(f"note: {label}: no weight bound: the ONNX graph engine {missing[0]} of {path} was built from is not "
                          "beside it nor where its sidecar says (build the engine manifest beside the split)", flush=True)
                else:
                    _add_weight_bound(entry, rows, engines_weight_bytes(weight_graphs, prec), bw)
            report["engines"][label] = entry
        col = "batch" if a.decode else "shape"
    elif a.decode:
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
            _add_weight_bound(entry, rows, weight_bytes(onnx_path, prec), bw)
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
