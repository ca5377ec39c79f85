"""Models dispatched by accelerate (sq_export.dispatch), on the CPU: calibration hooks and smoothing on a model whose
weights sit in AlignDevicesHook's weights_map ("meta" placeholders in the modules) — per-module hooks
(accelerate.cpu_offload), block hooks (attach_align_device_hook_on_blocks, as dispatch_model / device_map="auto"
place them), and disk offload (from_pretrained with device_map="auto" and a small max_memory). The smoothing must
land in the offloaded storage itself (what the next forward loads), never in a "meta" copy."""

import copy

import pytest
import torch

from conftest import make_tiny, token_batches
from sq_export.dispatch import is_dispatched, offloaded, resident, undispatch
from sq_export.errors import BadInput
from sq_export.families import family_for
from sq_export.quant.calibrate import calibrate
from sq_export.quant.smooth import apply_smoothing, logits_of, smooth_checked


def _cpu_offload(model):
    from accelerate import cpu_offload

    cpu_offload(model, execution_device="cpu")
    return model


def _block_offload(model):
    """Each decoder layer a block offloaded to CPU RAM with its hook on the block (place_submodules), the rest
    resident: dispatch_model's layout for a device_map that sends the layers to "cpu"."""
    from accelerate.hooks import attach_align_device_hook_on_blocks

    fam = family_for(model)
    sd = dict(model.state_dict())
    top = [n for n, _ in model.named_children()]
    execution, offload = {}, {}
    for n, m in model.named_modules():
        if n.startswith(fam.layers_path + ".") and n.count(".") == fam.layers_path.count(".") + 1:
            execution[n], offload[n] = torch.device("cpu"), True
    for n in top:
        execution.setdefault(n, torch.device("cpu"))
        offload.setdefault(n, False)
    # the base model's own children (embeddings, final norm) resident
    base = fam.layers_path.rsplit(".", 1)[0]
    for n, _ in model.get_submodule(base).named_children():
        q = f"{base}.{n}"
        if q != fam.layers_path:
            execution[q], offload[q] = torch.device("cpu"), False
    attach_align_device_hook_on_blocks(model, execution_device=execution, offload=offload, weights_map=sd)
    return model, sd


@pytest.mark.parametrize("how", ["cpu_offload", "blocks"])
@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_calibrate_and_smooth_a_dispatched_model(family, how):
    plain, _ = make_tiny(family)
    model = copy.deepcopy(plain)
    if how == "cpu_offload":
        _cpu_offload(model)
    else:
        model, _ = _block_offload(model)
    fam, fam_p = family_for(model), family_for(plain)
    q = fam.quantized_linears()[0]
    assert is_dispatched(model) and model.get_submodule(q).weight.device.type == "meta"
    b = token_batches(4, 32)
    act, act_p = calibrate(model, fam, b), calibrate(plain, fam_p, b)
    assert all(torch.equal(act[n], act_p[n]) for n in act_p)  # the hooks saw the same inputs
    x = torch.as_tensor(b[:2])
    _, d = smooth_checked(model, fam, act, 0.6, x, linear_pairs=True)  # the float check runs on the offloaded model
    apply_smoothing(plain, fam_p, act_p, 0.6, linear_pairs=True)
    # the placeholders stay "meta"; the offloaded storage holds the smoothed weights
    assert model.get_submodule(q).weight.device.type == "meta"
    hook, key = offloaded(model, q + ".weight")
    assert torch.equal(hook.weights_map[key], plain.get_submodule(q).weight)
    assert torch.equal(logits_of(model, x), logits_of(plain, x))
    undispatch(model, "cpu")
    sd, sd_p = model.state_dict(), plain.state_dict()
    assert not is_dispatched(model) and all(torch.equal(sd[k], sd_p[k]) for k in sd_p)


def test_resident_writes_back_and_restores_placeholders():
    model, _ = make_tiny("llama")
    _cpu_offload(model)
    n = "model.layers.0.input_layernorm"
    with resident(model, [n]):
        w = model.get_submodule(n).weight
        assert w.device.type == "cpu"
        w.data.mul_(2)
    assert model.get_submodule(n).weight.device.type == "meta"
    hook, key = offloaded(model, n + ".weight")
    real = hook.weights_map[key]
    with resident(model, [n], write=False):
        assert torch.equal(model.get_submodule(n).weight, real)


def test_disk_offload_calibrates_and_refuses_to_smooth(tiny_dirs, tmp_path):
    """from_pretrained(device_map="auto", max_memory tiny) on a machine without GPU offloads layers to disk:
    calibration runs (the hooks see the forward), smoothing is refused with what to change."""
    from sq_export import api

    model, _ = api.load_model(tiny_dirs("llama"), device="cpu", device_map="auto", max_memory={"cpu": "40KiB"},
                              with_tokenizer=False)
    fam = family_for(model)
    metas = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if not metas:
        pytest.skip("accelerate kept every weight resident")
    act = calibrate(model, fam, token_batches(2, 16))
    assert len(act) == len(fam.quantized_linears())
    with pytest.raises(BadInput, match="offloaded to disk"):
        apply_smoothing(model, fam, act, 0.5)
