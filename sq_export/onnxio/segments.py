"""Split an exported decoder graph into segments of consecutive layers, without copying a weight (torch-free).

Why: TensorRT 8.6's builder holds about ten times an INT8 Q/DQ graph's weight bytes in host memory while it builds
(a 4-layer Llama-2-7B-wide graph: 34.3 GB; the 32-layer one was killed at 79.5 GB on a 128 GB host, docs/BIG_MODELS.md).
A model cut into segments of a few layers builds one segment at a time (or a few in parallel), each engine as
small as its layers, and runs as a chain: segment k's outputs feed segment k+1 (sq_export.engine.chain). This is
how runtimes split a model into pipeline stages; here the stages share one GPU.

What crosses a cut: the residual stream (a float [batch, sequence, hidden] tensor) and, in a decode graph, nothing
else (each segment takes its own layers' past_key_values.* and returns their present.*). Everything cheap that
several layers share (the attention-mask expansion, the rotary cos/sin, position ids, shape arithmetic) is
recomputed inside each segment that needs it: the nodes are copied, so the values are the same computation on the
same inputs. "Cheap" is decided per value: computed from graph inputs and small initializers only (no weight of
`BIG_INITIALIZER` bytes or more anywhere upstream). Values computed from initializers alone (a qdq16 weight's
float16 -> Cast, a Q -> DQ of a weight: nodes outside any layer's name scope) are computed in the segment that uses
them too. Any other value used across a cut becomes an output of the segment that makes it and an input of the one
that uses it.

No weight is copied: each segment's initializers are external data pointing into the source graph's file (its
`.data` file, or, for a single-file graph, the raw bytes inside the .onnx itself, as onnxio.read.point_into does),
so the segment files sit beside the source graph and a 14 GB graph splits in seconds with no extra disk.

The manifest `<stem>.segments.json` lists the segments in order with their inputs and outputs; every model path
the engine side takes (compare, eval, perplexity, generate) accepts it, and `sq-export build` turns it into an
engine manifest (one engine per segment).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import onnx

from sq_export.errors import BadInput

SEGMENTS_SUFFIX = ".segments.json"
FORMAT = "sq_export.segments/1"
BIG_INITIALIZER = 1 << 16  # bytes: an initializer this large upstream makes a value "not cheap" (a weight)
_LAYER_RE = re.compile(r"(?:^|/)(?:layers|h|blocks|layer)\.(\d+)(?:/|$)")


def is_manifest(path) -> bool:
    return str(path).lower().endswith(SEGMENTS_SUFFIX)


def layer_of(node_name: str) -> int | None:
    """The decoder-layer index in a node name exported from a module path (…/layers.3/…, …/h.3/…), else None."""
    m = _LAYER_RE.search(node_name or "")
    return int(m.group(1)) if m else None


def _tensor_bytes(t: onnx.TensorProto) -> int:
    n = 1
    for d in t.dims:
        n *= int(d)
    return n * max(1, onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize) if t.data_type else 0


def _source_proto(path: Path) -> onnx.ModelProto:
    """The graph without weight bytes, every initializer external data that points into the source's files."""
    from sq_export.onnxio.read import load_proto, point_into, read_skeleton

    got = read_skeleton(path)
    if got is not None:  # single-file graph: point into the .onnx itself
        proto, spans = got
        point_into(proto, spans, path.name)
        return proto
    proto = load_proto(path)  # external data already (relative to the source's folder, where the segments go)
    for t in proto.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL and t.HasField("raw_data") and len(t.raw_data) >= BIG_INITIALIZER:
            raise BadInput(f"{path}: initializer {t.name} is stored both inline and beside external data; re-export the graph")
    return proto


