"""`sq-export run --stream` on a tiny Llama folder: the model is never loaded whole; model.sq.onnx is the bytes of
`export --stream DIR` with the same recipe (--fallback none, the --stream default) and model.fp.onnx the bytes of
`export --mode fp`; a second run skips every stage; switching --stream reruns; what --stream cannot do is refused
(exit 2, one line)."""

import json

import pytest

from sq_export.cli import main
from test_pipeline import STAGES, manifest, snapshot, write_texts
from test_pipeline import run as pipeline_run

CALIB = ["--samples", "4", "--calib-seq-len", "32"]


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    """Calibration and eval text as test_pipeline.py takes them (slices of the shipped calibration file)."""
    return write_texts(tmp_path_factory.mktemp("run_stream_text"))


def files(folder):
    """{relative path: bytes} of every file under `folder`."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class Passes:
    """Counts, while installed, the act-maxima hooks made (one per Linear a calibration pass measures) and the cached
    batches each streamed layer runs on."""

    def __init__(self, monkeypatch):
        import sq_export.stream.calibrate as sc
        from sq_export.stream.layers import LayerStream

        self.hooks, self.batches = 0, []
        real_hook, real_forward = sc.act_max_hook, LayerStream.forward

        def hook(*a, **k):
            self.hooks += 1
            return real_hook(*a, **k)

        def forward(ls, i, layer=None):
            self.batches.append(len(ls.hidden))
            return real_forward(ls, i, layer)

        monkeypatch.setattr(sc, "act_max_hook", hook)
        monkeypatch.setattr(LayerStream, "forward", forward)


def run(model, out, texts, *extra):
    return pipeline_run(model, out, texts, "--weights", "qdq16", *extra)


@pytest.fixture(scope="module")
def stream_run(tiny_dirs, texts, tmp_path_factory):
    import sq_export.run.context as context

    def whole(self):
        raise AssertionError("a --stream run loaded the whole model")

    real = context.RunContext.loaded
    context.RunContext.loaded = whole  # (also refused by the context itself; this makes the test independent of it)
    try:
        out = tmp_path_factory.mktemp("run_stream") / "out"
        assert run(tiny_dirs("llama"), out, texts, "--stream") == 0
    finally:
        context.RunContext.loaded = real
    return out


def test_stream_run_gives_the_export_commands_graphs(stream_run, tiny_dirs, texts, tmp_path):
    out, folder = stream_run, str(tiny_dirs("llama"))
    for f in ("act_scales.safetensors", "smoothed/sq_quant.json", "channel_stats.safetensors", "model.fp.onnx",
              "model.sq.onnx", "check.json", "eval.json", "report.md", "report.json", "plots/act_channels.png",
              "plots/weight_channels.png"):
        assert (out / f).is_file(), f
    assert not (out / "model.naive.onnx").exists() and not (out / "model.paper.onnx").exists()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "temp/staging leftovers"
    m = manifest(out)
    assert m["last_run"]["status"] == "complete"
    for s in ("calibrate", "smooth", "export", "eval"):
        assert m["stages"][s]["options"]["stream"] is True, s
    assert m["stages"]["smooth"]["options"]["fallback"] is None  # --fallback none: the --stream default
    assert "--stream default" in m["stages"]["smooth"]["summary"]["fallback"]
    # the act scales of the calibrate stage are those the streamed quantization measured
    assert (out / "act_scales.safetensors").read_bytes() == (out / "smoothed" / "act_scales.safetensors").read_bytes()

    cal = [*CALIB, "--calib-text", str(texts / "calib.txt")]
    exp = ["-q", "export", folder, "--weights", "qdq16", *cal]
    assert main([*exp, "--fallback", "none", "--stream", str(tmp_path / "q"), "-o", str(tmp_path / "sq.onnx")]) == 0
    assert (out / "model.sq.onnx").read_bytes() == (tmp_path / "sq.onnx").read_bytes()
    assert (out / "smoothed" / "sq_quant.json").read_bytes() == (tmp_path / "q" / "sq_quant.json").read_bytes()
    assert files(out / "smoothed") == files(tmp_path / "q")  # (the run's smooth stage took the calibrate stage's maxima)
    assert main([*exp, "--mode", "fp", "-o", str(tmp_path / "fp.onnx")]) == 0  # the whole model, loaded
    assert (out / "model.fp.onnx").read_bytes() == (tmp_path / "fp.onnx").read_bytes()

    ev = json.loads((out / "eval.json").read_text())
    assert ev["stream"] is True and ev["modes"] == ["fp", "sq"] and set(ev["perplexity"]) == {"pytorch"}
    assert set(ev["skipped"]) == {"onnxruntime", "layer_sqnr", "tensorrt"}  # no TensorRT here
    # the layer-streamed PyTorch perplexity is the whole models' (CPU, float32: bit for bit)
    from sq_export import api

    model, tok = api.load_model(folder, device="cpu")
    kw = dict(seq_len=64, max_tokens=256)
    assert ev["perplexity"]["pytorch"]["fp"] == api.perplexity(model, tok, texts / "eval.txt", **kw)["perplexity"]
    qm = api.load_quantized(out / "smoothed", device="cpu")
    assert ev["perplexity"]["pytorch"]["sq"] == api.perplexity(qm, tok, texts / "eval.txt", **kw)["perplexity"]
    assert ev["tokens"] == 252 and ev["perplexity"]["pytorch"]["sq"] != ev["perplexity"]["pytorch"]["fp"]
    assert set(ev["not_built"]) == {"naive", "paper"}
    assert json.loads((out / "check.json").read_text())["ok"] is True
    rep = json.loads((out / "report.json").read_text())
    assert rep["channels"]["act_max_before"]["ratio"] > 5 * rep["channels"]["act_max_after"]["ratio"]  # outliers flattened
    assert rep["channels"]["w_max_after"]["ratio"] > rep["channels"]["w_max_before"]["ratio"]  # moved into the weights
    md = (out / "report.md").read_text()
    assert f"**{ev['perplexity']['pytorch']['sq']:.3f}**" in md and "Layer-streamed run" in md and "naive W8A8" in md
    assert "--fallback none: the --stream default" in md


def test_stream_rerun_skips_and_switching_stream_reruns(stream_run, tiny_dirs, texts, tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(stream_run, out)
    before = snapshot(out)
    assert run(tiny_dirs("llama"), out, texts, "--stream") == 0
    m = manifest(out)
    assert m["last_run"]["ran"] == [] and m["last_run"]["skipped"] == STAGES
    assert snapshot(out) == before

    # the whole-model run does not take the streamed outputs as its own, and the other way round
    assert run(tiny_dirs("llama"), out, texts, "--until", "export") == 0
    assert manifest(out)["last_run"]["ran"] == ["calibrate", "smooth", "export"]
    assert (out / "model.naive.onnx").is_file()
    assert (out / "model.fp.onnx").read_bytes() == before["model.fp.onnx"][1]  # the same float graph either way
    # the same calibration and per-channel statistics either way (CPU, float32): the report plots the same channels
    for f in ("act_scales.safetensors", "channel_stats.safetensors"):
        assert (out / f).read_bytes() == before[f][1], f
    assert run(tiny_dirs("llama"), out, texts, "--stream", "--until", "check") == 0
    assert not (out / "model.naive.onnx").exists() and not (out / "model.paper.onnx").exists()  # not this run's
    m = manifest(out)
    assert m["last_run"]["ran"] == ["calibrate", "smooth", "export"]
    assert (out / "model.sq.onnx").read_bytes() == before["model.sq.onnx"][1]
    # check reads graphs only: its record (of the first streamed run, the same model.sq.onnx bytes) is up to date
    assert m["last_run"]["skipped"] == ["check"]


def test_stream_run_measures_the_engines(stream_run, tiny_dirs, texts, tmp_path, monkeypatch):
    """No TensorRT here: stand-ins (as test_pipeline's fake TensorRT) check that a streamed run builds fp and sq
    engines and that eval measures them; the report leads with their perplexity."""
    import shutil
    import types
    from pathlib import Path

    import numpy as np

    import sq_export.engine.build as eb
    import sq_export.engine.run as er
    import sq_export.engine.trt_compat as tc
    from sq_export.measure.perplexity import onnx_perplexity

    out = tmp_path / "trt"
    shutil.copytree(stream_run, out)
    built = []

    def fake_build(onnx, dest, precision="int8", batch=None, seq=None, **k):
        built.append((Path(onnx).name, precision))
        Path(dest).write_bytes(b"engine:" + Path(onnx).read_bytes()[:64])
        return {"engine": str(dest), "engine_bytes": Path(dest).stat().st_size, "build_seconds": 0.1, "tensorrt_version": "8.6.1"}

    def fake_engine_ppl(path, toks, *a, **k):
        ids = np.concatenate([toks.input_ids[i, : toks.lengths[i]] for i in range(toks.n_chunks)])
        return onnx_perplexity(str(Path(path).with_suffix(".onnx")), ids, int(toks.input_ids.shape[1]), len(ids))

    monkeypatch.setattr(tc, "import_tensorrt", lambda: types.SimpleNamespace(__version__="8.6.1"))
    monkeypatch.setattr(tc, "require_gpu", lambda: {"name": "FakeGPU"})
    monkeypatch.setattr(eb, "build_engine", fake_build)
    monkeypatch.setattr(er, "engine_perplexity", fake_engine_ppl)
    assert run(tiny_dirs("llama"), out, texts, "--stream") == 0
    assert manifest(out)["last_run"]["ran"] == ["build", "eval", "report"]
    assert sorted(built) == [("model.fp.onnx", "fp16"), ("model.sq.onnx", "int8")]
    ev = json.loads((out / "eval.json").read_text())
    trt = ev["perplexity"]["tensorrt"]
    assert set(trt) == {"fp", "sq"} and all(1.0 < v < 1e4 for v in trt.values()) and ev["tokens"] == 252  # 256 tokens in chunks of 64
    assert "tensorrt" not in ev["skipped"] and set(ev["perplexity"]["pytorch"]) == {"fp", "sq"}
    # each engine checked against the layer-streamed PyTorch model its graph was exported from
    agree = ev["engine_vs_graph"]
    assert set(agree) == {"fp", "sq"} and all(v["reference"] == "pytorch" and v["ok"] for v in agree.values())
    assert agree["sq"]["pytorch"] == ev["perplexity"]["pytorch"]["sq"]
    md = (out / "report.md").read_text()
    assert f"{trt['sq']:.3f}" in md and "TensorRT" in md


def test_stream_refusals(tiny_dirs, texts, tmp_path, capsys):
    folder = tiny_dirs("llama")
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 100)
    cases = [
        (folder, ["--fallback", "auto"], "--fallback auto"),
        (folder, ["--quantize-attention"], "--quantize-attention"),
        (folder, ["--quantize-lm-head"], "--quantize-lm-head"),
        (folder, ["--act-scales", str(tmp_path / "a.safetensors")], "--act-scales"),
        (folder, ["--prefix-outliers", "auto"], "--prefix-outliers"),
        (folder, ["--dtype", "fp16"], "--dtype fp16"),
        (gguf, [], "m.gguf"),
        ("smollm2", [], "smollm2"),
    ]
    capsys.readouterr()
    for model, extra, what in cases:
        out = tmp_path / "out"
        assert run(model, out, texts, "--stream", *extra) == 2, extra
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--stream" in err and what in err, err
        assert not out.exists()


def test_stream_fallback_rule_is_one_function(monkeypatch):
    """--stream's --fallback default (none: the presets' auto needs whole-model logits) is decided by
    sq_export.quant.recipe.stream_fallback alone: the run's options ask it (export --stream DIR too: test_stream.py's
    test_cli_stream_default_recipe_streams_with_fallback_none)."""
    import sq_export.run.options as options
    from sq_export.quant.recipe import make_recipe, stream_fallback
    from sq_export.run.options import RunOptions

    assert stream_fallback(None, make_recipe("default")) == ("none", True)
    assert stream_fallback(None, make_recipe("paper")) == ("none", False)
    assert stream_fallback("2", make_recipe("default")) == ("2", False)
    o = RunOptions(stream=True)
    assert o.sq_fallback() == "none" and o.stream_fallback_defaulted() and o.recipe_for("sq").fallback is None
    assert not RunOptions(stream=True, recipe="paper").stream_fallback_defaulted()
    assert RunOptions(stream=True, fallback="2").recipe_for("sq").fallback == "2"
    assert RunOptions().sq_fallback() is None and not RunOptions().stream_fallback_defaulted()
    assert RunOptions().recipe_for("sq").fallback == "auto"
    monkeypatch.setattr(options, "stream_fallback", lambda fallback, recipe: ("3", True))
    assert RunOptions(stream=True).recipe_for("sq").fallback == "3" and RunOptions(stream=True).stream_fallback_defaulted()


@pytest.mark.parametrize("recipe, kw, batches", [
    ("paper", {}, 1),  # no row sample: the float-equivalence check's batch only
    ("default", {"fallback": "2", "clip": "p99.9"}, 4),  # α search, clip and fallback N: every batch, for the rows
])
def test_streamed_quantization_takes_a_calibration(tiny_dirs, texts, tmp_path, monkeypatch, recipe, kw, batches):
    """quantize_streamed given calibrate_streamed's maxima does not measure them again (no act-maxima hook; the
    layers run on as many batches as the rows need) and writes the bytes of the quantization that measures them;
    maxima of other windows are refused in one line and nothing is written."""
    from sq_export import api
    from sq_export.errors import BadInput
    from sq_export.quant.recipe import CalibOptions, make_recipe

    folder = tiny_dirs("llama")
    tok = api.load_tokenizer(folder)
    r = make_recipe(recipe, calib=CalibOptions(str(texts / "calib.txt"), 8, 32, 2), **kw)  # 4 batches of 2
    cal = api.calibrate_streamed(folder, tok, texts / "calib.txt", samples=8, seq_len=32, batch_size=2, rows=None)
    api.quantize_streamed(folder, tmp_path / "measured", r, tokenizer=tok, device="cpu")
    n = Passes(monkeypatch)
    api.quantize_streamed(folder, tmp_path / "given", r, tokenizer=tok, device="cpu", calibration=cal)
    assert n.hooks == 0 and n.batches and set(n.batches) == {batches}
    assert files(tmp_path / "given") == files(tmp_path / "measured")
    other = api.calibrate_streamed(folder, tok, texts / "calib.txt", samples=4, seq_len=32, batch_size=2, rows=None)
    with pytest.raises(BadInput, match="other windows") as e:
        api.quantize_streamed(folder, tmp_path / "bad", r, tokenizer=tok, device="cpu", calibration=other)
    assert "\n" not in str(e.value) and not (tmp_path / "bad").exists()


def test_stream_run_calibrates_once(tiny_dirs, texts, tmp_path, monkeypatch):
    """run --stream measures the act maxima once (the calibrate stage); the smooth stage takes them and, with a
    recipe that needs no row sample, runs the layers on the first batch only; its smoothed/ is the bytes of
    `export --stream DIR` (which measures them itself)."""
    folder = tiny_dirs("llama")
    cal = ["--samples", "8", "--calib-batch", "2", "--recipe", "paper"]
    n = Passes(monkeypatch)
    assert run(folder, tmp_path / "out", texts, "--stream", *cal, "--until", "smooth") == 0
    assert manifest(tmp_path / "out")["last_run"]["ran"] == ["calibrate", "smooth"]
    linears = len(json.loads((tmp_path / "out" / "smoothed" / "sq_quant.json").read_text())["act_scales"])
    layers = len(n.batches) // 2
    assert n.hooks == linears  # one measuring pass
    assert n.batches == [4] * layers + [1] * layers  # calibrate: every batch; smooth: the check's batch
    monkeypatch.undo()
    exp = ["-q", "export", str(folder), "--weights", "qdq16", "--calib-text", str(texts / "calib.txt"), *CALIB, *cal]
    assert main([*exp, "--stream", str(tmp_path / "q"), "-o", str(tmp_path / "sq.onnx")]) == 0
    assert files(tmp_path / "out" / "smoothed") == files(tmp_path / "q")


def test_stream_run_with_segments(stream_run, tiny_dirs, texts, tmp_path, monkeypatch):
    """--segments 2 --build-jobs 2: export cuts each graph into 2 segments beside it (a changed option: export
    reruns), build makes one engine per segment through sq_export.engine.chain.build_segments (its `sq-export build`
    processes stood in for by a script: no TensorRT here), and eval measures each engine manifest as one chain: here
    the ONNX segments run through ONNX Runtime in its place, whose perplexity must agree with the layer-streamed
    PyTorch model as a whole engine's does."""
    import shutil
    import sys
    import types
    from pathlib import Path

    import sq_export.engine.chain as chain
    import sq_export.engine.run as er
    import sq_export.engine.trt_compat as tc
    from sq_export.onnxio.segments import read_manifest
    from test_segments import FAKE_BUILD

    out = tmp_path / "seg"
    shutil.copytree(stream_run, out)
    fake = tmp_path / "fakepy"
    fake.write_text(f"#!{sys.executable}\n" + FAKE_BUILD)
    fake.chmod(0o755)
    measured = []

    def chain_ppl(path, toks, *a, **k):  # the engine manifest's ONNX segments, chained in ONNX Runtime
        onnx_man = Path(path).with_name(Path(path).name.replace(".engines.segments.json", ".segments.json"))
        measured.append(onnx_man.name)
        return er.model_perplexity(onnx_man, toks)

    monkeypatch.setattr(tc, "import_tensorrt", lambda: types.SimpleNamespace(__version__="8.6.1"))
    monkeypatch.setattr(tc, "require_gpu", lambda: {"name": "FakeGPU"})
    real_build = chain.build_segments  # every segment build through the stand-in interpreter, whatever run passes
    monkeypatch.setattr(chain, "build_segments", lambda *a, python=None, **k: real_build(*a, python=str(fake), **k))
    monkeypatch.setattr(er, "engine_perplexity", chain_ppl)
    assert run(tiny_dirs("llama"), out, texts, "--stream", "--segments", "2", "--build-jobs", "2") == 0
    assert manifest(out)["last_run"]["ran"] == ["export", "build", "eval", "report"]  # the graphs themselves are unchanged: check is up to date
    for mode in ("fp", "sq"):
        man = read_manifest(out / f"model.{mode}.segments.json")
        assert [e["layers"] for e in man["segments"]] == [[0, 0], [1, 1]]
        eng = read_manifest(out / f"model.{mode}.engines.segments.json")
        assert eng["kind"] == "engine" and [e["file"] for e in eng["segments"]] == [f"model.{mode}.engines.seg0{i}.engine" for i in range(2)]
        side = json.loads((out / f"model.{mode}.engines.seg01.engine.json").read_text())
        assert side["args"][:2] == ["--precision", "fp16" if mode == "fp" else "int8"]
    assert sorted(measured) == ["model.fp.segments.json", "model.sq.segments.json"]
    ev = json.loads((out / "eval.json").read_text())
    agree = ev["engine_vs_graph"]
    assert set(agree) == {"fp", "sq"} and all(v["reference"] == "pytorch" and v["ok"] for v in agree.values())
    build = json.loads((out / "build.json").read_text())
    assert build["sq"]["segments"] == 2 and build["sq"]["engine"] == "model.sq.engines.segments.json"
    # bad values: one line, exit 2
    assert main(["-q", "run", str(tiny_dirs("llama")), "-o", str(tmp_path / "x"), "--segments", "0"]) == 2
    assert main(["-q", "run", str(tiny_dirs("llama")), "-o", str(tmp_path / "y"), "--build-jobs", "2"]) == 2
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


