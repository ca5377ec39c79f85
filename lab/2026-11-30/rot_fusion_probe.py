"""Which form of the rotated down_proj does TensorRT 8.6 build as an INT8 GEMM? (issue 17, ninth lease's finding)

The ninth lease (docs/TENSORRT.md, "What the rotation costs at Llama-2-7B width") found that TensorRT 8.6 runs
`Reshape → MatMul(H) → Reshape → Q → DQ → MatMul(DQ(W))` (what `export --rotate-down` writes) as an FP16 GEMM: the
engine stores that weight in FP16 and ncu shows no INT8 kernel for it. This probe builds one Linear of Llama-2-7B's
down_proj size (11,008 → 4,096) in several graph forms and reports, per form, the engine size (an INT8 weight is
45 MB, an FP16 one 90 MB) and the GPU time of a 4 × 256 forward, so the exporter can write the form 8.6 fuses.

    source /opt/trt86/env.sh; "$TRTPY" lab/2026-11-30/rot_fusion_probe.py --out /tmp/probe [--forms base,exported,...]

Forms (x is [batch, seq, 11008] float32, H the 64 × 64 Hadamard, W the [11008, 4096] weight):
  base       Q → DQ → MatMul                                     (no rotation: the INT8 reference)
  exported   Reshape(Shape-built) → MatMul(H) → Reshape(Shape-built) → Q → DQ → MatMul   (today's graph)
  const      the same with constant reshape targets [0, 0, -1, 64] / [0, 0, 11008]
  qdq4d      Reshape → MatMul(H) → Q → DQ → Reshape → MatMul     (the Q/DQ pair before the reshape back)
  flat2d     Reshape to [-1, 64] → MatMul(H) → Reshape to [batch, seq, 11008] via Shape → Q → DQ → MatMul
  nofp16     `exported` built without the FP16 flag (does the FP16 flag make 8.6 prefer the FP16 GEMM?)
Torch-free; run with the kit's Python (tensorrt 8.6, onnx, numpy, polygraphy)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

I, O, B = 11008, 4096, 64
FORMS = ("base", "exported", "const", "qdq4d", "flat2d", "nofp16")


def hadamard(b: int) -> np.ndarray:
    h = np.ones((1, 1), np.float32)
    while h.shape[0] < b:
        h = np.block([[h, h], [h, -h]])
    return (h / np.sqrt(b)).astype(np.float32)


def graph(form: str) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((I, O)) * 0.02).astype(np.float32)
    inits = [numpy_helper.from_array(w, "W"),
             numpy_helper.from_array((np.abs(w).max(0) / 127).astype(np.float32), "w_scale"),
             numpy_helper.from_array(np.zeros(O, np.int8), "w_zero"),
             numpy_helper.from_array(np.array(0.05, np.float32), "x_scale"),
             numpy_helper.from_array(np.array(0, np.int8), "x_zero"),
             numpy_helper.from_array(hadamard(B), "H")]
    nodes = []

    def qdq(src: str, dst: str):
        nodes.append(helper.make_node("QuantizeLinear", [src, "x_scale", "x_zero"], [dst + "_q"]))
        nodes.append(helper.make_node("DequantizeLinear", [dst + "_q", "x_scale", "x_zero"], [dst]))

    def shape_built(src: str, tail: list[int], name: str) -> str:
        """[dim0(src), dim1(src), *tail] the way torch.onnx writes x.reshape(*x.shape[:-1], ...)."""
        nodes.append(helper.make_node("Shape", [src], [name + "_shape"]))
        nodes.append(helper.make_node("Slice", [name + "_shape", name + "_s0", name + "_s1"], [name + "_lead"]))
        inits.extend([numpy_helper.from_array(np.array([0], np.int64), name + "_s0"),
                      numpy_helper.from_array(np.array([2], np.int64), name + "_s1"),
                      numpy_helper.from_array(np.array(tail, np.int64), name + "_tail")])
        nodes.append(helper.make_node("Concat", [name + "_lead", name + "_tail"], [name], axis=0))
        return name

    def const(values: list[int], name: str) -> str:
        inits.append(numpy_helper.from_array(np.array(values, np.int64), name))
        return name

    nodes.append(helper.make_node("QuantizeLinear", ["W", "w_scale", "w_zero"], ["Wq"], axis=1))
    nodes.append(helper.make_node("DequantizeLinear", ["Wq", "w_scale", "w_zero"], ["Wd"], axis=1))
    if form == "base":
        qdq("x", "xd")
    elif form in ("exported", "nofp16", "const"):
        s4 = shape_built("x", [-1, B], "t4") if form != "const" else const([0, 0, -1, B], "t4")
        nodes.append(helper.make_node("Reshape", ["x", s4], ["x4"]))
        nodes.append(helper.make_node("MatMul", ["x4", "H"], ["r4"]))
        s3 = shape_built("x", [-1], "t3") if form != "const" else const([0, 0, I], "t3")
        nodes.append(helper.make_node("Reshape", ["r4", s3], ["r3"]))
        qdq("r3", "xd")
    elif form == "qdq4d":
        nodes.append(helper.make_node("Reshape", ["x", const([0, 0, -1, B], "t4")], ["x4"]))
        nodes.append(helper.make_node("MatMul", ["x4", "H"], ["r4"]))
        qdq("r4", "r4d")
        nodes.append(helper.make_node("Reshape", ["r4d", const([0, 0, I], "t3")], ["xd"]))
    elif form == "flat2d":
        nodes.append(helper.make_node("Reshape", ["x", const([-1, B], "t2")], ["x2"]))
        nodes.append(helper.make_node("MatMul", ["x2", "H"], ["r2"]))
        nodes.append(helper.make_node("Reshape", ["r2", shape_built("x", [I], "t3")], ["r3"]))
        qdq("r3", "xd")
    else:
        raise SystemExit(f"unknown form {form}; forms: {', '.join(FORMS)}")
    nodes.append(helper.make_node("MatMul", ["xd", "Wd"], ["y"]))
    g = helper.make_graph(nodes, form, [helper.make_tensor_value_info("x", TP.FLOAT, ["batch", "seq", I])],
                          [helper.make_tensor_value_info("y", TP.FLOAT, ["batch", "seq", O])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(m)
    return m


def build_and_time(path: Path, fp16: bool, shape=(4, 256, I)) -> dict:
    import tensorrt as trt
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, Profile, TrtRunner

    prof = Profile().add("x", (1, 1, I), shape, (8, 512, I))
    t0 = time.time()
    plan = EngineBytesFromNetwork(NetworkFromOnnxPath(str(path)), config=CreateConfig(int8=True, fp16=fp16, profiles=[prof]))()
    build_s = time.time() - t0
    runtime = trt.Runtime(trt.Logger(trt.Logger.ERROR))
    engine = runtime.deserialize_cuda_engine(plan)
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    with TrtRunner(engine) as r:
        for _ in range(5):
            r.infer({"x": x})
        ts = []
        for _ in range(30):
            r.infer({"x": x})
            ts.append(r.last_inference_time() * 1e3)
    return {"engine_bytes": len(plan), "build_s": round(build_s, 1), "infer_ms_median": round(float(np.median(ts)), 3),
            "int8_weight": len(plan) < 0.75 * I * O * 2}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--forms", default=",".join(FORMS))
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = {}
    for form in a.forms.split(","):
        p = out / f"{form}.onnx"
        onnx.save(graph(form), str(p))
        try:
            rows[form] = build_and_time(p, fp16=form != "nofp16")
        except Exception as e:  # a form 8.6 refuses is a result too
            rows[form] = {"error": f"{type(e).__name__}: {e}"[:300]}
        print(form, json.dumps(rows[form]), flush=True)
    (out / "probe.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
