"""Stage 4, export: torch.onnx (TorchScript exporter, opset 17) of the fake-quantized model.

QLinear's fake-quant ops export as QuantizeLinear → DequantizeLinear with int8 zero-points: activations
per-tensor (scalar scale), weights per output channel on axis 1 of the [K, N] MatMul weight; a tensor feeding
several QLinears (the norm output feeding q/k/v) gets one shared Q/DQ pair after the dedup pass. LayerNorm
exports as one LayerNormalization op (opset 17). Post-export graph passes (sq_export.passes) turn float
W → Q → DQ into INT8 initializers → DQ (`--weights int8`, TensorRT 10+) and, for `--target ort`, rewrite
activation Q/DQ to uint8/128 (same grid) for ONNX Runtime's integer kernels.

Files are written atomically; the same inputs give a byte-identical file (no timestamps; names and constants
come from module names and deterministic calibration).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
import warnings
from pathlib import Path

import torch

from sq_export.errors import BadInput
from sq_export.fileio import check_output_path
from sq_export.onnxio.write import save_model

log = logging.getLogger(__name__)

OPSET = 17
OPSET_FP16 = 19  # float16 QuantizeLinear/DequantizeLinear scales need opset 19
DTYPES = ("fp32", "fp16")
# int8: INT8 initializers -> DQ (TensorRT 10+); qdq: float32 W -> Q -> DQ (TensorRT 8.6); qdq16: float16 (q·s) ->
# Cast -> Q -> DQ, the same INT8 values at half qdq's bytes (passes/weights_fp16.py); on a float graph (mode fp)
# qdq16 stores float16 W -> Cast where float16 holds W exactly (passes/float_weights_fp16.py), int8 and qdq nothing
# else than the float32 weights
WEIGHTS = ("int8", "qdq", "qdq16")


class LogitsOnly(torch.nn.Module):
    """input_ids, attention_mask (int64 [batch, seq]) → logits; no KV cache."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def _example_inputs(batch=2, seq=16, vocab=100):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, max(2, vocab), (batch, seq), generator=g)
    return ids, torch.ones_like(ids)


def torch_export(model, family, path: Path, opset: int = OPSET) -> None:
    wrapper = LogitsOnly(model).eval()
    ids, mask = _example_inputs(vocab=model.config.vocab_size)
    dev = next(model.parameters()).device  # where float32_on put the model (the CPU unless traced on a GPU)
    ids, mask = ids.to(dev), mask.to(dev)
    with contextlib.ExitStack() as stack:
        for patch in family.export_patches:
            stack.enter_context(patch(model))
        torchscript_export(
            wrapper,
            (ids, mask),
            path,
            opset_version=opset,
            input_names=["input_ids", "attention_mask"],
            output_names=["logits"],
            dynamic_axes={
                "input_ids": {0: "batch", 1: "sequence"},
                "attention_mask": {0: "batch", 1: "sequence"},
                "logits": {0: "batch", 1: "sequence"},
            },
        )


# ----- the weights stay in torch until they are written ----------------------------------------------------------
# torch.onnx's TorchScript exporter serializes every parameter into one in-memory protobuf (and then into a bytes
# object) before it writes the file: two extra copies of the float model per graph, and a third when the file is
# read back for the graph passes. Inside `export_onnx` the exporter runs with export_params=False instead, and the
# final parameter dict it would have serialized (after its constant folding and initializer deduplication: the
# model's own tensors, and views of them such as the transposed Linear weights) is captured. `export_onnx` then
# attaches those tensors to the small graph as initializers without copying them (onnx_ir TorchTensor), runs the
# passes (weights_to_int8 reads each float weight and keeps only its INT8 values), and writes the file tensor by
# tensor. The bytes are those of the in-memory path (tests/test_export_stream.py compares them).
_capture = threading.local()


@contextlib.contextmanager
def _capturing_params():
    """Collect, per torch.onnx.export call, the parameter dict the TorchScript exporter hands to its serializer."""
    got: list[dict] = []
    orig = torch._C._jit_pass_onnx_deduplicate_initializers

    def wrapped(*args, **kwargs):
        params = orig(*args, **kwargs)
        got.append(params)
        return params

    torch._C._jit_pass_onnx_deduplicate_initializers = wrapped
    try:
        yield got
    finally:
        torch._C._jit_pass_onnx_deduplicate_initializers = orig


