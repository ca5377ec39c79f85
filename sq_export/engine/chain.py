"""A segmented model (sq_export.onnxio.segments) as one Polygraphy runner, and its engines built segment by segment.

`ChainRunner` runs the segments of a manifest in order: each takes the graph inputs and earlier segments' outputs
it names, and the chain returns the graph's outputs, so compare, eval/perplexity and generate treat a manifest as
they treat one .onnx graph or one engine. Members are ONNX graphs (ONNX Runtime) or TensorRT engines; between
TensorRT segments the residual stream stays on the GPU (Polygraphy device arrays, copy_outputs_to_host=False).

`build_segments` builds one engine per ONNX segment with the same options `build` takes, and writes the engine
manifest (the members' sidecars carry what each build measured). Segments build in separate processes, `jobs` at a
time: TensorRT's builder holds many times a segment's weight bytes in host memory, so `jobs` is what bounds it.
"""

from __future__ import annotations

import functools
import json
import logging
import queue
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from sq_export.engine.external import child_env, last_line
from sq_export.errors import BadInput
from sq_export.onnxio.segments import FORMAT, SEGMENTS_SUFFIX, is_manifest, member_paths, read_manifest

log = logging.getLogger(__name__)


def manifest_kind(path) -> str:
    """"onnx" or "engine": what the manifest's members are."""
    man = read_manifest(path)
    kind = man.get("kind")
    if kind not in ("onnx", "engine"):
        raise BadInput(f"{path}: unknown segment kind {kind!r}")
    return kind


def chain_runner(path, name: str | None = None, providers=None):
    """A (not yet activated) runner of every segment of the manifest at `path`, in order. Engine segments share one
    activation-memory buffer (SharedScratch)."""
    from sq_export.engine.run import open_runner

    man = read_manifest(path)  # (a chain: each segment takes graph inputs or earlier segments' outputs only)
    members = member_paths(man)
    names = [f"{name or Path(path).name}:{i}" for i in range(len(members))]
    scratch = None
    if man.get("kind") == "engine":
        runners, scratch = engine_runners(members, names)
    else:
        runners = [open_runner(p, name=n, providers=providers) for p, n in zip(members, names)]
    return _chain_class()(man, runners, name=name or Path(path).name, scratch=scratch)


def _device_buffer(nbytes: int):
    """A raw device buffer (Polygraphy's DeviceArray; .ptr, .allocated_nbytes, .free())."""
    from polygraphy import cuda

    return cuda.DeviceArray.raw((nbytes,))


class SharedScratch:
    """One device buffer that the execution contexts of a chain's segment engines share as their activation memory.
    The segments run one after another (Polygraphy synchronizes each runner's stream after its inference;
    bench_trt enqueues them in order on one stream), so the chain needs the largest segment's scratch, not the sum:
    the 7B chains of 8 segments held 104 GB of GPU memory with a context's own memory each (2026-11-30)."""

    def __init__(self, engines):
        from sq_export.engine.trt_compat import context_memory_size

        self.engines = list(engines)  # kept alive as long as their contexts
        self.sizes = [context_memory_size(e) for e in self.engines]
        self.buffer = None

    @property
    def nbytes(self) -> int:
        return max(self.sizes, default=0)

    def attach(self, contexts) -> None:
        """Allocate the buffer (once) and give it to every context, before their first inference."""
        from sq_export.engine.trt_compat import set_context_memory

        if self.buffer is None:
            self.buffer = _device_buffer(max(self.nbytes, 1))
        for c in contexts:
            set_context_memory(c, self.buffer.ptr, self.buffer.allocated_nbytes)
        log.info("%d segment contexts share %.1f MiB of activation memory (%.1f MiB each on its own)", len(self.sizes),
                 self.nbytes / 2**20, sum(self.sizes) / 2**20)

    def free(self) -> None:
        if self.buffer is not None:
            self.buffer.free()
            self.buffer = None


def engine_runners(members, names) -> tuple[list, SharedScratch]:
    """Polygraphy TrtRunners (not activated) of segment engines whose contexts own no activation memory, and the
    SharedScratch to attach to them once they are active."""
    from polygraphy.backend.trt import TrtRunner

    from sq_export.engine.run import load_engine
    from sq_export.engine.trt_compat import context_without_device_memory, import_tensorrt

    trt = import_tensorrt()
    engines = [load_engine(p) for p in members]
    runners = [TrtRunner(context_without_device_memory(e, trt), name=n) for e, n in zip(engines, names)]
    return runners, SharedScratch(engines)


