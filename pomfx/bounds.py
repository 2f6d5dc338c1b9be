"""Norms of the effective weights and the generalization bounds of the paper's Table 2.

``bounds(model, n_samples)`` reads every conv/linear weight of a model as the matrix
``M_l = W_l.reshape(out, in·k)`` (rows: output units; the reshaping Bartlett et al. 2017 and
Neyshabur et al. 2018 use for convolutions), where ``W_l`` is the *effective* weight: for a
converted layer the ``W = R ⊙ ω`` its parametrization computes (``module.weight``), for any other
layer its plain weight. It works the same on a plain and on a converted model, so the two can
be compared side by side. Per layer ``l`` it gives

- ``frobenius``  ‖M_l‖_F;
- ``spectral``   ‖M_l‖_σ, the largest singular value, by power iteration (:func:`spectral_norm`);
- ``two_one``    ‖M_lᵀ‖_{2,1} = Σ_rows ‖(M_l)_r‖_2, Bartlett et al.'s (2,1) norm: the sum over
  output units of the ℓ2 norms of their incoming weights;
- ``two_one_grouped``  Σ_{g∈G_l} ‖W_{g,l}‖_F, the same (2,1) group norm (Neyshabur et al. 2015's
  μ_{2,1}) taken over the layer's POM groups G_l instead of its output units. For a layer that is
  not converted, G_l is its output units and this equals ``two_one``; for a converted ``po``
  layer with K > 1 it equals it too (a po group is one output channel); for ``pi`` it is the
  (2,1) norm over input channels, for ``pio`` over the random mixed groups.

and for a converted layer, per POM group g (from the layout's buckets), with ``E_1..E_m`` the
group's effective components (each ``R ⊙ ω_i``, a tall A×B matrix), the norms of the group as
the block-diagonal operator of its product manifold:
``frobenius`` (Σ_i ‖E_i‖_F²)^{1/2}, ``spectral`` max_i ‖E_i‖_σ, ``two_one`` Σ_i Σ_cols ‖E_i[:, j]‖_2.
These are what the manifolds fix (sp: ‖ω‖_F = 1, ob: every column 1, st: ‖ω‖_σ = 1), times R.

**The three bounds** (Ozay 2019, Table 2). With L layers, n training samples, margin γ
(``margin``), input norm B (``input_norm``: ‖x‖_2 ≤ B), width h = max_l max(rows_l, cols_l),
constants and the confidence term ln(1/δ)/n dropped:

- ``frobenius``: Neyshabur, Tomioka & Srebro 2015, "Norm-based capacity control in neural
  networks" (COLT), the ℓ_{2,2} group-norm (Frobenius) bound on the Rademacher complexity of
  ReLU networks::

      B_F = 2^L · B · ∏_l ‖W_l‖_F / (γ √n),      ‖W_l‖_F² = Σ_{g∈G_l} ‖W_{g,l}‖_F²

- ``spectral``: Bartlett, Foster & Telgarsky 2017, "Spectrally-normalized margin bounds for
  neural networks" (NeurIPS), Theorem 1.1 with ρ_l = 1 (ReLU) and reference matrices M_l = 0::

      B_S = B · ln(h) · ∏_l ‖W_l‖_σ · (Σ_l (a_l / ‖W_l‖_σ)^{2/3})^{3/2} / (γ √n)

  with a_l = Σ_{g∈G_l} ‖W_{g,l}‖_F in the grouped form (``two_one_grouped``), a_l = ‖W_lᵀ‖_{2,1}
  in the paper's own (``standard``) form;

- ``pac_bayes``: Neyshabur, Bhojanapalli & Srebro 2018, "A PAC-Bayesian approach to
  spectrally-normalized margin bounds for neural networks" (ICLR), Theorem 1::

      B_P = sqrt( B² L² h ln(L h) · ∏_l ‖W_l‖_σ² · Σ_l Σ_{g∈G_l} ‖W_{g,l}‖_F² / ‖W_l‖_σ²  / (γ² n) )

**Grouped form, pomfx's reading of Ozay's Table 2.** Ozay writes the bounds with the norms of
weights grouped by input or output channels, and conjectures that bounding each group's norms
(the POMs) brings them down. pomfx writes every norm of a bound that is a sum over groups as a
sum over the layer's POM groups: the Frobenius terms are exact (the groups partition a layer's
entries), Bartlett's (2,1) term becomes the (2,1) group norm over POM groups (for unconverted
layers, over output units: the paper's bound). Spectral norms stay per layer. On a plain model
the grouped and the standard forms coincide. All values are also given as log10 (products of
many norms overflow on deep models); a model whose layer is all zeros has bounds 0.

Batch norm and other normalization layers are not part of the weights and not counted.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .parametrization import POM

__all__ = ["BOUNDS", "Bounds", "GroupNorms", "LayerNorms", "bounds", "spectral_norm"]

#: bound key -> (paper, what it multiplies)
BOUNDS: dict[str, str] = {
    "frobenius": "Neyshabur et al. 2015 (Frobenius)",
    "spectral": "Bartlett et al. 2017 (spectral)",
    "pac_bayes": "Neyshabur et al. 2018 (PAC-Bayes)",
}

_LAYER_TYPES = (nn.Linear, nn.modules.conv._ConvNd)
_SQUARING_MAX = 128  # Gram matrices up to this size: repeated squaring; larger ones: Lanczos


# -- spectral norm by power iteration ------------------------------------------------------------
def spectral_norm(x: Tensor, *, tol: float = 1e-10, max_steps: int = 300, squarings: int = 20) -> Tensor:
    """Largest singular value of every matrix of a batch ``(..., m, n)``, in float64; never an SVD.

    The power method on the Gram matrix ``G = XᵀX`` of the smaller side k = min(m, n):

    - k ≤ 128: by repeated squaring, ``P ← P²/tr(P²)`` up to ``squarings`` times, which is the
      power iteration ``G^(2^s)`` in s batched matrix products (2^20 steps: the Rayleigh quotient
      is within 2e-7 of σ² whatever the eigenvalue gap; it stops early at a fixed point); its
      largest column is the top eigenvector;
    - k > 128: the Krylov space of the power iterates (Lanczos with full reorthogonalization,
      batched), which reaches what plain power steps reach in their square root of steps; it stops
      when every Ritz residual is below ``tol`` (relative) or after ``max_steps`` steps.

    Two plain power steps and a Rayleigh quotient then give σ² = vᵀGv.
    """
    x = x.detach().to(torch.float64)
    if x.shape[-2] < x.shape[-1]:
        x = x.transpose(-1, -2)
    k = x.shape[-1]
    if k == 0 or x.shape[-2] == 0:
        return torch.zeros(x.shape[:-2], dtype=torch.float64, device=x.device)
    g = x.transpose(-1, -2) @ x  # (..., k, k), symmetric PSD
    v = _top_vector_squaring(g, squarings) if k <= _SQUARING_MAX else _top_vector_lanczos(g, tol, max_steps)
    for _ in range(2):
        v = _normalize(g @ v)
    lam = (v * (g @ v)).sum((-2, -1))
    return lam.clamp_min(0).sqrt()


def _normalize(v: Tensor) -> Tensor:
    n = torch.linalg.vector_norm(v, dim=-2, keepdim=True)
    return torch.where(n > 0, v / torch.where(n > 0, n, 1.0), v)


def _trace_normalize(p: Tensor) -> Tensor:
    tr = torch.diagonal(p, dim1=-2, dim2=-1).sum(-1)[..., None, None]
    return p / torch.where(tr > 0, tr, 1.0)


def _top_vector_squaring(g: Tensor, squarings: int) -> Tensor:
    p = _trace_normalize(g)
    for _ in range(squarings):
        new = _trace_normalize(p @ p)
        done = bool((new - p).abs().amax() <= 1e-14)  # a fixed point: converged (or a repeated top)
        p = new
        if done:
            break
    col = torch.diagonal(p, dim1=-2, dim2=-1).argmax(-1)  # the column of largest norm
    v = torch.gather(p, -1, col[..., None, None].expand(*p.shape[:-1], 1))
    return _normalize(v)


def _top_vector_lanczos(g: Tensor, tol: float, max_steps: int, check: int = 8) -> Tensor:
    """Top eigenvector of symmetric PSD ``g`` (batched) from its Lanczos tridiagonalization."""
    *batch, k, _ = g.shape
    steps = min(k, max_steps)
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(k, 1, generator=gen, dtype=g.dtype).to(g.device).expand(*batch, k, 1)
    v = _normalize(g @ v)  # one power step: the start leans to the top of the spectrum
    basis = torch.zeros(*batch, k, steps, dtype=g.dtype, device=g.device)
    alpha = torch.zeros(*batch, steps, dtype=g.dtype, device=g.device)
    beta = torch.zeros(*batch, steps, dtype=g.dtype, device=g.device)
    for j in range(steps):
        basis[..., j : j + 1] = v
        w = g @ v
        alpha[..., j] = (v * w).sum((-2, -1))
        q = basis[..., : j + 1]
        for _ in range(2):  # full reorthogonalization, twice
            w = w - q @ (q.transpose(-1, -2) @ w)
        beta[..., j] = torch.linalg.vector_norm(w, dim=(-2, -1))
        v = _normalize(w)
        if (j + 1) % check == 0 or j + 1 == steps:
            theta, s = _ritz(alpha[..., : j + 1], beta[..., :j])
            residual = beta[..., j] * s[..., -1].abs()  # ‖G y − θ y‖ of the top Ritz pair
            if bool((residual <= tol * theta.clamp_min(torch.finfo(g.dtype).tiny)).all()) or j + 1 == steps:
                return _normalize(q @ s.unsqueeze(-1))
    raise AssertionError("unreachable")


def _ritz(alpha: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
    """Top eigenpair of the tridiagonal matrices with diagonal ``alpha`` and off-diagonal ``beta``."""
    t = torch.diag_embed(alpha) + torch.diag_embed(beta, 1) + torch.diag_embed(beta, -1)
    evals, evecs = torch.linalg.eigh(t)
    return evals[..., -1], evecs[..., :, -1]


# -- results -----------------------------------------------------------------------------------
@dataclass
class GroupNorms:
    """Per POM group of a converted layer (lists in the layout's storage order of groups)."""

    manifold: list[str]
    components: list[int]
    frobenius: list[float]
    spectral: list[float]
    two_one: list[float]

    def __len__(self) -> int:
        return len(self.manifold)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for m in self.manifold:
            out[m] = out.get(m, 0) + 1
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LayerNorms:
    """Norms of one layer's effective weight matrix (out × in·k)."""

    name: str
    type: str
    shape: tuple[int, int]
    converted: bool
    frobenius: float
    spectral: float
    two_one: float
    two_one_grouped: float
    groups: GroupNorms | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "groups"}
        d["shape"] = list(self.shape)
        d["groups"] = self.groups.to_dict() if self.groups is not None else None
        return d


