"""What a TensorRT version needs to build a given ONNX graph at a given precision.

``plan_build(trt_version, precision, facts)`` is a pure function of the TensorRT version string and a few facts
read from the ONNX graph (``graph_facts``), so the choices are unit-testable without TensorRT or a GPU:

TensorRT 8.x (the kit on the lent GPU is 8.6.0)
  * explicit quantization: Q/DQ nodes in the graph plus the INT8 *and* FP16 builder flags (FP16 lets the
    non-quantized layers run in half precision, as they would in a strongly typed FP16 graph);
  * weights must be float initializers -> QuantizeLinear -> DequantizeLinear: 8.6's Myelin backend refuses INT8
    initializers feeding DequantizeLinear, so such a graph is rejected up front (export with ``--weights qdq``);
  * an FP16 engine is a float graph (FP32 or FP16) built with the FP16 flag;
  * no INT64 I/O: the ONNX parser turns int64 inputs into int32 ones (the runners feed the dtype the engine
    reports, so int64 token ids are cast to int32 at run time);
  * no BF16.
TensorRT 10+ (and 11, which removes the precision flags)
  * strongly typed networks: no INT8/FP16 flags; the graph's dtypes decide every layer's precision;
  * INT8 weight initializers -> DequantizeLinear are accepted (half the ONNX size), float -> Q -> DQ too;
  * an FP16 engine needs an FP16 graph (``sq-export export --dtype fp16``); an FP32 Q/DQ graph builds, but every
    non-quantized layer stays FP32 (said in the plan's notes);
  * INT64 inputs are native.
TensorRT 9.x (LLM preview releases) is treated like 8.x: the builder flags still exist there.

Nothing here imports TensorRT at module level; ``import_tensorrt()`` and ``require_gpu()`` raise
``BackendMissing`` (exit 3) with one line saying what to install.
"""

from __future__ import annotations

import ctypes
import re
from dataclasses import asdict, dataclass, field

from sq_export.errors import BackendMissing, BadInput

PRECISIONS = ("int8", "fp16")

TRT_INSTALL_HINT = (
    "install TensorRT 8.6+ for this Python (pip install tensorrt) on a machine with an NVIDIA GPU, "
    "or on the lent GPU `source /opt/trt86/env.sh` and run with $TRTPY"
)


# --------------------------------------------------------------------------------------------------------------
# Backend availability
# --------------------------------------------------------------------------------------------------------------


def import_tensorrt():
    """Import tensorrt or raise BackendMissing (one line, says what to install)."""
    try:
        import tensorrt as trt  # noqa: PLC0415 (lazy on purpose)
    except Exception as e:  # ImportError, or a broken install (missing libnvinfer.so)
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BackendMissing(f"TensorRT is not importable ({msg}): {TRT_INSTALL_HINT}") from None
    if not hasattr(trt, "__version__"):
        raise BackendMissing(f"the `tensorrt` module found has no __version__ (not NVIDIA TensorRT?): {TRT_INSTALL_HINT}")
    return trt


def _cudart():
    """The CUDA runtime library as Polygraphy finds it (ctypes handle), or None."""
    try:
        from polygraphy import cuda

        return cuda.wrapper().handle
    except Exception:
        for name in ("libcudart.so", "libcudart.so.12", "libcudart.so.11.0"):
            try:
                return ctypes.CDLL(name)
            except OSError:
                continue
    return None


def gpu_info() -> dict:
    """{'count': n, 'name': str|None, 'error': str|None} through the CUDA runtime; never raises."""
    lib = _cudart()
    if lib is None:
        return {"count": 0, "name": None, "error": "CUDA runtime library (libcudart) not found"}
    try:
        n = ctypes.c_int(0)
        rc = lib.cudaGetDeviceCount(ctypes.byref(n))
        if rc != 0:
            return {"count": 0, "name": None, "error": f"cudaGetDeviceCount returned CUDA error {rc}"}
        name = None
        if n.value > 0:
            dev = ctypes.c_int(0)
            lib.cudaGetDevice(ctypes.byref(dev))
            buf = ctypes.create_string_buffer(16384)  # cudaDeviceProp is ~1 KiB; `name` (char[256]) comes first
            if lib.cudaGetDeviceProperties(buf, dev) == 0:
                name = buf.raw[:256].split(b"\0", 1)[0].decode(errors="replace") or None
        return {"count": int(n.value), "name": name, "error": None}
    except Exception as e:  # a stand-in or broken libcudart
        return {"count": 0, "name": None, "error": f"{type(e).__name__}: {e}"}


