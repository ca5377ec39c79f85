"""TensorRT decode engines (skipped without TensorRT and a GPU): build FP16 and INT8 engines of the KV-cache
decode fixtures (graphs/decode_llama_*, tests/fixtures/make_decode_fixtures.py), check each decode step against ONNX
Runtime on the same inputs (teacher-forced, so one flip cannot cascade), and greedy generation through
`sq-export generate ENGINE --prompts-file`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed (these tests need TensorRT and an NVIDIA GPU)")

from sq_export.engine.trt_compat import gpu_info  # noqa: E402

_GPU = gpu_info()
if _GPU["count"] < 1:
    pytest.skip(f"no NVIDIA GPU visible ({_GPU['error']})", allow_module_level=True)

import onnxruntime as ort  # noqa: E402

from sq_export.cli import main  # noqa: E402
from sq_export.engine.build import build_engine  # noqa: E402
from sq_export.engine.generate import EngineDecoder  # noqa: E402
from sq_export.kvcache import output_names, position_ids_for  # noqa: E402

pytestmark = pytest.mark.trt
G = Path(__file__).resolve().parent / "fixtures" / "graphs"
FIX = np.load(G / "decode_llama.npz")
PROFILE = dict(batch=(1, 1, 4), seq=(1, 8, 16), past=(1, 16, 32))


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    d = tmp_path_factory.mktemp("dec")
    out = {}
    for kind, prec, kv16 in (("fp", "fp16", False), ("sq", "int8", False), ("sq", "int8", True)):
        name = f"{kind}_{prec}{'_kv16' if kv16 else ''}"
        side = build_engine(G / f"decode_llama_{kind}.onnx", d / f"{name}.engine", precision=prec, kv_fp16=kv16, **PROFILE)
        out[name] = (d / f"{name}.engine", side)
    return out


def _teacher_forced(step, prompt, forced, n_layers, kvh, hd, kv_dtype, pad):
    """Logits of the prefill and of each forced decode step, through `step(feed) -> outputs`."""
    mask = np.concatenate([np.zeros((1, pad), np.int64), np.ones((1, len(prompt)), np.int64)], axis=1)
    past = {f"past_key_values.{i}.{kv}": np.zeros((1, kvh, pad, hd), kv_dtype) for i in range(n_layers) for kv in ("key", "value")}
    x = prompt[None].astype(np.int64)
    logits = []
    for t in [None, *forced]:
        if t is not None:
            x = np.array([[t]], np.int64)
            mask = np.concatenate([mask, np.ones((1, 1), np.int64)], axis=1)
        out = step({"input_ids": x, "attention_mask": mask, "position_ids": position_ids_for(mask, x.shape[1]), **past})
        logits.append(np.array(out["logits"], np.float32)[0, -1])
        past = {k: np.array(out["present." + k[len("past_key_values."):]]) for k in past}
    return np.stack(logits)


def _ort_step(kind):
    sess = ort.InferenceSession(str(G / f"decode_llama_{kind}.onnx"), providers=["CPUExecutionProvider"])
    outs = output_names(2)

    def step(feed):
        return dict(zip(outs, sess.run(outs, {k: np.asarray(v, np.float32) if k.startswith("past") else v for k, v in feed.items()})))

    return step


@pytest.mark.parametrize("name,kind", [("fp_fp16", "fp"), ("sq_int8", "sq"), ("sq_int8_kv16", "sq")])
def test_decode_steps_match_onnxruntime(engines, name, kind):
    """Teacher-forced decode steps (the ORT greedy tokens of the same graph fed back): the FP16 engine must match
    the float graph to FP16 rounding; an INT8 engine must sit closer to its Q/DQ graph (the fake-quantized
    function) than to the float graph, i.e. INT8 really runs, and agree with it on most greedy choices."""
    path, side = engines[name]
    assert side["decode_graph"] and side["profile"]["past"] == [1, 16, 32]
    assert side["kv_cache_fp16_io"] == (8 if name.endswith("kv16") else 0)  # 2 layers x (key, value) x (in, out)
    ref, flt = _ort_step(kind), _ort_step("fp")
    errs = {"own": [], "float": []}
    top1 = []
    with EngineDecoder(path) as dec:
        assert (dec.n_layers, dec.kv_heads, dec.head_dim, dec.past_min) == (2, 2, 16, 1)
        for p, forced in zip(FIX["prompts"], FIX[f"ort_{kind}"]):
            a = _teacher_forced(ref, p, forced[:-1], 2, 2, 16, np.float32, 1)
            f = _teacher_forced(flt, p, forced[:-1], 2, 2, 16, np.float32, 1)
            b = _teacher_forced(dec, p, forced[:-1], 2, 2, 16, dec.kv_dtype, 1)
            errs["own"].append(float(np.abs(a - b).max() / np.abs(a).max()))
            errs["float"].append(float(np.abs(f - b).max() / np.abs(f).max()))
            top1.append(float((a.argmax(-1) == b.argmax(-1)).mean()))
    print(f"{name}: rel. max err vs own graph {np.round(errs['own'], 4)}, vs float graph {np.round(errs['float'], 4)}, top-1 vs own {np.round(top1, 3)}")
    if kind == "fp":
        assert max(errs["own"]) < 0.05, errs
    else:
        assert np.mean(errs["own"]) < np.mean(errs["float"]), errs
    assert np.mean(top1) >= 0.75, top1


def test_generate_engine_prompts_file(engines, tmp_path, capsys):
    path, _ = engines["sq_int8"]
    pf = tmp_path / "prompts.npz"
    np.savez(pf, prompts=FIX["prompts"], reference=FIX["ort_sq"])
    assert main(["-q", "generate", str(path), "--prompts-file", str(pf), "--max-new-tokens", "8", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["backend"] == "tensorrt" and res["prompts"] == 4 and all(len(t) == 8 for t in res["tokens"])
    assert res["agreement_with_reference"]["token_agreement_pct"] >= 75.0  # INT8 engine vs the Q/DQ graph in ORT
    # the profile bounds are enforced with one clear error
    assert main(["-q", "generate", str(path), "--prompts-file", str(pf), "--max-new-tokens", "40"]) == 2
    assert "past length" in capsys.readouterr().err


def test_generate_refuses_prefill_engine(tmp_path, capsys):
    from test_engine_models import tiny_lm

    eng = tmp_path / "f.engine"
    build_engine(tiny_lm(tmp_path / "f.onnx"), eng, precision="fp16", batch=(1, 1, 1), seq=(1, 8, 16))
    pf = tmp_path / "p.npz"
    np.savez(pf, prompts=FIX["prompts"])
    assert main(["-q", "generate", str(eng), "--prompts-file", str(pf), "--max-new-tokens", "2"]) == 2
    assert "not a decode engine" in capsys.readouterr().err


def test_generate_engine_starts_from_the_outlier_prefix(tmp_path, capsys):
    """A decode graph exported with an outlier prefix carries its float KV cache as initializers no node reads (the
    initial past, sq_export.export.decode): `generate ENGINE` reads it from the engine's source graph and starts every
    sequence from it, as ONNX Runtime's greedy loop does with the graph (here the INT8 fixture with a random prefix of
    2 slots; the engine's profile starts the past at 1, which the prefix covers, so no pad slot is added)."""
    import onnx
    from onnx import numpy_helper

    from sq_export.export.decode import read_prefix
    from sq_export.measure.generate import greedy_onnx

    m = onnx.load(str(G / "decode_llama_sq.onnx"))
    rng = np.random.default_rng(3)
    for i in range(2):
        for kv in ("key", "value"):
            m.graph.initializer.append(numpy_helper.from_array(rng.standard_normal((1, 2, 2, 16)).astype(np.float32), f"prefix_outliers.{i}.{kv}"))
    p = m.metadata_props.add()
    p.key, p.value = "sq_export.prefix_length", "2"
    src = tmp_path / "pre.onnx"
    onnx.save(m, str(src))
    eng = tmp_path / "pre.engine"
    side = build_engine(src, eng, precision="int8", **PROFILE)
    assert side["graph"]["prefix_length"] == 2
    pre = read_prefix(src)
    sess = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    want = [greedy_onnx(sess, pr[None], 8, prefix=pre)[0] for pr in FIX["prompts"]]
    pf = tmp_path / "prompts.npz"
    np.savez(pf, prompts=FIX["prompts"], reference=np.stack(want))
    assert main(["-q", "generate", str(eng), "--prompts-file", str(pf), "--max-new-tokens", "8", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["agreement_with_reference"]["token_agreement_pct"] >= 75.0, res  # INT8 engine vs its graph in ORT
    with EngineDecoder(eng, prefix=pre) as dec:
        assert dec.check_fits(FIX["prompts"][:1], 8) == 0  # the prefix fills the profile's minimum past
    # the prefix matters here (so the agreement above needs it fed): without it ONNX Runtime decodes other tokens
    plain = [greedy_onnx(sess, pr[None], 8, pad_slots=1)[0] for pr in FIX["prompts"]]
    assert sum(int((a != b).sum()) for a, b in zip(plain, want)) >= 8
