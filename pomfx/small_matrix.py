"""FG-SGD's small-matrix algebra in tensor ops, batched over the components of a job.

A job's components are (n, A, B) tensors (block jobs) or structure-of-arrays (A, B, n) ones
(kernel jobs, ``soa_*``). For small components (B ≤ 8) a product is a few fused
multiply-adds over n per entry, which beats a batched BLAS or LAPACK call per component by
10-40× on a CPU; larger ones take ``bmm``/``baddbmm`` and batched Cholesky. The Stiefel
retraction is Cholesky-QR: ``Q = Y·R⁻¹`` with ``RᵀR = YᵀY``, done twice when a step is
large (‖ξ_c‖² > :data:`RESTEP`), since one pass loses orthogonality as the condition number
of YᵀY grows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .manifolds import BIG_COMPONENT, right_solve_upper

__all__ = [
    "RESTEP",
    "SOA_COLS",
    "chol_qr_",
    "chol_qr_small_",
    "coldot",
    "dot",
    "isfinite",
    "soa_chol_",
    "soa_sub_mm_",
    "soa_tmm",
    "sub_mm_",
    "sym",
    "tmm",
    "well_conditioned",
]

# kernel components with more columns: their B×B products and Cholesky-QR by batched BLAS,
# LAPACK or cuSOLVER calls, whose launches do not grow with B, instead of elementwise ops
SOA_COLS = 4


RESTEP = 0.25  # ‖ξ_c‖² above which a Stiefel component's Cholesky-QR is done twice


def soa_tmm(X: Tensor, Y: Tensor, out: Tensor) -> Tensor:
    """XᵀY per component for (A, B, n) X and Y, into ``out`` (B, B, n)."""
    if X.shape[1] > SOA_COLS:
        return out.copy_(torch.bmm(X.permute(2, 1, 0), Y.permute(2, 0, 1)).permute(1, 2, 0))
    torch.mul(X[0].unsqueeze(1), Y[0].unsqueeze(0), out=out)
    for r in range(1, X.shape[0]):
        out.addcmul_(X[r].unsqueeze(1), Y[r].unsqueeze(0))
    return out


def soa_sub_mm_(V: Tensor, X: Tensor, C: Tensor) -> None:
    """V −= X·C per component: (A, B, n) V and X, (B, B, n) C."""
    if X.shape[1] > SOA_COLS:
        V.sub_(torch.bmm(X.permute(2, 0, 1), C.permute(2, 0, 1)).permute(1, 2, 0))
        return
    for r in range(X.shape[1]):
        V.addcmul_(X[:, r].unsqueeze(1), C[r].unsqueeze(0), value=-1.0)


def soa_chol_(P: Tensor, R: Tensor, d: Tensor) -> Tensor:
    """Upper Cholesky factor R (P = RᵀR, positive diagonal) per component of (B, B, n) P, into
    ``R``; ``d`` is a (B, n) workspace."""
    b = P.shape[0]
    R.zero_()
    tiny = torch.finfo(P.dtype).tiny
    for j in range(b):
        dj = d[: b - j]
        dj.copy_(P[j, j:])
        for k in range(j):
            dj.addcmul_(R[k, j].unsqueeze(0), R[k, j:], value=-1.0)
        torch.clamp(dj[0], min=tiny, out=R[j, j]).sqrt_()
        if j + 1 < b:
            torch.div(dj[1:], R[j, j], out=R[j, j + 1 :])
    return R


def isfinite(t: Tensor) -> Tensor:
    """``isfinite(t)`` as ``t − t == 0`` (NaN and ±inf give NaN): two kernels on CUDA, where
    ``torch.isfinite`` takes four."""
    return (t - t) == 0


def dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-component inner products of (n, A, B) tensors: (n,); large components summed
    accurately (see :func:`pomfx.manifolds.frobenius_norm`)."""
    n = a.shape[0]
    if a.shape[1] * a.shape[2] > BIG_COMPONENT:
        return (a * b).sum((1, 2))
    return torch.bmm(a.reshape(n, 1, -1), b.reshape(n, -1, 1)).view(n)


