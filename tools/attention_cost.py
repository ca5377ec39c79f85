"""Accuracy cost of --quantize-attention on the tiny synthetic models (PyTorch fake quant vs float), per family.

    python tools/attention_cost.py          # prints the table in docs/RUNTIME.md

Each family's tiny model (sq_export.synth, outliers injected) is calibrated on random token windows and prepared
with the paper recipe, with and without attention Q/DQ (the same calibration), then compared with the float model.
"""

import numpy as np
import torch

from sq_export.families import family_for
from sq_export.quant.calibrate import Calibration, calibrate
from sq_export.quant.prepare import prepare, working_copy
from sq_export.quant.recipe import CalibOptions, make_recipe
from sq_export.synth import FAMILIES, make_tiny, token_batches


def stats(x, ref):
    lp = torch.log_softmax(torch.as_tensor(ref), -1)
    lq = torch.log_softmax(torch.as_tensor(x), -1)
    kl = (lp.exp() * (lp - lq)).sum(-1).mean().item()
    rel = np.abs(x - ref).mean() / np.abs(ref).mean()
    return f"rel {rel:.3f}, top-1 {(x.argmax(-1) == ref.argmax(-1)).mean() * 100:.1f}%, KL {kl:.4f}"


def logits(model, ids):
    with torch.no_grad():
        x = torch.as_tensor(ids)
        return model(input_ids=x, attention_mask=torch.ones_like(x)).logits.numpy()


def main():
    ids = token_batches(n=4, seq=32, seed=11)
    print("| family | SQ W8A8 vs float | SQ W8A8 + attention INT8 vs float |\n|---|---|---|")
    for f in FAMILIES:
        fp, fam = make_tiny(f)
        ref = logits(fp, ids)
        stream = token_batches(n=1, seq=8 * 32, seed=0)[0]
        calib = Calibration(calibrate(fp, fam, token_batches()), None, stream, CalibOptions(None, 8, 32), check=ids[:2])
        row = []
        for attn in (False, True):
            m = working_copy(fp, fam, smoothing=True)
            prepare(m, family_for(m), make_recipe("paper", quantize_attention=attn, calib=calib.options), calib)
            row.append(stats(logits(m, ids), ref))
        print(f"| {f} | {row[0]} | {row[1]} |")


if __name__ == "__main__":
    main()
