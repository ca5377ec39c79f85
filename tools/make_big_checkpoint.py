#!/usr/bin/env python3
"""Write a synthetic full-size checkpoint (a real model's shapes, random weights, outlier channels injected as in the
tests) as a Hugging Face folder of float16 safetensors shards, one decoder layer at a time: the whole model is never
in memory (peak ≈ one layer in float32, ~0.8 GB for Llama-2-7B), so a 13.5 GB checkpoint is written on any machine.

    python tools/make_big_checkpoint.py --shape llama2-7b -o /data/llama2-7b-synth          # 13.5 GB, 32 layers
    python tools/make_big_checkpoint.py --shape llama2-13b -o /data/13b --layers 40         # 26 GB
    python tools/make_big_checkpoint.py --shape llama2-7b -o small --layers 2 --set hidden_size=256 \
        --set intermediate_size=512 --set num_attention_heads=4 --set num_key_value_heads=4 --set vocab_size=1024

Weights (sq_export.synth's conventions): Linear and embedding weights N(0, 0.02) (transformers' initializer_range),
biases 0; every norm that feeds a smoothing group gets γ = 1 + 0.2·N(0,1) (β = 0.1·N(0,1)) with channels
sq_export.synth.OUTLIER_CHANNELS × OUTLIER_GAIN (as synth.inject_outliers), the final norm γ = 1. Each tensor has
its own generator seeded from --seed and its name: the same command writes the same bytes, in any order.
Tokenizer: a byte-level BPE trained on the shipped calibration text with at most the shape's vocabulary (default),
or `--tokenizer PATH` (a folder / .gguf / alias such as smollm2: its vocabulary must fit the shape's, or pass
--set vocab_size=N).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _value(s: str):
    for t in (int, float):
        try:
            return t(s)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(s.lower(), s)


def generator(seed: int, name: str):
    import torch

    h = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(h[:8], "little") & ((1 << 63) - 1))


def tensor_for(name: str, shape, seed: int, smoothing_norms: set, std: float):
    """The synthetic value of parameter `name` (float32)."""
    import torch

    from sq_export.synth import OUTLIER_CHANNELS, OUTLIER_GAIN

    g = generator(seed, name)
    mod, _, leaf = name.rpartition(".")
    if len(shape) >= 2:
        return torch.randn(shape, generator=g) * std
    if mod in smoothing_norms:
        if leaf == "weight":
            t = 1.0 + 0.2 * torch.randn(shape, generator=g)
        else:
            t = 0.1 * torch.randn(shape, generator=g)
        ch = [c for c in OUTLIER_CHANNELS if c < shape[0]]
        t[ch] *= OUTLIER_GAIN
        return t
    if leaf == "weight" and "norm" in name.lower() or name.endswith(("ln_f.weight", "layernorm.weight")):
        return torch.ones(shape)
    return torch.zeros(shape)


def write_checkpoint(out: Path, shape: str, layers: int | None, sets: dict, seed: int, dtype: str, tokenizer: str | None,
                     log=print) -> dict:
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from sq_export.families import family_for
    from sq_export.stream.writer import ShardWriter
    from sq_export.synth import full_size_config, train_tokenizer

    t0 = time.perf_counter()
    cfg = full_size_config(shape, layers)
    for k, v in sets.items():
        setattr(cfg, k, v)
    tdt = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    if tokenizer:
        from sq_export.modeling import load_tokenizer

        tok = load_tokenizer(tokenizer)
        if len(tok) > cfg.vocab_size:
            raise SystemExit(f"tokenizer {tokenizer} has {len(tok)} tokens, the shape's vocabulary {cfg.vocab_size}: "
                             f"pass --set vocab_size={len(tok)}")
    else:
        tok = train_tokenizer(cfg.vocab_size, chars=None)
    with init_empty_weights():
        skel = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    fam = family_for(skel)
    smoothing_norms = {g.source for g in fam.groups()}
    std = float(getattr(cfg, "initializer_range", 0.02))
    out.mkdir(parents=True, exist_ok=True)
    w = ShardWriter(out, tdt)
    state = dict(skel.state_dict())  # meta tensors: names and shapes only
    tied = getattr(cfg, "tie_word_embeddings", False)
    head = skel.get_output_embeddings()
    head_name = next((n for n, m in skel.named_modules() if m is head), None)
    layer_pre = fam.layers_path + "."
    for name, t in state.items():  # the embedding part, the final norm, the LM head
        if name.startswith(layer_pre) or (tied and head_name and name == f"{head_name}.weight"):
            continue
        w.add(name, tensor_for(name, tuple(t.shape), seed, smoothing_norms, std))
    w.flush("model-rest.safetensors")
    n_layers = cfg.num_hidden_layers
    for i in range(n_layers):
        pre = f"{layer_pre}{i}."
        for name, t in state.items():
            if name.startswith(pre):
                w.add(name, tensor_for(name, tuple(t.shape), seed, smoothing_norms, std))
        w.flush(f"model-layer-{i:05d}.safetensors")
        log(f"layer {i + 1}/{n_layers} written ({time.perf_counter() - t0:.0f}s)")
    w.close()
    cfg.dtype = dtype
    cfg.save_pretrained(out)
    c = json.loads((out / "config.json").read_text())
    c["dtype"] = dtype
    c["sq_export_synthetic"] = {"shape": shape, "seed": seed, "outliers": "sq_export.synth.inject_outliers convention"}
    (out / "config.json").write_text(json.dumps(c, indent=2, sort_keys=True) + "\n")
    tok.save_pretrained(out)
    total = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    return {"folder": str(out), "shape": shape, "layers": n_layers, "bytes": total, "tokenizer_vocab": len(tok),
            "seconds": round(time.perf_counter() - t0, 1)}


def main(argv=None) -> int:
    from sq_export.synth import FULL_SIZE

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama2-7b", choices=sorted(FULL_SIZE))
    ap.add_argument("-o", "--output", required=True, metavar="DIR")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field (repeatable)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--tokenizer", default=None, metavar="PATH", help="copy this tokenizer (default: a BPE trained here)")
    ap.add_argument("-q", "--quiet", action="store_true")
    a = ap.parse_args(argv)
    sets = {}
    for kv in a.set:
        k, _, v = kv.partition("=")
        sets[k] = _value(v)
    res = write_checkpoint(Path(a.output), a.shape, a.layers, sets, a.seed, a.dtype, a.tokenizer,
                           log=(lambda m: None) if a.quiet else (lambda m: print(m, file=sys.stderr, flush=True)))
    print(json.dumps(res, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