# torch.onnx's shape inference pass (run twice per export) converts every constant input of every node it infers to
# an ONNX tensor, copying it: the 113 MB embedding of SmolLM2 (and its tied, transposed LM head) three times over,
# +500 MB at the export's peak. Shapes and types do not depend on the values of float weights (ONNX's data
# propagation reads only small integer shape tensors), and the graph's inputs carry every parameter's full tensor
# type: inside `torchscript_export` the pass sees the parameter dict without float tensors of SHAPE_INFERENCE_SKIP
# bytes and more (tests/test_export_stream.py checks the graph is the same byte for byte).
SHAPE_INFERENCE_SKIP = 1 << 20


@contextlib.contextmanager
def _shape_inference_without_weights():
    skip_bytes = SHAPE_INFERENCE_SKIP
    orig = torch._C._jit_pass_onnx_graph_shape_type_inference

    def wrapped(graph, params, *args, **kwargs):
        small = {k: v for k, v in params.items()
                 if not (isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel() * v.element_size() >= skip_bytes)}
        return orig(graph, small, *args, **kwargs)

    torch._C._jit_pass_onnx_graph_shape_type_inference = wrapped
    try:
        yield
    finally:
        torch._C._jit_pass_onnx_graph_shape_type_inference = orig


def torchscript_export(module, args, path, **kwargs) -> None:
    """torch.onnx.export (TorchScript exporter, constant folding on). Inside `export_onnx` the graph is written
    without its weights and the weights are handed to export_onnx (see above); elsewhere it is a plain export."""
    sink = getattr(_capture, "sink", None)
    kw = dict(dynamo=False, do_constant_folding=True, **kwargs)
    # no autograd graph: with parameters that require grad, the traced forward would keep what backward needs
    # (fake-quant masks, matmul inputs) alive until the export ends (SmolLM2 naive W8A8: +540 MB); same graph
    with warnings.catch_warnings(), torch.no_grad(), _shape_inference_without_weights():
        warnings.simplefilter("ignore")
        if sink is None:
            torch.onnx.export(module, args, str(path), **kw)
            return
        with _capturing_params() as got:
            torch.onnx.export(module, args, str(path), export_params=False, **kw)
    if len(got) != 1 or not isinstance(got[0], dict):
        raise RuntimeError(f"torch.onnx.export ran its initializer pass {len(got)} times (expected once); "
                           "this torch version exports differently")
    sink[str(path)] = got[0]


@contextlib.contextmanager
def _weights_sink():
    prev = getattr(_capture, "sink", None)
    _capture.sink = {}
    try:
        yield _capture.sink
    finally:
        _capture.sink = prev


def _attach_weights(model, params: dict, lazy=None) -> None:
    """Graph inputs that are exporter parameters become initializers holding the torch tensors (no copy), in the
    order the exporter would have written them (its graph-input order), typed as onnx_ir types read initializers.
    `lazy` (sq_export.stream.lazy.LazyWeights): a parameter that is (a view of) a placeholder becomes a LazyTensor
    reading its values from the checkpoint when written."""
    import onnx_ir as ir
    from onnx_ir.tensor_adapters import TorchTensor

    g = model.graph
    names = [v.name for v in g.inputs]
    missing = sorted(set(params) - set(names))
    if missing:
        raise RuntimeError(f"exported graph lacks inputs for parameters {missing[:3]}")
    for v in [v for v in g.inputs if v.name in params]:
        p = params[v.name].detach()
        t = lazy.captured(p, v.name) if lazy is not None else None
        if t is None:
            t = TorchTensor(p, name=v.name)
        g.inputs.remove(v)
        v.const_value = t
        v.type = ir.TensorType(t.dtype)
        v.shape = t.shape
        g.register_initializer(v)



def _drop_unused_initializers(graph) -> None:
    """Initializers left behind by the passes (e.g. zero-points of folded weight Q nodes) are removed."""
    for name, v in list(graph.initializers.items()):
        if not v.uses() and not v.is_graph_output():
            del graph.initializers[name]


