"""Peak resident memory (RSS) of `sq-export run`, per stage, in one run, and its ratio to the FP32 model size.

    python tools/bench_memory.py smollm2 -o /tmp/bench --samples 16 --max-tokens 2048 [--json FILE] [--resume]

The arguments are those of `sq-export run`; `--force` is added (every stage runs) unless `--resume` is given. The pipeline runs in this
process; each section (the model load, every stage, and inside export each graph) starts by resetting the
kernel's peak-RSS counter (`echo 5 > /proc/self/clear_refs`) and ends by reading it back (VmHWM), so a section's
peak is exact (kernel-tracked, no sampling) and includes what the earlier sections left allocated. The whole-run
peak printed at the end is the maximum over the sections, plus the peak of any child process
(`getrusage(RUSAGE_CHILDREN)`). Because the counter is reset, `/usr/bin/time -v` around *this* tool reports only
the last section: measure the plain command with `/usr/bin/time -v sq-export run ...` for an independent
whole-run figure. Linux only (falls back to ru_maxrss, cumulative, elsewhere).

The FP32 model size is the bytes of the loaded model's parameters and buffers (tied tensors counted once).
"""

from __future__ import annotations

import contextlib
import json
import resource
import sys
import time

from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sq_export.memory import rss_kb  # noqa: E402 (torch-free: /proc reader)

MiB = 1 << 20


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _children_peak_kb() -> int:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss


class Peaks:
    """Nested sections; each records its own exact peak (a parent's peak covers its children's)."""

    def __init__(self):
        self.rows: list[dict] = []
        self.stack: list[dict] = []
        self.resettable = _reset_peak()
        self.start_rss_kb = rss_kb("VmRSS") or 0

    def _fold(self) -> None:
        """Fold the peak since the last reset into every open section, then reset."""
        hwm = rss_kb("VmHWM") if self.resettable else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for s in self.stack:
            s["peak_kb"] = max(s["peak_kb"], hwm or 0)
        if self.resettable:
            _reset_peak()

    @contextlib.contextmanager
    def section(self, name: str):
        self._fold()
        row = {"section": name, "depth": len(self.stack), "peak_kb": 0, "rss_before_kb": rss_kb("VmRSS") or 0,
               "children_before_kb": _children_peak_kb()}
        self.rows.append(row)
        self.stack.append(row)
        t = time.perf_counter()
        try:
            yield row
        finally:
            self._fold()
            self.stack.pop()
            row["wall_s"] = round(time.perf_counter() - t, 1)
            row["rss_after_kb"] = rss_kb("VmRSS") or 0
            ch = _children_peak_kb()
            row["children_peak_kb"] = ch if ch > row.pop("children_before_kb") else None


def model_bytes(model) -> int:
    seen, n = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.dtype)
        if key not in seen:
            seen.add(key)
            n += t.untyped_storage().nbytes()
    return n


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    json_out = None
    resume = "--resume" in argv  # keep up-to-date stages (default: --force, every stage runs)
    if resume:
        argv.remove("--resume")
    if "--json" in argv:
        i = argv.index("--json")
        json_out = argv[i + 1]
        del argv[i : i + 2]
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0

    from sq_export import run
    from sq_export.cli import main as cli_main
    from sq_export.run import context

    cli_args = ["-q", "run", *argv, *([] if resume else ["--force"])]
    peaks = Peaks()
    info: dict = {}

    orig_loaded = context.RunContext.loaded
    import sq_export.export.exporter as exporter

    orig_export = exporter.export_onnx
    open_stage: list = []

    def stage(name, event):  # a section per stage, opened and closed by the run's observer events
        if event == "start":
            cm = peaks.section(name)
            cm.__enter__()
            open_stage.append(cm)
        elif open_stage:
            open_stage.pop().__exit__(None, None, None)

    run.add_observer(stage)

    def loaded(self):
        if self._loaded is None:
            with peaks.section("load model"):
                r = orig_loaded(self)
            info["fp32_bytes"] = model_bytes(r[0])
            return r
        return orig_loaded(self)

    def export(model, family, path, **kw):
        from pathlib import Path

        with peaks.section(f"export {Path(path).name}"):
            return orig_export(model, family, path, **kw)

    context.RunContext.loaded, exporter.export_onnx = loaded, export
    from sq_export.measure import perplexity as evaluate
    orig_ort, orig_torch = evaluate.onnx_perplexity, evaluate.torch_perplexity

    def ort_ppl(path, *a, **k):
        from pathlib import Path

        with peaks.section(f"onnxruntime {Path(path).name}"):
            return orig_ort(path, *a, **k)

    def torch_ppl(model, *a, desc="eval", **k):
        with peaks.section(desc):
            return orig_torch(model, *a, desc=desc, **k)

    evaluate.onnx_perplexity, evaluate.torch_perplexity = ort_ppl, torch_ppl
    t0 = time.perf_counter()
    with peaks.section("run"):
        rc = cli_main(cli_args)  # exactly what `sq-export -q run ...` does (malloc settings included)
    wall = time.perf_counter() - t0
    run_row = peaks.rows[0]
    children = _children_peak_kb() or None
    whole = max(run_row["peak_kb"], children or 0)
    fp32 = info.get("fp32_bytes")

    def ratio(kb):
        return f"{kb * 1024 / fp32:5.2f}x" if fp32 and kb else "   - "

    print(f"peak RSS per section ({'exact, VmHWM reset per section' if peaks.resettable else 'ru_maxrss, cumulative'}); "
          f"FP32 model {fp32 / MiB:.0f} MiB" if fp32 else "FP32 model size unknown (no stage loaded the model)")
    print(f"{'section':32s} {'peak MiB':>9s} {'x FP32':>7s} {'RSS after':>10s} {'wall s':>7s}")
    for r in peaks.rows[1:]:
        name = "  " * (r["depth"] - 1) + r["section"]
        ch = f"  (child process peak {r['children_peak_kb'] / 1024:.0f} MiB)" if r.get("children_peak_kb") else ""
        print(f"{name:32s} {r['peak_kb'] / 1024:9.0f} {ratio(r['peak_kb']):>7s} {r['rss_after_kb'] / 1024:10.0f} {r['wall_s']:7.1f}{ch}")
    print(f"{'whole run (max of any process)':32s} {whole / 1024:9.0f} {ratio(whole):>7s} {'':10s} {wall:7.1f}")
    if json_out:
        doc = {"argv": argv, "fp32_model_bytes": fp32, "whole_run_peak_kb": whole, "children_peak_kb": children, "wall_s": round(wall, 1),
               "exact": peaks.resettable, "sections": peaks.rows[1:], "date": time.strftime("%Y-%m-%d")}
        with open(json_out, "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
    return rc


if __name__ == "__main__":
    sys.exit(main())
