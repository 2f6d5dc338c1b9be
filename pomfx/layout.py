"""Components, groups and schemes: a weight shape plus options gives a :class:`Layout`.

A *component* is one matrix on one manifold; a *group* (one POM) is a set of components that
share a manifold type; a layer's groups form its layout. pomfx's reading of the paper (DESIGN §1):

- K = k1·…·kn > 1: a component is one kernel ``W[d, c]`` as a matrix (2-D: kH×kW, 3-D:
  (kD·kH)×kW, 1-D: k×1), stored transposed when it is wide so that every component is tall.
  ``pi`` groups the kernels that read one input channel, ``po`` those that write one output
  channel, ``pio`` shuffles the (d, c) grid and cuts it into subsets whose sizes follow a
  multivariate hypergeometric draw (sampling without replacement from an urn of
  ``ceil(N/m)+1`` colours with ``m`` balls each, so every size is at most ``m`` and the sizes
  sum to the grid). ``group_size`` caps a group (big ones are cut into near-equal parts); for
  pio its default cap is ``max(D_g, C)``, the size of a natural pi or po group.
- K = 1 (``nn.Linear``, 1×1 convs): a scalar kernel can only be ±1 on any manifold, so each group
  is one component, a block of the weight matrix: ``po`` cuts the output channels into chunks of
  at most ``group_size`` (default ``min(D_g, C)``), each block ``fan_in × chunk``; ``pi`` cuts the
  input channels (default ``min(C, D_g)``), each block ``fan_out × chunk``; ``pio`` shuffles both
  and cuts each into chunks (default: halves), one block per (input chunk × output chunk). Blocks
  are stored tall (``fan × width`` when that is tall, its transpose otherwise).

Conv groups are respected: no group crosses them. Manifold types go to a layer's groups in equal
shares (counts differ by at most one) at random. Every random choice comes from
``numpy.random.default_rng([seed, crc32(name)])``, so the same arguments give the same layout in
every process.

Storage order: buckets (one manifold, one component shape) one after the other, in the order of
the manifold names given, then by shape; inside a bucket, groups stay whole and keep their order.

Cost: building a layout is vectorized numpy, a few passes over the layer's storage units (kernels
for K > 1, weight elements for K = 1); nothing loops in Python over components or groups.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from . import manifolds as _m

__all__ = ["SCHEMES", "BlockMap", "Bucket", "Layout", "build_layout", "parse_manifolds", "check_group_size"]

SCHEMES = ("pi", "po", "pio")
_I64 = np.int64


def parse_manifolds(spec: str | Sequence[str]) -> tuple[str, ...]:
    """``"sp+ob+st"`` → ``("sp", "ob", "st")``; raises ValueError naming the valid names."""
    if not isinstance(spec, str) and not (
        isinstance(spec, Sequence) and all(isinstance(n, str) for n in spec)
    ):
        raise ValueError(
            f"manifolds must be a string such as 'sp+ob+st' (valid names: {', '.join(_m.MANIFOLDS)}), "
            f"got {spec!r}"
        )
    names = spec.split("+") if isinstance(spec, str) else list(spec)
    names = [n.strip() for n in names]
    if not names or any(n not in _m.MANIFOLDS for n in names):
        bad = [n for n in names if n not in _m.MANIFOLDS] or ["(empty)"]
        raise ValueError(
            f"unknown manifold {bad[0]!r} in {spec!r}; valid: {', '.join(_m.MANIFOLDS)}, "
            "joined by '+' (e.g. 'sp+ob+st' or 'sp+ob+st+euc')"
        )
    if len(set(names)) != len(names):
        raise ValueError(f"manifold listed twice in {spec!r}; valid: {', '.join(_m.MANIFOLDS)}, each once")
    return tuple(names)


def check_scheme(scheme: str) -> str:
    if not isinstance(scheme, str) or scheme not in SCHEMES:
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


@dataclass(frozen=True)
class BlockMap:
    """A block layout's element map, row by row. Row ``t`` of the weight's rows in shuffled order
    (conv group ``g = t // rows per group``) starts at flat weight position ``row_term[t]``; its
    element in column ``c`` sits in storage at ``base[t, j] + (k − bounds[j])·stride[t, j]``, with
    ``k = col_pos[g, c]`` the column's shuffled position and ``j`` the chunk holding k. A block's
    row is one run of storage (stride 1 when the block is stored with the weight's rows as its
    rows, else the block's row count), and a block's rows are adjacent in ``t``: a pass over t
    touches every weight row once, whole, and storage in runs or in tiles of adjacent rows."""

    row_term: np.ndarray  # (G·NR,) flat weight position of each row's first element
    col_pos: np.ndarray  # (G, NC) shuffled position of each column
    bounds: np.ndarray  # (n_chunks + 1,) column chunk boundaries, in shuffled positions
    base: np.ndarray  # (G·NR, n_chunks) storage position of each row's run in each chunk
    stride: np.ndarray  # (G·NR, n_chunks) storage step along the run


@dataclass
class Layout:
    """Where each stored component element lives in the weight, and what it is constrained to.

    ``inverse`` maps storage to the weight: storage unit u is unit ``inverse[u]`` of
    ``W.view(P*Q, unit)``, with ``unit = K`` for kernels and 1 for blocks. It is the one array a
    layout keeps per unit (int32; int64 from 2³¹ units on): a block layout holds it per weight
    element, and besides it a few numbers per weight row and channel (``block_map``).
    Everything else per unit is computed when asked for, so that it costs no memory in training
    (the zoo's largest models, 645 M weights, ran out of memory while a layout also kept these):
    ``index`` (its inverse permutation, ``W.view(P*Q, unit) = stored.view(-1, unit)[index]``),
    ``gamma[p, q]`` (float32: the geometric scale of the manifold holding weight row (p, q)) and
    ``in_channel[p, q]`` (the input feature channel that row reads, for λ; :meth:`channel_view`
    gives the same as a broadcast).
    """

    weight_shape: tuple[int, ...]
    kernel: bool
    transpose: bool
    buckets: tuple[Bucket, ...]
    inverse: np.ndarray
    dims: tuple[int, int, int]  # (conv groups, input channels per group, output channels per group)
    transposed: bool  # a ConvTranspose weight: row p reads input channel p
    options: dict
    # blocks: γ of each block (G, n_out_chunks, n_in_chunks) and the chunk of every output /
    # input channel (G, D_g), (G, C): γ per weight element from a table lookup, not a scatter
    gamma_tables: tuple[np.ndarray, np.ndarray, np.ndarray] | None = field(default=None, repr=False)
    # blocks: per bucket, the flat weight position of one element in each input channel of each
    # block, shaped (count, A, 1) when a block's rows are its input channels, else (count, 1, B):
    # R is constant along a block's output channels, so this reads R of every element as a broadcast
    scale_probes: tuple[np.ndarray, ...] | None = field(default=None, repr=False)
    # blocks: the element map W ↔ storage by rows of the weight, a few numbers per row
    # (:class:`BlockMap`) instead of a random access per element
    block_map: BlockMap | None = field(default=None, repr=False)
    _summary: dict | None = field(default=None, init=False, repr=False, compare=False)
    _checksum: int | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def checksum(self) -> int:
        """crc32 of ``index`` as int64, saved in the state_dict and compared when a checkpoint is
        loaded. Computed on first use (a pass over every storage unit: a tenth of a second on
        ResNet-50, which ``convert`` need not pay) and kept."""
        if self._checksum is None:
            self._checksum = zlib.crc32(np.ascontiguousarray(self.index, dtype=_I64).reshape(-1))
        return self._checksum

    @property
    def in_features(self) -> int:
        return self.dims[0] * self.dims[1]

    @property
    def index(self) -> np.ndarray:
        """Weight unit ← storage unit (the inverse permutation of ``inverse``), computed."""
        index = np.empty_like(self.inverse)
        index[self.inverse] = np.arange(len(self.inverse), dtype=self.inverse.dtype)
        return index

    @property
    def gamma(self) -> np.ndarray:
        """(P, Q) float32: γ of the manifold holding each weight row, computed."""
        if self.gamma_tables is not None:
            gtab, oid, iid = self.gamma_tables
            if len(gtab) == 1:  # the common case, in 2-D ops (much faster than take_along_axis)
                gamma = np.take(gtab[0][oid[0]], iid[0], axis=1)[None]
            else:
                gamma = np.take_along_axis(gtab[np.arange(len(gtab))[:, None], oid], iid[:, None, :], 2)
            if self.transposed:  # weight layout (g, c, d)
                gamma = gamma.transpose(0, 2, 1)
            return np.ascontiguousarray(gamma).reshape(self.weight_shape[:2])
        per_bucket = np.asarray([_m.get(b.manifold).gamma(b.cols) for b in self.buckets], dtype=np.float32)
        gamma = np.empty(len(self.inverse), dtype=np.float32)
        gamma[self.inverse] = np.repeat(per_bucket, [b.count for b in self.buckets])
        return gamma.reshape(self.weight_shape[:2])

    def channel_view(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(rows_shape, channel_shape)``: a (P, Q) array viewed as ``rows_shape`` lines up with a
        per-input-channel vector viewed as ``channel_shape`` (a broadcast), i.e. with
        ``in_channel``: (G, D_g, C) against (G, 1, C); ConvTranspose: (P, Q) against (P, 1)."""
        p, q = self.weight_shape[:2]
        gc, c_per, d_per = self.dims
        if self.transposed:
            return (p, q), (p, 1)
        return (gc, d_per, c_per), (gc, 1, c_per)

    @property
    def in_channel(self) -> np.ndarray:
        """(P, Q): the input feature channel each weight row reads, computed."""
        rows, chan = self.channel_view()
        c = np.arange(self.in_features).reshape(chan)
        small = np.int32 if self.inverse.dtype == np.int32 else _I64
        return np.ascontiguousarray(np.broadcast_to(c, rows), dtype=small).reshape(self.weight_shape[:2])

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
        if self._summary is None:
            self._summary = {
                **self.options,
                "weight_shape": list(self.weight_shape),
                "buckets": [[b.manifold, b.rows, b.cols, b.count, len(b.group_sizes)] for b in self.buckets],
                "checksum": self.checksum,
            }
        return {**self._summary, "buckets": [list(b) for b in self._summary["buckets"]]}


# -- small helpers -----------------------------------------------------------------------------
def _chunks(n: int, cap: int) -> np.ndarray:
    """n cut into ceil(n/cap) near-equal parts (sizes differ by at most one)."""
    k = -(-n // cap)
    return np.full(k, n // k, dtype=_I64) + (np.arange(k) < n % k)


def _hypergeometric_sizes(rng: np.random.Generator, n: int, cap: int) -> np.ndarray:
    """Group sizes summing to n, each at most cap: a multivariate hypergeometric draw of n balls
    from ceil(n/cap)+1 colours of cap balls each (empty colours dropped)."""
    colours = -(-n // cap) + 1
    sizes = rng.multivariate_hypergeometric(np.full(colours, cap, dtype=_I64), n)
    return sizes[sizes > 0].astype(_I64)


def _assign_types(rng: np.random.Generator, n_groups: int, n_types: int) -> np.ndarray:
    """Equal shares of the types over the groups (counts differ by at most one), at random."""
    return rng.permutation((np.arange(n_groups) + rng.integers(n_types)) % n_types)


def _shuffle_rows(rng: np.random.Generator, rows: int, n: int) -> np.ndarray:
    """``rows`` independent random permutations of ``range(n)``, shape (rows, n)."""
    if rows == 1:
        return rng.permutation(n).reshape(1, n)
    return rng.permuted(np.tile(np.arange(n, dtype=_I64), (rows, 1)), axis=1)


def _ranges(starts: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + n)`` for every (s, n), without a Python loop."""
    total = int(sizes.sum())
    shift = np.repeat(starts - (np.cumsum(sizes) - sizes), sizes)
    return shift + np.arange(total, dtype=_I64)


def _finish(
    shape, kernel, transpose, buckets, inverse, dims, transposed, options, gtabs=None, probes=None, bmap=None
):
    """Completes a Layout: ``inverse`` and the probes in the compact index dtype."""
    small = _index_dtype(len(inverse), shape)
    return Layout(
        weight_shape=tuple(shape),
        kernel=kernel,
        transpose=transpose,
        buckets=tuple(buckets),
        inverse=np.ascontiguousarray(inverse, dtype=small),
        dims=tuple(int(d) for d in dims),
        transposed=bool(transposed),
        options=options,
        gamma_tables=gtabs,
        scale_probes=None if probes is None else tuple(np.ascontiguousarray(p, dtype=small) for p in probes),
        block_map=bmap,
    )


def _index_dtype(n: int, shape) -> type:
    """int32 while every storage unit and weight row fits, int64 from 2³¹ on."""
    return np.int32 if max(n, shape[0] * shape[1]) < 2**31 else _I64


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
    """The layout of one weight, named ``name`` (its qualified name: it seeds the random choices).

    ``weight_shape`` is ``(D, C/g, *kernel)``, or with ``transposed`` a ConvTranspose weight
    ``(C_in, C_out/g, *kernel)``; ``conv_groups`` is the conv's ``groups``.
    """
    check_scheme(scheme)
    types = parse_manifolds(manifolds)
    group_size = check_group_size(group_size)
    shape = tuple(int(s) for s in weight_shape)
    if len(shape) < 2 or any(s < 1 for s in shape):
        raise ValueError(f"weight of {name!r} has shape {shape}; need (out, in, *kernel), all sizes >= 1")
    if isinstance(conv_groups, bool) or not isinstance(conv_groups, (int, np.integer)) or conv_groups < 1:
        raise ValueError(f"conv_groups must be a positive int, got {conv_groups!r}")
    conv_groups = int(conv_groups)
    if shape[0] % conv_groups:
        role = "input" if transposed else "output"
        raise ValueError(
            f"weight {shape} of {name!r}: {shape[0]} {role} channels not divisible by {conv_groups=}"
        )
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


# -- K > 1: one component per kernel -----------------------------------------------------------
def _kernel_layout(rng, shape, dims, scheme, types, group_size, transposed, options) -> Layout:
    gc, c_per, d_per = dims
    n_per = d_per * c_per
    # ``order``: canonical units k = d·C + c (d global), listed group after group
    if scheme == "po":  # already grouped by d
        order = np.arange(gc * n_per, dtype=_I64)
        sizes = np.tile(_chunks(c_per, group_size or c_per), gc * d_per)
    elif scheme == "pi":  # for each (conv group, c): the d of that conv group
        g, c, j = np.ogrid[:gc, :c_per, :d_per]
        order = ((g * d_per + j) * c_per + c).astype(_I64).ravel()
        sizes = np.tile(_chunks(d_per, group_size or d_per), gc * c_per)
    else:  # pio: shuffle within each conv group, cut by a hypergeometric draw
        order = (_shuffle_rows(rng, gc, n_per) + np.arange(gc, dtype=_I64)[:, None] * n_per).ravel()
        sizes = np.tile(_hypergeometric_sizes(rng, n_per, group_size or max(d_per, c_per)), gc)
    gtype = _assign_types(rng, len(sizes), len(types))

    # bucket by type, groups kept whole and in order: reorder whole groups, not units
    if len(types) > 1:
        by_type = np.argsort(gtype, kind="stable")
        starts = np.cumsum(sizes) - sizes
        order = order[_ranges(starts[by_type], sizes[by_type])]
        sizes, gtype = sizes[by_type], gtype[by_type]
    if transposed:  # unit k = (d, c) -> row (g·C + c)·D_g + d % D_g of W.view(C_in·D_g, K)
        d, c = np.divmod(order, c_per)
        inverse = ((d // d_per) * c_per + c) * d_per + d % d_per
    else:  # row d·C + c of W.view(D·C, K) is unit k itself
        inverse = order

    ks = shape[2:]
    a, b = (ks[0], 1) if len(ks) == 1 else (math.prod(ks[:-1]), ks[-1])
    transpose = a < b
    a, b = max(a, b), min(a, b)

    buckets, offset = [], 0
    counts = np.bincount(gtype, minlength=len(types))
    first = np.searchsorted(gtype, np.arange(len(types)))
    for t, mname in enumerate(types):
        if not counts[t]:
            continue
        gs = sizes[first[t] : first[t] + counts[t]]
        count = int(gs.sum())
        buckets.append(Bucket(mname, a, b, count, offset, tuple(gs.tolist())))
        offset += count * a * b
    return _finish(shape, True, transpose, buckets, inverse, dims, transposed, options)


# -- K = 1: one component per block -----------------------------------------------------------
def _block_layout(rng, shape, dims, scheme, types, group_size, transposed, options) -> Layout:
    """Blocks of a K = 1 weight. One pass per element: ``inverse`` (storage -> weight), written in
    its final dtype by broadcasting each bucket's row and column offsets; γ and R's probes come
    from per-block and per-channel tables."""
    gc, c_per, d_per = dims
    if scheme == "po":
        oc, ic = _chunks(d_per, group_size or min(d_per, c_per)), np.array([c_per], dtype=_I64)
    elif scheme == "pi":
        oc, ic = np.array([d_per], dtype=_I64), _chunks(c_per, group_size or min(c_per, d_per))
    if scheme == "pio":  # positions of the output / input channels after the shuffle
        out_perm = _shuffle_rows(rng, gc, d_per)
        in_perm = _shuffle_rows(rng, gc, c_per)
        oc = _chunks(d_per, group_size or -(-d_per // 2))
        ic = _chunks(c_per, group_size or -(-c_per // 2))
    else:
        out_perm = np.broadcast_to(np.arange(d_per, dtype=_I64), (gc, d_per))
        in_perm = np.broadcast_to(np.arange(c_per, dtype=_I64), (gc, c_per))
    # every block: (conv group, out chunk, in chunk); flat id (g·n_oc + o)·n_ic + i
    n_oc, n_ic = len(oc), len(ic)
    o_start, i_start = np.cumsum(oc) - oc, np.cumsum(ic) - ic
    btype = _assign_types(rng, gc * n_oc * n_ic, len(types)).reshape(gc, n_oc, n_ic)

    # A weight element (d, c) of conv group g (d, c local) sits at flat position
    # dterm[g, d] + cterm[g, c] of W.view(-1): a row part and a column part.
    if transposed:  # W: (C_in, D_g); row g·C + c, column d
        dterm = np.broadcast_to(np.arange(d_per, dtype=_I64), (gc, d_per))
        cterm = (np.arange(gc * c_per, dtype=_I64) * d_per).reshape(gc, c_per)
    else:  # W: (D, C); row g·D_g + d, column c
        dterm = (np.arange(gc * d_per, dtype=_I64) * c_per).reshape(gc, d_per)
        cterm = np.broadcast_to(np.arange(c_per, dtype=_I64), (gc, c_per))
    if scheme == "pio":
        dterm = np.take_along_axis(dterm, out_perm, 1)
        cterm = np.take_along_axis(cterm, in_perm, 1)
    n = int(np.prod(shape))
    small = _index_dtype(n, shape)  # ``inverse`` is written in its final dtype: no copy after
    dterm, cterm = dterm.astype(small), cterm.astype(small)

    # buckets: by manifold, then by block shape (o, i); blocks in id order inside a bucket.
    # Per block: its elements' weight positions, γ, and R's probes.
    o_sizes, i_sizes = sorted(set(oc.tolist())), sorted(set(ic.tolist()))
    # the row map: a weight row is an output channel (conv) or an input channel (ConvTranspose)
    n_rows = c_per if transposed else d_per
    rchunk_start, cchunk = (i_start, oc) if transposed else (o_start, ic)
    base = np.empty((gc * n_rows, len(cchunk)), dtype=small)
    stride = np.empty((gc * n_rows, len(cchunk)), dtype=np.int32)
    shapes = sorted((o, i) for o in o_sizes for i in i_sizes)
    inverse = np.empty(n, dtype=small)
    gtab = np.empty((gc, n_oc, n_ic), dtype=np.float32)
    buckets, probes, offset = [], [], 0
    for t, mname in enumerate(types):
        for os_, is_ in shapes:
            ob, ib = np.flatnonzero(oc == os_), np.flatnonzero(ic == is_)
            if not len(ob) or not len(ib):
                continue
            sel = np.argwhere(btype[:, ob][:, :, ib] == t)  # (nb, 3): g, position in ob, in ib
            if not len(sel):
                continue
            g, o, i = sel[:, 0], ob[sel[:, 1]], ib[sel[:, 2]]
            rows = dterm[g[:, None], o_start[o, None] + np.arange(os_)]  # (nb, os)
            cols = cterm[g[:, None], i_start[i, None] + np.arange(is_)]  # (nb, is)
            nb, size = len(sel), os_ * is_
            out = inverse[offset : offset + nb * size]
            if is_ >= os_:  # stored tall: the (i × o) transpose of the block
                a, b = is_, os_
                np.add(cols[:, :, None], rows[:, None, :], out=out.reshape(nb, a, b))
                probes.append(cols[:, :, None] + rows[:, None, :1])
            else:
                a, b = os_, is_
                np.add(rows[:, :, None], cols[:, None, :], out=out.reshape(nb, a, b))
                probes.append(rows[:, :1, None] + cols[:, None, :])
            # block row r (weight row rchunk_start + r): a run of storage, along the block's rows
            # when they are the weight's rows (then stride 1), along its columns otherwise
            rc, cc, nr, nc = (i, o, is_, os_) if transposed else (o, i, os_, is_)
            rows_are_rows = (is_ >= os_) == transposed
            t_of = g[:, None] * n_rows + rchunk_start[rc, None] + np.arange(nr)  # (nb, nr)
            first = offset + np.arange(nb, dtype=_I64)[:, None] * size
            base[t_of, cc[:, None]] = first + np.arange(nr) * (nc if rows_are_rows else 1)
            stride[t_of, cc[:, None]] = 1 if rows_are_rows else nr
            gtab[g, o, i] = _m.get(mname).gamma(b)
            buckets.append(Bucket(mname, a, b, nb, offset, (1,) * nb))
            offset += nb * size
    assert offset == n

    # the chunk of every output / input channel, for γ's tables
    pos_out = np.empty((gc, d_per), dtype=_I64)  # position of local output channel d after the shuffle
    np.put_along_axis(pos_out, out_perm, np.arange(d_per, dtype=_I64)[None, :], 1)
    pos_in = np.empty((gc, c_per), dtype=_I64)
    np.put_along_axis(pos_in, in_perm, np.arange(c_per, dtype=_I64)[None, :], 1)
    oid = np.repeat(np.arange(n_oc), oc)[pos_out]  # (gc, d_per): out chunk of d
    iid = np.repeat(np.arange(n_ic), ic)[pos_in]  # (gc, c_per)
    gtabs = (gtab, oid.astype(np.int32), iid.astype(np.int32))
    row_term, col_term = (cterm, dterm) if transposed else (dterm, cterm)  # col_term: a permutation
    col_pos = np.empty(col_term.shape, dtype=np.int32)
    positions = np.arange(col_term.shape[1], dtype=np.int32)[None, :]
    np.put_along_axis(col_pos, col_term.astype(_I64), positions, 1)
    bounds = np.concatenate([[0], np.cumsum(cchunk)]).astype(_I64)
    bmap = BlockMap(np.ascontiguousarray(row_term).reshape(-1), col_pos, bounds, base, stride)
    return _finish(shape, False, False, buckets, inverse, dims, transposed, options, gtabs, probes, bmap)
