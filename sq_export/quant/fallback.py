"""`--fallback`: keep the Linears whose quantization costs most in float (no Q/DQ; TensorRT runs them in FP16).

`select_fallback` ranks the quantized Linears by how much the KL to the float model's distributions (on
calibration-split windows, never the held-out text) would drop with each one back in float, then greedily puts
them back in that order while the KL improves, until the perplexity on those windows is within the target of
float at its 95 % upper confidence bound, or the budget is spent. Two rankings (FALLBACK_RANKING):

- "first-order" (default): one forward and one backward pass of the quantized model per window give every
  Linear's estimate −Σ⟨∂KL/∂y, y_float − y_quant⟩ at once (`first_order_gains`; the gradient goes straight
  through the rounding). On SmolLM2 it costs about what 4 of the measured ranking's ~50 scorings cost.
- "measured": screen each role (down_proj, o_proj, ... of every layer, put in float together), take 2 × budget
  candidates from the roles that gain most per Linear (SQNR order within a role) and measure each one's gain alone.

Each greedy step is measured; the scoring replays the unchanged layers below a tried Linear from a cache
(`KLScore(layers_path=...)`).
"""

from __future__ import annotations

import logging
import math
import re
import time

import numpy as np
import torch

from sq_export.decoder_layers import LayerStandIn, hidden_of, layer_input, recording_calls, replay_kwargs
from sq_export.errors import BadInput
from sq_export.quant import prefix as prefix_mod
from sq_export.quant.reservoir import RowReservoir, rows_for

log = logging.getLogger(__name__)

FALLBACK_WINDOWS = 4  # calibration-split windows (of ≤512 tokens) scoring --fallback auto
FALLBACK_CANDIDATES = None  # Linears whose gain alone is measured (role-screened order); None: 2 × the budget
FALLBACK_CONFIDENCE_Z = 1.645  # ppl_upper_bound: one-sided 95 % upper confidence bound of the window perplexity
FALLBACK_BLOCK = 64  # tokens per block for that bound's standard error (neighbouring tokens' errors correlate)
KL_CHUNK = 64  # tokens per chunk of the vocabulary-wide KL arithmetic (bounds its temporaries)
FALLBACK_RANKING = "first-order"  # or "measured" (role screening + each candidate's gain measured alone)
FALLBACK_CRITERION = "kl-first-order-ub95"  # `run` records it: a stage chosen by an older --fallback auto criterion reruns


@torch.no_grad()
def local_sqnr(model, family, float_linears: dict, res: RowReservoir, divs: dict) -> dict[str, float]:
    """Per quantized Linear: SQNR (dB) of its QLinear output vs its float output on the sampled (smoothed) rows."""
    return {n: linear_sqnr(flin, model.get_submodule(n), rows_for(res, family, n), divs.get(n))
            for n, flin in float_linears.items()}


@torch.no_grad()
def linear_sqnr(flin, qlin, rows: torch.Tensor, div: torch.Tensor | None = None) -> float:
    """SQNR (dB) of QLinear `qlin`'s output vs float Linear `flin`'s on `rows` (float32, CPU; divided by the
    smoothing vector `div` when the Linear's input was smoothed), on the Linear's device in its type."""
    from sq_export.device import execution_device
    from sq_export.measure.sqnr import sqnr_db

    if div is not None:
        rows = rows / div
    w = flin.weight
    rows = rows.to(execution_device(flin), w.dtype if w.device.type != "meta" else rows.dtype)
    return sqnr_db(flin(rows).float().cpu(), qlin(rows).float().cpu())


def small_eval_ids(tokenizer, calib_text, seq_len: int, windows: int = 4, seed: int = 1) -> np.ndarray:
    """A few calibration-split windows (a different seed than calibration) for the fallback perplexity."""
    from sq_export.textdata import calibration_samples, token_ids

    ids = token_ids(tokenizer, calib_text, "calib")
    return calibration_samples(ids, windows, min(seq_len, 512, len(ids)), seed=seed)


