"""Build a TensorRT engine from an exported ONNX graph with Polygraphy's loaders.

    build_engine("sq.onnx", "sq.engine", precision="int8")  ->  sidecar dict (also written to sq.engine.json)

The TensorRT version decides the flags (sq_export.engine.trt_compat.plan_build): 8.x sets the INT8+FP16 builder
flags for explicit Q/DQ quantization, 10+ parses a strongly typed network. The engine and its sidecar are
written atomically. Per-layer precisions come from TensorRT's engine inspector; 8.6 compiles transformer blocks
into opaque Myelin layers, whose precision is recorded as "unavailable (Myelin)".
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from sq_export.engine.run import polygraphy_logging
from sq_export.engine.precision_pins import SIDECAR_KEYS, plan_pins
from sq_export.engine.trt_compat import graph_facts_from_model, import_tensorrt, load_graph, plan_build, require_gpu
from sq_export.errors import BadInput, SqExportError
from sq_export.fileio import atomic_file, check_output_path, write_text_atomic

log = logging.getLogger(__name__)

DEFAULT_BATCH = (1, 1, 4)
DEFAULT_SEQ = (1, 128, 512)
# Decode graphs (past_key_values inputs): past length range. It starts at 1, not 0: the generate loop starts from
# one masked zero slot (sq_export.kvcache.greedy), which avoids empty tensors in TensorRT 8.6.
DEFAULT_PAST = (1, 128, 512)
# The lent GPU's kit carries stand-ins for cuBLAS/cuDNN, so by default no external tactic library is used:
# TensorRT's own INT8/FP16 GEMM kernels do the work. Pass names (e.g. ["CUBLAS", "CUBLAS_LT"]) where the real
# libraries are installed.
DEFAULT_TACTIC_SOURCES: list[str] = []


class EngineBuildFailed(SqExportError):
    """TensorRT parsed the graph but could not build an engine (exit 1)."""

    exit_code = 1


def parse_range(text: str, what: str) -> tuple[int, int, int]:
    """'1:128:512' -> (1, 128, 512); a single number N -> (N, N, N)."""
    parts = str(text).split(":")
    try:
        vals = [int(p) for p in parts]
    except ValueError:
        raise BadInput(f"--{what} must be MIN:OPT:MAX integers (or one integer), not {text!r}") from None
    if len(vals) == 1:
        vals = vals * 3
    if len(vals) != 3:
        raise BadInput(f"--{what} must be MIN:OPT:MAX, not {text!r}")
    return check_range(tuple(vals), what)


def profile_shapes(facts, batch, seq, past) -> dict:
    """{input: (min, opt, max) shapes} for every graph input. Token inputs are [batch, seq]; in a decode graph
    attention_mask is [batch, past + seq] and past_key_values.* are [batch, kv_heads, past, head_dim]."""
    from sq_export.kvcache import past_names

    pasts = set(past_names(facts.inputs))
    shapes, bad = {}, []
    for name in facts.inputs:
        dims = facts.input_shapes.get(name, [])
        if name in pasts:
            if len(dims) != 4 or not all(isinstance(d, int) and d > 0 for d in (dims[1], dims[3])):
                bad.append(f"{name} {dims}")
                continue
            shapes[name] = tuple((batch[i], dims[1], past[i], dims[3]) for i in range(3))
        elif len(dims) == 3 and isinstance(dims[2], int) and dims[2] > 0 and not all(isinstance(d, int) for d in dims[:2]):
            # a segment's residual-stream input [batch, sequence, hidden] (sq_export.onnxio.segments)
            shapes[name] = tuple((batch[i], seq[i], dims[2]) for i in range(3))
        elif len(dims) != 2:
            bad.append(f"{name} {dims}")
        elif name == "attention_mask" and pasts:
            shapes[name] = tuple((batch[i], past[i] + seq[i]) for i in range(3))
        else:
            shapes[name] = tuple((batch[i], seq[i]) for i in range(3))
    if bad:
        raise BadInput(
            "every graph input must be [batch, seq] (input_ids, attention_mask, position_ids), a segment's "
            "[batch, seq, hidden], or in a decode graph past_key_values.* [batch, heads, past, head_dim] with static "
            "heads/head_dim; these are not: " + ", ".join(bad)
        )
    return shapes


def check_range(r, what: str) -> tuple[int, int, int]:
    try:
        mn, opt, mx = (int(x) for x in r)
    except (TypeError, ValueError):
        raise BadInput(f"{what} must be (min, opt, max) integers, not {r!r}") from None
    if not (1 <= mn <= opt <= mx):
        raise BadInput(f"{what} must satisfy 1 <= min <= opt <= max, got {mn}:{opt}:{mx}")
    return mn, opt, mx


def tactic_source_values(trt, names) -> list:
    """Names ('CUBLAS', 'cublas_lt', ...) -> trt.TacticSource members; BadInput for unknown names."""
    members = dict(trt.TacticSource.__members__)
    out = []
    for n in names:
        key = str(n).strip().upper().replace("-", "_")
        if key not in members:
            raise BadInput(f"unknown tactic source {n!r}: this TensorRT knows {', '.join(members)}")
        out.append(members[key])
    return out


def _precision_of_format(fmt: str) -> str | None:
    f = (fmt or "").lower()
    for key, name in (("int8", "INT8"), ("fp8", "FP8"), ("fp16", "FP16"), ("half", "FP16"), ("bf16", "BF16"),
                      ("fp32", "FP32"), ("float", "FP32"), ("int32", "INT32"), ("int64", "INT64"), ("bool", "BOOL")):
        if key in f:
            return name
    return None


def layer_precisions(engine, trt) -> dict:
    """What TensorRT's engine inspector says about each layer: type, I/O formats, tactic, precision."""
    try:
        insp = engine.create_engine_inspector()
        info = json.loads(insp.get_engine_information(trt.LayerInformationFormat.JSON), strict=False)  # 8.6 emits raw control characters in layer names
    except Exception as e:
        return {"available": False, "reason": f"engine inspector failed: {type(e).__name__}: {e}", "layers": []}
    layers = []
    for L in info.get("Layers", []):
        if not isinstance(L, dict):  # profiling verbosity below DETAILED: names only
            layers.append({"name": str(L), "precision": "unavailable (no detailed profiling information)"})
            continue
        ltype = str(L.get("LayerType", ""))
        ins = [str(t.get("Format/Datatype", "")) for t in L.get("Inputs", []) if isinstance(t, dict)]
        outs = [str(t.get("Format/Datatype", "")) for t in L.get("Outputs", []) if isinstance(t, dict)]
        if "myelin" in ltype.lower() or "myelin" in str(L.get("TacticName", "")).lower():
            prec = "unavailable (Myelin)"
        else:
            precs = [p for p in (_precision_of_format(f) for f in ins + outs) if p]
            prec = "INT8" if "INT8" in precs else (precs[0] if precs else "unknown")
        layers.append(
            {
                "name": str(L.get("Name", ""))[:200],
                "type": ltype,
                "precision": prec,
                "inputs": ins[:4],
                "outputs": outs[:4],
                "tactic": str(L.get("TacticName", ""))[:120],
            }
        )
    counts: dict = {}
    for L in layers:
        counts[L["precision"]] = counts.get(L["precision"], 0) + 1
    return {"available": True, "n_layers": len(layers), "precision_counts": counts, "layers": layers}


