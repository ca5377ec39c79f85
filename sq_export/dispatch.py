"""Models dispatched by accelerate (`device_map="auto"` with a `max_memory`, `cpu_offload`, `dispatch_model`): the
recipe reads and writes their real weights, not the "meta" placeholders an offloaded module holds between calls.

accelerate keeps an offloaded module's weights in its AlignDevicesHook's `weights_map` (CPU tensors, or a disk
memory map) and puts them on the execution device only for the module's own forward. Calibration needs nothing
from here (its hooks see the inputs of the forwards that run). Smoothing reads max|W| and writes γ, β and W:

    with resident(model, ["model.layers.3.input_layernorm", "model.layers.3.self_attn.q_proj"], write=True):
        ...   # these modules hold their real weights (on their execution device); in-place writes are kept

On leaving, what was written is copied into the offloaded storage itself (the CPU tensor accelerate loads from at
the next forward), and the modules get their placeholders back. Weights offloaded to disk are refused for writing
(accelerate reads them afresh from a read-only memory map at each forward: a write would be lost).
`undispatch(model, "cpu")` removes the hooks and puts every weight, offloaded or not, on one device (export needs
one device: the TorchScript exporter traces on the CPU). A model that is not dispatched passes through unchanged.
"""

from __future__ import annotations

import contextlib

import torch

from sq_export.errors import BadInput


def is_dispatched(model) -> bool:
    return any(getattr(m, "_hf_hook", None) is not None for m in model.modules())


def _align_hooks(module):
    """The AlignDevicesHook(s) attached to `module` (a SequentialHook holds several)."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    hooks = getattr(hook, "hooks", None) or [hook]
    return [h for h in hooks if hasattr(h, "offload") and hasattr(h, "weights_map")]


def offloaded(model, full_name: str):
    """(hook, key in its weights_map) holding the real tensor of parameter/buffer `full_name`, or None when the
    tensor is not offloaded."""
    parts = full_name.split(".")
    # the nearest module owning an offloading hook that covers this tensor (its own, or a block's with
    # place_submodules)
    for i in range(len(parts) - 1, -1, -1):
        path = ".".join(parts[:i])
        try:
            mod = model.get_submodule(path) if path else model
        except AttributeError:
            continue
        for h in _align_hooks(mod):
            if not h.offload or h.weights_map is None:
                continue
            if i != len(parts) - 1 and not getattr(h, "place_submodules", False):
                continue
            key = ".".join(parts[i:])
            try:
                h.weights_map[key]
            except KeyError:
                continue
            return h, key
    return None


def _exec_device(hook) -> torch.device:
    d = hook.execution_device
    return torch.device("cuda", d) if isinstance(d, int) else torch.device(d)


@contextlib.contextmanager
def resident(model, names, write: bool = True, recurse: bool = False):
    """Inside the block the modules `names` (with `recurse`, and all their submodules) hold their real weights on
    their execution device; with `write`, in-place changes are copied into accelerate's offloaded storage on
    leaving. No-op for a model without hooks."""
    if not is_dispatched(model):
        yield
        return
    if recurse:
        names = [f"{n}.{sub}" if sub else n for n in names for sub, _ in model.get_submodule(n).named_modules()]
    swapped = []  # (tensor dict, name, placeholder, real storage, resident tensor)
    paused = []
    try:
        for n in names:
            mod = model.get_submodule(n)
            for kind, tensors in (("_parameters", mod._parameters), ("_buffers", mod._buffers)):
                for pname, t in list(tensors.items()):
                    if t is None or t.device.type != "meta":
                        continue
                    found = offloaded(model, f"{n}.{pname}")
                    if found is None:
                        raise BadInput(f"{n}.{pname} is on 'meta' and no accelerate hook holds its weights")
                    hook, key = found
                    real = hook.weights_map[key]
                    if write and hook.weights_map[key].data_ptr() != real.data_ptr():
                        raise BadInput(f"{n}.{pname} is offloaded to disk (read-only memory map): smoothing cannot write "
                                       "it; give max_memory enough CPU memory to offload to RAM instead")
                    here = real.to(_exec_device(hook))
                    new = torch.nn.Parameter(here, requires_grad=False) if kind == "_parameters" else here
                    tensors[pname] = new
                    swapped.append((tensors, pname, t, real, new))
            for h in _align_hooks(mod):  # its own forward must not swap the placeholders back in
                if h.offload:
                    h.offload = False
                    paused.append(h)
        yield
    finally:
        for h in paused:
            h.offload = True
        for tensors, pname, placeholder, real, new in swapped:
            if write and new.data_ptr() != real.data_ptr():
                with torch.no_grad():
                    real.copy_(new.detach().to(real.device, real.dtype))
            tensors[pname] = placeholder


def undispatch(model, device: str | torch.device = "cpu"):
    """Remove accelerate's hooks and put every weight on `device` (offloaded ones from their storage). In place;
    returns the model."""
    if not is_dispatched(model):
        return model.to(device)
    from accelerate.hooks import remove_hook_from_submodules

    real = {}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.device.type == "meta":
            found = offloaded(model, name)
            if found is None:
                raise BadInput(f"{name} is on 'meta' and no accelerate hook holds its weights")
            hook, key = found
            real[name] = hook.weights_map[key]
    remove_hook_from_submodules(model)
    for name, t in real.items():
        mod_name, _, pname = name.rpartition(".")
        mod = model.get_submodule(mod_name) if mod_name else model
        v = t.to(device)
        if pname in mod._parameters:
            mod._parameters[pname] = torch.nn.Parameter(v, requires_grad=False)
        else:
            mod._buffers[pname] = v
    if hasattr(model, "hf_device_map"):
        with contextlib.suppress(AttributeError):
            del model.hf_device_map
    return model.to(device)