def plan_ranges(n_layers: int, layers_per_segment: int | None = None, segments: int | None = None) -> list[tuple[int, int]]:
    """[(first, last)] layer ranges: `segments` near-equal parts or runs of `layers_per_segment` layers."""
    if (layers_per_segment is None) == (segments is None):
        raise BadInput("give either the number of segments or the layers per segment")
    if segments is not None:
        if not 1 <= segments <= n_layers:
            raise BadInput(f"--segments must lie in 1..{n_layers} (the graph has {n_layers} decoder layers), got {segments}")
        base, extra = divmod(n_layers, segments)
        sizes = [base + (1 if i < extra else 0) for i in range(segments)]
    else:
        if not layers_per_segment >= 1:
            raise BadInput(f"--layers-per-segment must be >= 1, got {layers_per_segment}")
        sizes = [min(layers_per_segment, n_layers - i) for i in range(0, n_layers, layers_per_segment)]
    out, first = [], 0
    for s in sizes:
        out.append((first, first + s - 1))
        first += s
    return out


@dataclass
class Segment:
    index: int
    layers: tuple[int, int]
    nodes: list  # node indices into the source graph, in source order
    inputs: list  # value names (graph inputs and values from earlier segments)
    outputs: list  # value names (graph outputs and values later segments use)
    shape_of: dict  # node index -> the input a Shape node reads here instead (same inferred shape)


def _signature(vi) -> tuple | None:
    """A value's inferred shape as a tuple of ints and dim names; None where any dim is unknown/unnamed."""
    if vi is None or not vi.type.tensor_type.HasField("shape"):
        return None
    out = []
    for d in vi.type.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            out.append(int(d.dim_value))
        elif d.dim_param and not d.dim_param.startswith("unk__"):
            out.append(d.dim_param)
        else:
            return None
    return tuple(out)