def io_tensors(engine, trt) -> dict:
    out = {}
    for i in range(engine.num_io_tensors):
        n = engine.get_tensor_name(i)
        out[n] = {
            "mode": "input" if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT else "output",
            "dtype": str(engine.get_tensor_dtype(n)).replace("DataType.", ""),
            "shape": [int(d) for d in engine.get_tensor_shape(n)],
        }
    return out


def network_from_rewritten_onnx(model, onnx_path: Path, trt, **network_kwargs):
    """A Polygraphy-style network loader for a graph rewritten in memory (loaded without its external weights): the
    parser reads the serialized graph and finds external weights relative to `onnx_path`, as parse_from_file would.
    (No copy of the graph or its weights on disk.)"""
    from polygraphy.backend.trt import CreateNetwork
    from polygraphy.backend.trt import util as trt_util

    model_bytes = model.SerializeToString()

    def load():
        builder, network = CreateNetwork(**network_kwargs)()
        trt.init_libnvinfer_plugins(trt_util.get_trt_logger(), "")
        parser = trt.OnnxParser(network, trt_util.get_trt_logger())
        ok = parser.parse(model_bytes, str(onnx_path))  # parse(model, path): on the H100 with 8.6
        trt_util.check_onnx_parser_errors(parser, ok)
        return builder, network, parser

    return load