def require_gpu() -> dict:
    info = gpu_info()
    if info["count"] < 1:
        why = info["error"] or "no CUDA device visible"
        raise BackendMissing(
            f"no NVIDIA GPU available to TensorRT ({why}): run on a machine with an NVIDIA GPU and its driver "
            "(check nvidia-smi and CUDA_VISIBLE_DEVICES)"
        )
    return info


# --------------------------------------------------------------------------------------------------------------
# Facts about the ONNX graph
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GraphFacts:
    inputs: dict = field(default_factory=dict)  # name -> ONNX dtype name ("INT64", "FLOAT", ...)
    input_shapes: dict = field(default_factory=dict)  # name -> [dim or dim_param or None]
    outputs: dict = field(default_factory=dict)  # name -> ONNX dtype name
    n_quantize: int = 0
    n_dequantize: int = 0
    int8_weight_dq: tuple = ()  # INT8/UINT8 initializers (or Constants) feeding DequantizeLinear directly
    float_dtype: str = "fp32"  # "fp32" | "fp16" | "bf16" | "none": the dtype most float weights are stored in
    qdq_scale_dtypes: tuple = ()  # dtypes of the Q/DQ scales ("FLOAT", "FLOAT16", ...)
    opset: int = 0
    int8_fp16: bool | None = None  # the graph's metadata sq_export.int8_fp16 (the exporter's family default), if any
    prefix_length: int = 0  # sq_export.prefix_length: an outlier prefix the decode runtime must start from

    @property
    def has_qdq(self) -> bool:
        return self.n_quantize + self.n_dequantize > 0

    def as_dict(self) -> dict:
        d = asdict(self)
        d["has_qdq"] = self.has_qdq
        d["int8_weight_dq"] = list(self.int8_weight_dq)[:10] + (["..."] if len(self.int8_weight_dq) > 10 else [])
        d["n_int8_weight_dq"] = len(self.int8_weight_dq)
        d["qdq_scale_dtypes"] = list(self.qdq_scale_dtypes)
        return d


_FLOAT_KIND = {"FLOAT": "fp32", "FLOAT16": "fp16", "BFLOAT16": "bf16", "DOUBLE": "fp32"}


def graph_facts_from_model(model) -> GraphFacts:
    """Facts from an in-memory onnx.ModelProto (external weights need not be loaded)."""
    import onnx

    def tname(elem_type: int) -> str:
        return onnx.TensorProto.DataType.Name(elem_type)

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    consts = {}
    for n in g.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value" and a.t is not None:
                    consts[n.output[0]] = a.t
    init_names = {i.name for i in g.initializer}

    def dims(vi):
        out = []
        for d in vi.type.tensor_type.shape.dim:
            out.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or None))
        return out

    inputs = {vi.name: tname(vi.type.tensor_type.elem_type) for vi in g.input if vi.name not in init_names}
    shapes = {vi.name: dims(vi) for vi in g.input if vi.name not in init_names}
    outputs = {vi.name: tname(vi.type.tensor_type.elem_type) for vi in g.output}

    nq = nd = 0
    int8_dq, scale_types = [], set()
    for n in g.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if n.op_type == "QuantizeLinear":
            nq += 1
        else:
            nd += 1
            src = n.input[0]
            t = inits.get(src) or consts.get(src)
            if t is not None and tname(t.data_type) in ("INT8", "UINT8", "INT4", "UINT4"):
                int8_dq.append(src)
        if len(n.input) > 1:
            s = inits.get(n.input[1]) or consts.get(n.input[1])
            if s is not None:
                scale_types.add(tname(s.data_type))

    # Which float type holds most weight elements (Q/DQ scales are few and do not sway it).
    count = {"fp32": 0, "fp16": 0, "bf16": 0}
    for t in list(inits.values()) + list(consts.values()):
        kind = _FLOAT_KIND.get(tname(t.data_type))
        if kind:
            n_el = 1
            for d in t.dims:
                n_el *= int(d)
            count[kind] += n_el
    if any(count.values()):
        float_dtype = max(count, key=lambda k: count[k])
    else:
        outs = [_FLOAT_KIND.get(v) for v in outputs.values() if _FLOAT_KIND.get(v)]
        float_dtype = outs[0] if outs else "none"

    opset = 0
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            opset = int(o.version)
    meta = {p.key: p.value for p in model.metadata_props}
    flag = meta.get("sq_export.int8_fp16")
    return GraphFacts(
        inputs=inputs,
        input_shapes=shapes,
        outputs=outputs,
        n_quantize=nq,
        n_dequantize=nd,
        int8_weight_dq=tuple(int8_dq),
        float_dtype=float_dtype,
        qdq_scale_dtypes=tuple(sorted(scale_types)),
        opset=opset,
        int8_fp16=None if flag in (None, "") else flag not in ("0", "false", "False"),
        prefix_length=int(meta.get("sq_export.prefix_length") or 0),
    )