@functools.cache
def _chain_class():
    """ChainRunner, a Polygraphy BaseRunner: defined on first use, so this module imports without Polygraphy."""
    from polygraphy.backend.base import BaseRunner

    class ChainRunner(BaseRunner):
        def __init__(self, manifest: dict, runners: list, name=None, scratch=None):
            super().__init__(name=name, prefix="chain-runner")
            self.manifest = manifest
            self.runners = runners
            self.scratch = scratch  # SharedScratch of engine segments, or None (each context its own memory)
            self.inputs = list(manifest["inputs"])
            self.outputs = list(manifest["outputs"])
            self.segment_io = [(list(e["inputs"]), list(e["outputs"])) for e in manifest["segments"]]
            self.needed = [n for n in self.inputs if any(n in ins for ins, _ in self.segment_io)]  # graph inputs used
            self.trt = all(type(r).__name__ == "TrtRunner" for r in runners)
            self.dtypes = None  # per segment: {input: numpy dtype}, read once when activated

        def activate_impl(self):
            from sq_export.engine.run import input_dtypes

            for r in self.runners:
                r.activate()
            if self.scratch is not None:
                self.scratch.attach([r.context for r in self.runners])
            self.dtypes = [input_dtypes(r) for r in self.runners]

        def deactivate_impl(self):
            for r in reversed(self.runners):
                if r.is_active:
                    r.deactivate()
            if self.scratch is not None:
                self.scratch.free()

        def get_input_metadata_impl(self):
            from polygraphy.common import TensorMetadata

            meta = TensorMetadata()
            for r, (ins, _outs) in zip(self.runners, self.segment_io):
                m = r.get_input_metadata()
                for n in ins:
                    if n in self.inputs and n not in meta:
                        dtype, shape = m[n]  # (a MetadataTuple unpacks; it does not index)
                        meta.add(n, dtype, shape)
            return meta

        def infer_impl(self, feed_dict, copy_outputs_to_host=True):
            import numpy as np

            missing = [n for n in self.needed if n not in feed_dict]
            if missing:
                raise BadInput(f"{self.name} needs the input {missing[0]}, which the feed does not give")
            values = dict(feed_dict)
            t0 = time.perf_counter()
            for r, dtypes, (ins, _outs) in zip(self.runners, self.dtypes, self.segment_io):
                feed = {}
                for n in ins:  # (chain_runner checked that the feed or an earlier segment gives each)
                    v = values[n]
                    if isinstance(v, np.ndarray) and v.dtype != dtypes[n]:  # host arrays: the type this segment takes
                        v = np.ascontiguousarray(v, dtype=dtypes[n])
                    feed[n] = v
                if self.trt:  # the boundary tensors stay on the GPU; graph outputs are copied at the end
                    got = r.infer(feed, check_inputs=False, copy_outputs_to_host=False)
                    for k, v in got.items():  # Polygraphy reuses its output buffers per runner, not across runners
                        values[k] = v
                else:
                    got = r.infer(feed, check_inputs=False)
                    values.update({k: np.array(v) for k, v in got.items()})
            out = OrderedDict()
            for n in self.outputs:
                v = values[n]
                if copy_outputs_to_host and not isinstance(v, np.ndarray) and hasattr(v, "numpy"):
                    v = v.numpy()
                out[n] = v
            self.inference_time = time.perf_counter() - t0
            return out

        def profile_limits(self) -> dict | None:
            """{graph input: (min, opt, max)} from the first segment engine that takes it (None for ONNX chains)."""
            from sq_export.engine.run import profile_limits

            lim = {}
            for r in self.runners:
                got = profile_limits(r)
                if got is None:
                    return None
                for k, v in got.items():
                    if k in self.inputs and k not in lim:
                        lim[k] = v
            return lim

    return ChainRunner


def engine_manifest_path(out) -> Path:
    out = Path(out)
    if not is_manifest(out):
        raise BadInput(f"a segmented graph builds into an engine manifest: -o must end with {SEGMENTS_SUFFIX}, got {out}")
    return out


