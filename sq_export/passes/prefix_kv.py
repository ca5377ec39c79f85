"""prefix_kv: a graph exported with an outlier prefix (sq_export.quant.prefix, `--prefix-outliers`) really runs after
it (rules PFX001–PFX003).

Such a graph records `sq_export.prefix_length` P (and the token ids, `sq_export.prefix_outliers`). The prefix is a
constant float KV cache: every attention layer concatenates a constant [1, kv_heads, P, head_dim] tensor (expanded
to the batch) in front of its keys and in front of its values along the sequence axis; the caller's attention mask
is widened by P ones; the real tokens' positions start at P (rotary embeddings: the sequence's Range plus P).

    PFX001  the number or the shape of the constant key/value prefixes does not match P (or the attention layers)
    PFX002  the positions of the real tokens do not start at P
    PFX003  the attention mask is not widened by P ones
    PFX004  a decode graph's initial past (initializers prefix_outliers.{i}.key/.value, which no node reads) is missing
            for a past input or does not have its shape [1, kv_heads, P, head_dim]

A decode graph (past_key_values.* inputs) is the plain decode graph: the prefix is its initial past, stored as
those initializers; a runtime starts from them with P ones in front of the mask (sq_export.kvcache.greedy), so the
positions, taken from the mask, start at P. PFX001–PFX003 apply to the logits graph.

A graph without the metadata is not checked (graphs without a prefix). Torch-free, structural.
"""

from __future__ import annotations

import onnx_ir as ir

from sq_export.passes._graph import Violation, attr_int, const_array, const_shape, is_const, label, nodes_of
from sq_export.passes.registry import graph_check, graph_metadata

THROUGH = ("Expand", "Concat", "Identity", "Cast", "Tile")


def _prefix_const(value: ir.Value | None, depth: int = 4) -> ir.Value | None:
    """The rank-4 constant a value comes from through Expand/Concat(one input)/Identity/Cast, or None."""
    for _ in range(depth):
        if value is None:
            return None
        if is_const(value):
            return value if len(const_shape(value) or ()) == 4 else None
        p = value.producer()
        if p is None or p.op_type not in THROUGH:
            return None
        if p.op_type == "Concat" and len(p.inputs) != 1:
            return None
        value = p.inputs[0]
    return None


def _reaches(value: ir.Value, ops: tuple, depth: int = 12) -> bool:
    """Whether `value` flows into a node of `ops` within `depth` nodes."""
    frontier, seen = [value], set()
    for _ in range(depth):
        nxt = []
        for v in frontier:
            for use in v.uses():
                n = use.node
                if n.op_type in ops:
                    return True
                if id(n) not in seen:
                    seen.add(id(n))
                    nxt.extend(n.outputs)
        frontier = nxt
    return False


def prefix_concats(graph: ir.Graph) -> list[tuple[ir.Node, ir.Value]]:
    """(Concat along the sequence axis, its constant rank-4 prefix) for every key/value concatenation whose first
    input is a constant cache."""
    out = []
    for n in nodes_of(graph, "Concat"):
        if len(n.inputs) != 2 or attr_int(n, "axis", 0) not in (2, -2):
            continue
        c = _prefix_const(n.inputs[0])
        if c is not None:
            out.append((n, c))
    return out


