#!/usr/bin/env python3
"""Which ONNX form of a Q/DQ Linear does TensorRT 8.6 turn into fast INT8 GEMMs? FP16 vs INT8 engines of the same
stack of MLP blocks at OPT-6.7B width (H 4096, F 16384), written in several forms (torch-free; runs under $TRTPY):

    mlp2d        x [T, H]; LayerNorm -> Q/DQ -> MatMul(W[K,N], DQ axis 1) -> Relu -> Q/DQ -> MatMul   (the kit's form)
    mlp3d        the same with x [B, S, H] (what exported models feed their Linears)
    mlp3d_bias   mlp3d plus a bias Add after each MatMul (OPT, BLOOM, GPT-2 Linears have biases)
    mlp3d_flat   mlp3d_bias, but activations reshaped to [B*S, H] around the quantized MatMuls
    mlp2d_const  mlp2d with activation scales/zero points as Constant nodes (as torch.onnx writes them)
    FORM_pin     any form with its LayerNormalization layers pinned to FP32 (what `sq-export build` does by default)

    PYTHONPATH=. $TRTPY tools/bench_qdq_forms.py [--forms mlp2d,mlp3d,...] [--layers 2] [--batch 4 --seq 256] [--jobs 8]

Builds run in parallel processes; timings (CUDA events, median of --runs) run one engine at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
H, F = 4096, 16384
FORMS = ("mlp2d", "mlp3d", "mlp3d_bias", "mlp3d_flat", "mlp2d_const", "mlp2d_pin", "mlp3d_bias_pin")


def graph(form: str, quant: bool, layers: int, batch: int, seq: int, path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    init, nodes = [], []

    const = form.endswith("_const")
    form = form.removesuffix("_pin").removesuffix("_const")

    def qdq(src, name, scale, axis=None, shape=None):
        s = np.full(shape, scale, np.float32) if shape else np.array(scale, np.float32)
        z = np.zeros(shape, np.int8) if shape else np.array(0, np.int8)
        if const and not shape:  # activation scale and zero point as Constant nodes
            nodes.append(helper.make_node("Constant", [], [name + "_s"], value=numpy_helper.from_array(s)))
            nodes.append(helper.make_node("Constant", [], [name + "_z"], value=numpy_helper.from_array(z)))
        else:
            init.extend([numpy_helper.from_array(s, name + "_s"), numpy_helper.from_array(z, name + "_z")])
        kw = {"axis": axis} if axis is not None else {}
        nodes.append(helper.make_node("QuantizeLinear", [src, name + "_s", name + "_z"], [name + "_q"], **kw))
        nodes.append(helper.make_node("DequantizeLinear", [name + "_q", name + "_s", name + "_z"], [name + "_dq"], **kw))
        return name + "_dq"

    three_d = form != "mlp2d"
    flat = form == "mlp3d_flat"
    bias = form in ("mlp3d_bias", "mlp3d_flat")
    if flat:
        init += [numpy_helper.from_array(np.array([-1, H], np.int64), "shape2d"), numpy_helper.from_array(np.array([batch, seq, H], np.int64), "shape3d_h")]
    src = "x"
    for l in range(layers):
        g, b = f"g{l}", f"b{l}"
        init += [numpy_helper.from_array(np.ones(H, np.float32), g), numpy_helper.from_array(np.zeros(H, np.float32), b)]
        nodes.append(helper.make_node("LayerNormalization", [src, g, b], [f"ln{l}"], name=f"LayerNorm_{l}_", axis=-1, epsilon=1e-5))
        a = f"ln{l}"
        if flat:
            nodes.append(helper.make_node("Reshape", [a, "shape2d"], [a + "_2d"])); a += "_2d"
        for i, (k, n) in enumerate(((H, F), (F, H))):
            w = (rng.standard_normal((k, n), dtype=np.float32) / np.sqrt(k)).astype(np.float32)
            wn = f"w{l}_{i}"
            init.append(numpy_helper.from_array(w, wn))
            if quant:
                a = qdq(a, f"a{l}_{i}", 4.0 / 127)
                wn = qdq(wn, wn + "q", float(np.abs(w).max() / 127), axis=1, shape=(n,))
            nodes.append(helper.make_node("MatMul", [a, wn], [f"m{l}_{i}"]))
            a = f"m{l}_{i}"
            if bias:
                init.append(numpy_helper.from_array((0.01 * rng.standard_normal(n)).astype(np.float32), f"bias{l}_{i}"))
                nodes.append(helper.make_node("Add", [a, f"bias{l}_{i}"], [a + "b"])); a += "b"
            if i == 0:
                nodes.append(helper.make_node("Relu", [a], [a + "r"])); a += "r"
        if flat:
            nodes.append(helper.make_node("Reshape", [a, "shape3d_h"], [a + "_3d"])); a += "_3d"
        nodes.append(helper.make_node("Add", [src, a], [f"res{l}"])); src = f"res{l}"
    shape = ["B", "S", H] if three_d else ["T", H]
    gr = helper.make_graph(nodes, form, [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                           [helper.make_tensor_value_info(src, TensorProto.FLOAT, shape)], init)
    m = helper.make_model(gr, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path), save_as_external_data=True, location=path.name + ".bin")
    return path


def build(form, quant, layers, batch, seq, work: Path) -> dict:
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, Profile

    import tensorrt as trt
    from polygraphy.backend.trt import PostprocessNetwork

    from sq_export.engine.precision_pins import pin_layers_fp32

    tag = f"{form}_{'int8' if quant else 'fp16'}"
    shape = (batch * seq, H) if form.startswith("mlp2d") else (batch, seq, H)
    if (work / f"{tag}.engine").exists():  # built before (same --layers/--batch/--seq): reuse
        return {"tag": tag, "build_s": None, "engine_mb": round((work / f"{tag}.engine").stat().st_size / 1e6, 1), "shape": list(shape)}
    onnx_path = graph(form, quant, layers, batch, seq, work / f"{tag}.onnx")
    prof = Profile().add("x", shape, shape, shape)
    network, extra = NetworkFromOnnxPath(str(onnx_path)), {}
    if form.endswith("_pin"):
        network = PostprocessNetwork(network, lambda network: pin_layers_fp32(network, trt, ["LayerNorm_"]))
        extra["precision_constraints"] = "prefer"
    t0 = time.perf_counter()
    data = EngineBytesFromNetwork(network, CreateConfig(fp16=True, int8=quant, profiles=[prof], tactic_sources=[], **extra))()
    (work / f"{tag}.engine").write_bytes(bytes(data))
    return {"tag": tag, "build_s": round(time.perf_counter() - t0, 1), "engine_mb": round(data.nbytes / 1e6, 1), "shape": list(shape)}


def time_it(engine_path: Path, shape, runs: int) -> float:
    from polygraphy import cuda
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    from tools.bench_trt import CudaEvents

    ev = CudaEvents()
    with TrtRunner(EngineFromBytes(BytesFromPath(str(engine_path)))) as r:
        x = cuda.DeviceArray(shape=tuple(shape), dtype=np.float32)
        x.copy_from(np.random.default_rng(0).standard_normal(tuple(shape), dtype=np.float32))
        for _ in range(10):
            r.infer({"x": x}, copy_outputs_to_host=False)
        s, e, out = ev.create(), ev.create(), []
        for _ in range(runs):
            ev.record(s, r.stream.ptr)
            r.context.execute_async_v3(r.stream.ptr)
            ev.record(e, r.stream.ptr)
            out.append(ev.elapsed_ms(s, e))
        x.free()
    return statistics.median(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--forms", default=",".join(FORMS))
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--jobs", type=int, default=8, help="parallel builds (default 8)")
    ap.add_argument("--workdir", default="/tmp/qdq_forms")
    ap.add_argument("--json", default=None)
    ap.add_argument("--log", help=argparse.SUPPRESS)
    ap.add_argument("--_build", nargs=2, metavar=("FORM", "QUANT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    if a._build:
        res = build(a._build[0], a._build[1] == "1", a.layers, a.batch, a.seq, work)
        print(json.dumps(res))
        return
    forms = a.forms.split(",")
    cmds = []
    for f in forms:
        for q in ("0", "1"):
            cmds.append([sys.executable, __file__, "--_build", f, q, "--layers", str(a.layers), "--batch", str(a.batch), "--seq", str(a.seq), "--workdir", str(work)])
    builds, running = {}, []

    def reap(p):
        p.wait()
        out, err = (Path(p.args[-1] + x).read_text() for x in (".out", ".err"))
        line = (out.strip().splitlines() or ["{}"])[-1]
        try:
            r = json.loads(line)
            builds[r["tag"]] = r
            print(f"built {r['tag']} in {r['build_s']} s, {r['engine_mb']} MB", flush=True)
        except (ValueError, KeyError):
            print(f"a build failed (rc {p.returncode}): {err[-600:]}", flush=True)

    for cmd in cmds:  # at most --jobs builds at once (each holds the graph's weights several times in host memory)
        while len(running) >= a.jobs:
            running[0].wait()
            reap(running.pop(0))
        log = str(work / f"build_{cmd[3]}_{cmd[4]}")  # logs in files: a pipe nobody reads could fill and block
        with open(log + ".out", "w") as o, open(log + ".err", "w") as e:
            running.append(subprocess.Popen(cmd + ["--log", log], stdout=o, stderr=e, env={**os.environ}))
    for p in running:
        reap(p)
    rows = []
    print(f"{'form':>12} {'FP16 ms':>9} {'INT8 ms':>9} {'INT8 speedup':>13} {'FP16 MB':>8} {'INT8 MB':>8}")
    for f in forms:
        r16, r8 = builds.get(f"{f}_fp16"), builds.get(f"{f}_int8")
        if not (r16 and r8):
            continue
        t16 = time_it(work / f"{f}_fp16.engine", r16["shape"], a.runs)
        t8 = time_it(work / f"{f}_int8.engine", r8["shape"], a.runs)
        rows.append({"form": f, "fp16_ms": t16, "int8_ms": t8, "speedup": t16 / t8, "fp16_mb": r16["engine_mb"], "int8_mb": r8["engine_mb"], "build_s": [r16["build_s"], r8["build_s"]]})
        print(f"{f:>12} {t16:9.3f} {t8:9.3f} {t16 / t8:12.2f}x {r16['engine_mb']:8.0f} {r8['engine_mb']:8.0f}", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"layers": a.layers, "batch": a.batch, "seq": a.seq, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
