"""Weight manifolds: sphere, oblique, Stiefel and Euclidean.

Every manifold acts on a batch of tall matrices ``x`` of shape ``(..., A, B)`` with ``A >= B``,
under the embedded (Frobenius) metric, and never loops over the batch. The verbs are fixed:

- ``project(x)``: a point of the manifold near ``x`` (used to initialise and to load weights);
- ``project_(x)``: the same, written into ``x``;
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

import contextlib
import math

import torch
from torch import Tensor

__all__ = ["Manifold", "Sphere", "Oblique", "Stiefel", "Euclidean", "MANIFOLDS", "get"]

_SMALL_STIEFEL = 8  # columns up to which Stiefel uses tensor-op Gram-Schmidt instead of LAPACK


def _sym(a: Tensor) -> Tensor:
    return 0.5 * (a + a.transpose(-1, -2))


def _col_sq(x: Tensor) -> Tensor:
    """Squared column norms, shape (..., 1, B).

    Summed slice by slice for short columns: torch's reductions over a small middle dimension
    (and ``vector_norm(dim=-2)``, 10-20x slower still) are much slower than a few adds.
    """
    sq = x * x
    if x.shape[-2] > 8:
        return sq.sum(-2, keepdim=True)
    out = sq[..., :1, :]
    for k in range(1, x.shape[-2]):
        out = out + sq[..., k : k + 1, :]
    return out


BIG_COMPONENT = 4096  # elements per component above which sums use torch's accurate reduction


def frobenius_norm(x: Tensor) -> Tensor:
    """‖x‖_F of each (A, B) component, shape (..., 1, 1).

    ``vector_norm`` over two dims (like a BLAS dot) accumulates in a few fp32 lanes, and its error
    grows with the component's size (2e-4 on a 4608×2048 sphere); large components go through
    ``sum``, whose cascade summation keeps it at 1e-9.
    """
    if x.shape[-2] * x.shape[-1] > BIG_COMPONENT:
        return (x * x).sum((-2, -1), keepdim=True).sqrt()
    return torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True)


def _unit(x: Tensor, dim: tuple[int, ...] | int, safe: bool, inplace: bool = False) -> Tensor:
    """x divided by its norm over ``dim`` (Frobenius for a tuple, columns for -2); written into
    ``x`` itself with ``inplace``.

    With ``safe``, slices whose norm is not positive (zero, or NaN) become a unit basis vector
    (entry (0, 0) for the Frobenius sphere, the first entry of each column for columns); the
    check costs one reduction and the repair runs only when it is needed.
    """
    n = frobenius_norm(x) if isinstance(dim, tuple) else _col_sq(x).sqrt()
    if safe and not bool((n > 0).all()):
        fallback = torch.zeros_like(x)
        if isinstance(dim, tuple):  # Frobenius: put the mass on entry (0, 0) only
            fallback[..., 0, 0] = 1.0
        else:
            fallback[..., 0, :] = 1.0
        y = torch.where(n > 0, x, fallback)
        n = torch.where(n > 0, n, torch.ones_like(n))
        return x.copy_(y.div_(n)) if inplace else y.div_(n)
    return x.div_(n) if inplace else x / n


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
    def project_(cls, x: Tensor) -> Tensor:
        """``x ← project(x)``, in place (no second copy of a large bucket)."""
        return x.copy_(cls.project(x))

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
    def project_(cls, x: Tensor) -> Tensor:
        return _unit(x, (-2, -1), safe=True, inplace=True)

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
    def project_(cls, x: Tensor) -> Tensor:
        return _unit(x, -2, safe=True, inplace=True)

    @classmethod
    def retract(cls, x: Tensor, xi: Tensor) -> Tensor:
        return _unit(x + xi, -2, safe=False)

    @staticmethod
    def proj_tangent(x: Tensor, g: Tensor) -> Tensor:
        return g - (x * g).sum(-2, keepdim=True) * x

    @staticmethod
    def distance(x: Tensor) -> Tensor:
        return (_col_sq(x).sqrt() - 1).abs().amax((-2, -1))

    @staticmethod
    def gamma(b: int) -> float:
        return 1.0 / math.sqrt(b)


def _gram_schmidt(x: Tensor, safe: bool) -> Tensor:
    """Q factor (positive diagonal R) of small tall matrices by CGS2, with elementwise tensor ops.

    Loops over the B columns only, never over the batch; each column is orthogonalised twice
    against the previous ones ("twice is enough"), which keeps ‖QᵀQ − I‖ at rounding level.
    Many small matrices are processed as a structure of arrays (columns stored (A, N), so that
    every op runs along the batch N: torch is slow on tiny inner dimensions); few tall ones as
    (N, A) columns. With ``safe``, a column that vanishes (rank-deficient input, relative to the
    matrix's largest column) is replaced by the basis vector least covered by the previous
    columns, made orthogonal to them; a retraction never needs that and skips the check.
    """
    a, b = x.shape[-2:]
    flat = x.reshape(-1, a, b)
    soa = flat.shape[0] >= a  # many small matrices
    # cols[j]: column j of every matrix, (A, N) in SoA, (N, A) otherwise; dots reduce over ``red``
    cols = flat.permute(2, 1, 0).contiguous() if soa else flat.transpose(1, 2).contiguous()
    red = 0 if soa else -1
    dot = lambda u, v: (u * v).sum(red, keepdim=True)  # noqa: E731
    if safe:
        # the largest column norm of each matrix, shaped like a column's norm: (1, N) or (N, 1)
        big = (
            (cols * cols).sum(1).amax(0, keepdim=True)
            if soa
            else (cols * cols).sum(-1).amax(-1, keepdim=True)
        )
        tol = big.sqrt() * (torch.finfo(x.dtype).eps * 4 * a)
    qs: list[Tensor] = []
    for j in range(b):
        v = cols[j] if soa else cols[:, j]
        for _ in range(2 if qs else 0):
            coef = [dot(q, v) for q in qs]  # CGS: all coefficients against the same v
            for q, c in zip(qs, coef):
                v = torch.addcmul(v, q, c, value=-1)
        n = dot(v, v).sqrt()
        if safe:
            tiny = n <= tol
            if bool(tiny.any()):
                cover = sum((q * q for q in qs), torch.zeros_like(v))
                e = torch.zeros_like(v).scatter_(red, cover.argmin(red, keepdim=True), 1.0)
                for _ in range(2 if qs else 0):
                    coef = [dot(q, e) for q in qs]
                    for q, c in zip(qs, coef):
                        e = torch.addcmul(e, q, c, value=-1)
                v = torch.where(tiny, e, v)
                n = dot(v, v).sqrt()
        qs.append(v / n)
    q = torch.stack(qs, 0).permute(2, 1, 0) if soa else torch.stack(qs, -1)
    return q.reshape(x.shape)


_INVERSE_COLS = 96  # up to this B, y·R⁻¹ as a product with R⁻¹ (~2× faster on a CPU than a solve)


@contextlib.contextmanager
def ieee_matmuls():
    """float32 matmuls as IEEE float32 inside (cuBLAS's TF32 off, whatever the user chose for
    the model): TF32 rounds a product's inputs to 10 bits, and a retraction through such a Gram
    matrix would leave ω ~1e-3 off its manifold. Set and restored through the API the user set
    it with: torch refuses to read its TF32 flags once both of its APIs have written them."""
    try:  # the legacy API's view; it raises where the new one (torch 2.9+) set the flag
        saved, exact = torch.get_float32_matmul_precision(), "highest"
        put = torch.set_float32_matmul_precision
    except RuntimeError:
        m = torch.backends.cuda.matmul
        saved, exact, put = m.fp32_precision, "ieee", lambda v: setattr(m, "fp32_precision", v)
    if saved == exact:
        yield
        return
    put(exact)
    try:
        yield
    finally:
        put(saved)


def right_solve_upper(r: Tensor, y: Tensor) -> Tensor:
    """``y·R⁻¹`` for upper-triangular (…, B, B) ``r``: a triangular solve, or, for small B on a
    CPU, the B×B inverse (O(B³)) times y by a batched matmul (O(A·B²) in BLAS, where the batched
    solve is about twice as slow). R here is a Cholesky factor of a well-conditioned Gram
    matrix, so both are accurate to rounding."""
    b = r.shape[-1]
    if y.device.type == "cpu" and b <= _INVERSE_COLS:
        eye = torch.eye(b, dtype=r.dtype, device=r.device).expand(r.shape)
        return y @ torch.linalg.solve_triangular(r, eye, upper=True)
    return torch.linalg.solve_triangular(r, y, upper=True, left=False)


def _cholesky_qr2(x: Tensor) -> Tensor:
    """Q factor of well-conditioned tall matrices (x + ξ with ξ tangent) by Cholesky-QR, twice."""
    for _ in range(2):
        r = torch.linalg.cholesky(x.transpose(-1, -2) @ x, upper=True)
        x = right_solve_upper(r, x)
    return x


def _householder_q(x: Tensor) -> Tensor:
    """Q factor with the signs of a positive-diagonal R, by Householder QR (any rank)."""
    q, r = torch.linalg.qr(x)
    d = torch.diagonal(r, dim1=-2, dim2=-1)
    return q * torch.where(d < 0, -1.0, 1.0).to(q.dtype).unsqueeze(-2)


def _orthonormalize(x: Tensor) -> Tensor:
    """Q factor (positive diagonal R) of arbitrary tall matrices, fast and robust.

    Cholesky-QR2 (two Gram matrices, two Choleskys, two triangular solves: 2-4x faster than
    Householder QR on a CPU), checked on the way: where the first Cholesky fails or its Q is far
    from orthonormal (ill-conditioned or rank-deficient input), that matrix is redone by
    Householder QR, which is orthonormal for any input.
    """
    flat = x.reshape(-1, *x.shape[-2:])
    eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    g = flat.transpose(-1, -2) @ flat
    r, info = torch.linalg.cholesky_ex(g, upper=True)
    bad = info != 0
    r = torch.where(bad.view(-1, 1, 1), eye, r)  # keep the failed ones finite; redone below
    y = right_solve_upper(r, flat)
    g = y.transpose(-1, -2) @ y
    bad |= ~((g - eye).abs().amax((-2, -1)) <= 0.1)  # also catches NaN/inf
    r, info = torch.linalg.cholesky_ex(torch.where(bad.view(-1, 1, 1), eye, g), upper=True)
    q = right_solve_upper(r, y)
    bad |= info != 0
    if bool(bad.any()):
        idx = bad.nonzero().squeeze(-1)
        q = q.index_copy(0, idx, _householder_q(flat.index_select(0, idx)))
    return q.reshape(x.shape)


class Stiefel(Manifold):
    """Orthonormal columns ``xᵀx = I``; tangent ``G − x·sym(xᵀG)``; QR retraction.

    The retraction is the Q factor with positive diagonal R: Gram-Schmidt in tensor ops for
    small matrices (kernels: B ≤ 8), Cholesky-QR2 for larger blocks (well conditioned, since
    (x+ξ)ᵀ(x+ξ) = I + ξᵀξ). ``project`` uses the same Q factor (robust to rank deficiency:
    vanishing columns are completed, failed Choleskys redone by Householder QR): a point of the
    manifold, not necessarily the nearest one. Needs tall matrices (A ≥ B).
    """

    name = "st"

    @staticmethod
    def _check(x: Tensor) -> None:
        if x.dim() < 2 or x.shape[-2] < x.shape[-1]:
            raise ValueError(f"Stiefel needs tall matrices (..., A, B) with A >= B, got {tuple(x.shape)}")

    @staticmethod
    def project(x: Tensor) -> Tensor:
        Stiefel._check(x)
        if x.shape[-1] <= _SMALL_STIEFEL:
            return _gram_schmidt(x, safe=True)
        return _orthonormalize(x)

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
