"""Layouts pin the semantics of DESIGN §1 and issue 2 item 3: components, groups, schemes,
manifold shares, the K = 1 blocks, conv groups, ConvTranspose roles, determinism, bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import pomfx
from pomfx.layout import build_layout

ROOT = Path(__file__).resolve().parents[1]


# -- decoding a layout back into weight coordinates ----------------------------------------------
def _dims(lay, conv_groups=1, transposed=False):
    p, q = lay.weight_shape[:2]
    if transposed:
        return conv_groups, p // conv_groups, q  # gc, c_per, d_per
    return conv_groups, q, p // conv_groups


def _channels(lay, pq, conv_groups=1, transposed=False):
    """(output channel, input channel, conv group) of weight rows ``pq`` (flat p·Q + q)."""
    gc, c_per, d_per = _dims(lay, conv_groups, transposed)
    p, q = np.divmod(pq, lay.weight_shape[1])
    if transposed:  # W: (C_in, C_out/g): row p is input channel p
        g = p // c_per
        return g * d_per + q, p, g
    g = p // d_per
    return p, g * c_per + q, g


def kernel_groups(lay):
    """K > 1: [(manifold, flat weight rows of the group's kernels)] in storage order."""
    out = []
    for b in lay.buckets:
        unit0 = b.offset // (b.rows * b.cols)
        ends = unit0 + np.cumsum(b.group_sizes)
        for s, e in zip(np.r_[unit0, ends[:-1]], ends):
            out.append((b.manifold, lay.inverse[s:e]))
    return out


def blocks(lay):
    """K = 1: [(manifold, (A, B) array of flat weight positions)] in storage order."""
    out = []
    for b in lay.buckets:
        pos = lay.inverse[b.offset : b.offset + b.numel].reshape(b.count, b.rows, b.cols)
        out += [(b.manifold, x) for x in pos]
    return out


def check_permutation(lay):
    n = len(lay.index)
    assert lay.index.dtype == np.int32 and lay.inverse.dtype == np.int32  # compact: one per element
    assert n == math.prod(lay.weight_shape[:2]) * (1 if lay.kernel else lay.unit)  # rows / elements
    assert np.array_equal(np.sort(lay.index), np.arange(n))
    assert np.array_equal(lay.index[lay.inverse], np.arange(n))
    assert np.array_equal(lay.inverse[lay.index], np.arange(n))
    assert sum(b.numel for b in lay.buckets) == n * lay.unit
    offset = 0
    for b in lay.buckets:  # buckets are contiguous, tall, groups partition them
        assert b.offset == offset and b.rows >= b.cols and sum(b.group_sizes) == b.count
        offset += b.numel


def check_product_block(lay, block, conv_groups=1, transposed=False):
    """A K = 1 component is (rows of one set) × (columns of one set), inside one conv group."""
    d, c, g = _channels(lay, block, conv_groups, transposed)
    p, q = np.divmod(block, lay.weight_shape[1])
    ps, qs = np.unique(p), np.unique(q)
    assert len(ps) * len(qs) == block.size
    assert len(np.unique(g)) == 1
    return np.unique(d), np.unique(c)


# -- every element exactly once ----------------------------------------------------------------
CONFIGS = [
    ((16, 8, 3, 3), 1, False),
    ((12, 4, 3, 3), 3, False),  # grouped
    ((8, 1, 3, 3), 8, False),  # depthwise
    ((8, 4, 1, 7), 1, False),  # wide kernels
    ((6, 5, 4), 1, False),  # Conv1d
    ((6, 4, 2, 3, 3), 1, False),  # Conv3d
    ((24, 10), 1, False),  # Linear
    ((10, 24), 1, False),
    ((32, 16, 1, 1), 1, False),  # 1x1 conv
    ((12, 4, 1, 1), 3, False),  # grouped 1x1
    ((8, 3, 3, 3), 2, True),  # ConvTranspose2d(8, 6, 3, groups=2)
    ((8, 6, 1, 1), 2, True),
]


@pytest.mark.parametrize("shape,groups,transposed", CONFIGS, ids=str)
@pytest.mark.parametrize("scheme", ["pi", "po", "pio"])
@pytest.mark.parametrize("group_size", [None, 1, 3])
def test_every_element_appears_exactly_once(shape, groups, transposed, scheme, group_size):
    lay = build_layout(
        "m.layer", shape, scheme=scheme, group_size=group_size, conv_groups=groups, transposed=transposed
    )
    check_permutation(lay)
    assert lay.kernel == (math.prod(shape[2:]) > 1)
    for a in (lay.index, lay.inverse, lay.gamma, lay.in_channel):  # zero-copy into torch buffers
        assert a.flags.c_contiguous
    p, q = shape[:2]
    assert lay.gamma.shape == (p, q) and lay.gamma.dtype == np.float32
    gc, c_per, d_per = _dims(lay, groups, transposed)
    pq = np.arange(p * q)
    _, c, _ = _channels(lay, pq, groups, transposed)
    assert np.array_equal(lay.in_channel.reshape(-1), c)  # λ is read from the right channel
    assert lay.in_features == gc * c_per
    # gamma of each weight row is its manifold's γ(B)
    from pomfx import manifolds as M

    want = np.empty(p * q, dtype=np.float32)
    if lay.kernel:
        for m, rows in kernel_groups(lay):
            want[rows] = M.get(m).gamma(lay.buckets[0].cols)
    else:
        for m, blk in blocks(lay):
            want[blk.reshape(-1)] = M.get(m).gamma(blk.shape[1])
            check_product_block(lay, blk, groups, transposed)
        check_block_map(lay)
    assert np.array_equal(lay.gamma.reshape(-1), want)


def check_block_map(lay):
    """The row-by-row map (pomfx.layout.BlockMap) puts every weight element where ``index`` says."""
    bm = lay.block_map
    gc, n_cols = bm.col_pos.shape
    t = np.arange(len(bm.row_term))
    k = bm.col_pos[t // (len(t) // gc)]  # (rows, columns): shuffled position of each column
    j = np.searchsorted(bm.bounds, k, side="right") - 1
    pos = bm.row_term[:, None] + np.arange(n_cols)
    stored = bm.base[t[:, None], j] + (k - bm.bounds[j]) * bm.stride[t[:, None], j]
    assert np.array_equal(np.sort(pos.reshape(-1)), np.arange(len(lay.inverse)))  # each element once
    assert np.array_equal(lay.index[pos], stored)


# -- K > 1: schemes --------------------------------------------------------------------------
@pytest.mark.parametrize("shape,groups", [((16, 8, 3, 3), 1), ((12, 4, 3, 3), 3)], ids=str)
@pytest.mark.parametrize("group_size", [None, 3])
def test_pi_groups_read_one_input_channel_po_groups_write_one_output(shape, groups, group_size):
    for scheme, key, other in [("pi", 1, 0), ("po", 0, 1)]:
        lay = build_layout("conv", shape, scheme=scheme, group_size=group_size, conv_groups=groups)
        natural = shape[0] // groups if scheme == "pi" else shape[1]  # D_g kernels read channel c
        cap = group_size or natural
        per_channel = Counter()
        for _, rows in kernel_groups(lay):
            ch = _channels(lay, rows, groups)
            assert len(np.unique(ch[key])) == 1  # one input (pi) / output (po) channel
            assert len(np.unique(ch[2])) == 1  # no group crosses conv groups
            assert len(rows) <= cap
            assert len(np.unique(ch[other])) == len(rows)
            per_channel[int(ch[key][0])] += len(rows)
        assert set(per_channel.values()) == {natural}  # the channel's kernels, all of them
        # big groups are cut into near-equal parts
        sizes = sorted(len(r) for _, r in kernel_groups(lay))
        assert sizes[-1] - sizes[0] <= 1


@pytest.mark.parametrize("shape,groups", [((64, 32, 3, 3), 1), ((24, 8, 3, 3), 2)], ids=str)
@pytest.mark.parametrize("group_size", [None, 5, 40])
def test_pio_groups_mix_channels_capped_and_sum_to_the_grid(shape, groups, group_size):
    lay = build_layout("conv", shape, scheme="pio", group_size=group_size, conv_groups=groups)
    d_per, c_per = shape[0] // groups, shape[1]
    cap = group_size or max(d_per, c_per)
    per_conv_group, mixed, sizes = Counter(), 0, []
    for _, rows in kernel_groups(lay):
        d, c, g = _channels(lay, rows, groups)
        assert len(np.unique(g)) == 1 and 1 <= len(rows) <= cap
        per_conv_group[int(g[0])] += len(rows)
        mixed += len(np.unique(d)) > 1 and len(np.unique(c)) > 1
        sizes.append(len(rows))
    assert dict(per_conv_group) == {g: d_per * c_per for g in range(groups)}
    assert mixed >= len(sizes) // 2  # groups mix input and output channels
    assert len(set(sizes)) > 1  # sizes are drawn, not fixed


def test_pio_sizes_follow_the_hypergeometric_mean():
    """Sizes come from drawing N balls without replacement from an urn of ceil(N/m)+1 colours
    of m balls each: every colour's expected count is N / colours."""
    n, cap = 64 * 32, 64  # default cap: max(D, C)
    colours = -(-n // cap) + 1
    sizes = np.concatenate(
        [
            [len(r) for _, r in kernel_groups(build_layout(f"l{i}", (64, 32, 3, 3), scheme="pio", seed=i))]
            for i in range(20)
        ]
    )
    assert sizes.max() <= cap
    assert abs(sizes.mean() - n / colours) < 0.5  # (zero draws, dropped, are rare here)


# -- manifold shares -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "shape,scheme", [((64, 32, 3, 3), "pio"), ((16, 8, 3, 3), "pi"), ((40, 7, 5), "po"), ((64, 48), "po")]
)
@pytest.mark.parametrize("spec", ["sp+ob+st", "sp+ob+st+euc", "st+euc", "ob", "euc"])
def test_manifold_types_get_equal_shares(shape, scheme, spec):
    gs = 4 if len(shape) == 2 else None  # several blocks for the Linear
    lay = build_layout("layer", shape, scheme=scheme, manifolds=spec, group_size=gs)
    names = spec.split("+")
    groups = Counter()
    for b in lay.buckets:
        groups[b.manifold] += len(b.group_sizes)
    assert set(groups) <= set(names)
    counts = [groups.get(n, 0) for n in names]
    assert max(counts) - min(counts) <= 1
    if lay.n_groups >= len(names):
        assert set(groups) == set(names)
    # storage order: manifolds in the order given
    order = [b.manifold for b in lay.buckets]
    assert order == sorted(order, key=names.index)
    assert lay.options["manifolds"] == spec


def test_manifold_assignment_is_random_per_layer():
    a = build_layout("a", (64, 32, 3, 3), scheme="po")
    b = build_layout("b", (64, 32, 3, 3), scheme="po")
    kinds = lambda lay: [m for m, _ in sorted(kernel_groups(lay), key=lambda g: g[1].min())]  # noqa: E731
    assert kinds(a) != kinds(b)


# -- kernel shapes ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "shape,rows,cols,transpose",
    [
        ((8, 4, 3, 3), 3, 3, False),
        ((8, 4, 1, 7), 7, 1, True),  # wide: constrained through its transpose
        ((8, 4, 7, 1), 7, 1, False),
        ((8, 4, 3, 5), 5, 3, True),
        ((8, 4, 5, 3), 5, 3, False),
        ((8, 4, 5), 5, 1, False),  # 1-D: k x 1
        ((8, 4, 2, 3, 3), 6, 3, False),  # 3-D: (kD·kH) x kW
        ((8, 4, 1, 1, 5), 5, 1, True),
        ((8, 4, 3, 1, 4), 4, 3, True),
    ],
)
def test_kernel_component_shapes_are_tall(shape, rows, cols, transpose):
    for manifolds in ("sp+ob+st", "st"):
        lay = build_layout("k", shape, manifolds=manifolds)
        assert lay.kernel and lay.transpose == transpose and lay.unit == math.prod(shape[2:])
        assert {(b.rows, b.cols) for b in lay.buckets} == {(rows, cols)}


def test_wide_kernel_is_constrained_through_its_transpose():
    """A 2×5 kernel on the oblique manifold: the 5×2 transpose has unit columns, so every
    *row* of the kernel (divided by its scale) has unit norm."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, (2, 5)), nn.Flatten(), nn.Linear(4 * 3 * 4, 2))
    conv = pomfx.convert(model, scheme="po", manifolds="ob")[0]
    pom = conv.parametrizations.weight[0]
    omega = conv.weight.detach() / pom.scale[:, :, None, None]
    assert torch.allclose(omega.norm(dim=-1), torch.ones(4, 3, 2), atol=1e-5)
    assert not torch.allclose(omega.norm(dim=-2), torch.ones(4, 3, 5), atol=1e-2)


# -- K = 1 -----------------------------------------------------------------------------------------
def test_po_on_linear_with_group_size_k_is_one_fan_in_by_k_block():
    n, k = 10, 4
    lay = build_layout("fc", (k, n), scheme="po", manifolds="st", group_size=k)
    (b,) = lay.buckets
    assert (b.manifold, b.rows, b.cols, b.count, b.group_sizes) == ("st", n, k, 1, (1,))
    # stored block[s, r] = W[r, s]: the block is Wᵀ, so ωᵀω = I means W·Wᵀ = I
    assert np.array_equal(lay.inverse.reshape(n, k), np.arange(k)[None, :] * n + np.arange(n)[:, None])


@pytest.mark.parametrize("n,k,group_size", [(10, 4, None), (4, 12, None), (30, 9, 4), (9, 30, 4)])
def test_po_and_pi_blocks(n, k, group_size):
    """po: blocks of ≤ group_size output channels × all inputs; pi: ≤ group_size input columns
    × all outputs (default group_size min(D, C)); each stored tall."""
    for scheme in ("po", "pi"):
        lay = build_layout("fc", (k, n), scheme=scheme, group_size=group_size)
        check_permutation(lay)
        cap = group_size or min(n, k)
        seen = []
        for _, blk in blocks(lay):
            outs, ins = check_product_block(lay, blk)
            chunk, full = (outs, ins) if scheme == "po" else (ins, outs)
            assert len(full) == (n if scheme == "po" else k)
            assert len(chunk) <= cap and np.all(np.diff(chunk) == 1)  # a contiguous chunk
            assert blk.shape == (max(len(outs), len(ins)), min(len(outs), len(ins)))
            seen.append(len(chunk))
        assert sum(seen) == (k if scheme == "po" else n) and max(seen) - min(seen) <= 1


@pytest.mark.parametrize("n,k,group_size", [(32, 16, None), (20, 9, 4), (9, 20, 4)])
def test_pio_blocks_are_input_chunk_by_output_chunk(n, k, group_size):
    lay = build_layout("fc", (k, n), scheme="pio", group_size=group_size)
    check_permutation(lay)
    out_chunks, in_chunks = set(), set()
    for _, blk in blocks(lay):
        outs, ins = check_product_block(lay, blk)
        out_chunks.add(tuple(outs))
        in_chunks.add(tuple(ins))
    n_oc, n_ic = len(out_chunks), len(in_chunks)
    assert lay.n_components == n_oc * n_ic  # one block per (input chunk × output chunk)
    for chunks, total in ((out_chunks, k), (in_chunks, n)):
        sizes = [len(c) for c in chunks]
        assert sorted(sum(chunks, ())) == list(range(total))  # a partition
        assert max(sizes) <= (group_size or -(-total // 2)) and max(sizes) - min(sizes) <= 1
    assert any(np.any(np.diff(c) != 1) for c in out_chunks | in_chunks)  # shuffled


def test_grouped_and_depthwise_convs_keep_groups_inside_conv_groups():
    for shape, groups in [((12, 4, 3, 3), 3), ((8, 1, 3, 3), 8), ((12, 4, 1, 1), 3), ((8, 1, 1, 1), 8)]:
        for scheme in ("pi", "po", "pio"):
            lay = build_layout("g", shape, scheme=scheme, conv_groups=groups)
            check_permutation(lay)
            if lay.kernel:
                for _, rows in kernel_groups(lay):
                    assert len(np.unique(_channels(lay, rows, groups)[2])) == 1
            else:
                for _, blk in blocks(lay):
                    check_product_block(lay, blk, groups)
            if shape[1] == 1 and lay.kernel:  # depthwise: one kernel per conv group
                assert all(len(r) == 1 for _, r in kernel_groups(lay))


# -- ConvTranspose -------------------------------------------------------------------------------
def test_conv_transpose_roles():
    """Weight (C_in, C_out/g, k...): row p reads input channel p; po groups share an output
    channel, pi groups an input channel; blocks of 1×1 ones likewise."""
    shape, groups = (8, 3, 3, 3), 2  # ConvTranspose2d(8, 6, 3, groups=2)
    for scheme, key in (("po", 0), ("pi", 1)):
        lay = build_layout("t", shape, scheme=scheme, conv_groups=groups, transposed=True)
        check_permutation(lay)
        assert np.array_equal(lay.in_channel, np.repeat(np.arange(8), 3).reshape(8, 3))
        for _, rows in kernel_groups(lay):
            ch = _channels(lay, rows, groups, transposed=True)
            assert len(np.unique(ch[key])) == 1 and len(np.unique(ch[2])) == 1
        natural = 4 if scheme == "po" else 3  # C_in/g kernels write an output channel
        assert {len(r) for _, r in kernel_groups(lay)} == {natural}
    lay = build_layout("t", (8, 6, 1, 1), scheme="po", group_size=2, conv_groups=2, transposed=True)
    for _, blk in blocks(lay):
        outs, ins = check_product_block(lay, blk, 2, transposed=True)
        assert len(outs) == 2 and len(ins) == 4  # 2 output channels × the conv group's 4 inputs


# -- determinism -----------------------------------------------------------------------------
DET_CASES = [
    ("features.3", (64, 32, 3, 3), "pio", "sp+ob+st", None, 1, False),
    ("layer1.0.conv1", (48, 64, 1, 1), "pio", "sp+ob+st+euc", None, 1, False),
    ("fc", (10, 40), "po", "st", 10, 1, False),
    ("up", (8, 3, 1, 5), "pi", "ob+st", 2, 2, True),
]


def _fingerprint(name, shape, scheme, manifolds, group_size, groups, transposed, seed=0):
    lay = build_layout(
        name,
        shape,
        scheme=scheme,
        manifolds=manifolds,
        group_size=group_size,
        seed=seed,
        conv_groups=groups,
        transposed=transposed,
    )
    crc = lambda a: zlib.crc32(np.ascontiguousarray(a).tobytes())  # noqa: E731
    return {
        "describe": lay.describe(),
        "index": crc(lay.index),
        "inverse": crc(lay.inverse),
        "gamma": crc(lay.gamma),
    }


def test_same_layout_in_a_separate_process():
    script = (
        "import json, sys; sys.path.insert(0, 'tests'); import test_layout as t; "
        "print(json.dumps([t._fingerprint(*c) for c in t.DET_CASES]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True
    )
    theirs = json.loads(out.stdout.strip().splitlines()[-1])
    ours = json.loads(json.dumps([_fingerprint(*c) for c in DET_CASES]))
    assert theirs == ours


# (checksum saved in the state_dict, crc32 of inverse, crc32 of gamma) of DET_CASES, as made by the
# layouts of sessions 1-2 (which kept index, gamma and in_channel as arrays): a checkpoint saved
# then must still load, so the layouts must not change
GOLDEN = {
    "features.3": (211445702, 3604422721, 3615666255),
    "layer1.0.conv1": (660653389, 3284105353, 3984573344),
    "fc": (662254121, 3015217668, 4270123467),
    "up": (1318657962, 178651242, 209519481),
}


def test_layouts_are_those_of_earlier_checkpoints():
    for case in DET_CASES:
        f = _fingerprint(*case)
        assert (f["describe"]["checksum"], f["inverse"], f["gamma"]) == GOLDEN[case[0]], case[0]


def test_seed_and_name_change_pio_layouts_only():
    base = ("conv", (32, 16, 3, 3))
    a = build_layout(*base, seed=0)
    assert np.array_equal(a.index, build_layout(*base, seed=0).index)
    assert not np.array_equal(a.index, build_layout(*base, seed=1).index)
    assert not np.array_equal(a.index, build_layout("conv2", base[1], seed=0).index)
    blk = build_layout("fc", (16, 32), seed=0)
    assert not np.array_equal(blk.index, build_layout("fc", (16, 32), seed=1).index)
    assert not np.array_equal(blk.index, build_layout("fc2", (16, 32), seed=0).index)
    # po/pi structure does not depend on the seed (only which manifold each group gets)
    po = [build_layout("c", (8, 4, 3, 3), scheme="po", manifolds="st", seed=s).index for s in (0, 1)]
    assert np.array_equal(*po)


# -- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"scheme": "pixel"}, "pi, po, pio"),
        ({"scheme": None}, "pi, po, pio"),
        ({"manifolds": "sp+hyperbolic"}, "sp, ob, st, euc"),
        ({"manifolds": ""}, "sp, ob, st, euc"),
        ({"manifolds": "sp+sp"}, "twice"),
        ({"manifolds": 3}, "sp, ob, st, euc"),
        ({"group_size": 0}, "group_size"),
        ({"group_size": -2}, "group_size"),
        ({"group_size": 1.5}, "group_size"),
        ({"group_size": "4"}, "group_size"),
        ({"group_size": True}, "group_size"),
        ({"conv_groups": 3}, "divisible"),
        ({"conv_groups": 0}, "conv_groups"),
    ],
)
def test_bad_input_raises_value_error_naming_valid_choices(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_layout("x", (8, 4, 3, 3), **kwargs)


def test_bad_input_through_convert_leaves_the_model_unchanged():
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for kwargs in ({"scheme": "pix"}, {"manifolds": "sp+hyp"}, {"group_size": 0}):
        with pytest.raises(ValueError):
            pomfx.convert(model, include=["0"], inplace=True, **kwargs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert type(model[0]) is nn.Linear


# -- end to end through the public API ---------------------------------------------------------
@pytest.mark.parametrize("n,k", [(20, 6), (64, 16)])
def test_po_stiefel_linear_has_orthonormal_rows(n, k):
    """DESIGN §1: convert(nn.Linear(n, k), scheme="po", manifolds="st", group_size=k) makes
    W·Wᵀ = I up to the scale: ω (n × k, stored Wᵀ) has ωᵀω = I, and W = R ⊙ ω with one R."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(n, k), nn.ReLU(), nn.Linear(k, 2))
    conv = pomfx.convert(model, scheme="po", manifolds="st", group_size=k, include=["0"])
    layer = conv[0]
    omega = layer.parametrizations.weight.original.detach().reshape(n, k)
    assert torch.allclose(omega.T @ omega, torch.eye(k), atol=1e-5)
    w = layer.weight.detach()
    r = layer.parametrizations.weight[0].scale
    assert torch.allclose(r, r.flatten()[0].expand_as(r))  # one scale κγ/λ̂ (λ̂ = 1 at first)
    assert torch.allclose(w / r, omega.T, atol=1e-6)
    wwt = w @ w.T
    assert torch.allclose(wwt, wwt[0, 0] * torch.eye(k), atol=1e-5 * float(wwt[0, 0]))
    assert float(wwt[0, 0]) == pytest.approx(float(r.flatten()[0]) ** 2, rel=1e-5)
    assert not hasattr(conv[2], "parametrizations")  # the classifier stays plain
    x = torch.randn(3, n)
    assert conv(x).shape == (3, 2)


def test_every_component_of_a_pio_layer_lies_on_its_groups_manifold():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3),
        nn.ReLU(),
        nn.Conv2d(16, 24, 1),
        nn.ReLU(),
        nn.Conv2d(24, 24, (1, 3), groups=4),
        nn.Flatten(),
        nn.Linear(24 * 6 * 4, 5),
    )
    conv = pomfx.convert(model, scheme="pio", manifolds="sp+ob+st+euc")
    errors = pomfx.constraint_error(conv)
    assert len(errors) == 3 and max(errors.values()) <= 1e-5
    conv(torch.randn(2, 3, 8, 8))
