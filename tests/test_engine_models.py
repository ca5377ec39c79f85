"""Tiny ONNX language models and token files for the engine-side tests (built with onnx.helper, no torch).

    logits = MatMul(Gather(emb, input_ids) * attention_mask, W)      [batch, seq, vocab]

`tiny_lm(path, quant=True)` writes the SmoothQuant-style W8A8 form TensorRT 8.6 accepts: activation
QuantizeLinear -> DequantizeLinear (per tensor), weight float initializer -> QuantizeLinear -> DequantizeLinear
(per output channel, axis 1). `weights="int8"` stores INT8 initializers -> DequantizeLinear (the TensorRT 10+
form, refused by 8.6). `dtype="fp16"` stores the float graph in FP16 (for strongly typed FP16 engines).
Imported by the other tests; the tests here check that ONNX Runtime runs the models.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

V, H = 64, 32


def _weights(seed: int = 0, perturb: float = 0.0):
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((V, H)).astype(np.float32)
    w = (rng.standard_normal((H, V)) / np.sqrt(H)).astype(np.float32)
    if perturb:
        w = w + perturb * np.random.default_rng(seed + 1).standard_normal(w.shape).astype(np.float32)
    return emb, w


def tiny_lm(
    path, quant: bool = False, weights: str = "qdq", dtype: str = "fp32", perturb: float = 0.0, seed: int = 0, pad_offset: float = 0.0
):
    """pad_offset: added to the logits at padding positions only (attention_mask 0)."""
    emb, w = _weights(seed, perturb)
    np_f = np.float16 if dtype == "fp16" else np.float32
    t_f = TensorProto.FLOAT16 if dtype == "fp16" else TensorProto.FLOAT
    init = [numpy_helper.from_array(emb.astype(np_f), "emb")]
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["x0"], axis=0),
        helper.make_node("Cast", ["attention_mask"], ["m0"], to=t_f),
        helper.make_node("Unsqueeze", ["m0", "ax"], ["m1"]),
        helper.make_node("Mul", ["x0", "m1"], ["x"]),
    ]
    init.append(numpy_helper.from_array(np.array([-1], np.int64), "ax"))
    a, wname = "x", "w"
    if quant:
        xs = float(np.abs(emb).max() / 127.0)
        init += [numpy_helper.from_array(np.array(xs, np.float32), "x_s"), numpy_helper.from_array(np.array(0, np.int8), "x_z")]
        nodes += [
            helper.make_node("QuantizeLinear", ["x", "x_s", "x_z"], ["x_q"]),
            helper.make_node("DequantizeLinear", ["x_q", "x_s", "x_z"], ["x_dq"]),
        ]
        a = "x_dq"
        ws = (np.abs(w).max(axis=0) / 127.0).astype(np.float32)
        q = np.clip(np.round(w / ws), -127, 127).astype(np.int8)
        init += [numpy_helper.from_array(ws, "w_s"), numpy_helper.from_array(np.zeros(V, np.int8), "w_z")]
        if weights == "int8":
            init.append(numpy_helper.from_array(q, "w_q"))
        else:
            init.append(numpy_helper.from_array((q * ws).astype(np.float32), "w_f"))
            nodes.append(helper.make_node("QuantizeLinear", ["w_f", "w_s", "w_z"], ["w_q"], axis=1))
        nodes.append(helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_z"], ["w_dq"], axis=1))
        wname = "w_dq"
    else:
        init.append(numpy_helper.from_array(w.astype(np_f), "w"))
    if pad_offset:
        init += [
            numpy_helper.from_array(np.array(1, np_f), "one"),
            numpy_helper.from_array(np.full((V,), pad_offset, np_f), "pad_off"),
        ]
        nodes += [
            helper.make_node("MatMul", [a, wname], ["l0"]),
            helper.make_node("Sub", ["one", "m1"], ["inv"]),
            helper.make_node("Mul", ["inv", "pad_off"], ["pad"]),
            helper.make_node("Add", ["l0", "pad"], ["logits"]),
        ]
    else:
        nodes.append(helper.make_node("MatMul", [a, wname], ["logits"]))
    graph = helper.make_graph(
        nodes,
        "tiny_lm",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
        ],
        [helper.make_tensor_value_info("logits", t_f, ["batch", "seq", V])],
        init,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return str(path)


def reference_logits(input_ids, attention_mask, quant: bool = False, perturb: float = 0.0, seed: int = 0):
    """NumPy logits of tiny_lm (fake-quantized like ONNX Runtime when quant)."""
    emb, w = _weights(seed, perturb)
    x = emb[input_ids] * attention_mask[..., None].astype(np.float32)
    if quant:
        xs = np.float32(np.abs(emb).max() / 127.0)
        x = (np.clip(np.round(x / xs), -128, 127) * xs).astype(np.float32)
        ws = (np.abs(w).max(axis=0) / 127.0).astype(np.float32)
        w = np.clip(np.round(w / ws), -127, 127) * ws
    return x @ w


def token_file(path, n_chunks: int = 5, seq_len: int = 16, last_len: int | None = 9, seed: int = 0, **extra):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, size=(n_chunks, seq_len), dtype=np.int64)
    lengths = np.full((n_chunks,), seq_len, np.int64)
    if last_len is not None:
        lengths[-1] = last_len
    mask = (np.arange(seq_len)[None, :] < lengths[:, None]).astype(np.int64)
    ids = ids * mask  # pad id 0
    arrays = {"input_ids": ids, "attention_mask": mask}
    if last_len is not None:
        arrays["lengths"] = lengths
    arrays.update(extra)
    np.savez(str(path), **arrays)
    return str(path)


# ---- the models run in ONNX Runtime and match NumPy ------------------------------------------------------------


def _ort(path, ids, mask):
    import onnxruntime as ort

    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {"input_ids": ids, "attention_mask": mask})[0]


def test_tiny_lm_float_matches_numpy(tmp_path):
    p = tiny_lm(tmp_path / "f.onnx")
    ids = np.arange(32, dtype=np.int64).reshape(2, 16) % V
    mask = np.ones_like(ids)
    np.testing.assert_allclose(_ort(p, ids, mask), reference_logits(ids, mask), rtol=1e-4, atol=1e-4)


def test_tiny_lm_qdq_matches_numpy(tmp_path):
    ids = (np.arange(32, dtype=np.int64).reshape(2, 16) * 7) % V
    mask = np.ones_like(ids)
    ref = reference_logits(ids, mask, quant=True)
    for weights in ("qdq", "int8"):
        p = tiny_lm(tmp_path / f"q_{weights}.onnx", quant=True, weights=weights)
        np.testing.assert_allclose(_ort(p, ids, mask), ref, rtol=1e-4, atol=1e-4)
