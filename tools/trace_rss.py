"""Where does the whole-process RSS peak of a `sq-export` command happen? A timeline of RSS, with stacks.

    python tools/trace_rss.py [--interval-ms 10] [--json FILE] -- -q run smollm2 -o OUT --samples 16 --max-tokens 2048

Runs `sq-export ARGS` in this process exactly as the console script does (malloc settings included; nothing reset,
unlike tools/bench_memory.py), while a daemon thread polls /proc/self/status (VmRSS, VmHWM) every interval. Stage
boundaries of `run` are recorded (sq_export.run.add_observer), and the main thread's Python stack is captured whenever RSS
climbs to a new maximum and whenever VmHWM rises between two polls (the peak fell between them: the stack shown is
the one right after it). At the end it prints the stage table (peak per stage from the samples, VmHWM where it
rose) and the stacks of the highest moments; child processes' peaks come from getrusage(RUSAGE_CHILDREN), which is
what /usr/bin/time folds in too. Linux only.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import threading
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sq_export.memory import configure_malloc, proc_status_kb  # noqa: E402 (torch-free)

MiB = 1024  # kB per MiB


def _status() -> tuple[int, int]:
    st = proc_status_kb("VmRSS", "VmHWM")
    return st.get("VmRSS", 0), st.get("VmHWM", 0)


def _stack(frame, limit=14) -> list[str]:
    out = []
    for fs in traceback.extract_stack(frame)[-limit:]:
        fn = fs.filename
        for cut in ("site-packages/", "sq_export/", "tools/"):
            if cut in fn:
                fn = fn[fn.index(cut):]
                break
        out.append(f"{fn}:{fs.lineno} {fs.name}")
    return out


class Tracer:
    def __init__(self, interval: float):
        self.interval = interval
        self.t0 = time.perf_counter()
        self.samples: list[tuple[float, int, int]] = []
        self.events: list[tuple[float, str]] = []
        self.marks: list[dict] = []  # new maxima / HWM jumps, with stacks
        self.main = threading.main_thread().ident
        self.stop = threading.Event()
        self.max_rss = 0
        self.last_hwm = 0

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def event(self, what: str) -> None:
        self.events.append((self.now(), what))

    def loop(self) -> None:
        while not self.stop.is_set():
            rss, hwm = _status()
            t = self.now()
            self.samples.append((t, rss, hwm))
            why = None
            if rss > self.max_rss + 4 * MiB:
                why = "new max RSS"
            if hwm > self.last_hwm + 4 * MiB and hwm > rss + 4 * MiB:
                why = f"VmHWM rose to {hwm / MiB:.0f} MiB between polls"
            if why:
                fr = sys._current_frames().get(self.main)
                self.marks.append({"t": round(t, 3), "rss_kb": rss, "hwm_kb": hwm, "why": why,
                                   "stage": self.events[-1][1] if self.events else "", "stack": _stack(fr) if fr else []})
                del fr  # a frame kept here keeps its locals (tensors) alive after its function returned
            self.max_rss = max(self.max_rss, rss)
            self.last_hwm = hwm
            time.sleep(self.interval)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    interval, json_out = 0.01, None
    while argv and argv[0] != "--":
        a = argv.pop(0)
        if a == "--interval-ms":
            interval = float(argv.pop(0)) / 1000
        elif a == "--json":
            json_out = argv.pop(0)
        else:
            print(__doc__)
            return 2
    argv = argv[1:]
    configure_malloc()  # as cli.main does first, so that the polling thread gets no arena of its own
    tr = Tracer(interval)
    th = threading.Thread(target=tr.loop, daemon=True)
    th.start()
    tr.event("imports")
    from sq_export import run

    run.add_observer(lambda name, event: tr.event(name if event == "start" else f"after {name}"))
    from sq_export.cli import main as cli_main

    tr.event("cli")
    rc = cli_main(argv)
    tr.event("end")
    time.sleep(3 * interval)
    tr.stop.set()
    th.join()
    rss, hwm = _status()
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    self_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    # per event span: max sampled RSS and whether VmHWM rose inside it
    spans = []
    ev = tr.events + [(float("inf"), "")]
    for (t, name), (t2, _) in zip(ev, ev[1:]):
        s = [x for x in tr.samples if t <= x[0] < t2]
        if not s:
            continue
        spans.append({"span": name, "start_s": round(t, 2), "wall_s": round(min(t2, tr.now()) - t, 2),
                      "max_rss_mib": round(max(x[1] for x in s) / MiB), "hwm_end_mib": round(s[-1][2] / MiB)})
    print(f"VmHWM {hwm / MiB:.0f} MiB (ru_maxrss self {self_max / MiB:.0f}, children {children / MiB:.0f}); "
          f"{len(tr.samples)} samples", file=sys.stderr)
    print(f"{'span':22s} {'start s':>8s} {'wall s':>7s} {'max RSS':>8s} {'HWM at end':>10s}", file=sys.stderr)
    for s in spans:
        print(f"{s['span']:22s} {s['start_s']:8.1f} {s['wall_s']:7.1f} {s['max_rss_mib']:8d} {s['hwm_end_mib']:10d}", file=sys.stderr)
    top = sorted(tr.marks, key=lambda m: -max(m["rss_kb"], m["hwm_kb"] if "VmHWM" in m["why"] else 0))[:4]
    for m in top:
        print(f"\n-- t={m['t']:.2f}s stage {m['stage']}: RSS {m['rss_kb'] / MiB:.0f} MiB, HWM {m['hwm_kb'] / MiB:.0f} ({m['why']})",
              file=sys.stderr)
        for line in m["stack"]:
            print("   " + line, file=sys.stderr)
    if json_out:
        with open(json_out, "w") as f:
            json.dump({"argv": argv, "hwm_kb": hwm, "children_kb": children, "spans": spans, "marks": tr.marks,
                       "samples": tr.samples[:: max(1, len(tr.samples) // 20000)], "events": tr.events}, f)
    return rc


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
