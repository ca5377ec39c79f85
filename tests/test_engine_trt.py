"""Real TensorRT + GPU checks of the engine side (skipped without them): build INT8 (explicit Q/DQ) and FP16
engines of a tiny language model made with onnx.helper, run them, and compare them with ONNX Runtime.

On the lent GPU (TensorRT 8.6 kit, CPython 3.10, no pytest there):
    source /opt/trt86/env.sh && PYTHONPATH=.:tests $TRTPY $TRTPY -m pytest --noconftest tests/test_engine_trt.py
or with pytest available:  python -m pytest tests/test_engine_trt.py
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed (these tests need TensorRT and an NVIDIA GPU)")

from sq_export.engine.trt_compat import gpu_info, parse_version  # noqa: E402

_GPU = gpu_info()
if _GPU["count"] < 1:
    pytest.skip(f"no NVIDIA GPU visible ({_GPU['error']})", allow_module_level=True)

from sq_export.engine.build import build_engine  # noqa: E402
from sq_export.engine.compare import compare  # noqa: E402
from sq_export.engine.run import engine_perplexity, input_dtypes, load_engine, onnx_perplexity  # noqa: E402
from sq_export.errors import BadInput  # noqa: E402
from test_engine_models import tiny_lm, token_file  # noqa: E402

pytestmark = pytest.mark.trt
MAJOR = parse_version(trt.__version__)[0]
BATCH = (1, 2, 4)
SEQ = (1, 16, 32)


@pytest.fixture
def files(tmp_path):
    return {
        "float": tiny_lm(tmp_path / "float.onnx"),
        "float16": tiny_lm(tmp_path / "float16.onnx", dtype="fp16"),
        "qdq": tiny_lm(tmp_path / "qdq.onnx", quant=True),
        "int8w": tiny_lm(tmp_path / "int8w.onnx", quant=True, weights="int8"),
        "tokens": token_file(tmp_path / "t.npz", n_chunks=6, seq_len=16, last_len=11),
        "dir": tmp_path,
    }


def test_int8_engine_builds_runs_and_matches_qdq_reference(files):
    eng = str(files["dir"] / "qdq.engine")
    cache = str(files["dir"] / "timing.cache")
    side = build_engine(files["qdq"], eng, precision="int8", batch=BATCH, seq=SEQ, timing_cache=cache)
    assert os.path.getsize(eng) == side["engine_bytes"] > 0
    with open(eng + ".json") as f:
        assert json.load(f)["tensorrt_version"] == trt.__version__
    assert side["precision"] == "int8" and side["plan"]["strongly_typed"] == (MAJOR >= 10)
    if MAJOR < 10:
        assert side["plan"]["int8_flag"] and side["plan"]["fp16_flag"]
    prof = side["profile"]
    assert (prof["batch"], prof["seq"], prof["inputs"]) == (list(BATCH), list(SEQ), ["input_ids", "attention_mask"])
    assert prof["shapes"]["input_ids"] == [[BATCH[i], SEQ[i]] for i in range(3)] and not side["decode_graph"]
    assert side["tactic_sources"] == []
    assert os.path.exists(cache)
    assert side["layer_precisions"]["available"], side["layer_precisions"]
    print("\nint8 engine layers:", json.dumps(side["layer_precisions"]["precision_counts"]), "io:", json.dumps(side["io"]))
    if MAJOR < 10:  # no INT64 I/O in 8.x: the parser made the token inputs INT32
        assert side["io"]["input_ids"]["dtype"].upper() == "INT32"

    near = compare([files["qdq"], eng], files["tokens"], batches=None, batch_size=2, min_cosine=0.999, min_top1=0.95)
    far = compare([files["float"], eng], files["tokens"], batches=None, batch_size=2, min_cosine=None, min_top1=None)
    mn = near["comparisons"][0]["outputs"]["logits"]
    mf = far["comparisons"][0]["outputs"]["logits"]
    print("int8 engine vs Q/DQ ONNX:", json.dumps(mn), "\nint8 engine vs float ONNX:", json.dumps(mf))
    assert near["passed"], mn
    # INT8 execution, shown numerically: far closer to the fake-quantized graph than to the float one.
    assert mn["mean_abs"] < 0.5 * mf["mean_abs"]

    p_eng = engine_perplexity(eng, files["tokens"], batch_size=4)
    p_ort = onnx_perplexity(files["qdq"], files["tokens"], batch_size=4)
    assert p_eng["predicted_tokens"] == p_ort["predicted_tokens"] == 5 * 15 + 10
    assert p_eng["perplexity"] == pytest.approx(p_ort["perplexity"], rel=1e-2)


def test_fp16_engine_matches_float_reference(files):
    src = files["float16"] if MAJOR >= 10 else files["float"]  # 10+: strongly typed, FP16 needs an FP16 graph
    eng = str(files["dir"] / "fp16.engine")
    side = build_engine(src, eng, precision="fp16", batch=BATCH, seq=SEQ)
    assert side["precision"] == "fp16" and side["engine_bytes"] > 0
    r = compare([files["float"], eng], files["tokens"], batches=None, batch_size=4, min_cosine=0.999, min_top1=0.95)
    print("\nfp16 engine vs float ONNX:", json.dumps(r["comparisons"][0]["outputs"]["logits"]))
    assert r["passed"]


def test_int8_weight_initializers_per_version(files):
    eng = str(files["dir"] / "int8w.engine")
    if MAJOR < 10:
        with pytest.raises(BadInput, match="--weights qdq"):
            build_engine(files["int8w"], eng, precision="int8", batch=BATCH, seq=SEQ)
        assert not os.path.exists(eng)
    else:
        build_engine(files["int8w"], eng, precision="int8", batch=BATCH, seq=SEQ)
        r = compare([files["qdq"], eng], files["tokens"], batches=2, min_cosine=0.999)
        assert r["passed"]


def test_precision_mismatch_is_refused(files):
    with pytest.raises(BadInput, match="--precision int8"):
        build_engine(files["qdq"], str(files["dir"] / "x.engine"), precision="fp16", batch=BATCH, seq=SEQ)
    with pytest.raises(BadInput, match="QuantizeLinear"):
        build_engine(files["float"], str(files["dir"] / "x.engine"), precision="int8", batch=BATCH, seq=SEQ)


def test_tokens_outside_profile_and_bad_engine(files):
    eng = str(files["dir"] / "small.engine")
    build_engine(files["qdq"], eng, precision="int8", batch=(1, 1, 2), seq=(1, 8, 8))
    with pytest.raises(BadInput, match="--seq"):
        engine_perplexity(eng, files["tokens"])
    junk = files["dir"] / "junk.engine"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(BadInput, match="deserialized"):
        load_engine(junk)


def test_cli_build_and_compare(files, capsys):
    import argparse

    from sq_export.commands import build as build_cmd
    from sq_export.commands import compare as compare_cmd

    p = argparse.ArgumentParser()
    sub = p.add_subparsers()
    build_cmd.add_parser(sub)
    compare_cmd.add_parser(sub)
    eng = str(files["dir"] / "cli.engine")
    a = p.parse_args(["build", files["qdq"], "-o", eng, "--batch", "1:2:4", "--seq", "1:16:32"])
    assert a.func(a) == 0
    assert "wrote" in capsys.readouterr().out
    a = p.parse_args(["compare", files["qdq"], eng, "--tokens", files["tokens"], "--batches", "0", "--perplexity"])
    assert a.func(a) == 0
    out = capsys.readouterr().out
    print(out)
    assert "overall: PASS" in out


def test_bench_cuda_graph_replay_gives_the_same_logits(files):
    """tools/bench_trt.py times a forward replayed as one captured CUDA graph: the replay must compute what the
    plain enqueue computes (same outputs) and be timed."""
    import sys
    from pathlib import Path

    from polygraphy.backend.trt import TrtRunner

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    import bench_trt

    eng = str(files["dir"] / "bench.engine")
    build_engine(files["qdq"], eng, precision="int8", batch=BATCH, seq=SEQ)
    rows = bench_trt.time_engine(eng, [(2, 16)], runs=5, warmup=2, vocab=None, cuda_graph=True)
    assert rows[0].get("cuda_graph_error") is None and rows[0]["cuda_graph_ms_median"] > 0
    ev = bench_trt.CudaEvents()
    host = bench_trt.make_tokens((2, 16), 50)
    with TrtRunner(load_engine(eng)) as r:
        dt = input_dtypes(r)  # TensorRT 8.x: int32 token inputs
        plain = {k: np.array(v) for k, v in r.infer({k: v.astype(dt[k]) for k, v in host.items()}).items()}
        name = next(iter(plain))
        out = r.context.get_tensor_address(name)  # where the plain run left its output (TensorRT 8.5+)
        assert out
        n = plain[name].size * plain[name].itemsize
        # capture, zero the output, replay the captured graph, read the output back: equal to the plain run
        graph, exe = ev.capture(r.stream.ptr, lambda: r.context.execute_async_v3(r.stream.ptr))
        ev.lib.cudaMemset(bench_trt.ctypes.c_void_p(out), 0, bench_trt.ctypes.c_size_t(n))
        ev.launch(exe, r.stream.ptr)
        r.stream.synchronize()
        got = np.empty_like(plain[name])
        ev.lib.cudaMemcpy(bench_trt.ctypes.c_void_p(got.ctypes.data), bench_trt.ctypes.c_void_p(out), bench_trt.ctypes.c_size_t(n), 2)
        ev.release(graph, exe)
    np.testing.assert_array_equal(got, plain[name])
