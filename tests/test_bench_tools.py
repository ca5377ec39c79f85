"""tools/make_bench_model.py (Llama-2-7B / OPT-6.7B shapes, scaled down here) and tools/bench_trt.py's decode
bound: the bytes of weights a step must read, counted from the graph."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parent.parent / "tools"
sys.path.insert(0, str(TOOLS))


@pytest.fixture(scope="module")
def llama_graphs(tmp_path_factory):
    import make_bench_model

    out = tmp_path_factory.mktemp("bench")
    make_bench_model.main(["--family", "llama", "--layers", "2", "--hidden", "64", "--ffn", "96", "--heads", "4",
                           "--vocab", "300", "--decode", "-o", str(out)])
    return out


def test_weight_bytes_counts_int8_and_fp16_weights(llama_graphs):
    import bench_trt

    layers, h, f, v = 2, 64, 96, 300
    linear = layers * (4 * h * h + 3 * h * f)  # q k v o, gate up down: bias-free
    for stem in ("sq", "sq_dec"):
        wb = bench_trt.weight_bytes(llama_graphs / f"{stem}.onnx", "int8")
        # every decoder Linear INT8 (1 byte), the LM head FP16 (2 bytes), the embedding only gathered
        assert wb["int8_weight_bytes"] == linear
        assert wb["fp16_weight_bytes"] == 2 * v * h
        assert wb["gathered_table_elements"] == v * h
    fp = bench_trt.weight_bytes(llama_graphs / "fp.onnx", "fp16")
    assert fp["int8_weight_bytes"] == 0 and fp["bytes"] == 2 * (linear + v * h)
    # the same Q/DQ graph in an FP16 build reads FP16 weights
    assert bench_trt.weight_bytes(llama_graphs / "sq.onnx", "fp16")["bytes"] == fp["bytes"]


def test_bandwidth_by_gpu_name():
    import bench_trt

    assert bench_trt.bandwidth_tbs("NVIDIA H200", None) == 4.8
    assert bench_trt.bandwidth_tbs("NVIDIA H100 80GB HBM3", None) == 3.35
    assert bench_trt.bandwidth_tbs("Some GPU", None) is None
    assert bench_trt.bandwidth_tbs("NVIDIA H200", 4.3) == 4.3


def test_ncu_kernel_classes_of_tensorrt_8_6_decode_kernels():
    """Kernel names from the H200 decode profile (2026-11-29): Myelin names its fused kernels after their ops, and
    genericReformat's template arguments contain 'ReducedDivisors' (it had been counted as a norm)."""
    import ncu_kernels

    c = ncu_kernels.classify
    assert c("sm80_xmma_gemm_i8f32_i8i32_f32_tn_n_tilesize32x64x64_stage6_warpsize2x2x1_tensor16x8x32_execute_kernel_trt") == "int8 gemm"
    assert c("sm90_xmma_gemm_i8f32_i8i32_f32_tn_n_tilesize64x128x128_cgasize1x2x1_warpgroupsize1x1x1_beta0_execute_segment_k_off_kernel_trt") == "int8 gemm"
    assert c("sm80_xmma_gemm_f16f16_f16f16_f16_nn_n_tilesize32x32x64_stage6_warpsize2x2x1_tensor16x8x16_execute_kernel_trt") == "fp16 gemm"
    assert c("void genericReformat::copyVectorizedKernel<double, __half, float, 1, 0, 1>(unsigned int, const void *, "
             "genericReformat::ArrayN<T6>, genericReformat::ArrayNWithReducedDivisors<T6>)") == "reformat/copy"
    assert c("__myl_bb0_60_GatCasAbsMaxMaxDivMulDivDivMulMeaAddSqrDivMulMulCasMulMinMaxRouCas") == "norm"
    assert c("__myl_bb0_8_Cas") == "cast" and c("__myl_bb0_58_CasMov") == "cast"
    assert c("__myl_bb0_40_SliNegMov") == "rope/slice" and c("__myl_bb0_39_SliMov") == "rope/slice"
    assert c("mha2") == "softmax/attn"
    assert c("__myl_bb0_26_CasMulCasMulAdd") == "pointwise"


# ---- bench_trt --engines: engine manifests (sq-export split + build) timed as one chain -------------------------

RESID0, RESID1 = "/model/layers.0/Add_1_output_0", "/model/layers.1/Add_1_output_0"


def _prefill_io():
    graph_inputs = ["input_ids", "attention_mask"]
    segment_io = [(["input_ids", "attention_mask"], [RESID0]), (["attention_mask", RESID0], [RESID1]),
                  (["attention_mask", RESID1], ["logits"])]
    return graph_inputs, segment_io