@torch.no_grad()
def float_reference(model, windows: np.ndarray) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The float model's next-token log-probabilities on `windows` (fp16, one [T-1, V] tensor per window) and its
    per-token NLL of the actual next tokens (fp32, one [T-1] tensor per window)."""
    from sq_export.device import model_device

    dev = model_device(model)
    lps, nlls = [], []
    for w in windows:
        x = torch.as_tensor(w)[None].to(dev)
        lp = torch.log_softmax(model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False).logits[0, :-1].float(), -1)
        lps.append(lp.half())
        nlls.append(-lp.gather(1, torch.as_tensor(w[1:], device=dev)[:, None])[:, 0].cpu())
    return lps, nlls


def ppl_upper_bound(nll_q: list[torch.Tensor], nll_f: list[torch.Tensor], z: float | None = None, block: int | None = None) -> float:
    """One-sided upper confidence bound (z standard errors; default FALLBACK_CONFIDENCE_Z) of the perplexity of the
    quantized model on windows where both models' per-token NLLs are known (one tensor per window). The standard
    error is that of the mean per-token NLL difference (paired: quantized − float), from blocks of `block`
    consecutive tokens within a window (default FALLBACK_BLOCK) so that correlated neighbours do not understate it;
    with fewer than 2 blocks it is 0 (the point estimate)."""
    z = FALLBACK_CONFIDENCE_Z if z is None else z
    block = FALLBACK_BLOCK if block is None else block
    d = [q.double() - f.double() for q, f in zip(nll_q, nll_f)]
    n = sum(x.numel() for x in d)
    mean_q = float(sum(q.double().sum() for q in nll_q)) / n
    m = float(sum(x.sum() for x in d)) / n
    blocks = [b for x in d for b in torch.split(x, block)]
    se = 0.0
    if len(blocks) >= 2:
        se = math.sqrt(len(blocks) / (len(blocks) - 1) * sum(float(b.sum() - m * b.numel()) ** 2 for b in blocks)) / n
    return math.exp(mean_q + z * se)


def _copy_out(o):
    """A copy of a layer output (tensor, or tuple/list of them): neither the cache nor the model can then change
    the other's tensors in place."""
    if isinstance(o, torch.Tensor):
        return o.clone()
    if type(o) in (tuple, list):
        return type(o)(_copy_out(v) for v in o)
    return o


class _KnownOutput(LayerStandIn):
    """Stands in for a decoder layer whose output on the current window is already known (KLScore's prefix cache):
    returns it without computing."""

    def __init__(self, layer, outputs: list, i: int):
        super().__init__(layer)
        object.__setattr__(self, "_outputs", outputs)
        self._i = i

    def forward(self, *args, **kwargs):
        return _copy_out(self._outputs[self._i])