FAKE_TRT_PYTHON = r'''
import json, sys
from pathlib import Path
args = sys.argv[1:]
log = Path(__file__).with_suffix(".log")
with open(log, "a") as f:
    f.write(json.dumps(args) + "\n")
if args[0] == "-c":  # run's probe
    assert "import_tensorrt" in args[1]
    print(json.dumps({"tensorrt": "8.6.0", "gpu": {"name": "StandInGPU"}}))
    sys.exit(0)
assert args[:2] == ["-m", "sq_export"], args
rest = [a for a in args[2:] if a != "-q"]
if rest[0] == "build":  # an "engine": the graph's name inside, so eval can find the graph
    onnx, out = rest[1], rest[rest.index("-o") + 1]
    Path(out).write_text(onnx)
    side = {"engine": out, "engine_bytes": Path(out).stat().st_size, "build_seconds": 0.1, "tensorrt_version": "8.6.0",
            "precision": rest[rest.index("--precision") + 1]}
    Path(out + ".json").write_text(json.dumps(side))
    print(json.dumps(side))
elif rest[0] == "eval":  # the "engine"'s perplexity: its graph's, in ONNX Runtime, on the token file given
    from sq_export.engine.run import model_perplexity
    tokens = rest[rest.index("--tokens") + 1]
    r = model_perplexity(Path(rest[1]).read_text(), tokens)
    print(json.dumps({**r, "backend": "tensorrt"}))
else:
    sys.exit(f"unexpected {rest}")
'''