def test_chain_plan_prefill_shares_the_residual_stream_and_graph_inputs():
    import bench_trt
    import numpy as np

    graph_inputs, segment_io = _prefill_io()
    b, t, h, v = 4, 256, 64, 300
    tok, res = ((b, t), np.int32), ((b, t, h), np.float32)
    seg_tensors = [{"input_ids": tok, "attention_mask": tok, RESID0: res},
                   {"attention_mask": tok, RESID0: res, RESID1: res},
                   {"attention_mask": tok, RESID1: res, "logits": ((b, t, v), np.float32)}]
    bindings, buffers = bench_trt.plan_chain_buffers(graph_inputs, segment_io, seg_tensors)
    # segment k's output and segment k+1's input: one buffer; the mask: one buffer bound by all three
    assert bindings[0][RESID0] == bindings[1][RESID0] and bindings[1][RESID1] == bindings[2][RESID1]
    assert len({bd["attention_mask"] for bd in bindings}) == 1
    assert set(buffers) == {"input_ids", "attention_mask", RESID0, RESID1, "logits"}
    assert buffers[RESID0]["bytes"] == b * t * h * 4 and buffers["input_ids"]["bytes"] == b * t * 4
    assert buffers["logits"]["bytes"] == b * t * v * 4 and buffers[RESID1]["shape"] == (b, t, h)


def test_chain_plan_decode_past_and_present_per_segment():
    import bench_trt
    import numpy as np

    past = [f"past_key_values.{i}.{kv}" for i in range(4) for kv in ("key", "value")]
    pres = [p.replace("past_key_values.", "present.") for p in past]
    graph_inputs = ["input_ids", "attention_mask", "position_ids", *past]
    segment_io = [(["input_ids", "attention_mask", "position_ids", *past[:4]], [RESID0, *pres[:4]]),
                  (["attention_mask", "position_ids", RESID0, *past[4:]], ["logits", *pres[4:]])]
    b, p, kvh, hd, h = 8, 512, 4, 16, 64
    i32 = np.int32
    seg_tensors = []
    for k, (ins, outs) in enumerate(segment_io):
        t = {"input_ids": ((b, 1), i32), "attention_mask": ((b, p + 1), i32), "position_ids": ((b, 1), i32),
             RESID0: ((b, 1, h), np.float32), "logits": ((b, 1, 300), np.float32)}
        t.update({n: ((b, kvh, p, hd), np.float16) for n in past})
        t.update({n: ((b, kvh, p + 1, hd), np.float16) for n in pres})
        seg_tensors.append({n: t[n] for n in ins + outs})
    bindings, buffers = bench_trt.plan_chain_buffers(graph_inputs, segment_io, seg_tensors)
    assert bindings[0][RESID0] == bindings[1][RESID0] == RESID0
    assert bindings[0]["position_ids"] == bindings[1]["position_ids"]
    # each segment binds only its own layers' cache; every past/present its own buffer
    assert set(bindings[0]) & set(past) == set(past[:4]) and set(bindings[1]) & set(pres) == set(pres[4:])
    assert all(n in buffers for n in past + pres)
    assert buffers[past[0]]["bytes"] == b * kvh * p * hd * 2 and buffers[pres[-1]]["bytes"] == b * kvh * (p + 1) * hd * 2
    assert buffers["attention_mask"]["bytes"] == b * (p + 1) * 4


def test_chain_plan_refuses_what_no_one_gives_and_disagreeing_views():
    import bench_trt
    import numpy as np

    from sq_export.errors import BadInput

    graph_inputs, segment_io = _prefill_io()
    broken = [segment_io[0], (["attention_mask", "/model/layers.0/mlp/Mul_output_0"], [RESID1]), segment_io[2]]
    with pytest.raises(BadInput, match=r"segment 1 takes /model/layers\.0/mlp/Mul_output_0, which neither the graph inputs nor an earlier segment give"):
        bench_trt.chain_bindings(graph_inputs, broken)
    # a later segment's output cannot feed an earlier one (order matters)
    with pytest.raises(BadInput, match=f"segment 1 takes {RESID1}"):
        bench_trt.chain_bindings(graph_inputs, [segment_io[0], (["attention_mask", RESID1], [RESID0]), segment_io[2]])
    with pytest.raises(BadInput, match="segment 1 returns .* segment 0's output too"):
        bench_trt.chain_bindings(graph_inputs, [segment_io[0], (["attention_mask", RESID0], [RESID0])])
    tok, res = ((1, 8), np.int32), ((1, 8, 16), np.float32)
    seg_tensors = [{"input_ids": tok, "attention_mask": tok, RESID0: res},
                   {"attention_mask": tok, RESID0: ((1, 8, 16), np.float16), RESID1: res},
                   {"attention_mask": tok, RESID1: res, "logits": ((1, 8, 30), np.float32)}]
    with pytest.raises(BadInput, match=f"segment 1 binds {RESID0} as float16"):
        bench_trt.plan_chain_buffers(graph_inputs, segment_io, seg_tensors)


