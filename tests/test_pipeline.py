"""`sq-export run` on tiny Llama and OPT folders: artifacts, manifest, skipping, --force, --until, --alpha reruns,
interruption and resume, determinism."""

import json
from pathlib import Path

import pytest

from sq_export.cli import main

SMALL = ["--samples", "4", "--calib-seq-len", "32", "--max-tokens", "256", "--seq-len", "64"]
ARTIFACTS = ["act_scales.safetensors", "smoothed", "channel_stats.safetensors", "model.fp.onnx", "model.naive.onnx",
             "model.paper.onnx", "model.sq.onnx", "check.json", "eval.json", "report.md", "report.json", "manifest.json"]
MODES = {"fp", "naive", "paper", "sq"}  # the delivered model (sq: the default recipe) and the three beside it
PLOTS = ["act_channels.png", "weight_channels.png", "sqnr.png", "perplexity.png"]
STAGES = ["calibrate", "smooth", "export", "check", "build", "eval", "report"]


def write_texts(d):
    """calib.txt and eval.txt in `d`: the eval split is a slice of the calibration file far from the calibration
    slice, so the tests do not depend on calibration/heldout.txt being present in the checkout."""
    from sq_export.textdata import DEFAULT_CALIB

    full = DEFAULT_CALIB.read_text()
    (d / "calib.txt").write_text(full[:20000])
    (d / "eval.txt").write_text(full[400000:408000])
    return d


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    return write_texts(tmp_path_factory.mktemp("pipeline_text"))


def run(model, out, texts, *extra):
    argv = ["-q", "run", str(model), "-o", str(out), *SMALL, "--calib-text", str(texts / "calib.txt"),
            "--text", str(texts / "eval.txt"), *map(str, extra)]
    return main(argv)


def manifest(out):
    return json.loads((Path(out) / "manifest.json").read_text())


def snapshot(out):
    """{relative path: (mtime_ns, bytes)} of every file under OUT except the manifest (rewritten on every run)."""
    out = Path(out)
    return {p.relative_to(out).as_posix(): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(out.rglob("*")) if p.is_file() and p.name != "manifest.json"}


