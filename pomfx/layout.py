"""Components, groups and schemes: a weight shape plus options gives a :class:`Layout`.

A *component* is one matrix on one manifold; a *group* (one POM) is a set of components that
share a manifold type; a layer's groups form its layout. pomfx's reading of the paper (DESIGN §1):

- K = k1·…·kn > 1: a component is one kernel ``W[d, c]`` as a matrix (2-D: kH×kW, 3-D:
  (kD·kH)×kW, 1-D: k×1), stored transposed when it is wide so that every component is tall.
  ``pi`` groups the kernels that read one input channel, ``po`` those that write one output
  channel, ``pio`` shuffles the (d, c) grid and cuts it into subsets whose sizes follow a
  multivariate hypergeometric draw (sampling without replacement from an urn of
  ``ceil(N/m)+1`` colours with ``m`` balls each, so every size is at most ``m``).
  ``group_size`` caps a group (big ones are cut into near-equal parts); for pio its default cap
  is ``max(D_g, C)``, the size of a natural pi or po group.
- K = 1 (``nn.Linear``, 1×1 convs): a scalar kernel can only be ±1 on any manifold, so each group
  is one component, a block of the weight matrix: ``po`` cuts the output channels into chunks of
  at most ``group_size`` (default ``min(D_g, C)``), each block ``fan_in × chunk``; ``pi`` cuts the
  input channels (default ``min(C, D_g)``), each block ``fan_out × chunk``; ``pio`` shuffles both
  and cuts each into chunks (default: halves), one block per (input chunk × output chunk). Blocks
  are stored tall (``fan × width`` when that is tall, its transpose otherwise).

Conv groups are respected: no group crosses them. Manifold types go to a layer's groups in equal
shares at random. Every random choice comes from ``numpy.random.default_rng([seed, crc32(name)])``
so the same arguments give the same layout in every process.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from . import manifolds as _m

__all__ = ["SCHEMES", "Bucket", "Layout", "build_layout", "parse_manifolds", "check_group_size"]

SCHEMES = ("pi", "po", "pio")


def parse_manifolds(spec: str | Sequence[str]) -> tuple[str, ...]:
    """``"sp+ob+st"`` → ``("sp", "ob", "st")``; raises ValueError naming the valid names."""
    names = spec.split("+") if isinstance(spec, str) else list(spec)
    names = [n.strip() for n in names]
    if not names or any(n not in _m.MANIFOLDS for n in names):
        bad = [n for n in names if n not in _m.MANIFOLDS] or ["(empty)"]
        raise ValueError(
            f"unknown manifold {bad[0]!r} in {spec!r}; valid: {', '.join(_m.MANIFOLDS)}, "
            "joined by '+' (e.g. 'sp+ob+st' or 'sp+ob+st+euc')"
        )
    if len(set(names)) != len(names):
        raise ValueError(f"manifold listed twice in {spec!r}")
    return tuple(names)


def check_scheme(scheme: str) -> str:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; valid: {', '.join(SCHEMES)}")
    return scheme


def check_group_size(group_size: int | None) -> int | None:
    if group_size is None:
        return None
    if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)):
        raise ValueError(f"group_size must be a positive int or None, got {group_size!r}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1 (or None), got {group_size}")
    return int(group_size)


@dataclass(frozen=True)
class Bucket:
    """Components of one manifold and one shape, stored contiguously in the flat parameter."""

    manifold: str
    rows: int  # A
    cols: int  # B (A >= B)
    count: int  # number of components
    offset: int  # first element in the flat storage
    group_sizes: tuple[int, ...]  # components per group, groups contiguous

    @property
    def numel(self) -> int:
        return self.count * self.rows * self.cols


@dataclass
class Layout:
    """Where each stored component element lives in the weight, and what it is constrained to.

    ``index`` gathers the weight from storage: ``W.view(P*Q, unit) = stored.view(-1, unit)[index]``
    with ``unit = K`` for kernels and 1 for blocks; ``inverse`` is its inverse permutation.
    ``gamma[p, q]`` is the geometric scale of the manifold holding weight row (p, q), and
    ``in_channel[p, q]`` the input feature channel that row reads (for λ).
    """

    weight_shape: tuple[int, ...]
    kernel: bool
    transpose: bool
    buckets: tuple[Bucket, ...]
    index: np.ndarray
    inverse: np.ndarray
    gamma: np.ndarray
    in_channel: np.ndarray
    in_features: int
    options: dict

    @property
    def unit(self) -> int:
        return math.prod(self.weight_shape[2:]) if self.kernel else 1

    @property
    def n_groups(self) -> int:
        return sum(len(b.group_sizes) for b in self.buckets)

    @property
    def n_components(self) -> int:
        return sum(b.count for b in self.buckets)

    def describe(self) -> dict:
        """A small, exact, JSON-able summary (saved in the state_dict, compared on load)."""
        return {
            **self.options,
            "weight_shape": list(self.weight_shape),
            "buckets": [
                [b.manifold, b.rows, b.cols, b.count, len(b.group_sizes)] for b in self.buckets
            ],
            "checksum": zlib.crc32(np.ascontiguousarray(self.index, dtype=np.int64).tobytes()),
        }


def _chunks(n: int, cap: int) -> np.ndarray:
    """n cut into ceil(n/cap) near-equal parts (sizes differ by at most one)."""
    k = -(-n // cap)
    return np.full(k, n // k) + (np.arange(k) < n % k)


def _hypergeometric_sizes(rng: np.random.Generator, n: int, cap: int) -> np.ndarray:
    colours = -(-n // cap) + 1
    sizes = rng.multivariate_hypergeometric(np.full(colours, cap), n)
    return sizes[sizes > 0]


def _assign_types(rng: np.random.Generator, n_groups: int, n_types: int) -> np.ndarray:
    """Equal shares of the types over the groups, at random."""
    return rng.permutation((np.arange(n_groups) + rng.integers(n_types)) % n_types)


def _rows(d: np.ndarray, c: np.ndarray, dims: tuple[int, int, int], transposed: bool):
    """Weight row (index into W.view(P*Q, ...)) and input channel of canonical entry (d, c)."""
    _, c_per, d_per = dims
    grp = d // d_per
    in_ch = grp * c_per + c
    row = (in_ch * d_per + d % d_per) if transposed else d * c_per + c
    return row, in_ch


def build_layout(
    name: str,
    weight_shape: Sequence[int],
    *,
    scheme: str = "pio",
    manifolds: str | Sequence[str] = "sp+ob+st",
    group_size: int | None = None,
    seed: int = 0,
    conv_groups: int = 1,
    transposed: bool = False,
) -> Layout:
    """The layout of one weight. ``transposed``: a ConvTranspose weight ``(C_in, C_out/g, *k)``."""
    check_scheme(scheme)
    types = parse_manifolds(manifolds)
    group_size = check_group_size(group_size)
    shape = tuple(int(s) for s in weight_shape)
    if len(shape) < 2:
        raise ValueError(f"weight of {name!r} has shape {shape}; need (out, in, *kernel)")
    if transposed:
        d_per, c_per = shape[1], shape[0] // conv_groups
    else:
        d_per, c_per = shape[0] // conv_groups, shape[1]
    dims = (conv_groups, c_per, d_per)
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(name.encode())])
    options = {
        "name": name,
        "scheme": scheme,
        "manifolds": "+".join(types),
        "group_size": group_size,
        "seed": int(seed),
    }
    k = math.prod(shape[2:])
    build = _kernel_layout if k > 1 else _block_layout
    return build(rng, shape, dims, scheme, types, group_size, transposed, options)


def _kernel_layout(rng, shape, dims, scheme, types, group_size, transposed, options) -> Layout:
    gc, c_per, d_per = dims
    n_per = d_per * c_per
    if scheme == "po":  # canonical k = d*C + c, already grouped by d
        order = np.arange(gc * n_per)
        sizes = np.tile(_chunks(c_per, group_size or c_per), gc * d_per)
    elif scheme == "pi":  # for each (conv group, c): the d of that conv group
        g, c, j = np.meshgrid(np.arange(gc), np.arange(c_per), np.arange(d_per), indexing="ij")
        order = ((g * d_per + j) * c_per + c).ravel()
        sizes = np.tile(_chunks(d_per, group_size or d_per), gc * c_per)
    else:  # pio: shuffle within each conv group, cut by a hypergeometric draw
        keys = rng.random((gc, n_per))
        order = (np.argsort(keys, axis=1) + np.arange(gc)[:, None] * n_per).ravel()
        cap = group_size or max(d_per, c_per)
        sizes = np.tile(_hypergeometric_sizes(rng, n_per, cap), gc)
    gtype = _assign_types(rng, len(sizes), len(types))
    gid = np.repeat(np.arange(len(sizes)), sizes)
    perm = np.argsort(gtype[gid], kind="stable")  # components bucketed by type, groups kept whole
    stored, stored_gid = order[perm], gid[perm]
    rows, _ = _rows(stored // c_per, stored % c_per, dims, transposed)

    ks = shape[2:]
    a, b = (ks[0], 1) if len(ks) == 1 else (math.prod(ks[:-1]), ks[-1])
    transpose = a < b
    a, b = max(a, b), min(a, b)

    buckets, offset, start = [], 0, 0
    gamma_stored = np.empty(len(stored))
    for t, mname in enumerate(types):
        count = int((gtype[gid] == t).sum())
        if not count:
            continue
        seg = stored_gid[start : start + count]
        cuts = np.flatnonzero(np.diff(seg)) + 1
        group_sizes = tuple(int(x) for x in np.diff(np.r_[0, cuts, count]))
        buckets.append(Bucket(mname, a, b, count, offset, group_sizes))
        gamma_stored[start : start + count] = _m.get(mname).gamma(b)
        offset += count * a * b
        start += count
    return _finish(shape, True, transpose, buckets, rows, gamma_stored, dims, transposed, options)


def _block_layout(rng, shape, dims, scheme, types, group_size, transposed, options) -> Layout:
    gc, c_per, d_per = dims
    out_perm = np.tile(np.arange(d_per), (gc, 1))
    in_perm = np.tile(np.arange(c_per), (gc, 1))
    if scheme == "po":
        oc, ic = _chunks(d_per, group_size or min(d_per, c_per)), np.array([c_per])
    elif scheme == "pi":
        oc, ic = np.array([d_per]), _chunks(c_per, group_size or min(c_per, d_per))
    else:
        out_perm = np.argsort(rng.random((gc, d_per)), axis=1)
        in_perm = np.argsort(rng.random((gc, c_per)), axis=1)
        oc = _chunks(d_per, group_size or -(-d_per // 2))
        ic = _chunks(c_per, group_size or -(-c_per // 2))
    # every block: (conv group, out chunk, in chunk)
    g, o, i = (x.ravel() for x in np.meshgrid(np.arange(gc), np.arange(len(oc)), np.arange(len(ic)), indexing="ij"))
    o_start, i_start = np.r_[0, np.cumsum(oc)][o], np.r_[0, np.cumsum(ic)][i]
    o_size, i_size = oc[o], ic[i]
    btype = _assign_types(rng, len(g), len(types))

    buckets, rows_parts, gamma_parts, offset = [], [], [], 0
    shapes = sorted({(int(a), int(b)) for a, b in zip(o_size, i_size)})
    for t, mname in enumerate(types):
        for os_, is_ in shapes:
            sel = np.flatnonzero((btype == t) & (o_size == os_) & (i_size == is_))
            if not len(sel):
                continue
            d = g[sel, None] * d_per + out_perm[g[sel, None], o_start[sel, None] + np.arange(os_)]
            c = in_perm[g[sel, None], i_start[sel, None] + np.arange(is_)]
            # (nb, o, i) rows of the block; stored tall: (i × o) = blockᵀ when i >= o
            rows, _ = _rows(d[:, :, None], c[:, None, :], dims, transposed)
            rows = rows.transpose(0, 2, 1) if is_ >= os_ else rows
            a, b = rows.shape[1:]
            buckets.append(Bucket(mname, a, b, len(sel), offset, (1,) * len(sel)))
            rows_parts.append(rows.ravel())
            gamma_parts.append(np.full(rows.size, _m.get(mname).gamma(b)))
            offset += rows.size
    rows, gamma_stored = np.concatenate(rows_parts), np.concatenate(gamma_parts)
    return _finish(shape, False, False, buckets, rows, gamma_stored, dims, transposed, options)


def _finish(shape, kernel, transpose, buckets, rows, gamma_stored, dims, transposed, options):
    gc, c_per, d_per = dims
    p, q = shape[0], shape[1]
    index = np.empty_like(rows)
    index[rows] = np.arange(len(rows))
    gamma = np.empty(p * q)
    gamma[rows] = gamma_stored
    d, c = np.divmod(np.arange(gc * d_per * c_per), c_per)
    row, in_ch = _rows(d, c, dims, transposed)
    in_channel = np.empty(p * q, dtype=np.int64)
    in_channel[row] = in_ch
    return Layout(
        weight_shape=tuple(shape),
        kernel=kernel,
        transpose=transpose,
        buckets=tuple(buckets),
        index=index,
        inverse=rows,
        gamma=gamma.reshape(p, q),
        in_channel=in_channel.reshape(p, q),
        in_features=gc * c_per,
        options=options,
    )
