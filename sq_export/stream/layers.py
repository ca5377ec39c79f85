"""The layer-streamed forward: a model skeleton without weights, its decoder layers loaded one at a time.

    ls = LayerStream(folder, device, dtype)          # the skeleton ("meta" weights) and the embedding part, loaded
    ls.capture(batches, batch_size)                 # the first decoder layer's inputs for every batch, cached
    for i in range(ls.num_layers):
        layer = ls.load(i)                          # layer i's tensors from the safetensors, on the device
        outs = ls.forward(i, layer)                 # each cached batch through it (hooks on it see them)
        ...                                         # statistics, smoothing, quantization of layer i
        ls.advance(outs); ls.free(i)                # its outputs are layer i+1's inputs; its weights are dropped

The skeleton is built from config.json under accelerate's `init_empty_weights` (buffers such as rotary inv_freq are
real, the parameters "meta"). `capture` runs the model's own forward with every decoder layer replaced by a
recorder: the embeddings, position embeddings and attention masks are computed by the model's code, as in a whole
model forward, and each layer's arguments are recorded (the hidden states for layer 0; the rest — mask, position
embeddings, position ids — per layer, stored once when equal across layers and batches). Each layer then runs the
cached batches with the same arguments a whole-model forward would give it, in the same batch composition, so on
the CPU in float32 every layer sees bit-identical inputs and the statistics are bit-identical to the whole-model
pass (tests/test_stream.py). Peak memory: one layer's weights + the cached hidden states (samples × seq_len × hidden
in the model's type: 2 GiB for 512 × 512 tokens of a 4096-wide model in bfloat16; `cache_device="cpu"` keeps them
in host memory and moves one batch at a time) + the embedding part.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from sq_export.decoder_layers import LayerStandIn, hidden_of
from sq_export.device import fits
from sq_export.errors import BadInput
from sq_export.stream.checkpoint import Checkpoint

log = logging.getLogger(__name__)

STREAM_HINT = "lower --calib-batch, or keep the cached activations in host memory (cache_device='cpu')"


class _Stop(Exception):
    """Raised by the last recorder: the rest of the model's forward (final norm, head) is not needed."""


class _Recorder(LayerStandIn):
    """Stands in for decoder layer `i` during `capture`: records its call's arguments and passes its input on."""

    def __init__(self, layer, i: int, sink, last: bool):
        super().__init__(layer)
        object.__setattr__(self, "_sink", sink)
        self._i, self._last = i, last

    def forward(self, *args, **kwargs):
        self._sink(self._i, args, kwargs)
        if self._last:
            raise _Stop
        return args[0] if args else kwargs.get("hidden_states")


class _Replay(LayerStandIn):
    """Stands in for a decoder layer in `LayerStream.logits`: passes its input on, or returns `out` (the last)."""

    def __init__(self, layer, out, as_tuple: bool):
        super().__init__(layer)
        object.__setattr__(self, "_out", out)
        object.__setattr__(self, "_tuple", as_tuple)

    def forward(self, *args, **kwargs):
        out = object.__getattribute__(self, "_out")
        h = out if out is not None else (args[0] if args else kwargs.get("hidden_states"))
        return (h,) if object.__getattribute__(self, "_tuple") else h  # BLOOM's blocks return a tuple


class _Interner:
    """Stores each distinct tensor once: the same object (one mask passed to every layer) or an equal one (the same
    mask in the next batch) maps to the first copy kept."""

    def __init__(self):
        self.by_id: dict[int, torch.Tensor] = {}
        self.kept: list[torch.Tensor] = []

    def __call__(self, x):
        if isinstance(x, torch.Tensor):
            t = self.by_id.get(id(x))
            if t is not None:
                return t
            for k in self.kept:
                if k.shape == x.shape and k.dtype == x.dtype and k.device == x.device and torch.equal(k, x):
                    self.by_id[id(x)] = k
                    return k
            self.kept.append(x)
            self.by_id[id(x)] = x
            return x
        if type(x) in (tuple, list):
            return type(x)(self(v) for v in x)
        if isinstance(x, dict):
            return {k: self(v) for k, v in x.items()}
        return x

    def next_batch(self):
        self.by_id = {}  # ids may be reused by new objects; equality still finds the kept copies


