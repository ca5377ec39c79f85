"""Segment engines under TensorRT (skipped without TensorRT and a GPU): the decode fixtures cut in two
(`sq-export split`) and built as one engine per segment (`sq-export build MANIFEST --jobs 2`) decode like the whole
engine built from the same graph: teacher-forced logits within the precision's noise of it, the KV cache handed
through the chain, and `sq-export generate MANIFEST` runs. The torch-free half of this (ONNX Runtime chains of
every family, bit-exact) is tests/test_segments.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

# test_engine_decode skips the module without TensorRT or a GPU (with its reason) and holds the decode fixtures
from test_engine_decode import FIX, PROFILE, _teacher_forced  # noqa: E402

from sq_export.cli import main  # noqa: E402
from sq_export.engine.build import build_engine  # noqa: E402
from sq_export.engine.generate import EngineDecoder  # noqa: E402

pytestmark = pytest.mark.trt
G = Path(__file__).resolve().parent / "fixtures" / "graphs"


@pytest.mark.parametrize("kind,prec", [("fp", "fp16"), ("sq", "int8")])
def test_segment_engines_decode_like_the_whole_engine(kind, prec, tmp_path, capsys):
    src = tmp_path / f"decode_llama_{kind}.onnx"
    shutil.copy(G / src.name, src)
    assert main(["split", str(src), "--segments", "2"]) == 0
    man = tmp_path / f"e_{kind}.segments.json"
    rng = ["--batch", "1:1:4", "--seq", "1:8:16", "--past", "1:16:32"]
    assert main(["build", str(tmp_path / f"decode_llama_{kind}.segments.json"), "-o", str(man), "--precision", prec, "--jobs", "2", *rng]) == 0
    built = json.loads(man.read_text())
    assert [e["layers"] for e in built["segments"]] == [[0, 0], [1, 1]] and all(e["engine_bytes"] > 0 for e in built["segments"])
    whole = build_engine(src, tmp_path / f"{kind}.engine", precision=prec, **PROFILE)["engine"]
    errs, top1 = [], []
    with EngineDecoder(whole) as a, EngineDecoder(man) as b:
        assert (b.n_layers, b.kv_heads, b.head_dim, b.past_min, b.past_max) == (a.n_layers, a.kv_heads, a.head_dim, a.past_min, a.past_max)
        for p, forced in zip(FIX["prompts"], FIX[f"ort_{kind}"]):
            la = _teacher_forced(a, p, forced[:-1], 2, 2, 16, a.kv_dtype, 1)
            lb = _teacher_forced(b, p, forced[:-1], 2, 2, 16, b.kv_dtype, 1)
            errs.append(float(np.abs(la - lb).max() / np.abs(la).max()))
            top1.append(float((la.argmax(-1) == lb.argmax(-1)).mean()))
    print(f"{kind} {prec}: chain vs whole engine rel. max err {np.round(errs, 5)}, top-1 {np.round(top1, 3)}")
    assert max(errs) < (0.02 if prec == "fp16" else 0.05), errs
    assert np.mean(top1) >= 0.9, top1
    pf = tmp_path / "prompts.npz"
    np.savez(pf, prompts=FIX["prompts"], reference=FIX[f"ort_{kind}"])
    capsys.readouterr()
    assert main(["-q", "generate", str(man), "--prompts-file", str(pf), "--max-new-tokens", "8", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["backend"] == "tensorrt" and all(len(t) == 8 for t in res["tokens"])
    assert res["agreement_with_reference"]["token_agreement_pct"] >= 75.0
