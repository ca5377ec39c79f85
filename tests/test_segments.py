"""Segmented graphs (sq_export.onnxio.segments, sq_export.engine.chain): every family's SmoothQuant graph, logits
and decode form, cut at layer boundaries runs as a chain with the whole graph's outputs bit for bit in ONNX
Runtime; only the residual stream crosses a cut; no weight byte is copied; the segment engines' build orchestration
and every refusal. (Under TensorRT: tests/test_engine_segments.py.)"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import FAMILIES, token_batches
from sq_export.cli import main
from sq_export.engine.run import model_kind, open_runner
from sq_export.errors import BadInput
from sq_export.onnxio.segments import plan_ranges, read_manifest, split

G = Path(__file__).resolve().parent / "fixtures" / "graphs"


def _tiny(family, layers=3):
    """A tiny `family` model of `layers` decoder layers, SmoothQuant W8A8 static (outliers injected)."""
    from sq_export.quant.calibrate import calibrate
    from sq_export.quant.qlinear import quantize_model, static_scales
    from sq_export.quant.smooth import apply_smoothing, smoothed_act_max
    from sq_export.synth import from_config, tiny_config

    cfg = tiny_config(family)
    cfg.num_hidden_layers = layers
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [cfg.layer_types[i % len(cfg.layer_types)] for i in range(layers)]
    model, fam = from_config(cfg)
    am = calibrate(model, fam, token_batches())
    am = smoothed_act_max(am, fam, apply_smoothing(model, fam, am, fam.default_alpha))
    names = fam.quantized_linears()
    quantize_model(model, names, "static", static_scales(am, names))
    return model, fam


def _feed(session_inputs, rng, past=3, seq=5, batch=2):
    dims = {"batch": batch, "sequence": seq, "past_sequence": past, "total_sequence": past + seq}
    feed = {}
    for name, shape in session_inputs:
        shp = [dims.get(d, d) for d in shape]
        if name == "input_ids":
            feed[name] = rng.integers(0, 100, shp).astype(np.int64)
        elif name == "attention_mask":
            m = np.ones(shp, np.int64)
            m[1, : shp[1] // 3] = 0  # left padding in one row
            feed[name] = m
        elif name == "position_ids":
            feed[name] = np.tile(np.arange(past, past + seq), (batch, 1)).astype(np.int64)
        else:
            feed[name] = rng.standard_normal(shp).astype(np.float32)
    return feed


def _whole_and_chain(path, manifest):
    whole = open_runner(path)
    chain = open_runner(manifest)
    with whole as w, chain as c:
        meta = w.get_input_metadata()
        feed = _feed([(n, list(shape)) for n, (_dt, shape) in meta.items()], np.random.default_rng(0))
        ref = {k: np.array(v) for k, v in w.infer(feed).items()}
        got = {k: np.array(v) for k, v in c.infer(feed).items()}
    return ref, got


@pytest.mark.parametrize("family", FAMILIES)
def test_chain_equals_whole_graph_every_family(family, tmp_path):
    from sq_export.export.decode import export_decode_onnx
    from sq_export.export.exporter import export_onnx

    model, fam = _tiny(family)
    export_onnx(model, fam, tmp_path / "sq.onnx", weights="qdq", meta={"mode": "sq"})
    export_decode_onnx(model, fam, tmp_path / "dec.onnx", weights="qdq", meta={"mode": "sq"})
    for name, n_out in (("sq", 1), ("dec", 1 + 2 * 3)):
        man = split(tmp_path / f"{name}.onnx", segments=3)
        assert [e["layers"] for e in man["segments"]] == [[0, 0], [1, 1], [2, 2]]
        for e in man["segments"][1:]:
            # only the residual stream (and per-layer KV inputs, graph inputs) crosses a cut
            cross = [v for v in e["inputs"] if v not in man["inputs"]]
            assert len(cross) == 1, (family, name, e["file"], cross)
            seg = onnx.load(str(tmp_path / e["file"]), load_external_data=False)
            vi = next(i for i in seg.graph.input if i.name == cross[0])
            dims = [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]
            assert vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT and len(dims) == 3 and dims[:2] == ["batch", "sequence"]
        assert model_kind(man["path"]) == "onnx"
        ref, got = _whole_and_chain(tmp_path / f"{name}.onnx", man["path"])
        assert len(ref) == n_out and set(got) == set(ref)
        for k in ref:
            np.testing.assert_array_equal(got[k], ref[k], err_msg=f"{family} {name} {k}")


def test_weight_only_nodes_stay_with_their_layers(tmp_path, monkeypatch):
    """qdq16 graphs hold each weight as float16 -> Cast (a node outside any layer's name scope): the Cast of a big
    weight is computed in the segment that uses it, not handed across cuts (on the H200 the first split of a 7B
    graph made segment 0 output every later layer's float32 weights). Tiny weights are "big" here by lowering the
    threshold."""
    from sq_export.export.exporter import export_onnx
    from sq_export.onnxio import segments

    model, fam = _tiny("llama")
    export_onnx(model, fam, tmp_path / "q16.onnx", weights="qdq16", meta={"mode": "sq"})
    monkeypatch.setattr(segments, "BIG_INITIALIZER", 512)
    man = split(tmp_path / "q16.onnx", segments=3)
    assert [len(e["outputs"]) for e in man["segments"]] == [1, 1, 1]
    assert [len([v for v in e["inputs"] if v not in man["inputs"]]) for e in man["segments"]] == [0, 1, 1]
    ref, got = _whole_and_chain(tmp_path / "q16.onnx", man["path"])
    np.testing.assert_array_equal(got["logits"], ref["logits"])


def test_segments_point_into_the_source_weights(tmp_path):
    """No weight is copied: a single-file graph's segments read the .onnx's own bytes, an external-data graph's
    segments its .data file; either way the chain is bit-exact and the segment files hold no weights."""
    from sq_export.export.exporter import export_onnx

    model, fam = _tiny("llama", layers=4)
    export_onnx(model, fam, tmp_path / "a.onnx", weights="qdq", meta={"mode": "sq"})
    ext = tmp_path / "ext"
    ext.mkdir()
    m = onnx.load(str(tmp_path / "a.onnx"))
    onnx.save_model(m, str(ext / "b.onnx"), save_as_external_data=True, all_tensors_to_one_file=True, location="b.onnx.data", size_threshold=0)
    for src, data in ((tmp_path / "a.onnx", "a.onnx"), (ext / "b.onnx", "b.onnx.data")):
        man = split(src, layers_per_segment=2)
        total = 0
        for e in man["segments"]:
            p = src.parent / e["file"]
            seg = onnx.load(str(p), load_external_data=False)
            locs = {kv.value for t in seg.graph.initializer for kv in t.external_data if kv.key == "location"}
            assert locs == {data}
            assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in seg.graph.initializer)
            total += p.stat().st_size
            assert e["weight_bytes"] > 0
        assert total < src.stat().st_size // 2 or data != "a.onnx"
        ref, got = _whole_and_chain(src, man["path"])
        np.testing.assert_array_equal(got["logits"], ref["logits"])


def test_plan_ranges():
    assert plan_ranges(32, segments=8)[:2] == [(0, 3), (4, 7)]
    assert plan_ranges(30, segments=4) == [(0, 7), (8, 15), (16, 22), (23, 29)]
    assert plan_ranges(5, layers_per_segment=2) == [(0, 1), (2, 3), (4, 4)]
    for kw in ({"segments": 0}, {"segments": 6}, {"layers_per_segment": 0}, {}, {"segments": 2, "layers_per_segment": 2}):
        with pytest.raises(BadInput):
            plan_ranges(5, **kw)


def test_refusals(tmp_path, capsys):
    # a graph without decoder layers: one line, exit 2, nothing written
    src = tmp_path / "plain.onnx"
    src.write_bytes((G / "plain_no_norm_no_qdq.onnx").read_bytes())
    assert main(["split", str(src), "--segments", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no decoder-layer nodes" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.onnx"]
    # too many segments for the layers
    dec = tmp_path / "dec.onnx"
    dec.write_bytes((G / "decode_llama_sq.onnx").read_bytes())
    assert main(["split", str(dec), "--segments", "3"]) == 2
    assert "1..2" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dec.onnx", "plain.onnx"]
    # the manifest must sit beside the graph
    assert main(["split", str(dec), "--segments", "2", "-o", str(tmp_path / "sub" / "x.segments.json")]) == 2
    assert "beside" in capsys.readouterr().err
    assert main(["split", str(dec), "--segments", "2"]) == 0
    man = tmp_path / "dec.segments.json"
    assert len(json.loads(man.read_text())["segments"]) == 2
    # build: an engine manifest must be named *.segments.json (checked before TensorRT is needed)
    assert main(["build", str(man), "-o", str(tmp_path / "dec.engine")]) == 2
    assert "must end with .segments.json" in capsys.readouterr().err
    # a member gone: every reader says which
    (tmp_path / "dec.seg01.onnx").unlink()
    with pytest.raises(BadInput, match="dec.seg01.onnx is missing"):
        read_manifest(man)
    assert main(["compare", str(dec), str(man), "--tokens", str(G / "decode_llama.npz")]) == 2
    assert "missing" in capsys.readouterr().err
    (tmp_path / "junk.segments.json").write_text("{}")
    with pytest.raises(BadInput, match="not a segment manifest"):
        model_kind(tmp_path / "junk.segments.json")


FAKE_BUILD = """
import json, os, sys, time
args = sys.argv[1:]
assert args[:2] == ["-m", "sq_export"] and args[2] == "build", args
seg, out = args[3], args[args.index("-o") + 1]
if os.environ.get("CHATTY"):
    for _ in range(5000):  # ~500 KB of log: more than a pipe holds
        print("[W] a chatty builder " * 5, file=sys.stderr)
if os.environ.get("FAIL_ON") and os.environ["FAIL_ON"] in seg:
    print("TensorRT ran out of memory", file=sys.stderr)
    sys.exit(1)
time.sleep(0.2)
open(out, "wb").write(b"x" * 100)
open(out + ".json", "w").write(json.dumps({"build_seconds": 0.2, "args": args[6:], "gpu": os.environ.get("CUDA_VISIBLE_DEVICES")}))
"""


def test_build_segments_runs_each_build_and_writes_the_manifest_last(tmp_path, monkeypatch):
    """The orchestration (no TensorRT here): one `sq-export build` process per segment with the forwarded options,
    `jobs` at a time; the engine manifest lists them in order; a failed segment leaves no manifest."""
    from sq_export.engine.chain import build_segments

    dec = tmp_path / "dec.onnx"
    dec.write_bytes((G / "decode_llama_sq.onnx").read_bytes())
    split(dec, segments=2)
    fake = tmp_path / "fakepy"
    fake.write_text(f"#!{sys.executable}\n" + FAKE_BUILD)
    fake.chmod(0o755)
    out = tmp_path / "e" / "dec.segments.json"
    out.parent.mkdir()
    man = build_segments(tmp_path / "dec.segments.json", out, jobs=2, build_args=["--precision", "int8", "--past", "1:16:32"], python=str(fake))
    assert [e["file"] for e in man["segments"]] == ["dec.seg00.engine", "dec.seg01.engine"]
    assert [e["onnx"] for e in man["segments"]] == ["dec.seg00.onnx", "dec.seg01.onnx"]
    assert man["engine_bytes"] == 200 and man["kind"] == "engine" and out.is_file()
    side = json.loads((out.parent / "dec.seg01.engine.json").read_text())
    assert side["args"] == ["--precision", "int8", "--past", "1:16:32"]
    assert model_kind(out) == "engine"
    monkeypatch.setenv("FAIL_ON", "seg01")
    out2 = tmp_path / "e" / "bad.segments.json"
    with pytest.raises(BadInput, match=r"segment 1 \(dec.seg01.onnx\) did not build \(exit 1\): TensorRT ran out of memory"):
        build_segments(tmp_path / "dec.segments.json", out2, jobs=1, python=str(fake))
    assert not out2.exists()
    # the first segment fails, one build at a time: the second is never started
    monkeypatch.setenv("FAIL_ON", "seg00")
    out3 = tmp_path / "e" / "first.segments.json"
    with pytest.raises(BadInput, match=r"segment 0 \(dec.seg00.onnx\) did not build"):
        build_segments(tmp_path / "dec.segments.json", out3, jobs=1, python=str(fake))
    assert not out3.exists() and not (out3.parent / "first.seg01.engine").exists()
    # a builder that logs more than a pipe holds still finishes (its log is read while it runs)
    monkeypatch.delenv("FAIL_ON")
    monkeypatch.setenv("CHATTY", "1")
    assert build_segments(tmp_path / "dec.segments.json", tmp_path / "e" / "chatty.segments.json", jobs=2, python=str(fake))["engine_bytes"] == 200
    monkeypatch.delenv("CHATTY")
    # --gpus: two builds at once on two GPUs get one each (each process sees its own as CUDA_VISIBLE_DEVICES)
    man = build_segments(tmp_path / "dec.segments.json", tmp_path / "e" / "gpus.segments.json", jobs=2, python=str(fake), gpus=["0", "1"])
    seen = sorted(json.loads((tmp_path / "e" / f"gpus.seg0{i}.engine.json").read_text())["gpu"] for i in range(2))
    assert seen == ["0", "1"] and man["gpus"] == ["0", "1"]
    with pytest.raises(BadInput, match="--gpus takes CUDA device numbers"):
        build_segments(tmp_path / "dec.segments.json", tmp_path / "e" / "x.segments.json", python=str(fake), gpus=["cuda:0"])


def test_build_forwards_every_build_option():
    """`sq-export build MANIFEST` gives each segment the options it was given (the parser's defaults included)."""
    from sq_export.cli import build_parser
    from sq_export.commands.build import forwarded

    args = build_parser().parse_args(["build", "a.segments.json", "-o", "b.segments.json", "--precision", "fp16", "--seq", "1:64:256",
                                      "--kv-fp16", "--fp32-nodes", "Add$", "--opt-level", "0", "--tactic-sources", "CUBLAS"])
    got = forwarded(args)
    for want in (["--precision", "fp16"], ["--seq", "1:64:256"], ["--kv-fp16"], ["--fp32-nodes", "Add$"], ["--opt-level", "0"],
                 ["--tactic-sources", "CUBLAS"], ["--batch", "1:1:4"]):
        i = got.index(want[0])
        assert got[i:i + len(want)] == want
    assert "--no-fp16" not in got and "--fp16" not in got and "--jobs" not in got  # neither: each graph's own default
    one = build_parser().parse_args(["build", "a.segments.json", "-o", "b.segments.json", "--fp16"])
    assert "--fp16" in forwarded(one) and "--no-fp16" not in forwarded(one)
    with pytest.raises(SystemExit):  # one or the other
        build_parser().parse_args(["build", "a.onnx", "-o", "b.engine", "--fp16", "--no-fp16"])


def test_chain_refuses_a_segment_input_nobody_gives(tmp_path):
    """A manifest whose segment takes a value neither the graph inputs nor an earlier segment give is refused when
    the chain is opened (one line naming it), not mid-inference."""
    dec = tmp_path / "dec.onnx"
    dec.write_bytes((G / "decode_llama_sq.onnx").read_bytes())
    man = split(dec, segments=2)
    doc = json.loads(Path(man["path"]).read_text())
    doc["segments"][1]["inputs"].append("hidden_from_nowhere")
    Path(man["path"]).write_text(json.dumps(doc))
    with pytest.raises(BadInput, match="segment 1 takes hidden_from_nowhere"):
        open_runner(man["path"])


def test_chain_contexts_share_one_activation_buffer(monkeypatch):
    """A chain's engine contexts own no activation memory; one buffer of the largest segment's size is given to all
    of them when the chain is activated and freed when it is deactivated (TensorRT 8.x and 10+ APIs, stand-ins)."""
    import types

    import sq_export.engine.chain as chain
    from sq_export.engine.trt_compat import context_memory_size, context_without_device_memory, set_context_memory

    class Ctx8:  # TensorRT 8.x: a device_memory attribute
        device_memory = None

    class Ctx10:  # 10.1+: set_device_memory(ptr, size)
        got = None

        def set_device_memory(self, ptr, nbytes):
            self.got = (ptr, nbytes)

    class Engine8:
        def __init__(self, size):
            self.device_memory_size = size

        def create_execution_context_without_device_memory(self):
            return Ctx8()

    class Engine10:
        device_memory_size_v2 = 7

        def create_execution_context(self, strategy):
            assert strategy == "USER_MANAGED"
            return Ctx10()

    trt8 = types.SimpleNamespace()
    trt10 = types.SimpleNamespace(ExecutionContextAllocationStrategy=types.SimpleNamespace(USER_MANAGED="USER_MANAGED"))
    assert isinstance(context_without_device_memory(Engine8(5), trt8), Ctx8)
    c10 = context_without_device_memory(Engine10(), trt10)
    assert context_memory_size(Engine10()) == 7 and context_memory_size(Engine8(5)) == 5
    set_context_memory(c10, 0x40, 7)
    assert c10.got == (0x40, 7)

    freed = []

    class Buf:
        def __init__(self, n):
            self.ptr, self.allocated_nbytes = 0x9000, n

        def free(self):
            freed.append(self.ptr)

    monkeypatch.setattr(chain, "_device_buffer", Buf)
    scratch = chain.SharedScratch([Engine8(300), Engine8(1200), Engine8(800)])
    assert scratch.nbytes == 1200
    ctxs = [Ctx8(), Ctx8(), Ctx8()]
    scratch.attach(ctxs)
    assert [c.device_memory for c in ctxs] == [0x9000] * 3 and scratch.buffer.allocated_nbytes == 1200
    scratch.free()
    assert freed == [0x9000] and scratch.buffer is None

    # the chain runner attaches the buffer after activating its segments and frees it after deactivating them
    class TrtRunner:
        def __init__(self, ctx):
            self.context, self.is_active = ctx, False

        def activate(self):
            self.is_active = True

        def deactivate(self):
            self.is_active = False

        def get_input_metadata(self, use_numpy_dtypes=True):
            return {}

    man = {"inputs": ["input_ids"], "outputs": ["logits"], "segments": [{"inputs": ["input_ids"], "outputs": ["r"]}, {"inputs": ["r"], "outputs": ["logits"]}]}
    runners = [TrtRunner(Ctx8()), TrtRunner(Ctx8())]
    r = chain._chain_class()(man, runners, name="c", scratch=chain.SharedScratch([Engine8(10), Engine8(20)]))
    r.activate()
    assert [x.context.device_memory for x in runners] == [0x9000, 0x9000] and r.scratch.buffer.allocated_nbytes == 20
    r.deactivate()
    assert r.scratch.buffer is None and freed == [0x9000, 0x9000]


def test_eval_tokens_of_a_graph_and_its_segment_chain(tiny_dirs, tmp_path, capsys):
    """`eval X --tokens FILE`: the perplexity of an .onnx graph or a manifest on exactly those ids, with no torch
    imported (what `run --trt-python` asks the TensorRT side for); the chain's equals the whole graph's; a model
    folder with --tokens is refused in one line."""
    import subprocess

    from sq_export.cli import main

    d = tiny_dirs("llama")
    g, t = tmp_path / "sq.onnx", tmp_path / "t.npz"
    assert main(["-q", "export", str(d), "--samples", "4", "--calib-seq-len", "32", "-o", str(g)]) == 0
    assert main(["-q", "tokens", str(d), "--seq-len", "32", "--max-tokens", "128", "-o", str(t)]) == 0
    split(g, segments=2)
    capsys.readouterr()
    got = {}
    for m in (g, tmp_path / "sq.segments.json"):
        assert main(["eval", str(m), "--tokens", str(t), "--json"]) == 0
        got[m.name] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert got["sq.onnx"]["perplexity"] == got["sq.segments.json"]["perplexity"] and got["sq.onnx"]["predicted_tokens"] == 124
    assert got["sq.segments.json"]["kind"] == "onnx" and got["sq.onnx"]["backend"] == "onnxruntime"
    # torch-free: the same command with torch made unimportable
    code = ("import sys; sys.modules['torch'] = None; from sq_export.cli import main; "
            f"sys.exit(main(['eval', {str(g)!r}, '--tokens', {str(t)!r}, '--json']))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert p.returncode == 0, p.stderr[-500:]
    assert json.loads(p.stdout.strip().splitlines()[-1])["perplexity"] == got["sq.onnx"]["perplexity"]
    assert main(["eval", str(d), "--tokens", str(t)]) == 2
    assert "expected an .onnx graph, a TensorRT engine" in capsys.readouterr().err


@pytest.mark.parametrize("decode", [False, True])
def test_prefix_and_rotation_graphs_segment(tiny_dirs, tmp_path, decode):
    """Issue 17's best graph (outlier prefix + rotated down_proj inputs) cuts like any other: its shapes stay
    inferable through the rotation's Reshapes (a dynamic Reshape there once made the residual stream untypable at
    every cut) and the chain gives the whole graph's outputs bit for bit, prefix and all."""
    out = tmp_path / "pr.onnx"
    rc = main(["-q", "export", str(tiny_dirs("llama")), "--prefix-outliers", "2", "--smooth-pairs", "--alpha", "0.85",
               "--fallback", "none", "--rotate-down", "16", "--samples", "4", "--weights", "qdq", "-o", str(out)]
              + (["--decode"] if decode else []))
    assert rc == 0
    meta = {p.key: p.value for p in onnx.load(str(out), load_external_data=False).metadata_props}
    assert meta.get("sq_export.rotated_linears") and meta.get("sq_export.prefix_length"), sorted(meta)
    man = split(out, segments=2)
    ref, got = _whole_and_chain(out, man["path"])
    assert set(got) == set(ref) and len(ref) == (1 + 2 * 2 if decode else 1)
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