def build_segments(manifest_path, out, *, jobs: int = 1, build_args: list | None = None, python: str | None = None,
                   gpus: list | None = None) -> dict:
    """Build every ONNX segment of `manifest_path` into `<out stem>.segNN.engine` beside `out` (an engine
    manifest, written last, atomically). `build_args`: the `sq-export build` options every segment gets (precision,
    profile, pins ...). Each build runs as `python -m sq_export build` in its own process, `jobs` at a time; a
    failed build stops the rest and leaves no manifest. `gpus` (CUDA device ids, e.g. ["0", "1"]): the builds
    running at once are spread evenly over them (each process sees one, as CUDA_VISIBLE_DEVICES); the engines run
    on any GPU of the same model."""
    from sq_export.fileio import check_output_path, write_text_atomic

    man = read_manifest(manifest_path)
    if man.get("kind") != "onnx":
        raise BadInput(f"{manifest_path} lists engines already; build takes the ONNX segment manifest `sq-export split` wrote")
    out = engine_manifest_path(out)
    check_output_path(out)
    if jobs < 1:
        raise BadInput(f"--jobs must be >= 1, got {jobs}")
    gpus = [str(g).strip() for g in (gpus or [])]
    if any(not g.isdigit() for g in gpus):
        raise BadInput(f"--gpus takes CUDA device numbers separated by commas, e.g. 0,1; got {','.join(gpus)}")
    free = queue.Queue()  # one token per build slot, the slots dealt over the GPUs in turn
    for slot in range(jobs):
        free.put(gpus[slot % len(gpus)] if gpus else None)
    stem = out.name[: -len(SEGMENTS_SUFFIX)]
    members = member_paths(man)
    engines = [out.with_name(f"{stem}.seg{i:02d}.engine") for i in range(len(members))]
    python = python or sys.executable
    env = child_env()

    stop = threading.Event()  # set by the first failed build: no further one starts

    def build_one(i):  # (subprocess.run reads the child's stderr while it runs: a chatty build cannot fill the pipe)
        if stop.is_set():
            return None
        cmd = [python, "-m", "sq_export", "build", str(members[i]), "-o", str(engines[i]), *(build_args or [])]
        log.info("segment %d/%d: %s", i + 1, len(members), " ".join(cmd))
        gpu = free.get()
        t = time.perf_counter()
        try:
            p = subprocess.run(cmd, env=env if gpu is None else {**env, "CUDA_VISIBLE_DEVICES": gpu},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        finally:
            free.put(gpu)
        if p.returncode != 0:
            stop.set()
        return p.returncode, last_line(p.stderr), time.perf_counter() - t

    t0 = time.perf_counter()
    failed = None
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(build_one, i): i for i in range(len(members))}
        for f in as_completed(futures):
            i, got = futures[f], f.result()
            if got is None:  # not started: an earlier build failed
                continue
            rc, msg, seconds = got
            if rc == 0:
                log.info("segment %d built in %.0f s", i, seconds)
            elif failed is None:
                failed = (i, rc, msg)
    if failed is not None:
        i, rc, msg = failed
        raise BadInput(f"segment {i} ({members[i].name}) did not build (exit {rc}): {msg}")
    entries = []
    for i, (e, eng) in enumerate(zip(man["segments"], engines)):
        side = Path(str(eng) + ".json")
        sidecar = json.loads(side.read_text()) if side.is_file() else {}
        entries.append({**{k: v for k, v in e.items() if k not in ("file", "nodes", "weight_bytes")}, "file": eng.name,
                        "onnx": members[i].name, "engine_bytes": eng.stat().st_size,
                        "build_seconds": sidecar.get("build_seconds")})
    manifest = {
        "format": FORMAT,
        "kind": "engine",
        "source": Path(manifest_path).name,
        "layers": man.get("layers"),
        "inputs": man["inputs"],
        "outputs": man["outputs"],
        "segments": entries,
        "jobs": jobs,
        "gpus": gpus or None,
        "build_args": list(build_args or []),
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "engine_bytes": sum(e["engine_bytes"] for e in entries),
    }
    write_text_atomic(out, json.dumps(manifest, indent=1) + "\n")
    manifest["path"] = str(out)
    return manifest
