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


class _FakeTrt:
    """Stand-ins for what time_chain touches of TensorRT and Polygraphy (no TensorRT on the CPU): engines whose
    dtypes are numpy dtypes, contexts that record shapes, addresses and enqueues, device arrays with fake pointers."""

    def __init__(self, specs: dict, limits: dict):
        import itertools

        self.specs, self.limits, self.log, self.ptrs = specs, limits, [], itertools.count(0x1000, 0x1000)
        self.scratch, self.mem = [], []  # raw buffers allocated; (engine, activation memory) at each enqueue
        fake = self

        class Engine:
            def __init__(self, path):
                self.name = Path(path).name
                self.io = specs[self.name]  # {tensor: (dtype, "in" | shape function of the input shapes)}
                self.num_io_tensors = len(self.io)

            def get_tensor_name(self, i):
                return list(self.io)[i]

            def get_tensor_dtype(self, n):
                return self.io[n][0]

            @property
            def device_memory_size(self):  # activation memory of a context: differs per segment
                return 1000 * (1 + int(self.name.split(".seg")[1][:2]))

            def create_execution_context_without_device_memory(self):
                return Context(self, own_memory=False)

        class Context:
            def __init__(self, engine, own_memory=True):
                self.engine, self.shapes, self.addr = engine, {}, {}
                self.device_memory = "own" if own_memory else None

            def set_input_shape(self, n, shape):
                assert self.engine.io[n][1] == "in"
                self.shapes[n] = tuple(shape)
                return True

            def get_tensor_shape(self, n):
                return self.engine.io[n][1](self.shapes)

            def set_tensor_address(self, n, ptr):
                self.addr[n] = ptr
                return True

            def execute_async_v3(self, stream):
                assert set(self.addr) == set(self.engine.io), "every I/O tensor bound before enqueue"
                assert self.device_memory is not None, "activation memory set before enqueue"
                fake.mem.append((self.engine.name, self.device_memory))
                fake.log.append((self.engine.name, stream, dict(self.addr)))
                return True

        class Stream:
            ptr = 0xABC

            def synchronize(self):
                pass

        class Runner:
            def __init__(self, engine, name=None):  # Polygraphy's TrtRunner takes an engine or a context
                if isinstance(engine, Context):
                    self.engine, self.context = engine.engine, engine
                else:
                    self.engine, self.context = engine, Context(engine)
                self.stream = Stream()

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

            def profile_limits(self):
                return fake.limits[self.engine.name]

        class DeviceArray:
            def __init__(self, shape, dtype):
                import numpy as np

                self.shape, self.dtype, self.ptr, self.filled = tuple(shape), np.dtype(dtype), next(fake.ptrs), None
                self.allocated_nbytes = int(np.prod(self.shape)) * self.dtype.itemsize

            @classmethod
            def raw(cls, shape):
                fake.scratch.append(cls(shape, "uint8"))
                return fake.scratch[-1]

            def copy_from(self, arr):
                assert arr.shape == self.shape and arr.dtype == self.dtype
                self.filled = arr

            def free(self):
                pass

        class Events:
            captured = 0

            def create(self):
                return object()

            def record(self, ev, stream):
                assert stream == Stream.ptr

            def elapsed_ms(self, start, end):
                return 2.0

            def destroy(self, ev):
                pass

            def capture(self, stream, enqueue):
                Events.captured += 1
                assert enqueue()
                return "graph", "exe"

            def launch(self, exe, stream):
                assert stream == Stream.ptr

            def release(self, graph, exe):
                pass

        self.Engine, self.Runner, self.DeviceArray, self.Events = Engine, Runner, DeviceArray, Events

    def install(self, monkeypatch, bench_trt):
        import types

        import polygraphy.backend.trt
        from polygraphy import cuda

        import sq_export.engine.run
        import sq_export.engine.trt_compat

        monkeypatch.setattr(bench_trt, "import_tensorrt", lambda: types.SimpleNamespace(nptype=lambda dt: dt))
        monkeypatch.setattr(sq_export.engine.trt_compat, "import_tensorrt", lambda: types.SimpleNamespace(nptype=lambda dt: dt))
        monkeypatch.setattr(bench_trt, "load_engine", self.Engine)
        monkeypatch.setattr(sq_export.engine.run, "load_engine", self.Engine)
        monkeypatch.setattr(bench_trt, "CudaEvents", self.Events)
        monkeypatch.setattr(polygraphy.backend.trt, "TrtRunner", self.Runner)
        monkeypatch.setattr(cuda, "DeviceArray", self.DeviceArray)