@contextlib.contextmanager
def float32_on(model, device="cpu"):
    """The model in float32 on `device` while the block runs (the TorchScript exporter traces there), then exactly
    as it was: every parameter and buffer elsewhere or in a half type gets a float32 copy on `device` for the block
    and its own tensor back afterwards (ties kept: `.data` is swapped, not the Parameter). Half weights widen to
    float32 exactly, so the graph's INT8 values are those the half model computes with. A float32 model already
    there passes through untouched. A model dispatched by accelerate is gathered onto the CPU for good
    (sq_export.dispatch.undispatch). `device` "cuda": the float32 copy lives in GPU memory (4 bytes a parameter
    there instead of in host memory); the writer then copies one tensor at a time to the host."""
    from sq_export.dispatch import is_dispatched, undispatch

    device = torch.device(device)
    if is_dispatched(model):
        log.info("export: gathering the dispatched model onto the CPU")
        undispatch(model, "cpu")
    swapped, seen = [], set()
    try:
        for mod in model.modules():
            for t in (*mod._parameters.values(), *mod._buffers.values()):
                if t is None or id(t) in seen:
                    continue
                seen.add(id(t))
                want = torch.float32 if t.is_floating_point() else t.dtype
                there = t.device.type == device.type and device.index in (None, t.device.index)
                if there and t.dtype == want:
                    continue
                swapped.append((t, t.data))
                t.data = t.data.to(device, want)
        if swapped:
            log.info("export: traced on %s in float32 (%d tensors moved or widened)", device, len(swapped))
        yield model
    finally:
        for t, data in swapped:
            t.data = data


@contextlib.contextmanager
def float16_model(model):
    """The model in float16 while the block runs (restored afterwards): every float32 parameter except QLinear's
    float32 weight, which stays so that its INT8 values come from the same float32 weights as in the FP32 graph;
    QLinear weight scales rounded to float16 values (what the float16 DQ computes with, sq_export.passes.fp16_qdq).
    Buffers stay as they are: rotary inv_freq must stay float32 (HF computes the angles in float32 from it; float16
    would put position-dependent phase errors into every rotation). Norms: HF's RMSNorm casts to float32 itself
    (the graph gets Cast → Pow → ReduceMean → … → Cast), LayerNorm exports as LayerNormalization with
    stash_type=1 (float32 statistics)."""
    from sq_export.passes.fp16_qdq import fp16_scale
    from sq_export.quant.qlinear import QLinear

    params, scales, seen = [], [], set()
    try:
        for mod in model.modules():
            keep = ("w_kn",) if isinstance(mod, QLinear) else ()
            for name, p in mod.named_parameters(recurse=False):
                if name in keep or id(p) in seen or p.dtype != torch.float32:
                    continue
                seen.add(id(p))
                params.append((p, p.data))
                p.data = p.data.to(torch.float16)
            if isinstance(mod, QLinear):
                scales.append((mod, mod.w_scale))
                mod.w_scale = torch.from_numpy(fp16_scale(mod.w_scale.numpy()).astype("float32"))
        yield model
    finally:
        for p, data in params:
            p.data = data
        for mod, s in scales:
            mod.w_scale = s