def build_engine(
    onnx_path,
    engine_path,
    precision: str = "int8",
    batch=DEFAULT_BATCH,
    seq=DEFAULT_SEQ,
    timing_cache=None,
    tactic_sources=None,
    workspace_gb=None,
    opt_level=None,
    fp32_norms=True,
    past=None,
    kv_fp16=False,
    fp16=None,
    fp16_float_matmuls=True,
    int8_gemm_output=None,
    fp32_nodes=None,
    prescale_norms=True,
) -> dict:
    """Build `onnx_path` into a TensorRT engine at `engine_path` (+ `engine_path`.json sidecar); returns the sidecar.

    batch/seq: (min, opt, max) of the dynamic [batch, seq] dims of every 2-D input (input_ids, attention_mask,
    position_ids). tactic_sources: None -> none (TensorRT's own kernels; cuBLAS/cuDNN off), or a list of names.
    timing_cache: a file read before and updated after the build. workspace_gb: workspace memory pool limit.
    past: (min, opt, max) past length of a decode graph (default DEFAULT_PAST; min >= 1). kv_fp16: TensorRT 8.x
    takes and returns the KV cache (past_key_values.* / present.*) in FP16, halving its memory traffic.
    fp16=False (TensorRT 8.x, int8): no FP16 builder flag, float layers stay FP32 (trt_compat.plan_build); True: the
    flag; None: the graph's own default (metadata int8_fp16: off for Gemma-3 INT8 graphs), else the flag.
    fp32_norms / fp16_float_matmuls (TensorRT 8.x): pin norms to FP32, and the un-quantized MatMuls to FP16 (in
    INT8 engines attention, LM head and fallback Linears; in FP16 engines every MatMul: next to FP32-pinned norms
    8.6 otherwise runs them in FP32; engine/precision_pins.py). int8_gemm_output "fp16"|"fp32" (TensorRT 8.x, experimental, benchmark
    only): the output type of the INT8 GEMMs (8.6 picks FP32 by itself). fp32_nodes: a regex over ONNX node names
    whose layers are pinned to FP32 too (TensorRT 8.x; Q/DQ and INT8 GEMMs excluded). prescale_norms: rewrite
    every decomposed norm so its statistics cannot overflow FP16 (engine/norm_prescale.py; exact), parsed from
    the rewritten graph in memory. With the FP16 flag the attention mask's float32-lowest fills become -16,384
    (engine/mask_fill.py: a fully masked row's softmax is NaN in FP16 otherwise).
    """
    onnx_path = Path(onnx_path)
    engine_path = Path(engine_path)
    batch = check_range(batch, "batch")
    seq = check_range(seq, "seq")
    if workspace_gb is not None and not (float(workspace_gb) > 0):
        raise BadInput(f"workspace must be > 0 GiB, got {workspace_gb}")
    if not onnx_path.is_file():
        raise BadInput(f"ONNX file {onnx_path} does not exist")
    if not os.access(onnx_path, os.R_OK):
        raise BadInput(f"ONNX file {onnx_path} is not readable (permission denied)")
    check_output_path(engine_path)
    model = load_graph(onnx_path)  # once: the facts here, the precision pins below
    facts = graph_facts_from_model(model)
    from sq_export.kvcache import PRESENT_PREFIX, past_names

    decode = bool(past_names(facts.inputs))
    past = check_range(past if past is not None else DEFAULT_PAST, "past") if decode else None
    shapes = profile_shapes(facts, batch, seq, past)

    trt = import_tensorrt()
    gpu = require_gpu()
    plan = plan_build(trt.__version__, precision, facts, fp16=fp16)
    for note in plan.notes:
        log.info("build plan: %s", note)

    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, EngineFromBytes, NetworkFromOnnxPath, Profile
    from polygraphy.exception import PolygraphyException

    profile = Profile()
    for name, (mn, opt, mx) in shapes.items():
        profile.add(name, min=mn, opt=opt, max=mx)
    names = DEFAULT_TACTIC_SOURCES if tactic_sources is None else list(tactic_sources)
    sources = tactic_source_values(trt, names)
    cfg_kwargs = dict(plan.config_kwargs())
    cfg_kwargs.update(
        profiles=[profile],
        tactic_sources=sources,
        profiling_verbosity=trt.ProfilingVerbosity.DETAILED,
    )
    if timing_cache is not None:
        cfg_kwargs["load_timing_cache"] = str(timing_cache)
    if opt_level is not None:
        cfg_kwargs["builder_optimization_level"] = int(opt_level)
    if workspace_gb is not None:
        cfg_kwargs["memory_pool_limits"] = {trt.MemoryPoolType.WORKSPACE: int(float(workspace_gb) * (1 << 30))}
    prescaled: list[str] = []
    if prescale_norms and plan.fp16_flag:  # TensorRT 8.x may pick FP16 for the norms whatever the pins say
        from sq_export.engine.norm_prescale import prescale_norms as _prescale

        prescaled = _prescale(model)
        log.info("prescaled norms: %d (statistics FP16-safe)", len(prescaled))
    mask_fills: list[str] = []
    if plan.fp16_flag:  # float32's lowest as the mask fill is -inf in FP16: a fully masked row's softmax NaN
        from sq_export.engine.mask_fill import finite_mask_fills

        mask_fills = finite_mask_fills(model)
        if mask_fills:
            log.info("attention-mask fills made FP16-finite: %d", len(mask_fills))
    if prescaled or mask_fills:
        network = network_from_rewritten_onnx(model, onnx_path, trt, **plan.network_kwargs())
    else:
        network = NetworkFromOnnxPath(str(onnx_path), **plan.network_kwargs())
    # layer precisions TensorRT 8.x must be told (engine/precision_pins.py), found on the graph read once above
    pins = plan_pins(model, trt, plan, fp32_norms=fp32_norms, fp16_float_matmuls=fp16_float_matmuls,
                     fp32_nodes=fp32_nodes, int8_gemm_output=int8_gemm_output)
    del model  # (the parser reads the file itself, or the rewritten graph's bytes)
    active = [p for p in pins if p.names]
    if active:
        from polygraphy.backend.trt import PostprocessNetwork

        def _pin(network):  # Polygraphy's PostprocessNetwork calls func(network=...)
            for pin in active:
                if not pin.apply(network, trt):
                    log.warning("precision pin %s: none of %d ONNX nodes (e.g. %s) matched a TensorRT layer", pin.key,
                                len(pin.names), pin.names[0])

        network = PostprocessNetwork(network, _pin)
        cfg_kwargs["precision_constraints"] = "prefer"
    kv_io = {"fp16": 0}
    if kv_fp16 and decode:
        if plan.strongly_typed:
            raise BadInput("--kv-fp16 needs TensorRT 8.x: a strongly typed network takes the cache in the graph's own dtype (export an FP16 graph)")
        from polygraphy.backend.trt import PostprocessNetwork

        def _kv16(network):
            net = network
            for t in [net.get_input(i) for i in range(net.num_inputs)] + [net.get_output(i) for i in range(net.num_outputs)]:
                if t.name.startswith(("past_key_values.", PRESENT_PREFIX)):
                    t.dtype = trt.float16
                    kv_io["fp16"] += 1

        network = PostprocessNetwork(network, _kv16)
    builder = EngineBytesFromNetwork(
        network,
        config=CreateConfig(**cfg_kwargs),
        save_timing_cache=str(timing_cache) if timing_cache is not None else None,
    )

    t0 = time.perf_counter()
    try:
        with polygraphy_logging("ERROR"):
            serialized = builder()
    except PolygraphyException as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "no message"
        if "pars" in str(e).lower():
            raise BadInput(
                f"TensorRT {trt.__version__} could not parse {onnx_path} ({first[:200]}); rerun with -v for the "
                "parser log"
            ) from None
        raise EngineBuildFailed(
            f"TensorRT {trt.__version__} could not build {onnx_path} at {precision} ({first[:200]}); rerun with -v "
            "for the builder log"
        ) from None
    build_s = time.perf_counter() - t0
    if serialized is None:
        raise EngineBuildFailed(f"TensorRT {trt.__version__} returned no engine for {onnx_path}")

    with atomic_file(engine_path) as tmp:
        with open(tmp, "wb") as f:
            f.write(serialized)
    n_bytes = engine_path.stat().st_size

    # Inspect the engine we just wrote (deserializing also proves it loads).
    try:
        with polygraphy_logging("ERROR"):
            engine = EngineFromBytes(serialized)()
        layers = layer_precisions(engine, trt)
        io = io_tensors(engine, trt)
        del engine
    except PolygraphyException as e:
        layers = {"available": False, "reason": f"could not deserialize to inspect: {str(e)[:200]}", "layers": []}
        io = {}
    del serialized

    sidecar = {
        "engine": str(engine_path),
        "onnx": str(onnx_path),
        "tensorrt_version": trt.__version__,
        "gpu": gpu.get("name"),
        "precision": precision,
        "plan": plan.as_dict(),
        "graph": facts.as_dict(),
        "profile": {"batch": list(batch), "seq": list(seq), **({"past": list(past)} if decode else {}), "inputs": list(facts.inputs),
                    "shapes": {n: [list(x) for x in v] for n, v in shapes.items()}},
        "decode_graph": decode,
        "kv_cache_fp16_io": kv_io["fp16"],
        "tactic_sources": [str(s).replace("TacticSource.", "") for s in sources],
        "timing_cache": str(timing_cache) if timing_cache is not None else None,
        "workspace_gb": workspace_gb,
        "builder_optimization_level": opt_level,
        **{key: {"layers": 0, "nodes": 0} for key in SIDECAR_KEYS.values()},
        "int8_gemm_output": {"layers": 0, "nodes": 0, "dtype": int8_gemm_output},
        "fp32_nodes": {"layers": 0, "nodes": 0, "pattern": fp32_nodes},
        "prescaled_norms": len(prescaled),
        "finite_mask_fills": len(mask_fills),
        **{p.key: p.record() for p in pins},
        "build_seconds": round(build_s, 3),
        "engine_bytes": n_bytes,
        "io": io,
        "layer_precisions": layers,
    }
    write_text_atomic(str(engine_path) + ".json", json.dumps(sidecar, indent=2) + "\n")
    return sidecar
