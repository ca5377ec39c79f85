"""Accuracy cost of --quantize-attention on the tiny test models (PyTorch fake quant vs float), per family.

    python tools/attention_cost.py          # prints the table in docs/RUNTIME.md
"""

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import FAMILIES, token_batches  # noqa: E402
from test_export import _quantized, _torch_logits  # noqa: E402

from sq_export import attention  # noqa: E402


def stats(x, ref):
    lp = torch.log_softmax(torch.as_tensor(ref), -1)
    lq = torch.log_softmax(torch.as_tensor(x), -1)
    kl = (lp.exp() * (lp - lq)).sum(-1).mean().item()
    rel = np.abs(x - ref).mean() / np.abs(ref).mean()
    return f"rel {rel:.3f}, top-1 {(x.argmax(-1) == ref.argmax(-1)).mean() * 100:.1f}%, KL {kl:.4f}"


def main():
    ids = token_batches(n=4, seq=32, seed=11)
    print("| family | SQ W8A8 vs float | SQ W8A8 + attention INT8 vs float |\n|---|---|---|")
    for f in FAMILIES:
        fp, _ = _quantized(f, "fp")
        ref = _torch_logits(fp, ids)
        m, fam = _quantized(f)
        q = _torch_logits(m, ids)
        attention.quantize_attention(m, fam, token_batches(n=8))
        print(f"| {f} | {stats(q, ref)} | {stats(_torch_logits(m, ids), ref)} |")


if __name__ == "__main__":
    main()