def build_skeleton(folder: str | Path, dtype: torch.dtype):
    """The model of `folder`'s config.json with "meta" parameters (real buffers), eval mode, eager attention."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        cfg = AutoConfig.from_pretrained(str(folder))
    except Exception as e:
        raise BadInput(f"could not read the config of {folder}: {type(e).__name__}: {str(e)[:200]}") from e
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=dtype)
    return model.eval()


class LayerStream:
    def __init__(self, folder: str | Path, device: torch.device, dtype: torch.dtype, cache_device=None):
        from sq_export.families import family_for

        self.folder = Path(folder)
        self.device, self.dtype = torch.device(device), dtype
        self.cache_device = torch.device(cache_device) if cache_device is not None else self.device
        self.model = build_skeleton(self.folder, dtype)
        self.family = family_for(self.model)
        self.ckpt = Checkpoint(self.folder, getattr(self.model, "base_model_prefix", None)).use_renames_of(self.model)
        self.layers = self.model.get_submodule(self.family.layers_path)
        self.num_layers = len(self.layers)
        self.hidden: list[torch.Tensor] = []  # per batch: the current layer's input hidden states
        self.returns_tuple = False  # whether the decoder layers return a tuple (BLOOM), seen by forward
        self.extras: list[list] = []  # per layer, per batch: (args after the hidden states, kwargs)
        self._loaded: dict[str, list[str]] = {}  # module name -> the tensor names materialized in it
        self._load_outside_layers()

    # ----- weights -----
    def _materialize(self, module_name: str, *, skip: tuple[str, ...] = ()) -> list[str]:
        """Load every "meta" parameter (and persistent buffer the checkpoint holds) of `module_name` from the
        checkpoint onto the device, in the model's type. Returns the loaded names (qualified)."""
        mod = self.model.get_submodule(module_name) if module_name else self.model
        pre = f"{module_name}." if module_name else ""
        done = []
        for sub_name, sub in mod.named_modules():
            q = f"{pre}{sub_name}." if sub_name else pre
            if any((q + "x").startswith(s + ".") for s in skip):
                continue
            for kind in ("_parameters", "_buffers"):
                for pname, t in list(getattr(sub, kind).items()):
                    if t is None:
                        continue
                    full = q + pname
                    if self.ckpt.key(full) is None:
                        if t.device.type == "meta":
                            raise BadInput(f"{self.folder}: the checkpoint has no tensor {full} (is it complete?)")
                        if kind == "_buffers" and t.device != self.device:  # computed by the model (rotary inv_freq)
                            sub._buffers[pname] = t.to(self.device)
                        continue
                    v = self.ckpt.tensor(full, self.device, self.dtype if t.is_floating_point() else None)
                    if tuple(v.shape) != tuple(t.shape):
                        raise BadInput(f"{self.folder}: {full} has shape {list(v.shape)}, the config says {list(t.shape)}")
                    getattr(sub, kind)[pname] = torch.nn.Parameter(v, requires_grad=False) if kind == "_parameters" else v
                    done.append(full)
        return done

    def _load_outside_layers(self) -> None:
        """Everything the forward needs outside the decoder layers: embeddings, their norms, position tables, the
        final norm (not the LM head: nothing here reads logits); computed buffers (rotary) moved to the device."""
        head = self.model.get_output_embeddings()
        head_name = next((n for n, m in self.model.named_modules() if m is head), None) if head is not None else None
        skip = (self.family.layers_path,) + ((head_name,) if head_name else ())
        with fits("the embedding part of the model", self.device, hint=STREAM_HINT), self.ckpt.reading():
            self._loaded[""] = self._materialize("", skip=skip)
            for name, mod in self.model.named_modules():
                if name == self.family.layers_path or name.startswith(self.family.layers_path + "."):
                    continue
                for bname, b in list(mod._buffers.items()):
                    if b is not None and b.device.type != "meta" and b.device != self.device:
                        mod._buffers[bname] = b.to(self.device)

    def layer_name(self, i: int) -> str:
        return f"{self.family.layers_path}.{i}"

    def load(self, i: int):
        """Decoder layer `i` with its weights from the checkpoint, on the device."""
        with fits(f"decoder layer {i}", self.device, hint=STREAM_HINT), self.ckpt.reading():
            self._loaded[self.layer_name(i)] = self._materialize(self.layer_name(i))
        return self.layers[i]

    def free(self, i: int) -> None:
        """Drop layer `i`'s weights (back to "meta" placeholders)."""
        layer = self.layers[i]
        for sub in layer.modules():
            for kind in ("_parameters", "_buffers"):
                d = getattr(sub, kind)
                for k, t in list(d.items()):
                    if t is not None and t.device.type != "meta" and (kind == "_parameters" or k in self._persistent(sub)):
                        m = torch.empty_like(t, device="meta")
                        d[k] = torch.nn.Parameter(m, requires_grad=False) if kind == "_parameters" else m
        self._loaded.pop(self.layer_name(i), None)

    @staticmethod
    def _persistent(mod) -> set:
        return set(mod._buffers) - set(getattr(mod, "_non_persistent_buffers_set", set()))

    # ----- activations -----
    @torch.no_grad()
    def capture(self, batches, batch_size: int = 4) -> None:
        """Run the model's forward on each batch of `batches` ([n, L] ids, `batch_size` at a time, as the
        whole-model calibration does; or a list of [b, L_i] arrays, each one batch, e.g. perplexity chunks of
        unequal length) up to the decoder layers, recording every layer's call arguments."""
        if isinstance(batches, (list, tuple)):
            groups = [torch.as_tensor(np.asarray(b)) for b in batches]
        else:
            ids = torch.as_tensor(np.asarray(batches))
            groups = [ids[s : s + batch_size] for s in range(0, len(ids), batch_size)]
        intern = _Interner()
        self.hidden, self.extras = [], [[] for _ in range(self.num_layers)]
        real = list(self.layers)
        body = getattr(self.model, "base_model", self.model)

        def sink(i, args, kwargs):
            if i == 0:
                h = args[0] if args else kwargs["hidden_states"]
                self.hidden.append(h.to(self.cache_device))
            rest = args[1:] if args else ()
            kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            self.extras[i].append(intern((rest, kw)))

        try:
            for i in range(self.num_layers):
                self.layers[i] = _Recorder(real[i], i, sink, i == self.num_layers - 1)
            with fits("the embedding part of a batch", self.device, hint=STREAM_HINT):
                for g in groups:
                    b = g.to(self.device)
                    intern.next_batch()
                    try:
                        body(input_ids=b, attention_mask=torch.ones_like(b), use_cache=False)
                    except _Stop:
                        pass
                    else:
                        raise RuntimeError("the model's forward did not reach its last decoder layer")
        finally:
            for i in range(self.num_layers):
                self.layers[i] = real[i]

    def layer_args(self, i: int, b: int, hidden: torch.Tensor | None = None):
        """(args, kwargs) of decoder layer `i` on batch `b` (its cached input, or `hidden`)."""
        h = self.hidden[b] if hidden is None else hidden
        rest, kw = self.extras[i][b]
        return (h.to(self.device), *rest), kw

    @torch.no_grad()
    def forward(self, i: int, layer=None) -> list[torch.Tensor]:
        """Every cached batch through decoder layer `i` (loaded): its outputs, one per batch (layer i+1's inputs)."""
        layer = self.layers[i] if layer is None else layer
        outs = []
        with fits(f"decoder layer {i}'s forward on a cached batch", self.device, hint=STREAM_HINT):
            for b in range(len(self.hidden)):
                args, kw = self.layer_args(i, b)
                out = layer(*args, **kw)
                self.returns_tuple = isinstance(out, (tuple, list))
                outs.append(hidden_of(out).to(self.cache_device))
        return outs

    def advance(self, outputs: list[torch.Tensor]) -> None:
        self.hidden = outputs

    def load_head(self) -> None:
        """The LM head's weights (not loaded by default: calibration reads no logits); a tied head shares the input
        embedding's weight, as tie_weights makes it in a loaded model."""
        head = self.model.get_output_embeddings()
        if head is None or head.weight.device.type != "meta":
            return
        emb = self.model.get_input_embeddings()
        if getattr(self.model.config, "tie_word_embeddings", False) and emb is not None and emb.weight.device.type != "meta":
            head.weight = emb.weight
            return
        name = next(n for n, m in self.model.named_modules() if m is head)
        with fits("the LM head", self.device, hint=STREAM_HINT), self.ckpt.reading():
            self._loaded[name] = self._materialize(name)

    @torch.no_grad()
    def logits(self, b: int, ids) -> torch.Tensor:
        """Logits [b, L, vocab] of batch `b` (input ids `ids`, [b, L]) once every layer ran (`advance`d): the model's
        own forward with each decoder layer standing in — passing its input on, the last one returning batch `b`'s
        cached final hidden states — so the final norm, head and any logit transform are the model's code. Needs
        `load_head`."""
        real = list(self.layers)
        final = self.hidden[b].to(self.device)
        try:
            for i in range(self.num_layers):
                self.layers[i] = _Replay(real[i], final if i == self.num_layers - 1 else None, self.returns_tuple)
            x = torch.as_tensor(np.asarray(ids)).to(self.device)
            return self.model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False).logits
        finally:
            for i in range(self.num_layers):
                self.layers[i] = real[i]

    def close(self) -> None:
        self.hidden, self.extras = [], []
        self.ckpt.close()