def test_stream_run_with_tensorrt_in_another_python(stream_run, tiny_dirs, texts, tmp_path, capsys):
    """--trt-python PATH: TensorRT is not importable here, so the build and the engines' perplexity go through PATH
    (`PATH -c probe`, `PATH -m sq_export build ... --json`, `PATH -m sq_export eval ENGINE --tokens FILE --json`): a
    stand-in interpreter here, whose "engines" are their graphs measured in ONNX Runtime; eval then checks them
    against the layer-streamed PyTorch model as it does in-process engines. A path that is no interpreter: one line."""
    import shutil
    import sys

    out = tmp_path / "ext"
    shutil.copytree(stream_run, out)
    fake = tmp_path / "trtpy"
    fake.write_text(f"#!{sys.executable}\n" + FAKE_TRT_PYTHON)
    fake.chmod(0o755)
    assert run(tiny_dirs("llama"), out, texts, "--stream", "--trt-python", str(fake)) == 0
    assert manifest(out)["last_run"]["ran"] == ["build", "eval", "report"]
    calls = [json.loads(line) for line in fake.with_suffix(".log").read_text().splitlines()]
    kinds = [c[0] if c[0] == "-c" else [a for a in c[2:] if a != "-q"][0] for c in calls]
    assert kinds.count("-c") >= 1 and kinds.count("build") == 2 and kinds.count("eval") == 2
    build = json.loads((out / "build.json").read_text())
    assert {m: build[m]["precision"] for m in ("fp", "sq")} == {"fp": "fp16", "sq": "int8"}
    ev = json.loads((out / "eval.json").read_text())
    agree = ev["engine_vs_graph"]
    assert set(agree) == {"fp", "sq"} and all(v["reference"] == "pytorch" and v["ok"] for v in agree.values())
    assert "tensorrt" not in ev["skipped"]
    capsys.readouterr()
    assert main(["-q", "run", str(tiny_dirs("llama")), "-o", str(tmp_path / "z"), "--trt-python", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--trt-python" in err and "not an executable Python" in err
    assert not (tmp_path / "z").exists()