@dataclass
class Bounds:
    """The result of :func:`bounds`: per-layer norms, and the three bounds (grouped and standard).

    ``log10[key]`` / ``values[key]`` hold the grouped form, ``standard_log10`` the papers' own
    (per-output-unit) form, for ``key`` in :data:`BOUNDS`.
    """

    layers: list[LayerNorms]
    n_samples: int
    margin: float
    input_norm: float
    depth: int
    width: int
    log10: dict[str, float] = field(default_factory=dict)
    standard_log10: dict[str, float] = field(default_factory=dict)

    @property
    def values(self) -> dict[str, float]:
        return {k: _pow10(v) for k, v in self.log10.items()}

    @property
    def standard(self) -> dict[str, float]:
        return {k: _pow10(v) for k, v in self.standard_log10.items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_samples": self.n_samples,
            "margin": self.margin,
            "input_norm": self.input_norm,
            "depth": self.depth,
            "width": self.width,
            "bounds": self.values,
            "log10": dict(self.log10),
            "standard": self.standard,
            "standard_log10": dict(self.standard_log10),
            "layers": [layer.to_dict() for layer in self.layers],
        }

    def __str__(self) -> str:
        head = (
            "layer",
            "type",
            "matrix",
            "groups",
            "‖W‖_F",
            "‖W‖_σ",
            "‖Wᵀ‖_2,1",
            "Σ_g‖W_g‖_F",
            "max_g‖W_g‖_σ",
        )
        body = []
        for r in self.layers:
            if r.groups is not None:
                mix = " ".join(f"{k}:{v}" for k, v in r.groups.counts().items())
                gmax = f"{max(r.groups.spectral, default=0.0):.4g}"
            else:
                mix, gmax = f"{r.shape[0]} units", "-"
            body.append(
                (
                    r.name or "(model)",
                    r.type,
                    f"{r.shape[0]}×{r.shape[1]}",
                    mix,
                    f"{r.frobenius:.4g}",
                    f"{r.spectral:.4g}",
                    f"{r.two_one:.4g}",
                    f"{r.two_one_grouped:.4g}",
                    gmax,
                )
            )
        widths = [max(len(x) for x in col) for col in zip(head, *body)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
        lines += [fmt.format(*row).rstrip() for row in body]
        lines.append(
            f"bounds (n = {self.n_samples}, L = {self.depth}, h = {self.width}, margin {self.margin:g}, "
            f"input norm {self.input_norm:g}; constants dropped)   grouped form     standard form"
        )
        for key, paper in BOUNDS.items():
            g, s = self.log10.get(key, math.nan), self.standard_log10.get(key, math.nan)
            lines.append(f"  {paper:<36}  {_fmt_log(g):>14}   {_fmt_log(s):>14}")
        return "\n".join(lines)


def _pow10(x: float) -> float:
    if math.isnan(x):
        return math.nan
    return math.inf if x > 300 else 10.0**x


def _fmt_log(x: float) -> str:
    if math.isnan(x):
        return "nan"
    if x == -math.inf:
        return "0"
    return f"10^{x:.3f}" if abs(x) >= 4 else f"{10.0**x:.4g}"


# -- computing ---------------------------------------------------------------------------------
def _weights(model: nn.Module):
    """``(name, type name, effective weight, POM or None, transposed)`` for every layer weight."""
    seen = set()
    for name, module in model.named_modules():
        cls = parametrize.type_before_parametrizations(module)
        converted = {}
        if parametrize.is_parametrized(module):
            for t, plist in module.parametrizations.items():
                if isinstance(plist[0], POM):
                    converted[t] = plist[0]
        tensors = []
        if issubclass(cls, _LAYER_TYPES):
            tensors.append("weight")
        tensors += [t for t in converted if t not in tensors]
        for t in tensors:
            w = getattr(module, t, None)
            if not isinstance(w, Tensor) or w.dim() < 2 or w.numel() == 0:
                continue
            label = name if t == "weight" and issubclass(cls, _LAYER_TYPES) else f"{name}.{t}".lstrip(".")
            if label in seen:
                continue
            seen.add(label)
            transposed = issubclass(cls, nn.modules.conv._ConvTransposeNd) and t == "weight"
            yield label, cls.__name__, w.detach(), converted.get(t), transposed


def _matrix(w: Tensor, transposed: bool) -> Tensor:
    if transposed:  # ConvTranspose weight (in, out/g, *k): rows are the output channels
        w = w.transpose(0, 1)
    return w.reshape(w.shape[0], -1).to(torch.float64)


@torch.no_grad()
def bounds(model: nn.Module, n_samples: int, *, margin: float = 1.0, input_norm: float = 1.0) -> Bounds:
    """Per-layer (and per-group) norms of ``model``'s effective weights and the Table 2 bounds.

    ``n_samples`` is the training-set size n; ``margin`` γ and ``input_norm`` B scale every bound
    by B/γ (defaults 1: the capacity terms themselves). Works on plain and converted models
    alike; see the module docstring for the formulas and their sources. Same-shaped layer
    matrices and same-shaped components are stacked, so the spectral norms of a whole model
    take a few batched power iterations.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"pomfx.bounds expects a torch.nn.Module, got {type(model).__name__}")
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive int (the training-set size), got {n_samples!r}")
    if not margin > 0 or not input_norm > 0:
        raise ValueError(f"margin and input_norm must be > 0, got {margin!r} and {input_norm!r}")

    entries = list(_weights(model))
    if not entries:
        raise ValueError(f"{type(model).__name__} has no conv or linear weights to bound")
    mats = [_matrix(w, tr) for _, _, w, _, tr in entries]
    spectral = _stacked(mats, lambda x: spectral_norm(x))
    layers: list[LayerNorms] = []
    comp_jobs = []  # (layer index, bucket, effective components)
    for i, ((name, tname, w, pom, _), m) in enumerate(zip(entries, mats)):
        layers.append(
            LayerNorms(
                name=name,
                type=tname,
                shape=(int(m.shape[0]), int(m.shape[1])),
                converted=pom is not None,
                frobenius=float(torch.linalg.vector_norm(m)),
                spectral=float(spectral[i]),
                two_one=float(torch.linalg.vector_norm(m, dim=1).sum()),
                two_one_grouped=math.nan,
            )
        )
        if pom is None:
            layers[-1].two_one_grouped = layers[-1].two_one
        else:
            flat = pom._stored(w.to(torch.float64))
            comp_jobs += [(i, b, x) for b, x in pom.buckets(flat)]
    _group_norms(layers, comp_jobs)

    L = len(layers)
    h = max(max(r.shape) for r in layers)
    out = Bounds(layers, n_samples, float(margin), float(input_norm), L, h)
    fro = [r.frobenius for r in layers]
    spec = [r.spectral for r in layers]
    scale = math.log10(input_norm) - math.log10(margin) - 0.5 * math.log10(n_samples)
    for form, a in (
        ("grouped", [r.two_one_grouped for r in layers]),
        ("standard", [r.two_one for r in layers]),
    ):
        target = out.log10 if form == "grouped" else out.standard_log10
        target.update(_log10_bounds(fro, spec, a, L, h, scale))
    return out


def _log10_bounds(fro, spec, a, L, h, scale) -> dict[str, float]:
    """log10 of the three bounds from per-layer norms (see the module docstring)."""
    vals = fro + spec + a
    if any(math.isnan(v) or math.isinf(v) for v in vals):
        return {k: math.nan for k in BOUNDS}
    if any(s <= 0 for s in spec):  # a zero layer: the network is constant, every bound is 0
        return {k: -math.inf for k in BOUNDS}
    lg = math.log10
    log_prod_spec = sum(lg(s) for s in spec)
    # Neyshabur 2015: 2^L ∏ ‖W‖_F
    frob = L * lg(2) + sum(lg(f) for f in fro) + scale
    # Bartlett 2017: ln(h) ∏ ‖W‖_σ (Σ (a/‖W‖_σ)^{2/3})^{3/2}
    terms = [(2 / 3) * (lg(x) - lg(s)) if x > 0 else -math.inf for x, s in zip(a, spec)]
    spectral = lg(math.log(max(h, 2))) + log_prod_spec + 1.5 * _log10_sum_pow10(terms) + scale
    # Neyshabur 2018: sqrt(L² h ln(Lh) ∏ ‖W‖_σ² Σ ‖W‖_F²/‖W‖_σ²)
    ratios = [2 * (lg(f) - lg(s)) if f > 0 else -math.inf for f, s in zip(fro, spec)]
    pac = 0.5 * (
        2 * lg(L) + lg(h) + lg(math.log(max(L * h, 2))) + 2 * log_prod_spec + _log10_sum_pow10(ratios)
    )
    pac += scale
    return {"frobenius": frob, "spectral": spectral, "pac_bayes": pac}


def _log10_sum_pow10(logs: list[float]) -> float:
    top = max(logs)
    if top == -math.inf:
        return -math.inf
    return top + math.log10(sum(10.0 ** (x - top) for x in logs))


def _stacked(mats: list[Tensor], fn) -> list[Tensor]:
    """``fn`` applied to same-shaped matrices stacked into one batch; results in input order."""
    out: list[Tensor | None] = [None] * len(mats)
    by_shape: dict[tuple, list[int]] = {}
    for i, m in enumerate(mats):
        by_shape.setdefault((tuple(m.shape), m.device), []).append(i)
    for idx in by_shape.values():
        res = fn(torch.stack([mats[i] for i in idx]))
        for j, i in enumerate(idx):
            out[i] = res[j]
    return out  # type: ignore[return-value]


def _group_norms(layers: list[LayerNorms], jobs: list) -> None:
    """Component norms of every (layer, bucket), same-shaped components of the model stacked;
    then per group: Frobenius (root sum of squares), spectral (max), (2,1) (sum)."""
    if not jobs:
        return
    by_shape: dict[tuple, list[int]] = {}
    for j, (_, b, x) in enumerate(jobs):
        by_shape.setdefault((b.rows, b.cols, x.device), []).append(j)
    comp: list[tuple[Tensor, Tensor, Tensor] | None] = [None] * len(jobs)
    for idx in by_shape.values():
        x = torch.cat([jobs[j][2] for j in idx])
        fro = torch.linalg.vector_norm(x, dim=(-2, -1))
        spec = spectral_norm(x)
        two_one = torch.linalg.vector_norm(x, dim=-2).sum(-1)
        start = 0
        for j in idx:
            n = jobs[j][1].count
            comp[j] = (fro[start : start + n], spec[start : start + n], two_one[start : start + n])
            start += n
    per_layer: dict[int, list] = {}
    for j, (i, b, _) in enumerate(jobs):
        fro, spec, two_one = comp[j]  # type: ignore[misc]
        sizes = torch.as_tensor(b.group_sizes, device=fro.device)
        gid = torch.repeat_interleave(torch.arange(len(sizes), device=fro.device), sizes)
        zeros = torch.zeros(len(sizes), dtype=torch.float64, device=fro.device)
        g_fro = zeros.index_add(0, gid, fro.square()).sqrt()
        g_spec = zeros.scatter_reduce(0, gid, spec, "amax", include_self=False)
        g_two_one = zeros.index_add(0, gid, two_one)
        per_layer.setdefault(i, []).append((b.manifold, sizes, g_fro, g_spec, g_two_one))
    for i, parts in per_layer.items():
        groups = GroupNorms([], [], [], [], [])
        for manifold, sizes, g_fro, g_spec, g_two_one in parts:
            groups.manifold += [manifold] * len(sizes)
            groups.components += sizes.tolist()
            groups.frobenius += g_fro.tolist()
            groups.spectral += g_spec.tolist()
            groups.two_one += g_two_one.tolist()
        layers[i].groups = groups
        layers[i].two_one_grouped = float(sum(groups.frobenius))
