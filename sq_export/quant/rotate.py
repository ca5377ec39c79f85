"""A foldable orthogonal rotation of the residual stream (QuaRot / SpinQuant's R1), for RMSNorm models.

RMSNorm(x) = x / rms(x) · γ. With γ folded into the Linears that read the norm (their input columns ×γ), the norm
is x / rms(x), which commutes with any orthogonal Q (rms(xQ) = rms(x)). So the whole residual stream can be
carried rotated — x' = x·Q — at no run-time cost:

    embedding rows        E  ← E·Q
    Linears reading it    W  ← W·Q        (q/k/v, gate/up, the LM head: y = x'·W'ᵀ = x·Q·Qᵀ·Wᵀ)
    Linears writing it    W  ← Qᵀ·W, b ← b·Q   (o_proj, down_proj)

The float model computes the same function (checked on a batch, as smoothing is); what changes is where the
activations' energy sits: a few outlier channels (and the massive tokens' few huge channels) are spread over all
channels by a random Hadamard matrix, so per-tensor INT8 scales of q/k/v and gate/up inputs fit better. The
down_proj and o_proj inputs are not in the residual stream: they stay as they are (QuaRot's online R3/R4 rotations
are not foldable). A tied LM head is untied (it reads the final norm, whose γ is folded into it).

    info = rotate_model(model, family, seed=0, check_batch=ids)   # in place, before calibration
"""

from __future__ import annotations

import math

import numpy as np
import torch

from sq_export.errors import BadInput, UnsupportedModel

ROTATABLE = ("llama",)  # families whose norms are RMSNorm without bias and whose Linears have no bias into the stream


def _paley(q: int) -> np.ndarray:
    """Hadamard matrix of order q+1 (Paley construction I, q prime ≡ 3 mod 4)."""
    residues = {(i * i) % q for i in range(1, q)}
    chi = np.array([0] + [1 if i in residues else -1 for i in range(1, q)])
    jac = np.array([[chi[(j - i) % q] for j in range(q)] for i in range(q)])
    h = np.ones((q + 1, q + 1), dtype=np.int64)
    h[1:, 0] = -1
    h[1:, 1:] = jac + np.eye(q, dtype=np.int64)
    return h


def _base(order: int) -> np.ndarray:
    if order == 1:
        return np.ones((1, 1), dtype=np.int64)
    if order in (12, 20):
        return _paley(order - 1)
    a, b = {144: (12, 12), 240: (12, 20), 400: (20, 20)}[order]
    return np.kron(_paley(a - 1), _paley(b - 1))


def hadamard_matrix(n: int) -> np.ndarray | None:
    """A ±1 Hadamard matrix of order n (n = 2^k times 1, 12, 20, 144, 240 or 400: Sylvester's doubling of Paley
    matrices and their Kronecker products; SmolLM2's 576 = 144·4), or None."""
    for base in (1, 12, 20, 144, 240, 400):
        if n % base == 0:
            m = n // base
            if m & (m - 1) == 0:  # a power of two
                h = _base(base)
                s = np.array([[1, 1], [1, -1]], dtype=np.int64)
                while h.shape[0] < n:
                    h = np.kron(h, s)
                return h
    return None


def random_orthogonal(n: int, seed: int = 0) -> torch.Tensor:
    """A random Hadamard rotation H·diag(±1)/√n (float64) when a Hadamard matrix of order n is known, else a random
    orthogonal matrix (QR of a Gaussian)."""
    g = np.random.default_rng(seed)
    h = hadamard_matrix(n)
    if h is not None:
        signs = g.choice([-1.0, 1.0], size=n)
        q = (h.astype(np.float64) * signs[None, :]).T / math.sqrt(n)  # rows of H·D, transposed: an orthogonal Q
        return torch.from_numpy(q)
    a = g.standard_normal((n, n))
    q, r = np.linalg.qr(a)
    return torch.from_numpy(q * np.sign(np.diag(r))[None, :])