def export_onnx(model, family, path, *, weights: str = "int8", target: str = "tensorrt", meta: dict | None = None, exporter=None,
                dtype: str = "fp32", constants: dict | None = None) -> dict:
    """Export `model` (already prepared: QLinears in place for naive/sq) to `path`. Returns a summary.

    `exporter(model, family, raw_path) -> dict | None` writes the raw torch.onnx graph (default: `torch_export`,
    logits only; sq_export.export.decode passes its KV-cache graph); its dict joins the metadata and the summary.
    `dtype` "fp16": the float parts in float16 (weights that stay float, norms' γ/β, activations, logits), Q/DQ
    with float16 scales at opset 19, norm statistics in float32 (see `float16_model`, passes/fp16_qdq.py); the
    model is float32 again afterwards. Only the logits graph (default exporter). `constants` {name: array}: tensors
    stored in the file as initializers no node reads (the decode graph's outlier prefix, its initial past).
    """
    import onnx_ir as ir

    from sq_export import passes
    from sq_export.onnxio.meta import write_metadata

    if weights not in WEIGHTS:
        raise BadInput(f"--weights {weights} unknown: int8 (TensorRT 10+), qdq or qdq16 (TensorRT 8.6)")
    if weights == "qdq16" and dtype == "fp16":
        raise BadInput("--weights qdq16 is the float32 graph's compact form; a --dtype fp16 graph stores float16 weights "
                       "already: use --weights qdq or int8")
    if target not in ("tensorrt", "ort"):
        raise BadInput(f"--target {target} unknown: tensorrt or ort")
    if dtype not in DTYPES:
        raise BadInput(f"--dtype {dtype} unknown: fp32 or fp16")
    if dtype == "fp16" and exporter is not None:
        raise BadInput("--dtype fp16 is for the logits graph only: export the --decode graph with --dtype fp32")
    final = check_output_path(path)
    with tempfile.TemporaryDirectory(prefix=".sq_export.", dir=final.parent) as td:
        raw = Path(td) / "raw.onnx"
        with _weights_sink() as sink:
            if dtype == "fp16":
                with float16_model(model):
                    extra = torch_export(model, family, raw, opset=OPSET_FP16) or {}
                    m = ir.load(str(raw))
                    if str(raw) in sink:  # the parameters turn float32 again after this block: keep the float16
                        _attach_weights(m, {k: v.detach() for k, v in sink.pop(str(raw)).items()})  # tensors
            else:
                extra = (exporter or torch_export)(model, family, raw) or {}
        if dtype == "fp32":
            m = ir.load(str(raw))
            if str(raw) in sink:  # the graph came without its weights: they are still the model's tensors
                _attach_weights(m, sink.pop(str(raw)), lazy=getattr(model, "_sq_lazy_weights", None))
            else:  # an exporter that wrote a complete graph itself
                ir.external_data.load_to_model(m)
    # TorchScript's CSE already gives a tensor feeding several QLinears (q/k/v) one shared Q/DQ pair.
    passes.TidyQDQConstantsPass()(m)
    if weights == "int8":
        passes.WeightsToInt8Pass()(m)
    elif weights == "qdq16" and (meta or {}).get("mode") == "fp":
        # the float graph's compact form: float16 W -> Cast where float16 holds W exactly (passes/float_weights_fp16.py)
        from sq_export.passes.float_weights_fp16 import FloatWeightsToFp16Pass

        p16 = FloatWeightsToFp16Pass()
        p16(m)
        if p16.kept_float32:
            log.warning("--weights qdq16: %d float weights kept in float32 (float16 does not hold their values exactly)",
                        p16.kept_float32)
        extra = {**extra, "weights_fp16": p16.count, "weights_kept_float32": p16.kept_float32}
    elif weights == "qdq16":
        from sq_export.passes.weights_fp16 import WeightsToFp16Pass

        p16 = WeightsToFp16Pass()
        p16(m)
        if p16.kept_float32:
            log.warning("--weights qdq16: %d weights kept in float32 (float16 would move their INT8 values)", p16.kept_float32)
        extra = {**extra, "weights_fp16": p16.count, "weights_kept_float32": p16.kept_float32}
    if target == "ort":
        passes.ActivationsToUint8Pass()(m)
    if dtype == "fp16":
        passes.Float16QDQPass()(m)
    _drop_unused_initializers(m.graph)
    for name, arr in (constants or {}).items():
        v = ir.Value(name=name, const_value=ir.tensor(arr, name=name))
        m.graph.register_initializer(v)

    def edit(mp):
        mp.producer_name = "sq_export"
        mp.doc_string = ""
        mp.graph.doc_string = ""
        write_metadata(mp, {**(meta or {}), "weights": weights, "target": target, **({"dtype": dtype} if dtype != "fp32" else {}), **extra})

    save_model(m, final, edit)
    n_nodes = len(m.graph)
    del m
    size = final.stat().st_size + (os.path.getsize(str(final) + ".data") if os.path.exists(str(final) + ".data") else 0)
    return {"onnx": str(final), "bytes": size, "nodes": n_nodes, **extra}