def plan_segments(proto: onnx.ModelProto, ranges: list[tuple[int, int]], infos: dict | None = None) -> list[Segment]:
    """Which source nodes each segment computes, what it takes and what it hands on (see the module doc).
    `infos` (name -> ValueInfoProto, from shape inference) lets a cheap Shape of a weight-derived value (the
    embedding's shape, read by the mask and rotary code) read a same-shaped input of the segment instead."""
    infos = infos or {}
    g = proto.graph
    nodes = list(g.node)
    init = {t.name: t for t in g.initializer}
    graph_inputs = [i.name for i in g.input if i.name not in init]
    graph_outputs = [o.name for o in g.output]
    producer = {}
    for i, n in enumerate(nodes):
        for o in n.output:
            if o:
                producer[o] = i
    seg_of_layer = {}
    for s, (a, b) in enumerate(ranges):
        for k in range(a, b + 1):
            seg_of_layer[k] = s

    # cheap values: computed from graph inputs and small initializers only (recomputed wherever they are needed);
    # a Shape node is cheap when its input's shape is known by name (it can read any value of that shape)
    big = {name for name, t in init.items() if _tensor_bytes(t) >= BIG_INITIALIZER}
    cheap_value = {name: True for name in graph_inputs}
    for name in init:
        cheap_value[name] = name not in big
    # weight-only values: computed from initializers alone (a weight's Cast, Transpose, Q -> DQ): like the cheap
    # ones, computed in whichever segment uses them, never handed across a cut
    weight_only = {name: True for name in init}
    free_node = []
    for i, n in enumerate(nodes):
        sub = any(_subgraph(a) for a in n.attribute)
        if n.op_type == "Shape" and n.input and _signature(infos.get(n.input[0])) is not None:
            ok = True
        else:
            ok = all(cheap_value.get(v, True) for v in n.input if v) and not sub  # unknown input (outer scope): let it be
        w_only = all(weight_only.get(v, False) for v in n.input if v) and not sub
        free_node.append(ok or w_only)
        for o in n.output:
            if o:
                cheap_value[o] = ok
                weight_only[o] = w_only

    # owners: a layer node belongs to its layer's segment; any other node sits with its latest producer (the
    # final norm and head in the last segment); free nodes are owned by nobody (computed where they are used)
    owner = [None] * len(nodes)
    for i, n in enumerate(nodes):
        if free_node[i]:
            continue
        k = layer_of(n.name)
        if k is not None:
            if k not in seg_of_layer:
                raise BadInput(f"node {n.name} belongs to layer {k}, outside the planned layers 0..{len(seg_of_layer) - 1}")
            owner[i] = seg_of_layer[k]
        else:
            owner[i] = max([owner[producer[v]] for v in n.input if v in producer and owner[producer[v]] is not None] or [0])
    for i, n in enumerate(nodes):  # a node fed by a later segment's node cannot run in order
        for v in n.input:
            p = producer.get(v)
            if p is not None and owner[p] is not None and owner[i] is not None and owner[p] > owner[i]:
                raise BadInput(f"node {n.name} (segment {owner[i]}) uses {v} from segment {owner[p]}: the graph's layers "
                               "are not in order, so it cannot be cut into consecutive segments")

    last = len(ranges) - 1
    demands = [set() for _ in ranges]
    for o in graph_outputs:
        p = producer.get(o)
        if p is None:
            raise BadInput(f"graph output {o} is not computed by any node (an input or constant passed through); cannot segment")
        demands[owner[p] if owner[p] is not None else last].add(o)
    segments: list[Segment] = []
    for s in range(last, -1, -1):
        keep, inputs, seen, deferred, shape_of = set(), [], set(), [], {}

        def take(v):
            """Ask an earlier segment for v (it becomes an input here, an output there)."""
            if v not in inputs:
                inputs.append(v)
            demands[owner[producer[v]]].add(v)

        stack = list(demands[s])
        while True:
            while stack:
                v = stack.pop()
                if v in seen or not v:
                    continue
                seen.add(v)
                if v in init:
                    continue
                p = producer.get(v)
                if p is None:
                    if v in graph_inputs and v not in inputs:
                        inputs.append(v)
                    continue
                if owner[p] == s or owner[p] is None:  # this segment's node, or a cheap one computed here
                    if p in keep:
                        continue
                    keep.add(p)
                    x = nodes[p].input[0] if nodes[p].input else ""
                    if owner[p] is None and nodes[p].op_type == "Shape" and not cheap_value.get(x, True):
                        deferred.append(p)  # decided below, once this segment's inputs are known
                    else:
                        stack.extend(x for x in nodes[p].input if x)
                elif owner[p] < s:
                    take(v)
                else:
                    raise BadInput(f"segment {s} needs {v} from the later segment {owner[p]}")
            if not deferred:
                break
            p = deferred.pop()
            x = nodes[p].input[0]
            px = producer.get(x)
            if px is None or owner[px] == s:  # computed here anyway
                stack.append(x)
                continue
            sig = _signature(infos.get(x))
            same = [y for y in inputs if y != x and _signature(infos.get(y)) == sig]
            if same:
                shape_of[p] = same[0]
            elif owner[px] is None:  # a free value (the embedding lookup): compute it here
                stack.append(x)
            else:
                take(x)
        order = sorted(keep)
        produced = {o for i in order for o in nodes[i].output}
        missing = [v for v in demands[s] if v not in produced]
        if missing:
            raise BadInput(f"segment {s} was asked for {missing[0]}, which it does not compute")
        outputs = [o for o in graph_outputs if o in demands[s]] + sorted(v for v in demands[s] if v not in graph_outputs)
        ins = [v for v in graph_inputs if v in inputs] + sorted(v for v in inputs if v not in graph_inputs)
        segments.append(Segment(s, ranges[s], order, ins, outputs, shape_of))
    segments.reverse()
    return segments


def _subgraph(attr) -> bool:
    return attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)


def _value_infos(proto: onnx.ModelProto, base_dir: Path) -> dict:
    """name -> ValueInfoProto of every typed value, from shape inference on the weight-less graph: ONNX Runtime's
    symbolic shape inference (it carries the token dims' names through the exporter's Reshape/Shape arithmetic,
    where onnx's own leaves unk__N), onnx's where that is not available or fails. The weights stay unread: each big
    initializer becomes an input of its shape; the small ones (shape constants) are read from the source."""
    from onnx.external_data_helper import load_external_data_for_tensor

    m = onnx.ModelProto()
    m.CopyFrom(proto)
    g = m.graph
    keep, moved = [], []
    for t in g.initializer:
        if _tensor_bytes(t) >= BIG_INITIALIZER:
            moved.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        else:
            t2 = onnx.TensorProto()
            t2.CopyFrom(t)
            if t2.data_location == onnx.TensorProto.EXTERNAL:
                load_external_data_for_tensor(t2, str(base_dir))
                t2.data_location = onnx.TensorProto.DEFAULT
                del t2.external_data[:]
            keep.append(t2)
    del g.initializer[:]
    g.initializer.extend(keep)
    g.input.extend(moved)
    inferred = None
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        inferred = SymbolicShapeInference.infer_shapes(m, auto_merge=True, guess_output_rank=False)
    except Exception:  # not installed, or an op it does not know: onnx's inference below
        inferred = None
    if inferred is None:
        try:
            inferred = onnx.shape_inference.infer_shapes(m, check_type=False, strict_mode=False, data_prop=True)
        except Exception:  # inference helps name shapes; a value it cannot type is refused where it crosses a cut
            inferred = m
    out = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        out[vi.name] = vi
    return out