def _linears(family, rel_names):
    return [family.layer_prefix(i) + r for i in range(family.num_layers()) for r in rel_names]


@torch.no_grad()
def rotate_model(model, family, seed: int = 0, check_batch: torch.Tensor | None = None) -> dict:
    """Fold every RMSNorm γ into the Linears it feeds and rotate the residual stream by a random Hadamard matrix, in
    place (see the module docstring). `check_batch`: token ids on which the float logits must not move (else
    SmoothingChangedOutputs, nothing is kept). Returns {"hidden", "kind", "seed", "delta"}."""
    from sq_export.modeling import check_plain_norm
    from sq_export.quant.smooth import check_unchanged, logits_of

    if family.name not in ROTATABLE:
        raise UnsupportedModel(f"--rotate needs an RMSNorm model without biases into the residual stream "
                               f"({', '.join(ROTATABLE)}), not {family.name}")
    ref = logits_of(model, check_batch) if check_batch is not None else None
    d = model.config.hidden_size
    Q = random_orthogonal(d, seed)
    kind = "hadamard" if hadamard_matrix(d) is not None else "orthogonal"
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if head is not None and head.weight is emb.weight:  # untie: the head gets the final norm's γ, the embedding not
        head.weight = torch.nn.Parameter(emb.weight.detach().clone(), requires_grad=False)
        model.config.tie_word_embeddings = False
    readers = []  # (norm, Linears reading it)
    for i in range(family.num_layers()):
        p = family.layer_prefix(i)
        for norm, lins in family.norm_groups:
            readers.append((p + norm, [p + x for x in lins]))
    final = _final_norm(model, family)
    if final is not None and head is not None:
        readers.append((final, None))
    for norm_name, lins in readers:
        norm = model.get_submodule(norm_name)
        check_plain_norm(norm, norm_name)
        if getattr(norm, "bias", None) is not None:
            raise UnsupportedModel(f"{norm_name} has a bias: the rotation needs RMSNorm (no centering, no bias)")
        mods = [model.get_submodule(n) for n in lins] if lins is not None else [head]
        g = norm.weight.detach().double()
        for m in mods:
            m.weight.copy_((m.weight.double() * g[None, :]).to(m.weight.dtype))
        norm.weight.fill_(1.0)
    def rot_in(m):  # y = x·Wᵀ with x rotated: W ← W·Q
        m.weight.copy_((m.weight.double() @ Q).to(m.weight.dtype))

    def rot_out(m):  # writes the stream: W ← Qᵀ·W, b ← b·Q
        m.weight.copy_((Q.t() @ m.weight.double()).to(m.weight.dtype))
        if getattr(m, "bias", None) is not None:
            m.bias.copy_((m.bias.double() @ Q).to(m.bias.dtype))

    emb.weight.copy_((emb.weight.double() @ Q).to(emb.weight.dtype))
    for n in _linears(family, [x for _, lins in family.norm_groups for x in lins]):
        rot_in(model.get_submodule(n))
    if head is not None:
        rot_in(head)
    for n in _linears(family, _writers(family)):
        rot_out(model.get_submodule(n))
    delta = check_unchanged(ref, logits_of(model, check_batch), "rotation") if ref is not None else None
    return {"hidden": d, "kind": kind, "seed": seed, "delta": delta}


def _writers(family) -> list[str]:
    """The Linears whose outputs are added to the residual stream (Llama: o_proj, down_proj)."""
    read = {x for _, lins in family.norm_groups for x in lins}
    return [x for x in family.linears if x not in read and x.endswith(("o_proj", "down_proj"))]


def _final_norm(model, family) -> str | None:
    base = family.layers_path.rpartition(".")[0]
    name = f"{base}.norm" if base else "norm"
    try:
        model.get_submodule(name)
    except AttributeError:
        return None
    return name


def check_rotatable(family) -> None:
    if family.name not in ROTATABLE:
        raise BadInput(f"--rotate applies to {', '.join(ROTATABLE)} models, not {family.name}")