class KLScore:
    """Fallback criterion: mean KL(float ‖ quantized) per predicted token on calibration-split windows, against
    the float model's distributions (computed once, by `reference`). Calling it returns the KL; the perplexity of
    the last call is kept in `last_ppl` (same forwards) and its one-sided upper confidence bound in `last_ppl_upper`
    (`ppl_upper_bound`), so the target can be checked in perplexity.

    Prefix cache (`layers_path`: the family's decoder-layer list, e.g. "model.layers"): every call records each
    layer's output per window; `commit()` keeps those of the last call as the reference state, and
    `score(model, start=L)` — for a model that differs from the committed one only in layers ≥ L — replays the
    committed outputs of layers < L instead of computing them. Exact (same inputs, same modules); it saves the
    layers below the changed Linear, about half a forward on average for one-Linear changes spread over depth."""

    def __init__(self, windows: np.ndarray, layers_path: str | None = None):
        self.windows = windows
        self.layers_path = layers_path
        self.ref = self.ref_nll = None
        self.last_ppl = self.last_ppl_upper = None
        self._committed = None  # per window: [output of layer i] of the committed state
        self._last = None

    def reference(self, model):
        self.ref, self.ref_nll = float_reference(model, self.windows)

    def reference_ppl(self) -> float:
        """The float model's perplexity on the windows (what scoring the float model gives as `last_ppl`)."""
        n = sum(t.numel() for t in self.ref_nll)
        return math.exp(float(sum(t.double().sum() for t in self.ref_nll)) / n)

    def first_order_gains(self, model, float_linears: dict) -> dict[str, float]:
        """`first_order_gains` on these windows against the float distributions."""
        return first_order_gains(model, float_linears, self.windows, self.ref, self.layers_path)

    def layer_of(self, name: str) -> int:
        """Index of the decoder layer holding module `name` (0 when unknown: nothing is replayed)."""
        pre = f"{self.layers_path}." if self.layers_path else None
        if pre and name.startswith(pre):
            head = name[len(pre):].split(".", 1)[0]
            if head.isdigit():
                return int(head)
        return 0

    def commit(self):
        self._committed = self._last

    @torch.no_grad()
    def __call__(self, model, start: int = 0) -> float:
        layers = model.get_submodule(self.layers_path) if self.layers_path else None
        if start and (layers is None or self._committed is None):
            raise ValueError("KLScore(start=...) needs layers_path and a committed state")
        from sq_export.device import model_device

        dev = model_device(model)
        kl = 0.0
        n = 0
        last, tok_nll = [], []
        for k, (w, ref) in enumerate(zip(self.windows, self.ref)):
            outs = [None] * len(layers) if layers is not None else None
            hooks, real = [], []
            try:
                if layers is not None:
                    for i in range(start):
                        real.append(layers[i])
                        layers[i] = _KnownOutput(real[i], self._committed[k], i)
                    for i in range(len(layers)):
                        hooks.append(layers[i].register_forward_hook(lambda _m, _a, o, i=i: outs.__setitem__(i, _copy_out(o))))
                x = torch.as_tensor(w)[None].to(dev)
                logits = model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False).logits[0, :-1]
            finally:
                for h in hooks:
                    h.remove()
                for i, r in enumerate(real):
                    layers[i] = r
            last.append(outs)
            tgt = torch.as_tensor(w[1:], device=logits.device)
            nll = []
            for a in range(0, logits.shape[0], KL_CHUNK):  # in token chunks: a few vocabulary-wide temporaries
                lq = torch.log_softmax(logits[a : a + KL_CHUNK].float(), -1)
                lp = ref[a : a + KL_CHUNK].to(lq.device).float()
                kl += float((lp.exp() * (lp - lq)).sum())
                nll.append(-lq.gather(1, tgt[a : a + KL_CHUNK, None])[:, 0].cpu())
            tok_nll.append(torch.cat(nll))
            n += ref.shape[0]
            del logits
        self._last = last if layers is not None else None
        self.last_ppl = math.exp(float(sum(t.double().sum() for t in tok_nll)) / n)
        self.last_ppl_upper = ppl_upper_bound(tok_nll, self.ref_nll)
        return kl / n