def _boundary_info(name: str, infos: dict, token_dims: list) -> onnx.ValueInfoProto:
    vi = infos.get(name)
    if vi is None or not vi.type.tensor_type.HasField("shape"):
        raise BadInput(f"the value {name} crosses a segment cut but its type/shape is unknown (ONNX shape inference "
                       "gave none): this graph cannot be segmented; build it whole")
    out = onnx.ValueInfoProto()
    out.CopyFrom(vi)
    dims = out.type.tensor_type.shape.dim
    # the residual stream is [batch, sequence, hidden]: give its leading dims the token inputs' names (inference
    # may leave them unnamed), so a segment engine's profile follows the token shapes
    if len(dims) == 3 and len(token_dims) == 2:
        for d, tok in zip(dims[:2], token_dims):
            if not d.HasField("dim_value") or d.dim_value != tok:
                d.Clear()
                if isinstance(tok, str):
                    d.dim_param = tok
                else:
                    d.dim_value = tok
    for d in dims:
        if not d.HasField("dim_value") and not d.dim_param:
            raise BadInput(f"the value {name} crosses a segment cut with a dimension ONNX shape inference cannot name: "
                           "this graph cannot be segmented; build it whole")
    return out


def split(onnx_path, *, segments: int | None = None, layers_per_segment: int | None = None, out=None) -> dict:
    """Cut `onnx_path` into consecutive-layer segments written beside it; returns the manifest (also written to
    `out`, default `<stem>.segments.json` beside the graph). The segment files reference the source's weight bytes."""
    from sq_export.fileio import check_output_path, write_text_atomic

    src = Path(onnx_path)
    if not src.is_file():
        raise BadInput(f"ONNX file {src} does not exist")
    stem = src.name[:-5] if src.name.lower().endswith(".onnx") else src.name
    out = Path(out) if out is not None else src.with_name(stem + SEGMENTS_SUFFIX)
    if not is_manifest(out):
        raise BadInput(f"the segment manifest must end with {SEGMENTS_SUFFIX}, got {out}")
    if out.resolve().parent != src.resolve().parent:
        raise BadInput(f"the manifest {out} must sit beside {src} (the segments point into its weight file)")
    check_output_path(out)
    proto = _source_proto(src)
    layers = sorted({k for n in proto.graph.node if (k := layer_of(n.name)) is not None})
    if not layers:
        raise BadInput(f"{src} has no decoder-layer nodes (names like …/layers.N/…): only graphs exported by "
                       "sq-export (or torch.onnx from a transformers model) can be segmented")
    if layers != list(range(len(layers))):
        raise BadInput(f"{src}: decoder layers {layers[0]}..{layers[-1]} are not numbered 0..{len(layers) - 1}")
    ranges = plan_ranges(len(layers), layers_per_segment, segments)
    infos = _value_infos(proto, src.parent)
    plan = plan_segments(proto, ranges, infos)
    g = proto.graph
    init = {t.name: t for t in g.initializer}
    graph_in = {i.name: i for i in g.input}
    graph_out = {o.name: o for o in g.output}
    tok = graph_in.get("input_ids")
    token_dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in tok.type.tensor_type.shape.dim] if tok else []
    entries, written = [], []
    try:
        for seg in plan:
            m = onnx.ModelProto()
            m.CopyFrom(proto)
            sg = m.graph
            del sg.node[:], sg.initializer[:], sg.input[:], sg.output[:], sg.value_info[:]
            used = set()
            for i in seg.nodes:
                sg.node.append(g.node[i])
                if i in seg.shape_of:  # read the same-shaped input this segment has
                    sg.node[-1].input[0] = seg.shape_of[i]
                used.update(v for v in sg.node[-1].input if v)
            sg.initializer.extend(init[v] for v in sorted(used) if v in init)
            sg.input.extend(graph_in[v] if v in graph_in else _boundary_info(v, infos, token_dims) for v in seg.inputs)
            sg.output.extend(graph_out[v] if v in graph_out else _boundary_info(v, infos, token_dims) for v in seg.outputs)
            sg.name = f"{g.name or 'graph'}.seg{seg.index:02d}"
            meta = {p.key: p.value for p in m.metadata_props}
            meta.update({"sq_export.segment": f"{seg.index}/{len(plan)}", "sq_export.segment_layers": f"{seg.layers[0]}-{seg.layers[1]}",
                         "sq_export.segment_source": src.name})
            del m.metadata_props[:]
            for k, v in meta.items():
                p = m.metadata_props.add()
                p.key, p.value = k, v
            path = src.with_name(f"{stem}.seg{seg.index:02d}.onnx")
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_bytes(m.SerializeToString())
            written.append((tmp, path))
            entries.append({"file": path.name, "layers": list(seg.layers), "nodes": len(seg.nodes), "inputs": seg.inputs,
                            "outputs": seg.outputs,
                            "weight_bytes": sum(_tensor_bytes(init[v]) for v in used if v in init)})
        for tmp, path in written:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _path in written:
            tmp.unlink(missing_ok=True)
        raise
    manifest = {
        "format": FORMAT,
        "kind": "onnx",
        "source": src.name,
        "layers": len(layers),
        "inputs": [i for i in graph_in if i not in init],
        "outputs": list(graph_out),
        "segments": entries,
    }
    write_text_atomic(out, json.dumps(manifest, indent=1) + "\n")
    manifest["path"] = str(out)
    return manifest