def assert_complete(out):
    out = Path(out)
    for a in ARTIFACTS:
        assert (out / a).exists(), a
    for p in PLOTS:
        assert (out / "plots" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", p
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "temp/staging leftovers"
    m = manifest(out)
    assert m["schema"] == "sq_export.run/1" and m["last_run"]["status"] == "complete"
    for s in STAGES:
        rec = m["stages"][s]
        assert set(rec) >= {"status", "inputs", "options", "outputs", "versions", "wall_s"}
        assert set(rec["versions"]) >= {"torch", "transformers", "onnx", "onnxruntime", "sq_export"}
        for o in rec["outputs"].values():
            assert (out / o["path"]).exists() and len(o["sha256"]) == 64
    # no TensorRT here: the build stage is recorded as skipped, with the reason
    b = m["stages"]["build"]
    assert b["status"] == "skipped" and "TensorRT" in b["reason"] and not b["outputs"]
    ev = json.loads((out / "eval.json").read_text())
    for backend in ("pytorch", "onnxruntime"):
        assert set(ev["perplexity"][backend]) == MODES
        assert all(1.0 < v < 1e4 for v in ev["perplexity"][backend].values())
    # ONNX Runtime runs the same graphs PyTorch fake-quantizes: close perplexities
    for mode in MODES:
        assert ev["perplexity"]["onnxruntime"][mode] == pytest.approx(ev["perplexity"]["pytorch"][mode], rel=2e-3)
    assert json.loads((out / "check.json").read_text())["ok"] is True
    assert ev["recipes"]["sq"] == ("SmoothQuant W8A8, norm + pair smoothing, alpha auto (per group), fallback auto (max 10%), "
                                   "down_proj input rotated (Hadamard blocks of 64)")
    md = (out / "report.md").read_text()
    assert "default recipe (delivered)" in md and "paper recipe" in md  # leads with the delivered recipe
    assert "Size, SmoothQuant vs FP32: graph " in md
    assert md.startswith("# SmoothQuant W8A8 report") and "**Perplexity**" in md.splitlines()[2]
    for p in PLOTS:
        assert f"plots/{p}" in md
    rep = json.loads((out / "report.json").read_text())
    assert rep["channels"]["act_max_before"]["ratio"] > 5 * rep["channels"]["act_max_after"]["ratio"]  # outliers flattened
    assert rep["headline"]["mean_sqnr_db"]["sq"] > rep["headline"]["mean_sqnr_db"]["naive"]
    return m


@pytest.fixture(scope="module")
def llama_run(tiny_dirs, texts, tmp_path_factory):
    out = tmp_path_factory.mktemp("run_llama") / "out"
    assert run(tiny_dirs("llama"), out, texts) == 0
    return out


def test_full_run_then_rerun_skips_then_force_redoes(llama_run, tiny_dirs, texts):
    out = llama_run
    m = assert_complete(out)
    assert m["last_run"]["ran"] == [s for s in STAGES if s != "build"]
    assert m["stages"]["report"]["outputs"].keys() >= {"report.md", "report.json", "plots"}
    before = snapshot(out)

    assert run(tiny_dirs("llama"), out, texts) == 0
    m = manifest(out)
    assert m["last_run"]["ran"] == [] and m["last_run"]["skipped"] == STAGES
    assert all(m["stages"][s]["status"] == "skipped" for s in STAGES)
    assert "up to date" in m["stages"]["export"]["reason"]
    assert snapshot(out) == before  # nothing rewritten: same mtimes, same bytes

    assert run(tiny_dirs("llama"), out, texts, "--force") == 0
    m = manifest(out)
    assert m["last_run"]["ran"] == [s for s in STAGES if s != "build"]
    after = snapshot(out)
    assert after["model.sq.onnx"][0] != before["model.sq.onnx"][0]  # rewritten ...
    for f in ("model.sq.onnx", "model.naive.onnx", "model.fp.onnx", "act_scales.safetensors"):
        assert after[f][1] == before[f][1]  # ... with the same bytes


def test_deterministic_across_folders_and_alpha_change(llama_run, tiny_dirs, texts, tmp_path):
    out = tmp_path / "b"
    assert run(tiny_dirs("llama"), out, texts, "--until", "export") == 0
    for f in ("act_scales.safetensors", "channel_stats.safetensors", "model.fp.onnx", "model.naive.onnx", "model.sq.onnx",
              "smoothed/model.safetensors"):
        assert (out / f).read_bytes() == (llama_run / f).read_bytes(), f
    m = manifest(out)
    assert m["last_run"]["status"] == "stopped after export" and list(m["stages"]) == ["calibrate", "smooth", "export"]
    assert not (out / "check.json").exists() and not (out / "report.md").exists()
    act_before = snapshot(out)["act_scales.safetensors"]

    assert run(tiny_dirs("llama"), out, texts, "--alpha", "0.5") == 0
    m = manifest(out)
    assert m["last_run"]["skipped"] == ["calibrate", "build"]
    assert m["last_run"]["ran"] == ["smooth", "export", "check", "eval", "report"]
    assert snapshot(out)["act_scales.safetensors"] == act_before  # calibration untouched
    assert (out / "model.sq.onnx").read_bytes() != (llama_run / "model.sq.onnx").read_bytes()
    assert (out / "model.naive.onnx").read_bytes() == (llama_run / "model.naive.onnx").read_bytes()
    assert json.loads((out / "report.json").read_text())["alpha"] == 0.5


def test_interrupted_stage_leaves_no_final_file_and_resumes(tiny_dirs, texts, tmp_path, monkeypatch):
    import sq_export.export.exporter as pl  # the run's export stage calls export_onnx from here

    real = pl.export_onnx
    calls = []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 2:  # one ONNX written (in staging), then Ctrl-C in the middle of the stage
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(pl, "export_onnx", flaky)
    out = tmp_path / "c"
    assert run(tiny_dirs("llama"), out, texts) == 130
    assert not list(out.glob("model.*")), "no file at a final path of the interrupted stage"
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "no temp/staging leftovers"
    m = manifest(out)
    assert m["stages"]["export"]["status"] == "interrupted" and m["last_run"]["status"] == "interrupted"
    assert m["stages"]["smooth"]["status"] == "ran" and "check" not in m["stages"]

    monkeypatch.setattr(pl, "export_onnx", real)
    assert run(tiny_dirs("llama"), out, texts, "--until", "check") == 0
    m = manifest(out)
    assert m["last_run"]["skipped"] == ["calibrate", "smooth"] and m["last_run"]["ran"] == ["export", "check"]
    assert all((out / f"model.{x}.onnx").is_file() for x in ("fp", "naive", "sq"))

    # a check violation fails the run (exit 1), keeps check.json for reading, and the stage reruns next time
    import sq_export.passes.check as ck
    from sq_export.passes._graph import Violation

    real_check = ck.run_check

    def bad_check(path, **k):
        r = real_check(path, **k)
        r.violations.append(Violation("SQ001", "fake_node", "injected by the test"))
        return r

    monkeypatch.setattr(ck, "run_check", bad_check)
    (out / "check.json").unlink()  # a missing output makes its stage run again
    assert run(tiny_dirs("llama"), out, texts, "--until", "check") == 1
    assert json.loads((out / "check.json").read_text())["ok"] is False
    assert manifest(out)["stages"]["check"]["status"] == "failed"
    monkeypatch.setattr(ck, "run_check", real_check)
    assert run(tiny_dirs("llama"), out, texts, "--until", "check") == 0  # a failed stage is not "up to date"
    assert manifest(out)["last_run"]["ran"] == ["check"]


def test_opt_full_run_and_rerun(tiny_dirs, texts, tmp_path):
    out = tmp_path / "opt"
    assert run(tiny_dirs("opt"), out, texts) == 0
    assert_complete(out)
    before = snapshot(out)
    assert run(tiny_dirs("opt"), out, texts) == 0
    assert manifest(out)["last_run"]["ran"] == []
    assert snapshot(out) == before


def test_run_help_and_bad_options(capsys, tmp_path, tiny_dirs):
    with pytest.raises(SystemExit) as e:
        main(["run", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--until STAGE" in out and "examples:" in out and "--force" in out
    assert main(["-q", "run", str(tiny_dirs("llama")), "-o", str(tmp_path / "x"), "--alpha", "1.5"]) == 2
    assert main(["-q", "run", str(tmp_path / "nope"), "-o", str(tmp_path / "x")]) == 2


def test_build_stage_wiring_with_a_fake_tensorrt(llama_run, tiny_dirs, texts, tmp_path, monkeypatch, capsys):
    """No TensorRT here: stand-ins for its public functions check how build and eval use engines, and that an
    engine whose perplexity leaves its graph's makes `run` fail."""
    import shutil
    import types

    import sq_export.engine.build as eb
    import sq_export.engine.run as er
    import sq_export.engine.trt_compat as tc
    from sq_export.errors import BadInput

    out = tmp_path / "trt"
    shutil.copytree(llama_run, out)
    built = []

    def fake_build(onnx, dest, precision="int8", batch=None, seq=None, **k):
        if precision == "fp16":
            raise BadInput("TensorRT 10.0.0 builds strongly typed networks ... this graph is FP32")
        built.append((Path(onnx).name, precision, tuple(seq)))
        Path(dest).write_bytes(b"engine:" + Path(onnx).read_bytes()[:64])
        return {"engine": str(dest), "engine_bytes": Path(dest).stat().st_size, "build_seconds": 0.1, "tensorrt_version": "10.0.0"}

    monkeypatch.setattr(tc, "import_tensorrt", lambda: types.SimpleNamespace(__version__="10.0.0"))
    monkeypatch.setattr(tc, "require_gpu", lambda: {"name": "FakeGPU"})
    monkeypatch.setattr(eb, "build_engine", fake_build)
    import numpy as np

    from sq_export.measure.perplexity import onnx_perplexity

    drift = {"factor": 1.0}

    def fake_engine_ppl(path, toks, *a, **k):
        # a faithful engine computes its graph's function: ONNX Runtime on model.X.onnx, same chunks, times a drift
        ids = np.concatenate([toks.input_ids[i, : toks.lengths[i]] for i in range(toks.n_chunks)])
        ppl = onnx_perplexity(str(Path(path).with_suffix(".onnx")), ids, int(toks.input_ids.shape[1]), len(ids))["perplexity"]
        return {"perplexity": ppl * drift["factor"]}

    monkeypatch.setattr(er, "engine_perplexity", fake_engine_ppl)
    assert run(tiny_dirs("llama"), out, texts) == 0
    m = manifest(out)
    assert m["last_run"]["ran"] == ["build", "eval", "report"]
    assert sorted(built) == [(f"model.{x}.onnx", "int8", (1, 64, 64)) for x in ("naive", "paper", "sq")]
    assert set(m["stages"]["build"]["outputs"]) == {"build.json"} | {f"model.{x}.engine{j}" for x in ("naive", "paper", "sq") for j in ("", ".json")}
    assert "fp16" not in json.dumps(built) and "strongly typed" in json.loads((out / "build.json").read_text())["fp"]["reason"]
    ev = json.loads((out / "eval.json").read_text())
    ort, trt = ev["perplexity"]["onnxruntime"], ev["perplexity"]["tensorrt"]
    assert set(trt) == {"naive", "paper", "sq"} and all(trt[k] == pytest.approx(ort[k], rel=1e-6) for k in trt)
    assert all(v["ok"] and v["ratio"] == pytest.approx(1.0) for v in ev["engine_vs_graph"].values())
    md = (out / "report.md").read_text()
    assert "| model | PyTorch | ONNX Runtime | TensorRT |" in md and f"{trt['sq']:.3f} |" in md
    assert run(tiny_dirs("llama"), out, texts) == 0
    assert manifest(out)["last_run"]["ran"] == []  # engines up to date too
    # an engine 30 % above its graph (an FP16 overflow gives 100-1000x): the run says so in one line and exits 1
    drift["factor"] = 1.3
    capsys.readouterr()
    assert run(tiny_dirs("llama"), out, texts, "--force") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not compute its graph" in err[0] and "--no-fp16" in err[0]
    ev = json.loads((out / "eval.json").read_text())
    assert not ev["engine_vs_graph"]["sq"]["ok"] and ev["engine_vs_graph"]["sq"]["ratio"] == pytest.approx(1.3)
    assert "does not compute its graph" in (out / "report.md").read_text()


# ----- the accuracy options (--smooth-pairs, --alpha auto, --clip, --fallback) ---------------------------------
def _float_linears(onnx_path):
    """Module paths of the Linears exported without Q/DQ: MatMul/Gemm reading a float initializer (lm_head excluded)."""
    import onnx

    g = onnx.load(str(onnx_path)).graph
    inits = {i.name for i in g.initializer}
    out = []
    for n in g.node:
        if n.op_type in ("MatMul", "Gemm") and any(i in inits for i in n.input) and "lm_head" not in n.name:
            out.append(n.name)
    return out


def test_accuracy_options_pairs_auto_alpha_then_fallback_then_no_pairs(tiny_dirs, texts, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from sq_export.onnxio.meta import read_metadata

    d = tiny_dirs("llama")
    out = tmp_path / "acc"
    assert run(d, out, texts, "--smooth-pairs", "--alpha", "auto", "--fallback", "none") == 0
    m = manifest(out)
    assert m["last_run"]["ran"] == [s for s in STAGES if s != "build"]
    assert m["stages"]["smooth"]["options"]["smooth_pairs"] is True and m["stages"]["export"]["options"]["alpha"] == "auto"
    assert "calib_rows.safetensors" in m["stages"]["calibrate"]["outputs"]
    # α per group (norm groups and the up→down / v→o pairs) in the manifest, eval.json, the ONNX and the report
    apg = m["stages"]["smooth"]["summary"]["alpha_per_group"]
    assert len(apg) == 4 * 2 and any(k.endswith("mlp.up_proj") for k in apg) and any(k.endswith("self_attn.v_proj") for k in apg)
    rep = json.loads((out / "report.json").read_text())
    assert rep["alpha"] == "auto" and rep["alpha_per_group"] == apg and rep["recipe"]["smooth_pairs"] is True
    assert json.loads(read_metadata(out / "model.sq.onnx")["alpha_per_group"]) == apg
    assert "Alpha per smoothing group" in (out / "report.md").read_text()
    assert json.loads((out / "check.json").read_text())["ok"] is True
    ev = json.loads((out / "eval.json").read_text())
    assert ev["recipe"]["alpha_per_group"] == apg and ev["recipe"]["fp16_layers"] == []
    for mode in MODES:
        assert ev["perplexity"]["onnxruntime"][mode] == pytest.approx(ev["perplexity"]["pytorch"][mode], rel=2e-3)
    # SQ is compared with the smoothed float model: pair producers (outputs divided by s) are not ~0 dB
    sq_db = {r["linear"]: r["sq"] for r in ev["layer_sqnr_db"]}
    assert all(sq_db[n] > 10 for n in sq_db if n.endswith(("up_proj", "v_proj"))), sq_db
    # the saved smoothed folder holds the pair folds and still computes the float model's function
    orig = AutoModelForCausalLM.from_pretrained(d).eval()
    sm = AutoModelForCausalLM.from_pretrained(out / "smoothed").eval()
    up = "model.layers.0.mlp.up_proj"
    assert not torch.equal(orig.get_submodule(up).weight, sm.get_submodule(up).weight)
    x = torch.randint(4, 200, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = orig(input_ids=x).logits, sm(input_ids=x).logits
    assert float((a - b).abs().max()) <= 1e-3 * max(1.0, float(a.abs().max()))
    before = snapshot(out)

    # --fallback 2: export and later only; exactly 2 Linears without Q/DQ in the SQ graph, check still clean
    assert run(d, out, texts, "--smooth-pairs", "--alpha", "auto", "--fallback", "2") == 0
    m = manifest(out)
    assert m["last_run"]["ran"] == ["export", "check", "eval", "report"]
    assert m["last_run"]["skipped"] == ["calibrate", "smooth", "build"]
    fp16 = m["stages"]["export"]["summary"]["sq"]["fp16_layers"]
    assert len(fp16) == 2 and m["stages"]["export"]["options"]["fallback"] == "2"
    floats = _float_linears(out / "model.sq.onnx")
    assert len(floats) == 2 and _float_linears(out / "model.naive.onnx") == []
    for n in fp16:  # model.layers.1.mlp.down_proj -> /model/model/layers.1/mlp/down_proj/MatMul
        path = "/" + n.replace("layers.", "layers#").replace(".", "/").replace("layers#", "layers.") + "/"
        assert sum(path in f for f in floats) == 1, (path, floats)
    assert read_metadata(out / "model.sq.onnx")["fp16_layers"] == ",".join(fp16)
    assert json.loads((out / "check.json").read_text())["ok"] is True
    assert json.loads((out / "eval.json").read_text())["recipe"]["fp16_layers"] == fp16
    assert json.loads((out / "report.json").read_text())["fp16_layers"] == fp16
    assert all(f"`{n}`" in (out / "report.md").read_text() for n in fp16)
    after = snapshot(out)
    for f in ("act_scales.safetensors", "calib_rows.safetensors", "smoothed/model.safetensors"):
        assert after[f] == before[f], f  # not rewritten
    assert after["model.naive.onnx"][1] == before["model.naive.onnx"][1]  # rewritten by the stage, same baseline bytes
    assert after["model.sq.onnx"][1] != before["model.sq.onnx"][1]

    # without --smooth-pairs: smooth and later rerun, calibration kept (stopping after check keeps the test short)
    assert run(d, out, texts, "--no-smooth-pairs", "--alpha", "auto", "--fallback", "2", "--until", "check") == 0
    m = manifest(out)
    assert m["last_run"]["ran"] == ["smooth", "export", "check"] and m["last_run"]["skipped"] == ["calibrate"]
    assert snapshot(out)["act_scales.safetensors"] == before["act_scales.safetensors"]
    apg2 = m["stages"]["smooth"]["summary"]["alpha_per_group"]
    assert len(apg2) == 4 and not any(k.endswith(("up_proj", "v_proj")) for k in apg2)
    assert "smooth_pairs" not in read_metadata(out / "model.sq.onnx") and len(_float_linears(out / "model.sq.onnx")) == 2
    assert json.loads((out / "check.json").read_text())["ok"] is True
    # a recipe needing no row sample reuses the calibration that took one (no recalibration)
    assert run(d, out, texts, "--recipe", "paper", "--until", "calibrate") == 0
    assert manifest(out)["last_run"]["skipped"] == ["calibrate"]


def test_run_with_an_outlier_prefix(tiny_dirs, texts, tmp_path):
    """`run --prefix-outliers`: the calibrate stage chooses the prefix and writes its float KV cache
    (prefix.safetensors); every quantized model runs after it in PyTorch, its graphs carry it (ONNX Runtime =
    PyTorch), the graph check passes, eval reports the float model with the prefix beside the plain one; a rerun
    skips every stage, and a run without the prefix into the same folder redoes them and drops the file."""
    import onnx

    from sq_export.quant.prefix import load_prefix

    out = tmp_path / "px"
    assert run(tiny_dirs("llama"), out, texts, "--prefix-outliers", "ids:1,5", "--fallback", "none") == 0
    assert "FP32 after the outlier prefix" in (out / "report.md").read_text()
    pre = load_prefix(out / "prefix.safetensors")
    assert pre.tokens == [1, 5] and len(pre.keys) == 2 and pre.keys[0].shape[2] == 2
    ev = json.loads((out / "eval.json").read_text())
    pt, ort = ev["perplexity"]["pytorch"], ev["perplexity"]["onnxruntime"]
    assert set(pt) == MODES | {"fp_prefix"} and set(ort) == MODES
    for m in ("naive", "paper", "sq"):  # the graphs run after the same prefix as the PyTorch models
        assert ort[m] == pytest.approx(pt[m], rel=2e-3), m
    assert ort["fp"] == pytest.approx(pt["fp"], rel=1e-4)  # the float graph: plain (the reference without prefix)
    assert ev["recipe"]["prefix_outliers"]["tokens"] == [1, 5]
    meta = {p.key: p.value for p in onnx.load(str(out / "model.sq.onnx"), load_external_data=False).metadata_props}
    assert meta["sq_export.prefix_outliers"] == "1,5"
    assert json.loads((out / "check.json").read_text())["ok"]
    m = manifest(out)
    assert m["stages"]["calibrate"]["options"]["prefix_outliers"] == "ids:1,5"
    assert run(tiny_dirs("llama"), out, texts, "--prefix-outliers", "ids:1,5", "--fallback", "none") == 0
    assert manifest(out)["last_run"]["ran"] == []
    assert run(tiny_dirs("llama"), out, texts, "--fallback", "none", "--until", "export") == 0
    assert "calibrate" in manifest(out)["last_run"]["ran"] and not (out / "prefix.safetensors").exists()


def test_run_with_the_down_proj_rotation(tiny_dirs, texts, tmp_path):
    """`run --rotate-down 32`: the delivered model's down_proj inputs rotated (its graph carries the rotation and the
    metadata; ONNX Runtime = PyTorch), the paper and naive baselines without it; the export and eval stages record
    the option, so a run with `--rotate-down none` into the same folder redoes them."""
    import onnx

    out = tmp_path / "rot"
    assert run(tiny_dirs("llama"), out, texts, "--rotate-down", "32", "--fallback", "none") == 0
    ev = json.loads((out / "eval.json").read_text())
    pt, ort = ev["perplexity"]["pytorch"], ev["perplexity"]["onnxruntime"]
    for m in ("naive", "paper", "sq"):
        assert ort[m] == pytest.approx(pt[m], rel=2e-3), m

    def meta(mode):
        return {p.key: p.value for p in onnx.load(str(out / f"model.{mode}.onnx"), load_external_data=False).metadata_props}

    assert meta("sq")["sq_export.rotate_down"] == "32"
    assert "sq_export.rotate_down" not in meta("paper") and "sq_export.rotate_down" not in meta("naive")
    assert "down_proj input rotated" in ev["recipes"]["sq"]
    m = manifest(out)
    assert m["stages"]["export"]["options"]["rotate_down"] == 32 and m["stages"]["eval"]["options"]["rotate_down"] == 32
    assert run(tiny_dirs("llama"), out, texts, "--fallback", "none", "--rotate-down", "none") == 0
    assert {"export", "eval"} <= set(manifest(out)["last_run"]["ran"])
    assert "sq_export.rotate_down" not in meta("sq")
    with pytest.raises(SystemExit):
        main(["-q", "run", str(tiny_dirs("llama")), "-o", str(tmp_path / "s"), "--stream", "--rotate-down", "x"])
    # streamed too: the smoothed folder's record names the rotated Linears (tests/test_stream.py checks what they compute)
    assert run(tiny_dirs("llama"), tmp_path / "s", texts, "--stream", "--rotate-down", "32", "--until", "smooth") == 0
    recs = list((tmp_path / "s").rglob("sq_quant.json"))
    assert len(recs) == 1 and json.loads(recs[0].read_text())["rotated"] == [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