def first_order_gains(model, float_linears: dict, windows: np.ndarray, ref: list[torch.Tensor],
                      layers_path: str | None = None) -> dict[str, float]:
    """Per quantized Linear n of `model` (a QLinear; `float_linears[n]` its float Linear): the first-order estimate
    of how much the mean KL(float ‖ quantized) per predicted token on `windows` drops when n alone goes back to
    float, −⟨∂KL/∂y_n, y_float − y_quant⟩ summed over n's outputs y_n (y_float: the float Linear on the same
    input). The gradient goes straight through the rounding (as torch.fake_quantize_* and
    `qlinear.straight_through`); the model's parameters get no gradient (requires_grad is off during the pass and
    restored after); the gradient at the logits is written down (softmax − float probabilities).

    With `layers_path` (the decoder-layer list) the backward pass runs one decoder layer at a time, as gradient
    checkpointing does: a forward pass without a graph records each layer's inputs, the head (final norm, LM head)
    gives ∂KL/∂ of the last layer's output, then each layer from the top is recomputed with a graph from its
    recorded input and back-propagated alone. Memory: one layer's graph instead of the whole model's (SmolLM2, 512
    tokens: ~80 MB instead of ~2.4 GB), for one more forward pass; the same numbers. Without it (or when the layers
    read a KV cache, which recomputing would extend), one graph per window."""
    from sq_export.device import model_device
    from sq_export.memory import release_memory
    from sq_export.quant.qlinear import straight_through

    dev = model_device(model)
    gains = {n: 0.0 for n in float_linears}
    trainable = [p for p in model.parameters() if p.requires_grad]
    emb = model.get_input_embeddings()
    layers = model.get_submodule(layers_path) if layers_path else None
    n_tok = 0
    diffs: dict[str, torch.Tensor] = {}

    def take(name, g):  # the gradient at n's output arrives: fold it with the output difference, free both
        d = diffs.pop(name, None)
        if d is not None:
            gains[name] -= float((g.float() * d).sum())

    def hook_for(name):
        flin = float_linears[name]

        def hook(_mod, args, out):
            if not out.requires_grad:
                return
            with torch.no_grad():
                diffs[name] = flin(args[0].detach()).float() - out.detach().float()
            out.register_hook(lambda g: take(name, g))  # holds the name only: no cycle through the output
        return hook

    def logits_grad(logits, lp):  # ∂/∂logits of Σ_t KL(p_t ‖ softmax(logits_t)) = softmax(logits_t) − p_t
        with torch.no_grad():
            g = torch.empty_like(logits)
            for a in range(0, logits.shape[0], KL_CHUNK):
                c = torch.softmax(logits[a : a + KL_CHUNK].float(), -1)
                c -= lp[a : a + KL_CHUNK].to(c.device).float().exp()
                g[a : a + KL_CHUNK] = c
        return g

    def whole(ids, lp):
        handles = [model.get_submodule(n).register_forward_hook(hook_for(n)) for n in float_linears]
        try:
            e = emb(ids).detach().requires_grad_(True)
            logits = model(inputs_embeds=e, attention_mask=torch.ones_like(ids), use_cache=False).logits[0, :-1]
            logits.backward(logits_grad(logits, lp))
        finally:
            for h in handles:
                h.remove()

    def layerwise(ids, lp) -> bool:
        top: dict = {}

        def leaf_output(_mod, _args, out):  # the last layer's output, as a leaf the head's graph starts from
            top["h"] = h = hidden_of(out).detach().requires_grad_(True)
            return (h, *out[1:]) if isinstance(out, (tuple, list)) else h

        leaf = layers[len(layers) - 1].register_forward_hook(leaf_output)
        try:  # nothing upstream needs a gradient: only the head builds a graph
            with recording_calls(layers) as calls:
                logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits[0, :-1]
        finally:
            leaf.remove()
        pre = prefix_mod.installed(model)  # replayed layers run after a fresh copy of the outlier prefix's cache
        if any(c is None or replay_kwargs(c[1], pre, 1) is None for c in calls):
            return False
        logits.backward(logits_grad(logits, lp))
        g = top["h"].grad
        del logits, top["h"]
        for i in reversed(range(len(layers))):
            args, kwargs = calls[i]
            calls[i] = None
            x = layer_input(args, kwargs).detach().requires_grad_(True)
            args = (x, *args[1:]) if args else args
            kwargs = replay_kwargs(kwargs, pre, x.shape[0])
            kw = kwargs if args else {**kwargs, "hidden_states": x}
            names = [n for n in float_linears if n.startswith(f"{layers_path}.{i}.")]
            handles = [model.get_submodule(n).register_forward_hook(hook_for(n)) for n in names]
            try:
                out = hidden_of(layers[i](*args, **kw))
            finally:
                for h in handles:
                    h.remove()
            out.backward(g)
            g = x.grad
            del out, x
        return True

    try:
        for p in trainable:
            p.requires_grad_(False)
        for w, lp in zip(windows, ref):
            ids = torch.as_tensor(w)[None].to(dev)
            try:
                with torch.enable_grad(), straight_through():
                    if layers is None or not layerwise(ids, lp):
                        whole(ids, lp)
            finally:
                diffs.clear()
            n_tok += lp.shape[0]
    finally:
        for p in trainable:
            p.requires_grad_(True)
        release_memory()
    return {n: g / max(n_tok, 1) for n, g in gains.items()}


@torch.no_grad()
def windows_perplexity(model, windows: np.ndarray) -> float:
    from sq_export.measure.perplexity import PerplexityAccumulator

    acc = PerplexityAccumulator()
    from sq_export.device import model_device

    dev = model_device(model)
    for w in windows:
        x = torch.as_tensor(w)[None].to(dev)
        acc.add(model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False).logits[0].float().cpu().numpy(), w)
    return acc.perplexity


def _swap(model, name, mod):
    from sq_export.quant.qlinear import replace_module

    replace_module(model, name, mod)


def least_sqnr(names, sqnr: dict, n: int) -> list[str]:
    """`--fallback N`: the N Linears of `names` with the lowest local SQNR (`sqnr`: {name: dB})."""
    return sorted(names, key=lambda x: sqnr.get(x, 0.0))[: min(n, len(names))]