def coldot(a: Tensor, b: Tensor, small: bool) -> Tensor:
    """Per-column inner products of (n, A, B) tensors: (n, B)."""
    if small:
        out = a[:, 0] * b[:, 0]
        for i in range(1, a.shape[1]):
            out.addcmul_(a[:, i], b[:, i])
        return out
    return torch.linalg.vecdot(a, b, dim=1)  # (einsum here: 30× slower on a 1024×256 block)


def tmm(a: Tensor, b: Tensor, small: bool) -> Tensor:
    """aᵀb per component: (n, B, B)."""
    if small:
        out = a[:, 0, :, None] * b[:, 0, None, :]
        for i in range(1, a.shape[1]):
            out.addcmul_(a[:, i, :, None], b[:, i, None, :])
        return out
    return torch.bmm(a.transpose(1, 2), b)


def sub_mm_(v: Tensor, a: Tensor, c: Tensor, small: bool) -> None:
    """v -= a @ c, in place, for (n, A, B) v and a and (n, B, B) c."""
    if small:
        for j in range(a.shape[2]):
            v.addcmul_(a[:, :, j, None], c[:, None, j, :], value=-1.0)
    else:
        v.baddbmm_(a, c, alpha=-1.0)


def sym(a: Tensor) -> Tensor:
    return (a + a.transpose(1, 2)).mul_(0.5)


def chol_qr_small_(y: Tensor, ok: Tensor | None) -> None:
    """y ← Q of y = QR (R upper, positive diagonal), in place, by Cholesky-QR in tensor ops.

    ``ok`` (n,) bool: components where it is False are left exactly as they are.
    """
    n, _, b = y.shape
    m = tmm(y, y, True)
    r = torch.zeros_like(m)
    for j in range(b):
        d = m[:, j, j:] - (r[:, :j, j, None] * r[:, :j, j:]).sum(1) if j else m[:, j, j:]
        rjj = d[:, 0].clamp_min(torch.finfo(y.dtype).tiny).sqrt()
        r[:, j, j] = rjj
        if j + 1 < b:
            r[:, j, j + 1 :] = d[:, 1:] / rjj[:, None]
    if ok is not None:
        eye = torch.eye(b, dtype=y.dtype, device=y.device)
        r = torch.where(ok.view(n, 1, 1), r, eye)
    for j in range(b):  # forward substitution on the columns: q_j = (y_j - Σ_k<j r_kj q_k) / r_jj
        col = y[:, :, j]
        for k in range(j):
            col.addcmul_(y[:, :, k], r[:, k, j, None], value=-1.0)
        col.div_(r[:, j, j, None])


def chol_qr_(y: Tensor, ok: Tensor | None, small: bool, twice: bool | None) -> None:
    """y ← Q of y = QR, in place (components not ``ok`` left as they are). ``twice``: repeat
    the Cholesky-QR; None (large blocks on a CPU): repeat it only where the first Gram matrix
    may be ill-conditioned (:func:`well_conditioned`)."""
    if small:
        chol_qr_small_(y, ok)
        if twice:
            chol_qr_small_(y, ok)
        return
    q = y
    for i in range(2):  # y = x + ξ, ξ tangent: well conditioned, its Gram matrix is I + ξᵀξ
        g = q.transpose(1, 2) @ q
        r = torch.linalg.cholesky_ex(g, upper=True)[0]
        q = right_solve_upper(r, q)
        if i == 0 and twice is None and well_conditioned(g):
            break
    y.copy_(q if ok is None else torch.where(ok.view(-1, 1, 1), q, y))


def well_conditioned(gram: Tensor) -> bool:
    """Whether every (B, B) Gram matrix has κ ≤ 1 + ``RESTEP`` by Gershgorin's discs
    (λ_max ≤ max_i Σ_j |g_ij|, λ_min ≥ min_i (g_ii − Σ_{j≠i} |g_ij|)): then one Cholesky-QR is
    orthonormal to rounding (error ~ κ·ε), as the small-component rule ‖ξ‖²_F ≤ ``RESTEP``
    guarantees; an O(B²) test that spares the second O(A·B²) pass of large blocks."""
    rows = gram.abs().sum(-1)
    diag = gram.diagonal(dim1=-2, dim2=-1)
    lo = (2 * diag - rows).amin(-1)
    return bool((rows.amax(-1) <= (1 + RESTEP) * lo).all())