def check_chain(graph_inputs, segment_io) -> None:
    """BadInput unless the segments form a chain: each takes graph inputs or earlier segments' outputs only, and no
    value is returned twice (or is a graph input). segment_io: [(inputs, outputs)] per segment, in order."""
    given = {n: None for n in graph_inputs}
    for k, (ins, outs) in enumerate(segment_io):
        for n in ins:
            if n not in given:
                raise BadInput(f"segment {k} takes {n}, which neither the graph inputs nor an earlier segment give: "
                               "not a chain of segments; split the graph and build it again")
        for n in outs:
            if n in given:
                by = "a graph input" if given[n] is None else f"segment {given[n]}'s output too"
                raise BadInput(f"segment {k} returns {n}, which is {by}: not a chain of segments; split the graph and "
                               "build it again")
            given[n] = k


def read_manifest(path) -> dict:
    """A segment manifest (ONNX or engines), checked: every member file present; BadInput otherwise."""
    p = Path(path)
    if not p.is_file():
        raise BadInput(f"segment manifest {p} does not exist")
    try:
        man = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise BadInput(f"{p} is not a readable segment manifest ({type(e).__name__}); write it with `sq-export split`") from None
    if not isinstance(man, dict) or man.get("format") != FORMAT or not man.get("segments"):
        raise BadInput(f"{p} is not a segment manifest of format {FORMAT}; write it with `sq-export split`")
    for e in man["segments"]:
        f = p.parent / e["file"]
        if not f.is_file():
            raise BadInput(f"{p}: its segment {e['file']} is missing beside it; split (or build) again")
    try:
        check_chain(man["inputs"], [(e["inputs"], e["outputs"]) for e in man["segments"]])
    except BadInput as e:
        raise BadInput(f"{p}: {e}") from None
    man["path"] = str(p)
    return man


def member_paths(man: dict) -> list[Path]:
    base = Path(man["path"]).parent
    return [base / e["file"] for e in man["segments"]]
