"""Issue 17: export the every-Linear-INT8 SmolLM2 after the outlier prefix with the α per group an `--alpha kl` eval
chose (read from its --json, replayed: no second search) for ONNX Runtime, and measure its PyTorch perplexity on the
same tokens. Then: sq-export eval OUT.onnx --max-tokens 8192 --json

    PYTHONPATH=. python lab/2026-11-29/export_decided.py lab/2026-11-29/logs4/eval_alpha_kl.json /tmp/kl.onnx
    PYTHONPATH=. python lab/2026-11-29/export_decided.py 'kinds:{"mlp.up_proj": 0.8}' /tmp/kl.onnx [--no-ppl]
"""

import json
import sys
import time


def main():
    src, out = sys.argv[1], sys.argv[2]
    if src.startswith("kinds:"):  # kinds:{"mlp.up_proj": 0.8}: those kinds, 0.85 elsewhere
        kinds = json.loads(src[6:])
        alpha = None
    else:
        with open(src) as f:
            alpha = json.loads(f.read().strip().splitlines()[-1])["alpha_per_group"]
    from sq_export import api
    from sq_export.measure.perplexity import torch_perplexity
    from sq_export.quant.recipe import CalibOptions, make_recipe

    t = time.perf_counter()
    model, tok = api.load_model("smollm2")
    opts = CalibOptions(None, 16, 512)
    if alpha is None:
        from sq_export.families import family_for

        alpha = {g.source: float(next((v for k, v in kinds.items() if g.source.endswith("." + k)), 0.85))
                 for g in family_for(model).groups(include_linear_pairs=True)}
    r = make_recipe("default", calib=opts, fallback="none", alpha=alpha, prefix_outliers="auto")
    calib = api.calibrate(model, tok, recipe=r)
    qm = api.quantize(model, calib, r)
    res = api.export_onnx(qm, out, target="ort", source_model="smollm2")
    print(f"exported {out} in {time.perf_counter() - t:.0f} s: {res}", flush=True)
    if "--no-ppl" in sys.argv:
        return
    v = torch_perplexity(qm.model, api.text_ids(tok, None, "eval"), 512, 8192, desc=None)
    print(json.dumps({"pytorch_perplexity": v["perplexity"], "tokens": v["tokens"], "prefix": qm.prepared.prefix.tokens}))


if __name__ == "__main__":
    main()
