"""Build the small ONNX fixtures in graphs/ (torch-free: onnx.helper only).

    python tools/make_graphs.py            # (re)writes graphs/*.onnx

Every graph follows the exporter's contract (opset 17; inputs input_ids, attention_mask int64 [batch, seq];
output logits): embedding -> norm -> shared activation Q/DQ -> q/k/v Linears (weight Q/DQ, per-channel axis 1)
-> quantized attention batched MatMuls -> o_proj -> residual -> norm -> up_proj -> Relu -> down_proj -> residual
-> final norm -> float lm_head. Each `faults` entry injects exactly one defect that sq_export.passes must find.
`build()` is importable so tests can also build variants in memory.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

C, F, V = 16, 32, 32  # hidden, MLP width, vocab
ACT_SCALE = 0.04


class _B:
    def __init__(self, seed: int):
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.rng = np.random.default_rng(seed)
        self.n = 0

    def init(self, name: str, arr) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def node(self, op: str, inputs: list[str], name: str | None = None, **attrs) -> str:
        self.n += 1
        name = name or f"/{op}_{self.n}"
        out = f"{name}_output_0"
        self.nodes.append(helper.make_node(op, inputs, [out], name=name, **attrs))
        return out

    # ----- quantization pieces -------------------------------------------------------------------------------
    def act_qdq(self, x: str, prefix: str, scale=ACT_SCALE, zp=None) -> str:
        s = self.init(f"{prefix}.act_scale", np.array(scale, np.float32))
        z = self.init(f"{prefix}.act_zp", np.array(0, np.int8) if zp is None else zp)
        q = self.node("QuantizeLinear", [x, s, z], name=f"{prefix}/QuantizeLinear")
        return self.node("DequantizeLinear", [q, s, z], name=f"{prefix}/DequantizeLinear")

    def weight(self, prefix: str, k: int, n: int, form: str, axis_fault: bool = False, trans: bool = False) -> str:
        w = (self.rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
        axis = 1
        if trans:  # Gemm transB=1: W stored [N, K], channel axis 0
            w, axis = np.ascontiguousarray(w.T), 0
        if axis_fault:
            axis = 1 - axis
        scale = (np.abs(w).max(axis=1 - axis) / 127.0).astype(np.float32)
        s = self.init(f"{prefix}.weight_scale", scale)
        z = self.init(f"{prefix}.weight_zp", np.zeros(scale.shape, np.int8))
        if form == "int8":
            shape = [1, 1]
            shape[axis] = -1
            wq = np.clip(np.rint(w / scale.reshape(shape)), -128, 127).astype(np.int8)
            wi = self.init(f"{prefix}.weight", wq)
        else:
            wi = self.init(f"{prefix}.weight", w)
            wi = self.node("QuantizeLinear", [wi, s, z], name=f"{prefix}/QuantizeLinear_1", axis=axis)
        return self.node("DequantizeLinear", [wi, s, z], name=f"{prefix}/DequantizeLinear_1", axis=axis)

    def linear(self, x: str, prefix: str, k: int, n: int, form: str, quant=True, axis_fault=False, gemm=False):
        b = self.init(f"{prefix}.bias", (self.rng.standard_normal(n) * 0.1).astype(np.float32))
        if not quant:
            w = self.init(f"{prefix}.weight", (self.rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32))
        else:
            w = self.weight(prefix, k, n, form, axis_fault, trans=gemm)
        if gemm:
            return self.node("Gemm", [x, w, b], name=f"{prefix}/Gemm", transB=1)
        y = self.node("MatMul", [x, w], name=f"{prefix}/MatMul")
        return self.node("Add", [y, b], name=f"{prefix}/Add")

    # ----- norms -----------------------------------------------------------------------------------------------
    def gamma_beta(self, prefix: str, beta: bool):
        g = (1.0 + 0.2 * self.rng.standard_normal(C)).astype(np.float32)
        b = (0.1 * self.rng.standard_normal(C)).astype(np.float32)
        return self.init(f"{prefix}.weight", g), (self.init(f"{prefix}.bias", b) if beta else None)

    def norm(self, x: str, prefix: str, kind: str) -> str:
        if kind != "rms_gemma":
            g, b = self.gamma_beta(prefix, beta=kind != "rms")
        if kind == "ln":
            return self.node("LayerNormalization", [x, g, b], name=f"{prefix}/LayerNormalization", axis=-1,
                             epsilon=1e-5)
        if kind == "rms":  # as torch exports HF LlamaRMSNorm
            two = self.init(f"{prefix}.two", np.array(2.0, np.float32))
            eps = self.init(f"{prefix}.eps", np.array(1e-6, np.float32))
            one = self.init(f"{prefix}.one", np.array(1.0, np.float32))
            xc = self.node("Cast", [x], name=f"{prefix}/Cast", to=TensorProto.FLOAT)
            p = self.node("Pow", [xc, two], name=f"{prefix}/Pow")
            m = self.node("ReduceMean", [p], name=f"{prefix}/ReduceMean", axes=[-1], keepdims=1)
            a = self.node("Add", [m, eps], name=f"{prefix}/Add")
            s = self.node("Sqrt", [a], name=f"{prefix}/Sqrt")
            r = self.node("Div", [one, s], name=f"{prefix}/Div")
            y = self.node("Mul", [xc, r], name=f"{prefix}/Mul")
            y = self.node("Cast", [y], name=f"{prefix}/Cast_1", to=TensorProto.FLOAT)
            return self.node("Mul", [g, y], name=f"{prefix}/Mul_1")
        if kind == "rms_gemma":  # Gemma's RMSNorm x·rsqrt(mean(x²)+eps)·(1+w), the 1+w left as an Add (not folded)
            w = self.init(f"{prefix}.weight_minus_one", (0.2 * self.rng.standard_normal(C)).astype(np.float32))
            two = self.init(f"{prefix}.two", np.array(2.0, np.float32))
            eps = self.init(f"{prefix}.eps", np.array(1e-6, np.float32))
            one = self.init(f"{prefix}.one", np.array(1.0, np.float32))
            p = self.node("Pow", [x, two], name=f"{prefix}/Pow")
            m = self.node("ReduceMean", [p], name=f"{prefix}/ReduceMean", axes=[-1], keepdims=1)
            a = self.node("Add", [m, eps], name=f"{prefix}/Add")
            s = self.node("Sqrt", [a], name=f"{prefix}/Sqrt")
            r = self.node("Div", [one, s], name=f"{prefix}/Div")
            y = self.node("Mul", [x, r], name=f"{prefix}/Mul")
            wc = self.node("Cast", [w], name=f"{prefix}/Cast", to=TensorProto.FLOAT)
            gain = self.node("Add", [one, wc], name=f"{prefix}/Add_1")
            return self.node("Mul", [y, gain], name=f"{prefix}/Mul_1")
        if kind == "ln_decomposed":  # what an exporter writes when LayerNormalization was not kept as one op
            two = self.init(f"{prefix}.two", np.array(2.0, np.float32))
            eps = self.init(f"{prefix}.eps", np.array(1e-5, np.float32))
            mu = self.node("ReduceMean", [x], name=f"{prefix}/ReduceMean", axes=[-1], keepdims=1)
            d = self.node("Sub", [x, mu], name=f"{prefix}/Sub")
            p = self.node("Pow", [d, two], name=f"{prefix}/Pow")
            v = self.node("ReduceMean", [p], name=f"{prefix}/ReduceMean_1", axes=[-1], keepdims=1)
            a = self.node("Add", [v, eps], name=f"{prefix}/Add")
            s = self.node("Sqrt", [a], name=f"{prefix}/Sqrt")
            y = self.node("Div", [d, s], name=f"{prefix}/Div")
            y = self.node("Mul", [y, g], name=f"{prefix}/Mul")
            return self.node("Add", [y, b], name=f"{prefix}/Add_1")
        raise ValueError(kind)

    def smooth(self, x: str, prefix: str, n: int, op: str = "Mul") -> str:
        c = (0.5 + self.rng.random(n)).astype(np.float32)
        ci = self.init(f"{prefix}.smooth_scale", c if op == "Mul" else c.reshape(1, 1, n))
        return self.node(op, [x, ci], name=f"{prefix}/{op}")


def build(norm: str = "rms", weights: str = "qdq", faults: frozenset[str] | set[str] = frozenset(),
          quantize: bool = True, seed: int = 0) -> onnx.ModelProto:
    """norm: rms | ln | rms_gemma (x̂·(1+w) with the Add unfolded); weights: qdq (TensorRT 8.6) | int8 (TensorRT
    10+); faults: see FIXTURES."""
    f = set(faults)
    b = _B(seed)
    lay = "/m/model/layers.0"
    emb = b.init("embed_tokens.weight", b.rng.standard_normal((V, C)).astype(np.float32))
    h0 = b.node("Gather", [emb, "input_ids"], name="/m/model/embed_tokens/Gather")
    ax = b.init("unsqueeze_axes", np.array([-1], np.int64))
    mk = b.node("Unsqueeze", ["attention_mask", ax], name="/m/model/Unsqueeze")
    mk = b.node("Cast", [mk], name="/m/model/Cast", to=TensorProto.FLOAT)
    h0 = b.node("Mul", [h0, mk], name="/m/model/Mul")
    kind1 = "ln_decomposed" if "decomposed_ln" in f else norm

    # attention block
    n1 = b.norm(h0, f"{lay}/input_layernorm", kind1)
    if "mul_after_norm" in f:
        n1 = b.smooth(n1, f"{lay}/input_layernorm/smooth", C)
    if not quantize:
        a_q = a_k = n1
    elif "duplicate_q" in f:
        a_q = b.act_qdq(n1, f"{lay}/self_attn/q_proj")
        a_k = b.act_qdq(n1, f"{lay}/self_attn/k_proj")
    else:
        a_q = a_k = b.act_qdq(n1, f"{lay}/self_attn/q_proj", zp=(
            np.array(3, np.int8) if "nonzero_zp" in f else np.array(0, np.uint8) if "uint8_zp" in f else None))
    if "one_sided" in f:
        a_q = n1
    q = b.linear(a_q, f"{lay}/self_attn/q_proj", C, C, weights, quantize)
    k = b.linear(a_k, f"{lay}/self_attn/k_proj", C, C, weights, quantize, axis_fault="weight_axis" in f)
    v = b.linear(a_k, f"{lay}/self_attn/v_proj", C, C, weights, quantize)
    kt = b.node("Transpose", [k], name=f"{lay}/self_attn/Transpose", perm=[0, 2, 1])
    if quantize:
        q = b.act_qdq(q, f"{lay}/self_attn/qk_a", 0.08)
        kt = b.act_qdq(kt, f"{lay}/self_attn/qk_b", 0.08)
    sc = b.node("MatMul", [q, kt], name=f"{lay}/self_attn/MatMul")
    inv = b.init(f"{lay}/self_attn.inv_sqrt_d", np.array(1 / np.sqrt(C), np.float32))
    sc = b.node("Mul", [sc, inv], name=f"{lay}/self_attn/Mul")
    p = b.node("Softmax", [sc], name=f"{lay}/self_attn/Softmax", axis=-1)
    if quantize:
        p = b.act_qdq(p, f"{lay}/self_attn/pv_a", 1 / 127)
        v = b.act_qdq(v, f"{lay}/self_attn/pv_b", 0.04)
    ctx = b.node("MatMul", [p, v], name=f"{lay}/self_attn/MatMul_1")
    if quantize:
        ctx = b.act_qdq(ctx, f"{lay}/self_attn/o_proj")
    o = b.linear(ctx, f"{lay}/self_attn/o_proj", C, C, weights, quantize)
    h1 = b.node("Add", [h0, o], name=f"{lay}/Add")

    # MLP block
    n2 = b.norm(h1, f"{lay}/post_attention_layernorm", norm)
    if "div_after_norm" in f:
        n2 = b.smooth(n2, f"{lay}/post_attention_layernorm/smooth", C, op="Div")
    if "mul_after_norm" in f and "shared_norm" in f:  # norm output also read elsewhere: the fold must duplicate
        n2b = b.smooth(n2, f"{lay}/post_attention_layernorm/smooth", C)
        h1 = b.node("Add", [h1, n2], name=f"{lay}/Add_extra")
        n2 = n2b
    bad_scale = {"scale_zero": 0.0, "scale_nan": float("nan")}
    scale = next((bad_scale[k_] for k_ in bad_scale if k_ in f), ACT_SCALE)
    gemm = norm == "ln"  # OPT/GPT-2 style: Reshape to 2-D -> Gemm(transB=1) -> Reshape back
    if gemm:
        lead = b.node("Shape", [n2], name=f"{lay}/mlp/Shape", end=2)
        fi = b.init(f"{lay}/mlp.F", np.array([F], np.int64))
        back = b.node("Concat", [lead, fi], name=f"{lay}/mlp/Concat", axis=0)
        flat = b.init(f"{lay}/mlp.flat", np.array([-1, C], np.int64))
        n2 = b.node("Reshape", [n2, flat], name=f"{lay}/mlp/Reshape")
    x = b.act_qdq(n2, f"{lay}/mlp/up_proj", scale) if quantize else n2
    up = b.linear(x, f"{lay}/mlp/up_proj", C, F, weights, quantize, gemm=gemm)
    if gemm:
        up = b.node("Reshape", [up, back], name=f"{lay}/mlp/Reshape_1")
    r = b.node("Relu", [up], name=f"{lay}/mlp/Relu")
    if "mul_before_down" in f:
        r = b.smooth(r, f"{lay}/mlp/down_proj/smooth", F)
    x = b.act_qdq(r, f"{lay}/mlp/down_proj", 0.03) if quantize else r
    down = b.linear(x, f"{lay}/mlp/down_proj", F, C, weights, quantize)
    h2 = b.node("Add", [h1, down], name=f"{lay}/Add_1")
    if "dangling_q" in f:
        s = b.init("dangling.scale", np.array(ACT_SCALE, np.float32))
        z = b.init("dangling.zp", np.array(0, np.int8))
        b.node("QuantizeLinear", [h2, s, z], name="/m/model/dangling/QuantizeLinear")

    nf = b.norm(h2, "/m/model/norm", norm)
    lm = b.init("lm_head.weight", (b.rng.standard_normal((C, V)) / np.sqrt(C)).astype(np.float32))
    logits = b.node("MatMul", [nf, lm], name="/lm_head/MatMul")
    if "qdq_output" in f:
        s = b.init("lm_head.out_scale", np.array(0.1, np.float32))
        z = b.init("lm_head.out_zp", np.array(0, np.int8))
        logits = b.node("QuantizeLinear", [logits, s, z], name="/lm_head/QuantizeLinear")
        logits = b.node("DequantizeLinear", [logits, s, z], name="/lm_head/DequantizeLinear")
    b.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="/logits/Identity"))
    return _model(b, "sq_fixture")


def build_plain() -> onnx.ModelProto:
    """No norm and no Q/DQ at all: `check` has nothing to check (exit 2)."""
    b = _B(1)
    emb = b.init("embed_tokens.weight", b.rng.standard_normal((V, C)).astype(np.float32))
    h = b.node("Gather", [emb, "input_ids"], name="/embed/Gather")
    lm = b.init("lm_head.weight", b.rng.standard_normal((C, V)).astype(np.float32))
    b.nodes.append(helper.make_node("MatMul", [h, lm], ["logits"], name="/lm_head/MatMul"))
    return _model(b, "plain")


def _model(b: _B, name: str) -> onnx.ModelProto:
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "seq"])
              for n in ("input_ids", "attention_mask")]
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", V])
    g = helper.make_graph(b.nodes, name, inputs, [out], initializer=b.inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], producer_name="sq_export.tools")
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


# name -> (build kwargs); the rule each bad fixture must trigger is asserted in tests/test_passes_*.py
FIXTURES: dict[str, dict] = {
    "clean_rms": dict(norm="rms"),
    "clean_ln": dict(norm="ln"),
    "clean_rms_int8w": dict(norm="rms", weights="int8"),
    "clean_ln_int8w": dict(norm="ln", weights="int8"),
    "unfolded_mul_rms": dict(norm="rms", faults={"mul_after_norm"}),
    "unfolded_mul_ln": dict(norm="ln", faults={"mul_after_norm"}),
    "unfolded_div_rms": dict(norm="rms", faults={"div_after_norm"}),
    "unfolded_shared_norm_ln": dict(norm="ln", faults={"mul_after_norm", "shared_norm"}),
    "unfolded_shared_norm_rms": dict(norm="rms", faults={"mul_after_norm", "shared_norm"}),
    "mul_before_down": dict(norm="rms", faults={"mul_before_down"}),
    "one_sided_dq": dict(norm="rms", faults={"one_sided"}),
    "scale_zero": dict(norm="rms", faults={"scale_zero"}),
    "scale_nan": dict(norm="ln", faults={"scale_nan"}),
    "wrong_weight_axis": dict(norm="rms", faults={"weight_axis"}),
    "nonzero_zp": dict(norm="rms", faults={"nonzero_zp"}),
    "uint8_zp": dict(norm="rms", faults={"uint8_zp"}),
    "dangling_q": dict(norm="rms", faults={"dangling_q"}),
    "duplicate_q": dict(norm="rms", faults={"duplicate_q"}),
    "decomposed_ln": dict(norm="ln", faults={"decomposed_ln"}),
    "qdq_on_output": dict(norm="rms", faults={"qdq_output"}),
    "float_rms": dict(norm="rms", quantize=False),
    "clean_rms_gemma": dict(norm="rms_gemma"),
    "unfolded_mul_rms_gemma": dict(norm="rms_gemma", faults={"mul_after_norm"}),
    "unfolded_shared_norm_rms_gemma": dict(norm="rms_gemma", faults={"mul_after_norm", "shared_norm"}),
}


def main(argv: list[str] | None = None) -> int:
    out = Path(argv[0] if argv else Path(__file__).resolve().parent.parent / "graphs")
    out.mkdir(parents=True, exist_ok=True)
    for name, kw in FIXTURES.items():
        onnx.save(build(**kw), out / f"{name}.onnx")
    onnx.save(build_plain(), out / "plain_no_norm_no_qdq.onnx")
    print(f"wrote {len(FIXTURES) + 1} graphs to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
