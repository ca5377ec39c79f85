"""Decoder-layer calls, as the code that works a layer at a time sees them (the per-layer smoothing check, layer
streaming, the fallback's output cache and its layer-at-a-time backward pass): what a layer was called with, what
it returned, and a module that stands in for a layer inside the model's own layer loop."""

from __future__ import annotations

import contextlib

import torch


def hidden_of(out) -> torch.Tensor:
    """A decoder layer's hidden-state output (BLOOM returns a tuple, the others a tensor)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def layer_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a decoder layer was called with (first positional argument, or `hidden_states=`)."""
    return args[0] if args else kwargs["hidden_states"]


CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


def replay_kwargs(kwargs: dict, prefix, batch: int) -> dict | None:
    """The keyword arguments to call a decoder layer again as it was called. A KV cache among them already holds
    what the layer appended when it ran (replayed, it would attend to itself twice), so it is replaced by a fresh
    cache of the outlier prefix (`prefix`: what sq_export.quant.prefix installed on the model; the only cache the
    forwards of this package carry), for `batch` sequences. None when there is a cache but no prefix to explain it
    (the caller must take another way)."""
    keys = [k for k in CACHE_KWARGS if kwargs.get(k) is not None]
    if not keys:
        return kwargs
    if prefix is None:
        return None
    device = next((t.device for v in kwargs.values() for t in (v if isinstance(v, (tuple, list)) else (v,))
                   if isinstance(t, torch.Tensor)), None)  # where the layer runs (the prefix may sit elsewhere)
    return {**kwargs, **{k: prefix.cache(batch, device=device) for k in keys}}


@contextlib.contextmanager
def recording_calls(layers):
    """Within the block, every call of `layers[i]` stores its (args, kwargs) in the yielded list at i (the last
    call wins)."""
    got: list = [None] * len(layers)
    hooks = [layers[i].register_forward_pre_hook(lambda m, a, k, i=i: got.__setitem__(i, (a, dict(k))), with_kwargs=True)
             for i in range(len(layers))]
    try:
        yield got
    finally:
        for h in hooks:
            h.remove()


class LayerStandIn(torch.nn.Module):
    """Base of a module put in the place of decoder layer `layer` for a while. Attributes the model's layer loop
    reads (e.g. `attention_type`) come from the real layer, which is not registered as a child (the model's
    modules and parameters are unchanged)."""

    def __init__(self, layer):
        super().__init__()
        object.__setattr__(self, "_real", layer)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_real"), name)