def load_graph(onnx_path):
    """The onnx.ModelProto of `onnx_path` without its external weights; BadInput when unreadable or empty."""
    from sq_export.onnxio.read import load_proto

    return load_proto(onnx_path)


def graph_facts(onnx_path) -> GraphFacts:
    """Read the graph (not its external weights) and return its facts; BadInput when unreadable."""
    return graph_facts_from_model(load_graph(onnx_path))


# --------------------------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------------------------


def parse_version(v: str) -> tuple[int, int, int]:
    m = re.match(r"^\s*(\d+)(?:\.(\d+))?(?:\.(\d+))?", str(v))
    if not m:
        raise BadInput(f"cannot parse the TensorRT version {v!r}")
    return tuple(int(x) if x is not None else 0 for x in m.groups())  # type: ignore[return-value]


@dataclass
class BuildPlan:
    trt_version: str
    trt_major: int
    precision: str  # "int8" | "fp16"
    strongly_typed: bool
    fp16_flag: bool
    int8_flag: bool
    int64_inputs_become_int32: bool
    graph_float_dtype: str
    notes: list = field(default_factory=list)

    def network_kwargs(self) -> dict:
        """Keyword arguments for polygraphy's NetworkFromOnnxPath."""
        return {"strongly_typed": True} if self.strongly_typed else {}

    def config_kwargs(self) -> dict:
        """Precision keyword arguments for polygraphy's CreateConfig."""
        kw = {}
        if self.fp16_flag:
            kw["fp16"] = True
        if self.int8_flag:
            kw["int8"] = True
        return kw

    def as_dict(self) -> dict:
        d = asdict(self)
        d["network_kwargs"] = self.network_kwargs()
        d["config_kwargs"] = self.config_kwargs()
        return d