def ranks_first_order(score, ranking: str | None = None) -> bool:
    """Whether `--fallback auto` with this score ranks by its `first_order_gains` (`ranking`, default
    FALLBACK_RANKING, is "first-order" and the score has them) rather than by measured gains."""
    ranking = ranking or FALLBACK_RANKING
    if ranking not in ("first-order", "measured"):
        raise ValueError(f"fallback ranking {ranking!r}: first-order or measured")
    return ranking == "first-order" and hasattr(score, "first_order_gains")


def role_of(name: str) -> str:
    """A Linear's role: its name with the layer index starred ("model.layers.3.mlp.down_proj" →
    "model.layers.*.mlp.down_proj"); the Linears of one role have the same place in every layer."""
    return re.sub(r"\.\d+\.", ".*.", name)


@torch.no_grad()
def select_fallback(model, float_linears: dict, spec, score, *, target: float = 0.02, max_count: int | None = None,
                    sensitivity: dict | None = None, max_tries: int | None = None, candidates: int | None = None,
                    ranking: str | None = None) -> dict:
    """Choose Linears to keep in float and put them back (in place). `float_linears`: {name: float module} for every
    quantized Linear; `score(model)`: lower is better (default: KLScore, mean KL to the float model on a few
    calibration-split windows; any callable such as a perplexity works); `sensitivity`: {name: SQNR dB} (lowest
    first breaks ties within a role).

    spec ('auto'), ranking "first-order" (default, FALLBACK_RANKING; a score with `first_order_gains`, as KLScore):
    (1) every Linear's gain is estimated at once (`first_order_gains`); the `candidates` best positive ones
        (default 2 × max_count) are ranked by it; then (2) below.
    spec ('auto'), ranking "measured" (or a score without `first_order_gains`):
    (0) role screening: for each role (`role_of`: down_proj, o_proj, ... across layers) all its Linears are put back
        to float together and scored; the role's gain per Linear (quantized score − that score, / its Linears)
        orders the roles (ties, and names without a layer index, keep the SQNR order). Local SQNR alone misses
        Linears whose error matters downstream (SmolLM2: layer 11's down_proj has the best SQNR of its role and
        the largest gain). Skipped when the pool holds every Linear or no role has two.
    (1) the `candidates` first Linears in that order (default FALLBACK_CANDIDATES, else 2 × max_count: every slot of
        the budget chooses among two measured Linears) are each put back to float alone and scored:
        gain = quantized score − that score;
    (2) in order of measured gain, a candidate stays in float if the score (all chosen so far in float) improves,
        until the target is met or max_count is reached.
    The target is checked in perplexity on the scoring windows: fp·(1+target) against the score's `last_ppl_upper`
    (KLScore: the one-sided 95 % upper confidence bound of the perplexity, from the per-token NLL differences to
    float in blocks of FALLBACK_BLOCK tokens) — so the search stops early only when the windows show the target is
    met beyond their own sampling noise, and otherwise spends the budget while the KL still drops — else
    `last_ppl`, else the score itself. A score with `commit()` / `layer_of()` (KLScore with layers_path) replays
    the unchanged layers below each tried Linear (exact, about half the cost).
    ('n', N): the N least-SQNR Linears. ('names', [...]).
    Returns {"fp16_layers": [...], "fp_score", "quant_score", "final_score", "tried", "history", ...}."""
    kind, arg = spec
    names = list(float_linears)
    total = len(names)
    max_count = total if max_count is None else max_count
    qmods = {n: model.get_submodule(n) for n in names}
    sqnr = sensitivity or {}
    if kind == "names":
        bad = [n for n in arg if n not in float_linears]
        if bad:
            raise BadInput(f"--fallback: {bad[0]} is not a quantized Linear of this model (e.g. {names[0]})")
        for n in arg:
            _swap(model, n, float_linears[n])
        return {"fp16_layers": list(arg), "history": []}
    if kind == "n":
        chosen = least_sqnr(names, sqnr, arg)
        for n in chosen:
            _swap(model, n, float_linears[n])
        return {"fp16_layers": chosen, "history": []}
    # auto
    cached = hasattr(score, "commit") and hasattr(score, "layer_of")

    def measure(m, changed=()):
        """(score, perplexity checked against the goal); `changed`: the Linears that differ from the committed state."""
        if cached and changed:
            v = score(m, start=min(score.layer_of(n) for n in changed))
        else:
            v = score(m)
        ppl = getattr(score, "last_ppl_upper", None)
        if ppl is None:
            ppl = getattr(score, "last_ppl", None)
        return v, (v if ppl is None else ppl), getattr(score, "last_ppl", v)

    first_order = ranks_first_order(score, ranking)
    knows_float = hasattr(score, "reference_ppl")  # KLScore: the float score is 0, its perplexity the reference's
    if getattr(score, "ref", 0) is None or not knows_float:  # the float model runs: a reference to take, or a score
        for n in names:
            _swap(model, n, float_linears[n])
        if getattr(score, "ref", 0) is None:  # KLScore not yet given the float distributions
            score.reference(model)
        if not knows_float:
            fp, _, fp_ppl = measure(model)
        for n in names:
            _swap(model, n, qmods[n])
    if knows_float:
        fp, fp_ppl = 0.0, score.reference_ppl()
    q0, q0_check, q0_ppl = measure(model)
    if cached:
        score.commit()
    goal = fp_ppl * (1 + target)
    out = {"fp_score": fp, "quant_score": q0, "fp_ppl": fp_ppl, "quant_ppl": q0_ppl, "quant_ppl_upper": q0_check, "goal": goal}
    if q0_check <= goal or max_count <= 0:
        return {"fp16_layers": [], **out, "final_score": q0, "final_ppl": q0_ppl, "final_ppl_upper": q0_check,
                "met": q0_check <= goal, "tried": 0, "history": [], "gains": {}, "role_gains": {}}
    if candidates is None:
        candidates = FALLBACK_CANDIDATES if FALLBACK_CANDIDATES is not None else 2 * max(max_count, 1)
    tried = 0
    roles: dict[str, list] = {}
    for n in names:
        roles.setdefault(role_of(n), []).append(n)
    role_gain = {}
    gains = {}
    if first_order:  # (1) every Linear's first-order estimate from one backward pass per window
        est = score.first_order_gains(model, float_linears)
        pool = [n for n in sorted(names, key=lambda n: (-est[n], sqnr.get(n, 0.0))) if est[n] > 0][: min(total, candidates)]
        gains = {n: est[n] for n in pool}
    elif candidates < total and 1 < len(roles) < total:  # (0) role screening (nothing to screen: one Linear a role)
        for r, members in roles.items():
            for n in members:
                _swap(model, n, float_linears[n])
            role_gain[r] = (q0 - measure(model, members)[0]) / len(members)
            tried += 1
            for n in members:
                _swap(model, n, qmods[n])
    if not first_order:
        pool = sorted(names, key=lambda n: (-role_gain.get(role_of(n), 0.0), sqnr.get(n, 0.0)))[: min(total, candidates)]
        for n in pool:  # (1) measured gain of each candidate alone
            _swap(model, n, float_linears[n])
            gains[n] = q0 - measure(model, [n])[0]
            tried += 1
            _swap(model, n, qmods[n])
    ranked = [n for n in sorted(pool, key=lambda n: -gains[n]) if gains[n] > 0]
    cur, cur_check, cur_ppl = q0, q0_check, q0_ppl
    chosen, history = [], []
    max_tries = max_tries or 3 * max(max_count, 1)
    tries2 = 0
    for n in ranked:  # (2) greedy in gain order
        if cur_check <= goal or len(chosen) >= max_count or tries2 >= max_tries:
            break
        tries2 += 1
        _swap(model, n, float_linears[n])
        new, new_check, new_ppl = measure(model, [n])
        if new < cur - 1e-4 * max(abs(q0), 1e-12):
            chosen.append(n)
            history.append({"linear": n, "score": new, "ppl": new_ppl, "ppl_upper": new_check, "gain_alone": gains[n]})
            cur, cur_check, cur_ppl = new, new_check, new_ppl
            if cached:
                score.commit()
        else:
            _swap(model, n, qmods[n])
    return {"fp16_layers": chosen, **out, "final_score": cur, "final_ppl": cur_ppl, "final_ppl_upper": cur_check,
            "met": cur_check <= goal, "tried": tried + tries2, "candidates": len(pool), "history": history,
            "gains": gains, "role_gains": role_gain, "ranking": "first-order" if first_order else "measured"}


def timed(fn, *a, **k):
    t = time.perf_counter()
    r = fn(*a, **k)
    return r, time.perf_counter() - t