def test_profile_misfit():
    import bench_trt

    lim = {"input_ids": ((8, 1), (8, 1), (8, 1)), "past_key_values.0.key": ((8, 4, 512, 16),) * 3}
    assert bench_trt.profile_misfit({"input_ids": (8, 1), "past_key_values.0.key": (8, 4, 512, 16), "x": (3,)}, lim) is None
    assert bench_trt.profile_misfit({"input_ids": (32, 1)}, lim) == "input_ids [32, 1] is outside its profile [8, 1]..[8, 1]"
    assert "past_key_values.0.key [8, 4, 256, 16]" in bench_trt.profile_misfit({"past_key_values.0.key": (8, 4, 256, 16)}, lim)


def _engine_manifest(onnx_man: dict, out: Path) -> Path:
    """The engine manifest `sq-export build` writes, with empty stand-in engines (no TensorRT here)."""
    import json

    from sq_export.onnxio.segments import FORMAT

    stem = out.name[: -len(".segments.json")]
    segs = []
    for i, e in enumerate(onnx_man["segments"]):
        eng = out.with_name(f"{stem}.seg{i:02d}.engine")
        eng.write_bytes(b"x")
        segs.append({"file": eng.name, "layers": e["layers"], "inputs": e["inputs"], "outputs": e["outputs"],
                     "onnx": e["file"], "engine_bytes": 1})
    out.write_text(json.dumps({"format": FORMAT, "kind": "engine", "inputs": onnx_man["inputs"], "outputs": onnx_man["outputs"],
                               "segments": segs, "wall_seconds": 1.0}))
    return out


def test_manifest_weight_bytes_is_the_whole_graphs(llama_graphs, tmp_path):
    """The weight bound of a segment chain: the sum over the segments' ONNX graphs equals the whole graph's count."""
    import shutil

    import bench_trt

    from sq_export.onnxio.segments import split

    for stem, prec in (("sq", "int8"), ("sq_dec", "int8"), ("fp", "fp16")):
        d = tmp_path / stem
        d.mkdir()
        for f in llama_graphs.iterdir():
            if f.name.startswith(stem + ".onnx"):  # the graph and its external data
                shutil.copy(f, d / f.name)
        man = split(d / f"{stem}.onnx", segments=2)
        eman = _engine_manifest(man, d / f"{stem}e.segments.json")
        graphs = bench_trt.engine_weight_graphs(eman)
        assert graphs == [d / e["file"] for e in man["segments"]]
        got = bench_trt.engines_weight_bytes(graphs, prec)
        whole = bench_trt.weight_bytes(d / f"{stem}.onnx", prec)
        assert got["graphs"] == 2
        assert {k: got[k] for k in whole} == whole, stem
        assert bench_trt.engines_facts(eman)["segments"] == 2
        # engines built elsewhere: no graph beside them and no sidecar -> None (the bound is left out with a note)
        far = tmp_path / f"{stem}_far"
        far.mkdir()
        assert bench_trt.engine_weight_graphs(_engine_manifest(man, far / "x.segments.json")) == [None, None]


def test_engines_mode_argument_checks(tmp_path, capsys):
    import bench_trt

    onnx_man = {"inputs": ["input_ids"], "outputs": ["logits"], "segments": [{"file": "a.seg00.onnx", "layers": [0, 1],
                                                                            "inputs": ["input_ids"], "outputs": ["logits"]}]}
    e16 = _engine_manifest(onnx_man, tmp_path / "fp.segments.json")
    e8 = _engine_manifest(onnx_man, tmp_path / "sq.segments.json")
    cases = [
        (["--engines", "fp.onnx", "sq.onnx"], "--engines takes engine manifests"),
        ([str(e16), str(e8)], "pass --engines"),
        (["--engines", str(e16), str(e8), "--reuse"], "--reuse is a build option"),
        (["--engines", "--decode", str(e16), str(e8), "--kv-fp16"], "--kv-fp16 is a build option"),
        (["--engines", str(e16), str(tmp_path / "none.engine")], "engine .*none.engine does not exist"),
    ]
    for argv, msg in cases:
        with pytest.raises(SystemExit):
            bench_trt.main(argv)
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert __import__("re").search(msg, err), (argv, err)
    (tmp_path / "o.seg00.onnx").write_bytes(b"x")
    (tmp_path / "o.segments.json").write_text(__import__("json").dumps({"format": "sq_export.segments/1", "kind": "onnx", **onnx_man,
                                                                        "segments": [{**onnx_man["segments"][0], "file": "o.seg00.onnx"}]}))
    with pytest.raises(SystemExit):
        bench_trt.main(["--engines", str(e16), str(tmp_path / "o.segments.json")])
    assert "lists ONNX segments: build them first" in capsys.readouterr().err
