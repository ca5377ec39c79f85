"""Compare ONNX graphs (ONNX Runtime) and TensorRT engines on real token batches with Polygraphy's Comparator.

    report = compare(["fp32.onnx", "sq.onnx", "sq.engine"], "tokens.npz", batches=4, min_cosine=0.99)
    print(format_table(report))

The first model is the reference; every other model is compared with it. The data loader yields feed dicts cut
from the token file (the same chunks eval scores); Polygraphy casts them to each runner's input dtype (int32 for
TensorRT 8.x engines). Per output and model: max/mean absolute error, cosine similarity (per position, over the
last axis, averaged; its minimum too), top-1 agreement (argmax over the vocabulary, for [batch, seq, vocab]
outputs), Polygraphy's element-wise atol/rtol verdict, and pass/fail against the user's tolerances. Padding
positions (>= each chunk's length) are zeroed in every output before comparing, so they count nowhere.

Hook for text input: ``compare(..., tokens=<Tokens>)`` accepts an already-loaded ``sq_export.engine.run.Tokens``
as well as a path, so a torch-side caller can tokenize a text file and pass the result.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from sq_export.engine.run import Tokens, check_fits_profile, load_tokens, model_kind, model_perplexity, open_runner, polygraphy_logging
from sq_export.errors import BadInput

DEFAULT_MIN_COSINE = 0.99
DEFAULT_MIN_TOP1 = 0.90


def _runner_names(models) -> list[str]:
    """Unique, readable runner names (file names; prefixed by index when they clash)."""
    names = [Path(m).name for m in models]
    if len(set(names)) != len(names):
        names = [f"{i}:{n}" for i, n in enumerate(names)]
    return names


class _Stats:
    """Running per-output metrics over valid positions."""

    def __init__(self):
        self.max_abs = 0.0
        self.sum_abs = 0.0
        self.n_el = 0
        self.cos_sum = 0.0
        self.cos_min = math.inf
        self.n_pos = 0
        self.top1_agree = 0
        self.n_top1 = 0
        self.nonfinite = 0
        self.shape_mismatch = None

    def add(self, ref: np.ndarray, out: np.ndarray, valid: np.ndarray) -> None:
        if ref.shape != out.shape:
            self.shape_mismatch = f"{list(ref.shape)} vs {list(out.shape)}"
            return
        r = ref.astype(np.float64, copy=False)
        o = out.astype(np.float64, copy=False)
        if r.ndim >= 2 and r.shape[:2] == valid.shape:
            r = r.reshape(r.shape[0], r.shape[1], -1)[valid]  # [positions, features]
            o = o.reshape(o.shape[0], o.shape[1], -1)[valid]
            top1 = ref.ndim == 3
        else:
            r = r.reshape(1, -1)
            o = o.reshape(1, -1)
            top1 = False
        if r.size == 0:
            return
        self.nonfinite += int((~np.isfinite(o)).sum())
        d = np.abs(r - o)
        self.max_abs = max(self.max_abs, float(np.nanmax(d)))
        self.sum_abs += float(np.nansum(d))
        self.n_el += int(d.size)
        num = (r * o).sum(axis=-1)
        den = np.linalg.norm(r, axis=-1) * np.linalg.norm(o, axis=-1)
        cos = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.where(np.abs(r).sum(-1) + np.abs(o).sum(-1) == 0, 1.0, 0.0))
        self.cos_sum += float(cos.sum())
        self.cos_min = min(self.cos_min, float(cos.min()))
        self.n_pos += int(cos.size)
        if top1:
            self.top1_agree += int((r.argmax(-1) == o.argmax(-1)).sum())
            self.n_top1 += int(r.shape[0])

    def result(self) -> dict:
        return {
            "max_abs": self.max_abs if self.n_el else None,
            "mean_abs": self.sum_abs / self.n_el if self.n_el else None,
            "cosine": self.cos_sum / self.n_pos if self.n_pos else None,
            "cosine_min": self.cos_min if self.n_pos else None,
            "top1": self.top1_agree / self.n_top1 if self.n_top1 else None,
            "positions": self.n_pos,
            "nonfinite": self.nonfinite,
            "shape_mismatch": self.shape_mismatch,
        }


def _as_float_host(arr) -> np.ndarray:
    a = np.asarray(arr)
    if np.issubdtype(a.dtype, np.floating) and a.dtype != np.float32:
        a = a.astype(np.float32)
    return a


def compare(
    models: list,
    tokens,
    batches: int | None = 4,
    batch_size: int = 1,
    atol: float | None = None,
    rtol: float | None = None,
    min_cosine: float | None = DEFAULT_MIN_COSINE,
    min_top1: float | None = DEFAULT_MIN_TOP1,
    perplexity: bool = False,
    outputs: list | None = None,
) -> dict:
    """Run every model on the same token batches and compare each with models[0]. Returns a JSON-able report
    whose "passed" is False when any tolerance given (not None) fails.

    tokens: a token-file path or a loaded Tokens. batches: how many batches (None = the whole file).
    atol/rtol: Polygraphy element-wise check (|out - ref| <= atol + rtol * |ref|); None leaves it unchecked
    (reported only). min_cosine / min_top1: thresholds on the mean per-position cosine and the top-1 agreement.
    perplexity: also score every model's perplexity on the whole token file. outputs: names to compare
    (default: every output the reference has).
    """
    models = [str(m) for m in models]
    if len(models) < 2:
        raise BadInput("compare needs at least two models (the first is the reference)")
    for m in models:
        model_kind(m)  # BadInput on an unknown suffix
    if batches is not None and batches < 1:
        raise BadInput(f"--batches must be >= 1, got {batches}")
    if batch_size < 1:
        raise BadInput(f"batch size must be >= 1, got {batch_size}")
    for name, v in (("atol", atol), ("rtol", rtol)):
        if v is not None and not v >= 0:
            raise BadInput(f"--{name} must be >= 0, got {v}")
    for name, v in (("min-cosine", min_cosine), ("min-top1", min_top1)):
        if v is not None and not (-1.0 <= v <= 1.0):
            raise BadInput(f"--{name} must lie in [-1, 1], got {v}")
    tok = tokens if isinstance(tokens, Tokens) else load_tokens(tokens)

    from polygraphy.comparator import CompareFunc, Comparator
    from polygraphy.exception import PolygraphyException

    names = _runner_names(models)
    runners = [open_runner(m, name=n) for m, n in zip(models, names)]  # BackendMissing/BadInput before any work
    for r in runners:
        check_fits_profile(r, tok, batch_size, clamp=False)  # engines: the chunks and batch fit the profile

    rows_list = []

    def data_loader():
        for rows, feed in tok.batches(batch_size, batches):
            rows_list.append(rows)
            yield feed

    pairs = [(0, i) for i in range(1, len(models))]
    stats = {i: {} for i in range(1, len(models))}

    def masked(stream):
        # One single-iteration RunResults per batch, holding every runner's outputs: zero the padding positions,
        # accumulate our metrics, then hand it on to Polygraphy's accuracy comparison.
        for it, single in enumerate(stream):
            valid = tok.valid_mask(rows_list[it])
            results = [iters[0] for _name, iters in single]
            for res in results:
                for out_name, arr in list(res.items()):
                    a = _as_float_host(arr)
                    if a.ndim >= 2 and a.shape[:2] == valid.shape and np.issubdtype(a.dtype, np.floating):
                        a = np.where(valid.reshape(valid.shape + (1,) * (a.ndim - 2)), a, 0).astype(a.dtype)
                    res[out_name] = a
            ref = results[0]
            wanted = outputs if outputs is not None else list(ref.keys())
            for i in range(1, len(results)):
                for out_name in wanted:
                    if out_name not in ref or out_name not in results[i]:
                        continue
                    stats[i].setdefault(out_name, _Stats()).add(ref[out_name], results[i][out_name], valid)
            yield single

    find = None
    if outputs is not None:
        wanted_set = set(outputs)

        def _find(name, _index, _iter_result):  # Polygraphy's find_output_func: compare only the chosen outputs
            return [name] if name in wanted_set else []

        find = _find

    with polygraphy_logging():  # CompareFunc.simple is deprecated in 0.53 (-> SimpleCompareFunc): keep it quiet
        check = CompareFunc.simple(
            atol=float("inf") if atol is None else float(atol),
            rtol=float("inf") if rtol is None else float(rtol),
            check_shapes=True,
            find_output_func=find,
        )
    try:
        with polygraphy_logging():
            stream = Comparator.run(runners, data_loader=data_loader(), streaming=True)
            acc = Comparator.compare_accuracy(masked(stream), comparisons=pairs, compare_func=check)
    except PolygraphyException as e:
        raise BadInput(f"comparison could not run: {str(e).strip().splitlines()[0][:300]}") from None
    if not rows_list:
        raise BadInput(f"token file {tok.path} yielded no batches")

    # Polygraphy's per-output element-wise verdicts and its error statistics (OutputCompareResult).
    poly = {i: {} for i in range(1, len(models))}
    accuracy = acc[0] if len(acc) else {}
    for i in range(1, len(models)):
        key = (runners[0].name, runners[i].name)
        for match in accuracy[key] if key in accuracy else []:
            for out_name, r in match.items():
                d = poly[i].setdefault(out_name, {"passed": True, "max_absdiff": 0.0, "max_reldiff": 0.0})
                d["passed"] = bool(d["passed"] and bool(r))
                for f in ("max_absdiff", "max_reldiff"):
                    v = getattr(r, f, None)
                    if v is not None and math.isfinite(v):
                        d[f] = max(d[f], float(v))

    comparisons = []
    for i in range(1, len(models)):
        outs = {}
        for out_name, st in stats[i].items():
            m = st.result()
            failures = []
            if m["shape_mismatch"]:
                failures.append(f"shape {m['shape_mismatch']}")
            if m["nonfinite"]:
                failures.append(f"{m['nonfinite']} non-finite values")
            pg = poly[i].get(out_name)
            if (atol is not None or rtol is not None) and pg is not None and not pg["passed"]:
                failures.append(f"atol/rtol (max abs {pg['max_absdiff']:.4g}, max rel {pg['max_reldiff']:.4g})")
            if min_cosine is not None and m["cosine"] is not None and m["cosine"] < min_cosine:
                failures.append(f"cosine {m['cosine']:.6f} < {min_cosine}")
            if min_top1 is not None and m["top1"] is not None and m["top1"] < min_top1:
                failures.append(f"top-1 {m['top1']:.4f} < {min_top1}")
            m["polygraphy_elementwise_pass"] = pg["passed"] if pg is not None and (atol is not None or rtol is not None) else None
            m["passed"] = not failures
            m["failures"] = failures
            outs[out_name] = m
        if not outs:
            outs["<none>"] = {"passed": False, "failures": ["no output in common with the reference"]}
        comparisons.append(
            {
                "model": models[i],
                "reference": models[0],
                "outputs": outs,
                "passed": all(o["passed"] for o in outs.values()),
            }
        )

    report = {
        "reference": models[0],
        "models": [{"path": m, "name": n, "backend": "tensorrt" if model_kind(m) == "engine" else "onnxruntime"}
                   for m, n in zip(models, names)],
        "tokens_file": tok.path,
        "batches": len(rows_list),
        "batch_size": batch_size,
        "seq_len": tok.seq_len,
        "tolerances": {"atol": atol, "rtol": rtol, "min_cosine": min_cosine, "min_top1": min_top1},
        "comparisons": comparisons,
        "passed": all(c["passed"] for c in comparisons),
    }
    if perplexity:
        for entry in report["models"]:
            p = model_perplexity(entry["path"], tok, batch_size=batch_size)
            entry["perplexity"] = p["perplexity"]
            entry["perplexity_tokens"] = p["predicted_tokens"]
    return report


def _fmt(v, spec: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return format(v, spec)


def format_table(report: dict) -> str:
    """A readable table of a compare() report."""
    tol = report["tolerances"]
    lines = [
        f"reference: {report['reference']}",
        f"tokens: {report['tokens_file']}  ({report['batches']} batch(es) x {report['batch_size']} chunk(s) x "
        f"{report['seq_len']} tokens)",
        "tolerances: "
        + ", ".join(f"{k}={'unchecked' if v is None else v}" for k, v in tol.items()),
    ]
    if any("perplexity" in m for m in report["models"]):
        lines.append("")
        lines.append(f"{'model':<40} {'backend':<12} {'perplexity':>12}")
        for m in report["models"]:
            lines.append(f"{m['name'][:40]:<40} {m['backend']:<12} {_fmt(m.get('perplexity'), '.4f'):>12}")
    lines.append("")
    hdr = f"{'model':<32} {'output':<14} {'max|err|':>10} {'mean|err|':>10} {'cosine':>9} {'cos min':>9} {'top-1':>7}  result"
    lines.append(hdr)
    lines.append("-" * len(hdr))
    for c in report["comparisons"]:
        for out_name, m in c["outputs"].items():
            res = "PASS" if m.get("passed") else "FAIL: " + "; ".join(m.get("failures", []))
            lines.append(
                f"{Path(c['model']).name[:32]:<32} {out_name[:14]:<14} {_fmt(m.get('max_abs'), '.4g'):>10} "
                f"{_fmt(m.get('mean_abs'), '.4g'):>10} {_fmt(m.get('cosine'), '.6f'):>9} "
                f"{_fmt(m.get('cosine_min'), '.4f'):>9} {_fmt(m.get('top1'), '.4f'):>7}  {res}"
            )
    lines.append("")
    lines.append("overall: " + ("PASS" if report["passed"] else "FAIL"))
    return "\n".join(lines)
