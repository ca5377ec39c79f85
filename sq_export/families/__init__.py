"""Model families: one declarative adapter per file, registered by decorator.

An adapter says, per decoder layer, which norm feeds which Linears (a *smoothing group*: the Linears share one
smoothing vector), which Linears are quantized, and which Linear → Linear pairs can carry a smoothing vector
(the producer's output rows absorb what the consumer's input columns lose; a fused producer declares which of its
rows feed the consumer with `pair_rows`, e.g. the v rows of a fused qkv projection), and how its norms apply their
weight (`norm_form`: γ·f(x)+β, or Gemma's (1+γ)·f(x)). Names are relative to the layer;
`Family.groups(model)` expands them to qualified module names of the loaded HF model, the same keys calibration
writes, so calibration and smoothing meet through real module names, never through string conventions.

Adding a family = one file here that subclasses `Family`, is decorated with `@register`, and is imported at the
bottom of this file; it then joins every parametrized test (tests/conftest.py builds a tiny model per family).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from sq_export.errors import UnsupportedModel


@dataclass(frozen=True)
class SmoothGroup:
    """`source` is a norm (kind "norm") or a Linear whose output rows absorb the factor (kind "linear")."""

    source: str
    linears: tuple[str, ...]
    kind: str = "norm"
    # For kind "linear": how the producer's output rows map onto the consumer's input columns when they differ
    # (grouped-query attention: v_proj has fewer output rows than o_proj has input columns).
    kv_repeat: int = 1
    # For kind "linear": the producer's output rows that feed the consumer, as (start, stop) ranges taken in order
    # (fused producers: the v rows of a fused qkv projection, the up half of a fused gate_up); () = all rows.
    rows: tuple[tuple[int, int], ...] = ()


class Family:
    name: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    layers_path: ClassVar[str]
    norm_groups: ClassVar[tuple[tuple[str, tuple[str, ...]], ...]]
    linears: ClassVar[tuple[str, ...]]
    # (producer, consumer) Linear pairs whose math allows folding the consumer's smoothing into the producer
    linear_pairs: ClassVar[tuple[tuple[str, str], ...]] = ()
    default_alpha: ClassVar[float] = 0.5
    alpha_note: ClassVar[str] = ""
    # Callables (model) -> context manager applied while exporting ONNX (works around exporter limits)
    export_patches: ClassVar[tuple] = ()
    # --quantize-attention: the attention module of each decoder layer (relative to the layer; None: not supported)
    attention_module: ClassVar[str | None] = None
    # the KV-cache decode graph feeds position_ids to the model (BLOOM derives positions from the mask: alibi)
    position_ids: ClassVar[bool] = True
    # How the norms apply their weight: "gamma" γ·f(x)+β (LayerNorm, Llama's RMSNorm), "one_plus_gamma" (1+γ)·f(x)
    # (Gemma's RMSNorm). Smoothing divides the effective gain by s: γ' = γ/s, or (1+γ') = (1+γ)/s.
    norm_form: ClassVar[str] = "gamma"
    # TensorRT 8.x INT8 engines of this family's graphs get the FP16 builder flag by default (the layers outside the
    # Q/DQ may run in FP16). False: the exported graph asks the builder to leave it off (graph metadata int8_fp16=0;
    # `build --fp16` still sets it), for families whose INT8 engines lose accuracy to FP16 float layers.
    int8_engine_fp16: ClassVar[bool] = True

    def __init__(self, model):
        self.model = model

    def check_supported(self) -> None:
        """Raise UnsupportedModel when this instance of the architecture cannot be smoothed as declared."""

    def check_attention_supported(self) -> None:
        """Raise UnsupportedModel when --quantize-attention cannot quantize this instance's attention."""

    def attention_forward(self):
        """A forward to bind to each attention module for --quantize-attention (sq_export.quant.attention), or
        None: the family routes attention through transformers' AttentionInterface, which gets the quantizing
        eager attention instead."""
        return None

    def num_layers(self) -> int:
        mod = self.model.get_submodule(self.layers_path)
        return len(mod)

    def layer_prefix(self, i: int) -> str:
        return f"{self.layers_path}.{i}."

    @property
    def mlp_out(self) -> str:
        """The MLP's output Linear, relative to a layer (down_proj, fc2, dense_4h_to_h, c_proj): every family lists
        it last in `linears` (tests/test_hadamard.py checks each). Its input is the MLP's hidden activation."""
        return self.linears[-1]

    def quantized_linears(self) -> list[str]:
        return [self.layer_prefix(i) + rel for i in range(self.num_layers()) for rel in self.linears]

    def groups(self, include_linear_pairs: bool = False) -> list[SmoothGroup]:
        out = []
        for i in range(self.num_layers()):
            p = self.layer_prefix(i)
            for norm, lins in self.norm_groups:
                out.append(SmoothGroup(p + norm, tuple(p + rel for rel in lins), "norm"))
            if include_linear_pairs:
                for prod, cons in self.linear_pairs:
                    out.append(SmoothGroup(p + prod, (p + cons,), "linear", self.kv_repeat(prod, cons),
                                           self.pair_rows(prod, cons)))
        return out

    def kv_repeat(self, producer: str, consumer: str) -> int:
        return 1

    def pair_rows(self, producer: str, consumer: str) -> tuple[tuple[int, int], ...]:
        """The producer's output rows feeding the consumer's input columns, as (start, stop) ranges in column order
        (before kv_repeat); () when all rows do (a plain Linear → Linear pair)."""
        return ()


REGISTRY: dict[str, type[Family]] = {}


def register(cls: type[Family]) -> type[Family]:
    for mt in cls.model_types:
        if mt in REGISTRY:
            raise RuntimeError(f"model_type {mt} registered twice ({REGISTRY[mt].__name__}, {cls.__name__})")
        REGISTRY[mt] = cls
    return cls


def supported_model_types() -> list[str]:
    return sorted(REGISTRY)


def family_for(model) -> Family:
    mt = getattr(model.config, "model_type", None)
    cls = REGISTRY.get(mt)
    if cls is None:
        raise UnsupportedModel(
            f"architecture {mt!r} ({type(model).__name__}) has no sq_export adapter; supported model types: "
            f"{', '.join(supported_model_types())} (add one in sq_export/families/)"
        )
    fam = cls(model)
    fam.check_supported()
    return fam


def family_classes() -> list[type[Family]]:
    seen = []
    for cls in REGISTRY.values():
        if cls not in seen:
            seen.append(cls)
    return seen


from sq_export.families import bloom, gemma3, glm, gpt2, gpt_neox, llama, opt, phi3, qwen3  # noqa: E402,F401  (registration)