def plan_build(trt_version: str, precision: str, facts: GraphFacts, fp16: bool | None = None) -> BuildPlan:
    """Decide builder flags / network typing for `precision` on TensorRT `trt_version`; BadInput when the graph
    cannot give that precision on that version (the message says how to re-export). fp16=False (TensorRT 8.x,
    int8 only): no FP16 flag, so every layer outside the Q/DQ-quantized ones runs in FP32 (slower; isolates FP16
    range problems from INT8 ones). fp16=None: what the graph asks for (facts.int8_fp16, written by the exporter
    from the family's default: off for Gemma-3), else the flag."""
    if precision not in PRECISIONS:
        raise BadInput(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    major, minor, _ = parse_version(trt_version)
    if major < 8 or (major == 8 and minor < 5):
        raise BackendMissing(f"TensorRT {trt_version} is too old (8.5+ needed, 8.6+ tested): {TRT_INSTALL_HINT}")
    strongly_typed = major >= 10
    fdt = facts.float_dtype
    graph_default = fp16 is None and precision == "int8" and not strongly_typed and facts.int8_fp16 is False
    if fp16 is None:
        fp16 = not graph_default
    if not fp16 and (precision != "int8" or strongly_typed):
        raise BadInput(
            "--no-fp16 applies to --precision int8 on TensorRT 8.x only"
            + (f" (TensorRT {trt_version} is strongly typed: export an FP32 graph to keep float layers in FP32)" if strongly_typed else "")
        )
    notes: list[str] = []
    int64_inputs = [n for n, t in facts.inputs.items() if t == "INT64"]

    if precision == "int8" and not facts.has_qdq:
        raise BadInput(
            "--precision int8 needs an explicitly quantized graph (QuantizeLinear/DequantizeLinear nodes), and this "
            "one has none: export the SmoothQuant graph with `sq-export export` (implicit INT8 calibration is not "
            "supported), or build this float graph with --precision fp16"
        )
    if precision == "fp16" and facts.has_qdq:
        raise BadInput(
            f"this graph holds {facts.n_quantize} QuantizeLinear / {facts.n_dequantize} DequantizeLinear nodes, so "
            "TensorRT would run it in INT8: build it with --precision int8, or build an FP16 engine from a float "
            "(unquantized) export of the model"
        )

    if not strongly_typed:
        if fdt == "bf16":
            raise BadInput(
                f"TensorRT {trt_version} has no BF16: export the graph as FP32 or FP16 (`sq-export export --dtype fp16`)"
            )
        if precision == "int8":
            if "FLOAT16" in facts.qdq_scale_dtypes:
                raise BadInput(
                    f"this graph's Q/DQ have FLOAT16 scales (opset {facts.opset}, an `export --dtype fp16` graph), "
                    f"which TensorRT {trt_version} cannot parse (FLOAT scales, opset <= 17): build it with TensorRT "
                    "10+ (strongly typed), or export --dtype fp32 --weights qdq for TensorRT 8.x"
                )
            if facts.int8_weight_dq:
                raise BadInput(
                    f"TensorRT {trt_version} refuses INT8 weight initializers feeding DequantizeLinear "
                    f"({len(facts.int8_weight_dq)} here, e.g. {facts.int8_weight_dq[0]}): re-export with "
                    "`sq-export export --weights qdq` (float weights -> QuantizeLinear -> DequantizeLinear; the "
                    "builder folds them into INT8), or use TensorRT 10+"
                )
            if facts.opset and facts.opset < 13:
                notes.append(f"opset {facts.opset} < 13: per-channel Q/DQ (axis) needs opset 13+")
            if any(s != "FLOAT" for s in facts.qdq_scale_dtypes):
                notes.append(
                    f"Q/DQ scales are {'/'.join(facts.qdq_scale_dtypes)}; TensorRT {major}.x expects FLOAT scales"
                )
            fp16_flag, int8_flag = fp16, True
            notes.append(
                f"TensorRT {major}.x explicit quantization: INT8 and FP16 builder flags; Q/DQ placement decides what "
                "runs in INT8, the rest may run in FP16"
                if fp16 else
                f"TensorRT {major}.x explicit quantization, INT8 flag only ("
                + ("the graph's metadata int8_fp16=0, its family's default; `build --fp16` overrides" if graph_default else "--no-fp16")
                + "): Q/DQ placement decides what runs in INT8, the rest runs in FP32"
            )
        else:
            fp16_flag, int8_flag = True, False
            notes.append(
                f"TensorRT {major}.x FP16: FP16 builder flag on a {fdt.upper()} graph (weakly typed: the builder "
                "picks FP16 kernels where it is faster)"
            )
        if int64_inputs:
            notes.append(
                f"TensorRT {major}.x has no INT64 I/O: the ONNX parser casts {', '.join(int64_inputs)} to INT32; "
                "feed int32 at run time (the runners here do it)"
            )
    else:
        fp16_flag = int8_flag = False
        if fdt == "fp32" or fdt == "none":
            if precision == "fp16":
                raise BadInput(
                    f"TensorRT {trt_version} builds strongly typed networks whose precision is the graph's, and this "
                    "graph is FP32 (the engine would be FP32): export an FP16 graph with `sq-export export --dtype fp16`"
                )
            notes.append(
                "the graph is FP32 and the network is strongly typed: quantized MatMuls run in INT8 but every other "
                "layer stays FP32 (export with `--dtype fp16` for FP16 elsewhere)"
            )
        else:
            notes.append(f"strongly typed network: the graph's {fdt.upper()} and Q/DQ dtypes decide layer precisions")
        if precision == "int8" and facts.int8_weight_dq:
            notes.append(f"{len(facts.int8_weight_dq)} INT8 weight initializers feed DequantizeLinear (fine on {major}.x)")
    return BuildPlan(
        trt_version=str(trt_version),
        trt_major=major,
        precision=precision,
        strongly_typed=strongly_typed,
        fp16_flag=fp16_flag,
        int8_flag=int8_flag,
        int64_inputs_become_int32=(not strongly_typed) and bool(int64_inputs),
        graph_float_dtype=fdt,
        notes=notes,
    )


# --------------------------------------------------------------------------------------------------------------
# Execution contexts whose activation memory the caller provides (segment chains share one buffer)
# --------------------------------------------------------------------------------------------------------------


def context_without_device_memory(engine, trt=None):
    """An execution context of `engine` with no activation (scratch) memory of its own: the caller sets it with
    set_context_memory before the first inference. TensorRT 10+: the USER_MANAGED allocation strategy; 8.x:
    create_execution_context_without_device_memory. Contexts that never run at the same time can share one buffer
    of the largest context_memory_size (the segments of a chain run one after another)."""
    trt = trt or import_tensorrt()
    strategy = getattr(trt, "ExecutionContextAllocationStrategy", None)
    ctx = (engine.create_execution_context(strategy.USER_MANAGED) if strategy is not None
           else engine.create_execution_context_without_device_memory())
    if ctx is None:
        raise BadInput("TensorRT could not create an execution context for a segment engine (see its log above)")
    return ctx


def context_memory_size(engine) -> int:
    """Bytes of activation memory a context of `engine` needs at its largest profile (10.1+: device_memory_size_v2)."""
    size = getattr(engine, "device_memory_size_v2", None)
    return int(size if size is not None else engine.device_memory_size)


def set_context_memory(context, ptr: int, nbytes: int) -> None:
    """Give a context made by context_without_device_memory its activation memory (10.1+: set_device_memory)."""
    if hasattr(context, "set_device_memory"):
        context.set_device_memory(ptr, nbytes)
    else:
        context.device_memory = ptr