def _decode_chain(tmp_path, b=8, past=512, kvh=4, hd=16, h=64, v=300):
    """A 2-segment decode engine manifest (2 layers each) with a static profile batch b, past `past`."""
    import numpy as np

    pasts = [[f"past_key_values.{i}.{kv}" for i in range(2 * k, 2 * k + 2) for kv in ("key", "value")] for k in range(2)]
    i32, f16, f32 = np.dtype(np.int32), np.dtype(np.float16), np.dtype(np.float32)
    toks = {"input_ids": (i32, "in"), "attention_mask": (i32, "in"), "position_ids": (i32, "in")}

    def present(name):
        p = name.replace("present.", "past_key_values.")
        return lambda s: (s[p][0], s[p][1], s[p][2] + 1, s[p][3])

    specs, limits, segments = {}, {}, []
    for k in range(2):
        ins = (["input_ids"] if k == 0 else [RESID0]) + ["attention_mask", "position_ids"] + pasts[k]
        pres = [p.replace("past_key_values.", "present.") for p in pasts[k]]
        outs = ([RESID0] if k == 0 else ["logits"]) + pres
        io = {n: toks.get(n, (f16 if n.startswith("past") else f32, "in")) for n in ins}
        io[outs[0]] = (f32, (lambda s: (s["attention_mask"][0], 1, h)) if k == 0 else (lambda s: (s[RESID0][0], 1, v)))
        io.update({n: (f16, present(n)) for n in pres})
        name = f"dec.seg{k:02d}.engine"
        specs[name] = io
        lim = {"attention_mask": ((b, past + 1),) * 3, "position_ids": ((b, 1),) * 3}
        lim.update({n: ((b, kvh, past, hd),) * 3 for n in pasts[k]})
        lim["input_ids" if k == 0 else RESID0] = ((b, 1),) * 3 if k == 0 else ((b, 1, h),) * 3
        limits[name] = lim
        (tmp_path / name).write_bytes(b"x")
        segments.append({"file": name, "layers": [2 * k, 2 * k + 1], "inputs": ins, "outputs": outs, "onnx": f"dec.seg{k:02d}.onnx"})
    import json

    from sq_export.onnxio.segments import FORMAT

    man = tmp_path / "dec.segments.json"
    man.write_text(json.dumps({"format": FORMAT, "kind": "engine", "inputs": ["input_ids", "attention_mask", "position_ids", *pasts[0], *pasts[1]],
                               "outputs": ["logits"] + [p.replace("past_key_values.", "present.") for p in pasts[0] + pasts[1]],
                               "segments": segments}))
    return man, specs, limits


