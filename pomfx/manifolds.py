"""Weight manifolds: sphere, oblique, Stiefel and Euclidean.

Every manifold acts on a batch of tall matrices ``x`` of shape ``(..., A, B)`` with ``A >= B``,
under the embedded (Frobenius) metric, and never loops over the batch. The verbs are fixed:

- ``project(x)``: a point of the manifold near ``x`` (used to initialise and to load weights);
- ``proj_tangent(x, g)``: the orthogonal projection of ``g`` onto the tangent space at ``x``,
  i.e. the Riemannian gradient of a function whose Euclidean gradient is ``g``;
- ``retract(x, xi)``: a first-order retraction, back onto the manifold from ``x + xi``;
- ``transport(y, v)``: vector transport to ``y`` by projection onto its tangent space;
- ``distance(x)``: how far each matrix lies from the manifold (0 on it), shape ``(...)``;
- ``random(shape)``: a random point;
- ``gamma(B)``: the geometric scale that brings the Frobenius and spectral norms of a point to
  at most 1 (DESIGN §1, stage (ii) of the renormalization).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["Manifold", "Sphere", "Oblique", "Stiefel", "Euclidean", "MANIFOLDS", "get"]

_SMALL_STIEFEL = 8  # columns up to which Stiefel uses tensor-op Gram-Schmidt instead of LAPACK


def _sym(a: Tensor) -> Tensor:
    return 0.5 * (a + a.transpose(-1, -2))


def _unit(x: Tensor, dim: tuple[int, ...] | int, safe: bool) -> Tensor:
    """x divided by its norm over ``dim``; with ``safe``, zero slices become a unit basis vector."""
    n = torch.linalg.vector_norm(x, dim=dim, keepdim=True)
    if safe:
        fallback = torch.zeros_like(x)
        fallback.select(-2, 0).fill_(1.0)
        if isinstance(dim, tuple):  # Frobenius: put the mass on entry (0, 0) only
            fallback[..., 1:] = 0
        x = torch.where(n > 0, x, fallback)
        n = torch.where(n > 0, n, torch.ones_like(n))
    return x / n


class Manifold:
    """The interface; subclasses are stateless and every method is batched."""

    name: str = ""

    @staticmethod
    def project(x: Tensor) -> Tensor:
        raise NotImplementedError

    @staticmethod
    def proj_tangent(x: Tensor, g: Tensor) -> Tensor:
        raise NotImplementedError

    @classmethod
    def retract(cls, x: Tensor, xi: Tensor) -> Tensor:
        return cls.project(x + xi)

    @classmethod
    def transport(cls, y: Tensor, v: Tensor) -> Tensor:
        return cls.proj_tangent(y, v)

    @staticmethod
    def distance(x: Tensor) -> Tensor:
        raise NotImplementedError

    @staticmethod
    def gamma(b: int) -> float:
        return 1.0

    @classmethod
    def random(
        cls,
        shape: tuple[int, ...],
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        return cls.project(torch.randn(shape, generator=generator, dtype=dtype, device=device))


class Sphere(Manifold):
    """Unit Frobenius sphere ``‖x‖_F = 1``; tangent ``G − ⟨x,G⟩x``; retraction ``(x+ξ)/‖x+ξ‖``."""

    name = "sp"

    @staticmethod
    def project(x: Tensor) -> Tensor:
        return _unit(x, (-2, -1), safe=True)

    @classmethod
    def retract(cls, x: Tensor, xi: Tensor) -> Tensor:
        return _unit(x + xi, (-2, -1), safe=False)  # ‖x+ξ‖ ≥ 1 for tangent ξ

    @staticmethod
    def proj_tangent(x: Tensor, g: Tensor) -> Tensor:
        return g - (x * g).sum((-2, -1), keepdim=True) * x

    @staticmethod
    def distance(x: Tensor) -> Tensor:
        return (torch.linalg.vector_norm(x, dim=(-2, -1)) - 1).abs()


class Oblique(Manifold):
    """Every column of unit norm; tangent ``G − x·ddiag(xᵀG)``; retraction normalises columns."""

    name = "ob"

    @staticmethod
    def project(x: Tensor) -> Tensor:
        return _unit(x, -2, safe=True)

    @classmethod
    def retract(cls, x: Tensor, xi: Tensor) -> Tensor:
        return _unit(x + xi, -2, safe=False)

    @staticmethod
    def proj_tangent(x: Tensor, g: Tensor) -> Tensor:
        return g - (x * g).sum(-2, keepdim=True) * x

    @staticmethod
    def distance(x: Tensor) -> Tensor:
        return (torch.linalg.vector_norm(x, dim=-2) - 1).abs().amax(-1)

    @staticmethod
    def gamma(b: int) -> float:
        return 1.0 / math.sqrt(b)


def _orthogonalize(v: Tensor, cols: list[Tensor]) -> Tensor:
    """v minus its components along the orthonormal columns ``cols``, done twice (CGS2)."""
    if not cols:
        return v
    q = torch.stack(cols, -1)  # (..., A, j)
    for _ in range(2):
        v = v - (q * (q * v.unsqueeze(-1)).sum(-2, keepdim=True)).sum(-1)
    return v


def _gram_schmidt(x: Tensor, safe: bool) -> Tensor:
    """Q factor (positive diagonal R) of small tall matrices by CGS2, with elementwise tensor ops.

    Loops over the B columns only, never over the batch; each column is orthogonalised twice
    against the previous ones ("twice is enough"), which keeps ‖QᵀQ − I‖ at rounding level.
    With ``safe``, a column that vanishes (rank-deficient input) is replaced by a basis vector
    made orthogonal to the previous ones; a retraction never needs that and skips the check.
    """
    cols: list[Tensor] = []
    for j in range(x.shape[-1]):
        v = _orthogonalize(x[..., j], cols)
        n = torch.linalg.vector_norm(v, dim=-1, keepdim=True)
        if safe:
            tiny = n <= torch.finfo(x.dtype).eps * 16
            e = torch.zeros_like(v)
            e[..., j] = 1.0
            v = torch.where(tiny, _orthogonalize(e, cols), v)
            n = torch.linalg.vector_norm(v, dim=-1, keepdim=True)
        cols.append(v / n)
    return torch.stack(cols, -1)


def _cholesky_qr2(x: Tensor) -> Tensor:
    """Q factor of well-conditioned tall matrices (x + ξ with ξ tangent) by Cholesky-QR, twice."""
    for _ in range(2):
        r = torch.linalg.cholesky(x.transpose(-1, -2) @ x, upper=True)
        x = torch.linalg.solve_triangular(r, x, upper=True, left=False)
    return x


class Stiefel(Manifold):
    """Orthonormal columns ``xᵀx = I``; tangent ``G − x·sym(xᵀG)``; QR retraction.

    The retraction is the Q factor with positive diagonal R: Gram-Schmidt in tensor ops for
    small matrices (kernels: B ≤ 8), Cholesky-QR2 for larger blocks (well conditioned, since
    (x+ξ)ᵀ(x+ξ) = I + ξᵀξ). ``project`` uses the same Q factor (Householder QR for wide blocks,
    robust to rank deficiency): a point of the manifold, not necessarily the nearest one.
    """

    name = "st"

    @staticmethod
    def project(x: Tensor) -> Tensor:
        if x.shape[-1] <= _SMALL_STIEFEL:
            return _gram_schmidt(x, safe=True)
        q, r = torch.linalg.qr(x)
        d = torch.diagonal(r, dim1=-2, dim2=-1)
        return q * torch.where(d < 0, -1.0, 1.0).to(q.dtype).unsqueeze(-2)

    @classmethod
    def retract(cls, x: Tensor, xi: Tensor) -> Tensor:
        y = x + xi
        return _gram_schmidt(y, safe=False) if y.shape[-1] <= _SMALL_STIEFEL else _cholesky_qr2(y)

    @staticmethod
    def proj_tangent(x: Tensor, g: Tensor) -> Tensor:
        return g - x @ _sym(x.transpose(-1, -2) @ g)

    @staticmethod
    def distance(x: Tensor) -> Tensor:
        eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
        return (x.transpose(-1, -2) @ x - eye).abs().amax((-2, -1))

    @staticmethod
    def gamma(b: int) -> float:
        return 1.0 / math.sqrt(b)


class Euclidean(Manifold):
    """Unconstrained ``R^{A×B}``: identity projection, ``x + ξ`` retraction."""

    name = "euc"

    @staticmethod
    def project(x: Tensor) -> Tensor:
        return x

    @classmethod
    def retract(cls, x: Tensor, xi: Tensor) -> Tensor:
        return x + xi

    @staticmethod
    def proj_tangent(x: Tensor, g: Tensor) -> Tensor:
        return g

    @staticmethod
    def distance(x: Tensor) -> Tensor:
        return torch.zeros(x.shape[:-2], dtype=x.dtype, device=x.device)


MANIFOLDS: dict[str, type[Manifold]] = {m.name: m for m in (Sphere, Oblique, Stiefel, Euclidean)}


def get(name: str) -> type[Manifold]:
    """The manifold class called ``name`` (one of ``sp``, ``ob``, ``st``, ``euc``)."""
    try:
        return MANIFOLDS[name]
    except KeyError:
        raise ValueError(f"unknown manifold {name!r}; valid: {', '.join(MANIFOLDS)}") from None
