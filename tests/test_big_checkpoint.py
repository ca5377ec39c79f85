"""tools/make_big_checkpoint.py, shrunk by config overrides: a loadable float16 folder written shard by shard with
the tests' outlier convention, deterministic, that streams like any checkpoint."""

import importlib.util
import json
from pathlib import Path

import onnx
import torch

ROOT = Path(__file__).resolve().parent.parent


def _tool():
    spec = importlib.util.spec_from_file_location("make_big_checkpoint", ROOT / "tools" / "make_big_checkpoint.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


SMALL = ["--layers", "2", "--set", "hidden_size=128", "--set", "intermediate_size=256", "--set", "num_attention_heads=4",
         "--set", "num_key_value_heads=4", "--set", "vocab_size=600", "-q"]


def test_small_llama_checkpoint(tmp_path, capsys):
    from sq_export import api
    from sq_export.families import family_for
    from sq_export.synth import OUTLIER_CHANNELS, OUTLIER_GAIN

    tool = _tool()
    assert tool.main(["--shape", "llama2-7b", "-o", str(tmp_path / "a"), *SMALL]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["layers"] == 2 and res["tokenizer_vocab"] <= 600
    files = sorted(p.name for p in (tmp_path / "a").glob("*.safetensors"))
    assert files == ["model-layer-00000.safetensors", "model-layer-00001.safetensors", "model-rest.safetensors"]
    model, tok = api.load_model(tmp_path / "a", device="cpu")  # auto on the CPU: float32
    fam = family_for(model)
    g = model.get_submodule(fam.groups()[0].source).weight
    others = torch.ones_like(g, dtype=torch.bool)
    others[list(OUTLIER_CHANNELS)] = False
    assert g[list(OUTLIER_CHANNELS)].abs().min() > OUTLIER_GAIN / 10 * g[others].abs().median()
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert cfg["dtype"] == "float16" and cfg["hidden_size"] == 128
    # deterministic: the same command, the same bytes
    assert tool.main(["--shape", "llama2-7b", "-o", str(tmp_path / "b"), *SMALL]) == 0
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    # and it streams like any checkpoint: the same calibration as the loaded model
    whole = api.calibrate(model, tok, None, samples=4, seq_len=32, rows=None)
    streamed = api.calibrate_streamed(tmp_path / "a", tok, None, samples=4, seq_len=32, rows=None, device="cpu")
    assert all(torch.equal(whole.act_max[n], streamed.act_max[n]) for n in whole.act_max)


def test_small_opt_checkpoint(tmp_path, capsys):
    from sq_export import api

    tool = _tool()
    assert tool.main(["--shape", "opt-6.7b", "-o", str(tmp_path / "o"), "--layers", "1", "--set", "hidden_size=64",
                      "--set", "ffn_dim=128", "--set", "num_attention_heads=4", "--set", "word_embed_proj_dim=64",
                      "--set", "vocab_size=600", "-q"]) == 0
    model, _ = api.load_model(tmp_path / "o", device="cpu", with_tokenizer=False)
    assert model.config.model_type == "opt" and torch.isfinite(model.model.decoder.layers[0].fc1.weight).all()


def test_bench_big_stages_on_a_small_checkpoint(tmp_path, capsys):
    """tools/bench_big.py, the device run's stages, end to end on the CPU on a small synthetic checkpoint."""
    spec = importlib.util.spec_from_file_location("bench_big", ROOT / "tools" / "bench_big.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    ck = tmp_path / "ck"
    assert _tool().main(["--shape", "llama2-7b", "-o", str(ck), *SMALL]) == 0
    capsys.readouterr()
    small = ["--samples", "4", "--seq-len", "32", "--device", "cpu"]
    recs = []
    for argv in (["calibrate", str(ck), "-o", str(tmp_path / "w"), *small],
                 ["calibrate", str(ck), "-o", str(tmp_path / "s"), "--stream", *small],
                 ["compare", str(tmp_path / "w"), str(tmp_path / "s")],
                 ["quantize", str(ck), "-o", str(tmp_path / "q"), *small],
                 ["export", str(tmp_path / "q"), "-o", str(tmp_path / "sq.onnx")],
                 ["ppl", str(tmp_path / "q"), "--device", "cpu", "--max-tokens", "256"],
                 ["quantize", str(ck), "-o", str(tmp_path / "qr"), "--rotate-down", "64", *small],  # the 7B-width rotation cost
                 ["export", str(tmp_path / "qr"), "-o", str(tmp_path / "sqr.onnx"), "--lazy"]):
        assert bench.main(argv) == 0
        recs.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert recs[2]["equal"] and recs[2]["same_bytes"]
    assert recs[3]["quantized"] == 14 and recs[4]["weights_kept_float32"] == 0 and recs[5]["perplexity"] > 1
    assert all(r["peak_rss_mib"] > 0 for r in recs)
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "sqr.onnx"), load_external_data=False).metadata_props}
    assert meta["sq_export.rotate_down"] == "64" and meta["sq_export.rotated_linears"] == "2"