@graph_check("prefix_kv", {
    "PFX001": "outlier prefix: constant key/value prefixes missing, extra, or not of length prefix_length",
    "PFX002": "outlier prefix: the real tokens' positions do not start at prefix_length",
    "PFX003": "outlier prefix: the attention mask is not widened by prefix_length ones",
    "PFX004": "outlier prefix: a decode graph's initial past (prefix_outliers.* initializers) missing or misshapen",
}, order=60)
def find_prefix_problems(graph: ir.Graph, target: str = "trt") -> list[Violation]:
    meta = graph_metadata(graph)
    if "prefix_length" not in meta:
        return []
    try:
        P = int(meta["prefix_length"])
    except ValueError:
        return [Violation("PFX001", "<metadata>", f"prefix_length {meta['prefix_length']!r} is not an integer")]
    out = []
    tokens = [t for t in str(meta.get("prefix_outliers", "")).split(",") if t]
    if tokens and len(tokens) != P:
        out.append(Violation("PFX001", "<metadata>", f"prefix_outliers lists {len(tokens)} tokens, prefix_length says {P}"))
    pasts = [v for v in graph.inputs if v.name.startswith("past_key_values.")]
    if pasts:
        return out + _decode_initial_past(graph, pasts, P)
    layers = len(nodes_of(graph, "Softmax"))
    found = prefix_concats(graph)
    for n, c in found:
        shape = const_shape(c)
        if shape[0] != 1 or shape[2] != P:
            out.append(Violation("PFX001", label(n), f"constant prefix {c.name} has shape {list(shape)}: expected "
                                 f"[1, kv_heads, {P}, head_dim]"))
    if len(found) != 2 * layers:
        out.append(Violation("PFX001", "<graph>", f"{len(found)} key/value concatenations start with a constant prefix, "
                             f"expected 2 per attention layer ({layers} Softmax): the prefix is not in every layer"))
    # positions (rotary families): Range(0, seq) + P feeds the rotary angles
    if nodes_of(graph, "Cos") or nodes_of(graph, "Sin"):
        offsets = []
        for a in nodes_of(graph, "Add"):
            r = [i for i in a.inputs if i is not None and i.producer() is not None and i.producer().op_type == "Range"]
            k = [_static_int(i) for i in a.inputs if i is not None and i not in r]
            if r and k and k[0] is not None and _reaches(a.outputs[0], ("Cos", "Sin")):
                offsets.append(k[0])
        if P not in offsets:
            out.append(Violation("PFX002", "<graph>", f"no position Range + {P} feeds the rotary embeddings "
                                 f"(offsets found: {sorted(set(offsets)) or 'none'}): the tokens would take the prefix's positions"))
    mask = next((i for i in graph.inputs if i.name == "attention_mask"), None)
    if mask is not None:
        widened = False
        for use in mask.uses():
            n = use.node
            if n.op_type == "Concat" and attr_int(n, "axis", 0) in (1, -1) and len(n.inputs) == 2 and use.idx == 1:
                ones = n.inputs[0].producer()
                if ones is not None and ones.op_type == "ConstantOfShape":
                    v = ones.attributes.get("value")
                    widened = v is not None and float(v.value.numpy().reshape(-1)[0]) == 1.0 and _ones_width(ones) in (P, None)
                elif is_const(n.inputs[0]):
                    a = const_array(n.inputs[0])
                    widened = a is not None and a.shape[-1] == P and bool((a == 1).all())
        if not widened:
            out.append(Violation("PFX003", "attention_mask", f"the attention mask is not concatenated after {P} ones: "
                                 "the prefix slots would be masked or the mask would not match the keys"))
    return out


def _decode_initial_past(graph: ir.Graph, pasts: list, P: int) -> list[Violation]:
    out = []
    inits = graph.initializers
    for v in pasts:
        name = "prefix_outliers." + v.name[len("past_key_values."):]
        init = inits.get(name)
        if init is None:
            out.append(Violation("PFX004", v.name, f"no initializer {name}: the decode graph's initial past is missing"))
            continue
        shape = tuple(int(d) for d in init.const_value.shape) if init.const_value is not None else ()
        want = [1, v.shape[1] if v.shape is not None else None, P, v.shape[3] if v.shape is not None else None]
        if len(shape) != 4 or shape[0] != 1 or shape[2] != P or any(isinstance(w, int) and w != s for w, s in zip(want, shape)):
            out.append(Violation("PFX004", name, f"shape {list(shape)}, expected {want}"))
    return out


def _static_int(value: ir.Value | None, depth: int = 6) -> int | None:
    """A scalar integer the graph computes from constants alone: a constant, or the sequence length of a constant
    prefix read through Shape → Gather (how the exporter writes "the cache's length"), through Cast/Squeeze/Unsqueeze."""
    for _ in range(depth):
        if value is None:
            return None
        if is_const(value):
            a = const_array(value)
            return int(a.reshape(-1)[0]) if a is not None and a.size == 1 else None
        p = value.producer()
        if p is None:
            return None
        if p.op_type in ("Cast", "Identity", "Squeeze", "Unsqueeze"):
            value = p.inputs[0]
            continue
        if p.op_type == "Gather" and p.inputs[0] is not None and p.inputs[0].producer() is not None \
                and p.inputs[0].producer().op_type == "Shape":
            idx = const_array(p.inputs[1])
            c = _prefix_const(p.inputs[0].producer().inputs[0])
            if idx is None or idx.size != 1 or c is None or int(idx.reshape(-1)[0]) == 0:
                return None  # axis 0 is the batch (expanded)
            return int(const_shape(c)[int(idx.reshape(-1)[0])])
        return None
    return None


def _ones_width(node: ir.Node) -> int | None:
    """The last dimension ConstantOfShape makes, when its shape input is a Concat ending in a constant (else None)."""
    s = node.inputs[0].producer()
    if s is None or s.op_type != "Concat":
        return None
    a = const_array(s.inputs[-1])
    return None if a is None else int(a.reshape(-1)[-1])