def test_time_chain_binds_one_stream_and_shared_buffers_against_fakes(tmp_path, monkeypatch):
    """time_chain's control flow on the CPU: every segment on the runner-0 stream in order, the residual stream one
    address for producer and consumer, graph inputs one address for every segment, the chain captured as one graph."""
    import bench_trt

    b, past = 8, 512
    man, specs, limits = _decode_chain(tmp_path, b=b, past=past)
    fake = _FakeTrt(specs, limits)
    fake.install(monkeypatch, bench_trt)
    rows = bench_trt.time_chain(man, [(b, 1)], runs=5, warmup=2, vocab=300, past_len=past, cuda_graph=True)
    assert len(rows) == 1 and rows[0]["shape"] == [b, 1] and rows[0]["past"] == past and rows[0]["segments"] == 2
    # both contexts ran on one shared activation buffer, as large as the larger segment's need (2,000 bytes)
    assert len(fake.scratch) == 1 and fake.scratch[0].allocated_nbytes == 2000
    assert {m for _, m in fake.mem} == {fake.scratch[0].ptr} and {n for n, _ in fake.mem} == {"dec.seg00.engine", "dec.seg01.engine"}
    assert rows[0]["gpu_ms_median"] == 2.0 and rows[0]["cuda_graph_ms_median"] == 2.0 and rows[0]["tokens_per_s"] == b / 2e-3
    # warm-up 2 + host-timed 5 + GPU-timed 5 + 1 captured, each a full chain in order on one stream
    assert [e[0] for e in fake.log] == ["dec.seg00.engine", "dec.seg01.engine"] * 13
    assert {e[1] for e in fake.log} == {0xABC} and fake.Events.captured == 1
    a0, a1 = fake.log[0][2], fake.log[1][2]
    assert a0[RESID0] == a1[RESID0]
    assert a0["attention_mask"] == a1["attention_mask"] and a0["position_ids"] == a1["position_ids"]
    assert len(set(a0.values()) | set(a1.values())) == len(set(a0) | set(a1))  # every other tensor its own buffer
    kv = b * 4 * past * 16 * 2
    expect = (2 * b * 4 + b * (past + 1) * 4 + b * 1 * 64 * 4 + b * 300 * 4  # ids + positions, mask, residual, logits
              + 8 * kv + 8 * (kv // past) * (past + 1))  # 8 past in, 8 present out (FP16)
    assert rows[0]["device_buffer_bytes"] == expect
    # a batch outside the static profile: one error naming the input and the options
    from sq_export.errors import BadInput

    with pytest.raises(BadInput, match=r"segment 0 \(dec.seg00.engine\): input_ids \[32, 1\] is outside its profile \[8, 1\]\.\.\[8, 1\].*--batches/--past"):
        bench_trt.time_chain(man, [(32, 1)], runs=5, warmup=2, vocab=300, past_len=past)


def test_engines_mode_main_and_prefill_chain_against_fakes(tmp_path, monkeypatch, capsys):
    """main --engines end to end on fakes: a decode FP16/INT8 pair of manifests (no ONNX beside them: the bound is
    left out with a note) and a prefill chain whose feed comes from the token path (int32 ids, mask)."""
    import json

    import bench_trt
    import numpy as np

    dirs = []
    for name in ("fp", "sq"):
        (tmp_path / name).mkdir()
        dirs.append(_decode_chain(tmp_path / name, b=8, past=64))
    specs = dict(dirs[0][1])
    fake = _FakeTrt(specs, dirs[0][2])
    fake.install(monkeypatch, bench_trt)
    monkeypatch.setattr(bench_trt, "require_gpu", lambda: {"name": "NVIDIA H200"})
    monkeypatch.setattr(bench_trt, "import_tensorrt", lambda: __import__("types").SimpleNamespace(nptype=lambda dt: dt, __version__="8.6.fake"))
    out = tmp_path / "r.json"
    assert bench_trt.main(["--engines", "--decode", "--batches", "8", "--past", "64", str(dirs[0][0]), str(dirs[1][0]),
                           "--runs", "4", "--warmup", "1", "--cuda-graph", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "note: fp16: no weight bound" in text and "note: int8: no weight bound" in text
    rep = json.loads(out.read_text())
    assert rep["prebuilt_engines"] and rep["speedup_int8_over_fp16"] == {"b8": 1.0}
    assert rep["engines"]["int8"]["segments"] == 2 and rep["engines"]["fp16"]["engine_bytes"] == 2
    assert rep["cuda_graph_speedup_over_fp16"] == {"int8": {"b8": 1.0}}

    # prefill: segment 0 takes the tokens, segment 1 the mask and the residual stream
    i32, f32 = np.dtype(np.int32), np.dtype(np.float32)
    pspecs = {"p.seg00.engine": {"input_ids": (i32, "in"), "attention_mask": (i32, "in"), RESID0: (f32, lambda s: (*s["input_ids"], 64))},
              "p.seg01.engine": {"attention_mask": (i32, "in"), RESID0: (f32, "in"), "logits": (f32, lambda s: (*s[RESID0][:2], 300))}}
    big = {"input_ids": ((1, 1), (4, 256), (8, 512)), "attention_mask": ((1, 1), (4, 256), (8, 512)), RESID0: ((1, 1, 64), (4, 256, 64), (8, 512, 64))}
    plimits = {"p.seg00.engine": big, "p.seg01.engine": big}
    segs = [{"file": "p.seg00.engine", "inputs": ["input_ids", "attention_mask"], "outputs": [RESID0]},
            {"file": "p.seg01.engine", "inputs": ["attention_mask", RESID0], "outputs": ["logits"]}]
    for s in segs:
        (tmp_path / s["file"]).write_bytes(b"x")
    man = tmp_path / "p.segments.json"
    man.write_text(json.dumps({"format": "sq_export.segments/1", "kind": "engine", "inputs": ["input_ids", "attention_mask"],
                               "outputs": ["logits"], "segments": segs}))
    fake = _FakeTrt(pspecs, plimits)
    fake.install(monkeypatch, bench_trt)
    rows = bench_trt.time_chain(man, [(4, 256), (8, 512)], runs=3, warmup=1, vocab=300)
    assert [r["shape"] for r in rows] == [[4, 256], [8, 512]] and rows[1]["tokens"] == 8 * 512
    a0, a1 = fake.log[-2][2], fake.log[-1][2]
    assert a0[RESID0] == a1[RESID0] and a0["attention_mask"] == a1["attention_mask"]
    assert rows[1]["device_buffer_bytes"] == 2 * 8 * 512 * 4 + 8 * 512 * 64 * 4 + 8 * 512 * 300 * 4
