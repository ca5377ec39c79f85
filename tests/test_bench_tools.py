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
