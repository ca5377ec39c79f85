#!/usr/bin/env python3
"""One stage of the big-model pipeline on a checkpoint folder, measured: wall time, peak host RSS (VmHWM of this
process) and peak GPU memory (torch's max reserved), one JSON line on stdout. Run each stage in its own process
so that each peak is the stage's own (the device driver lab/2026-11-29/device_big.sh runs them in order).

    python tools/bench_big.py calibrate FOLDER -o OUT [--stream] [--device cuda] [--samples 128 --seq-len 512]
    python tools/bench_big.py compare OUT/whole OUT/stream                      # act scales: equal? max rel. diff
    python tools/bench_big.py quantize FOLDER -o OUT/q [--recipe default --fallback none] [--device cuda]
    python tools/bench_big.py export OUT/q -o OUT/sq.onnx [--weights qdq16] [--lazy | --trace-device cuda]   # from a streamed folder
    python tools/bench_big.py ppl OUT/q|FOLDER [--device cuda] [--max-tokens 4096]   # torch perplexity

`calibrate` writes OUT/act_scales.safetensors (as `sq-export calibrate`); `quantize` is `api.quantize_streamed`
(OUT: the smoothed checkpoint + sq_quant.json); `export` is `api.load_quantized` + `api.export_onnx`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def vm_hwm_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def gpu_peak_mib() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_reserved() / 2**20


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["calibrate", "compare", "quantize", "export", "ppl"])
    ap.add_argument("paths", nargs="+")
    ap.add_argument("-o", "--output")
    ap.add_argument("--stream", action="store_true")
    ap.add_argument("--device", default=None)
    ap.add_argument("--model-dtype", default="auto")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--recipe", default="default")
    ap.add_argument("--fallback", default="none")
    ap.add_argument("--alpha", default=None)
    ap.add_argument("--rotate-down", type=int, default=None, metavar="B", help="quantize: rotate the down_proj inputs (sq_export.quant.hadamard)")
    ap.add_argument("--weights", default="qdq16")
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--cache-device", default=None)
    ap.add_argument("--trace-device", default="cpu", help="export: trace in float32 on cpu (default) or cuda")
    ap.add_argument("--lazy", action="store_true", help="export: trace on placeholders, read each weight when written (stream/lazy.py)")
    a = ap.parse_args(argv)

    from sq_export import api
    from sq_export.quant.recipe import CalibOptions, make_recipe

    t = time.perf_counter()
    rec: dict = {"stage": a.stage, "stream": a.stream}
    if a.stage == "calibrate":
        from sq_export.quant.calibrate import ACT_SCALES_FILE, save_act_scales

        folder = a.paths[0]
        opts = dict(samples=a.samples, seq_len=a.seq_len, batch_size=a.batch, rows=None)
        tok = api.load_tokenizer(folder)
        if a.stream:
            c = api.calibrate_streamed(folder, tok, None, device=a.device, dtype=a.model_dtype, cache_device=a.cache_device, **opts)
        else:
            tl = time.perf_counter()
            m, _ = api.load_model(folder, device=a.device, dtype=a.model_dtype, with_tokenizer=False)
            rec["load_s"] = round(time.perf_counter() - tl, 1)
            c = api.calibrate(m, tok, None, **opts)
        out = Path(a.output)
        out.mkdir(parents=True, exist_ok=True)
        meta = {k: v for k, v in c.meta.items() if k != "seconds"}
        save_act_scales(out / ACT_SCALES_FILE, c.act_max, {"model_type": api.model_type(folder), **meta})
        rec.update(calibration_s=c.meta.get("seconds"), linears=len(c.act_max))
    elif a.stage == "compare":
        import torch

        from sq_export.quant.calibrate import ACT_SCALES_FILE, load_act_scales

        x, y = (load_act_scales(Path(p) / ACT_SCALES_FILE) for p in a.paths[:2])
        rel = max(float(((x[k] - y[k]).abs() / x[k].abs().clamp(min=1e-12)).max()) for k in x)
        rec.update(equal=all(torch.equal(x[k], y[k]) for k in x), max_rel_diff=rel, linears=len(x),
                   same_bytes=(Path(a.paths[0]) / ACT_SCALES_FILE).read_bytes() == (Path(a.paths[1]) / ACT_SCALES_FILE).read_bytes())
    elif a.stage == "quantize":
        r = make_recipe(a.recipe, calib=CalibOptions(None, a.samples, a.seq_len, a.batch), fallback=a.fallback,
                        alpha=a.alpha, rotate_down=a.rotate_down)
        res = api.quantize_streamed(a.paths[0], a.output, r, device=a.device, dtype=a.model_dtype, cache_device=a.cache_device)
        rec.update(times=res.times, max_layer_change=res.max_layer_change, quantized=len(res.quantized),
                   fp16_layers=len(res.fp16_layers), alpha_groups=len(res.alpha_per_group or {}))
    elif a.stage == "export":
        qm = api.load_quantized(a.paths[0], lazy=True) if a.lazy else api.load_quantized(a.paths[0], device=a.trace_device)
        rec["load_s"] = round(time.perf_counter() - t, 1)
        r = api.export_onnx(qm, a.output, weights=a.weights, trace_device=a.trace_device)
        rec.update(trace_device=a.trace_device, lazy=a.lazy)
        rec.update(bytes=r.bytes, nodes=r.nodes, weights=a.weights, weights_kept_float32=r.metadata.get("weights_kept_float32"))
    elif a.stage == "ppl":
        folder = a.paths[0]
        if (Path(folder) / "sq_quant.json").is_file():
            qm = api.load_quantized(folder, device=a.device, dtype=a.model_dtype)
            m, tok = qm.model, api.load_tokenizer(folder)
        else:
            m, tok = api.load_model(folder, device=a.device, dtype=a.model_dtype)
        rec.update(api.perplexity(m, tok, None, seq_len=512, max_tokens=a.max_tokens))
    rec.update(seconds=round(time.perf_counter() - t, 1), peak_rss_mib=round(vm_hwm_mib()), peak_gpu_mib=gpu_peak_mib())
    print(json.dumps(rec, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
