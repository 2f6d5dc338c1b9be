"""Compiles pomfx's Triton kernels (:mod:`pomfx.fused_gpu`: FG-SGD's, the λ fold's) for a GPU
architecture on any machine, no GPU needed (Triton's compiler and its bundled ptxas run on the
CPU), and prints each kernel's registers and spills: a check that the generated source compiles
for the H100/H200 (sm_90a) where no device is lent, and of the kernels' register pressure. Exits
non-zero if a kernel fails to compile or spills::

    python benchmarks/triton_ptx.py                    # every shape and mode, sm_90a
    python benchmarks/triton_ptx.py --shapes 3x3 --arch 80
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile

os.environ["TRITON_INTERPRET"] = "0"  # compile for the GPU, before triton is imported

import torch  # noqa: E402

_ELEM = {torch.float32: "fp32", torch.float64: "fp64", torch.float16: "fp16", torch.bfloat16: "bf16"}


_BLOCK_ARGS = {  # name, kind: f a pointer to the data's dtype, n an int, c a constexpr
    "prep": [("G", "f"), ("SROW", "f"), ("SCOL", "f"), ("OUT", "f"), ("GID", "i32"), ("BADG", "i32"),
             ("A", "n"), ("B", "n"), ("TA", "c"), ("TB", "c")],
    "coldots": [("X", "f"), ("Y", "f"), ("OUT", "f"), ("A", "n"), ("B", "n"), ("TA", "c"), ("TB", "c")],
    "project": [("Y", "f"), ("X", "f"), ("P", "f"), ("TYPES", "i8"), ("GID", "i32"), ("BADG", "i32"),
                ("A", "n"), ("B", "n"), ("SKIP", "c"), ("TA", "c"), ("TB", "c")],
    "compose": [("M", "f"), ("OUT", "f"), ("GID", "i32"), ("BADG", "i32"), ("B", "n"), ("MODE", "c"),
                ("TR", "c"), ("TB", "c")],
    "direction": [("D", "f"), ("X", "f"), ("V", "f"), ("TYPES", "i8"), ("GID", "i32"), ("BADG", "i32"),
                  ("KC", "f"), ("QP", "f"), ("HYP", "f"), ("A", "n"), ("B", "n"), ("T", "n"), ("MODE", "c"),
                  ("TA", "c"), ("TB", "c")],
    "move": [("X", "f"), ("U", "f"), ("TYPES", "i8"), ("GID", "i32"), ("BADG", "i32"), ("QG", "f"),
             ("NORMG", "f"), ("HYP", "f"), ("A", "n"), ("B", "n"), ("TA", "c"), ("TB", "c")],
    "normalize": [("X", "f"), ("P", "f"), ("TYPES", "i8"), ("GID", "i32"), ("BADG", "i32"), ("A", "n"),
                  ("B", "n"), ("TA", "c"), ("TB", "c")],
}  # fmt: skip


def signature(kernel: str, dt: torch.dtype, other: torch.dtype | None = None) -> dict[str, str]:
    """Triton's argument types of :mod:`pomfx.fused_gpu`'s kernels (as pomfx calls them): ``dt``
    the data's, ``other`` the λ kernels' x (moments) or running_var (fold)."""
    f = "*" + _ELEM[dt]
    if kernel == "moments":  # dt: the sums'
        ints = dict.fromkeys(("P", "C", "Q", "CHUNK", "S"), "i32")
        head = {"x": "*" + _ELEM[other], "part": f, "nbt": "*i64"}
        return {**head, **ints, "momentum": "fp32", "ROWS": "constexpr", "BP": "constexpr", "BI": "constexpr"}
    if kernel == "fold":
        return {"part": f, "rv": "*" + _ELEM[other], "nbt": "*i64", "C": "i32", "S": "i32", "n": "i32",
                "BLOCK": "constexpr"}  # fmt: skip
    if kernel == "block_map":  # dt: the product's, other: src's, out's and scale's
        e = "*" + _ELEM[other]
        return {"src": e, "index": "*i32", "scale": e, "out": e, "N": "i32", "TO_WEIGHT": "constexpr",
                "BLOCK": "constexpr"}  # fmt: skip
    if kernel in _BLOCK_ARGS:  # the block jobs' kernels
        types = {"f": f, "i8": "*i8", "i32": "*i32", "n": "i32", "c": "constexpr"}
        return {name: types[kind] for name, kind in _BLOCK_ARGS[kernel]}
    if kernel == "group_sums":
        return {"q": f, "order": "*i64", "start": "*i64", "qg": f, "BLOCK": "constexpr"}
    sig = {"X": f, "G": f, "V": f, "cg": f, "mu_eff": f, "wd": f, "types": "*i8"}
    extra = {"gid": "*i32", "qg": f, "norm_g": f} if kernel == "step" else {"q": f}
    return {**sig, **extra, "hyp": f, "N": "i32", "BLOCK": "constexpr"}


def compile_one(fn, sig: dict[str, str], constexprs: dict, arch: int) -> str:
    """ptxas's report ("N registers, S bytes spilled") of ``fn`` compiled for ``arch``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn, sig, constexprs=constexprs)
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4})
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    sm = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(k.asm["ptx"])
        out = subprocess.run(
            [ptxas, f"-arch={sm}", "-v", path, "-o", os.devnull], capture_output=True, text=True
        )
    if out.returncode:
        raise RuntimeError(out.stderr)
    regs = re.search(r"Used (\d+) registers", out.stderr)
    spill = re.search(r"(\d+) bytes spill stores", out.stderr)
    return f"{regs[1]} registers, {spill[1]} bytes spilled"


def main() -> int:
    from pomfx import fused_gpu

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="3x3,2x2,3x1,5x1,4x4", help="component shapes AxB (tall: A ≥ B)")
    ap.add_argument("--dtypes", default="float32,float64")
    ap.add_argument("--arch", type=int, default=90, help="compute capability ×10 (90: H100/H200)")
    args = ap.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    jobs = [("group_sums", fused_gpu._group_module(), signature("group_sums", dt),
             {"BLOCK": fused_gpu._GROUP_BLOCK}, "group sums", dt) for dt in dtypes]  # fmt: skip
    for acc in dtypes:  # the λ fold: the sums' dtype, x's, rows (channels last) or planes
        for x in [acc] if acc == torch.float64 else [torch.float16, torch.bfloat16, torch.float32]:
            for rows in (True, False):
                bi = 64 if rows else 1024
                consts = {"ROWS": rows, "BP": fused_gpu._TILE // bi, "BI": bi}
                mod = fused_gpu._moments_module(acc, torch.float32)
                label = f"x {_ELEM[x]} {'rows' if rows else 'planes'}"
                jobs.append(("moments", mod, signature("moments", acc, x), consts, label, acc))
        for rv in dtypes:
            mod, consts = fused_gpu._moments_module(acc, rv), {"BLOCK": fused_gpu._CHANNELS}
            jobs.append(("fold", mod, signature("fold", acc, rv), consts, f"running_var {_ELEM[rv]}", acc))
    for x in [torch.float16, torch.bfloat16, *dtypes]:  # block layers' maps, both ways
        acc = torch.float64 if x == torch.float64 else torch.float32
        if acc in dtypes:
            for to in ("weight", "storage"):
                consts = {"TO_WEIGHT": to == "weight", "BLOCK": fused_gpu._MAP_BLOCK}
                sig = signature("block_map", acc, x)
                jobs.append(
                    ("block_map", fused_gpu._block_map_module(acc), sig, consts, f"{_ELEM[x]} to {to}", acc)
                )
    for dt in dtypes:  # block jobs: a 512×128 block's tiles, each mode
        ta, tb, _, tr = fused_gpu.block_tiles(512, 128)
        mod = fused_gpu._blocks_module(dt)
        kernels = [("prep", {}), ("coldots", {}), *[("project", {"SKIP": k}) for k in (False, True)],
                   *[("compose", {"MODE": m}) for m in (0, 1, 2)],
                   *[("direction", {"MODE": m}) for m in (0, 3, 2)],
                   ("move", {}), ("normalize", {})]  # fmt: skip
        for kernel, flags in kernels:
            label = " ".join(["blocks", *(f"{k.lower()} {int(v)}" for k, v in flags.items())])
            consts = {**flags, "TR": tr, "TB": tb} if kernel == "compose" else {**flags, "TA": ta, "TB": tb}
            jobs.append((kernel, mod, signature(kernel, dt), consts, label, dt))
    for (a, b), mode, twice in itertools.product(shapes, (0, 3, 2), (False, True)):
        for dt in dtypes:
            mod = fused_gpu._kernels(a, b, mode, twice, dt)
            label = f"{a}x{b} mode {mode}{' twice' if twice else ''}"
            for kernel in ("step",) if twice else ("norms", "step"):  # norms do not retract
                jobs.append((kernel, mod, signature(kernel, dt), {"BLOCK": fused_gpu._BLOCK}, label, dt))
    failed = False
    for kernel, mod, sig, consts, label, dt in jobs:
        try:
            report = compile_one(getattr(mod, kernel), sig, consts, args.arch)
            failed |= not report.endswith(" 0 bytes spilled")
        except Exception as e:  # noqa: BLE001 - reported, then the exit status says it
            report, failed = f"FAILED: {type(e).__name__}: {str(e)[:300]}", True
        print(f"{kernel:10s} {_ELEM[dt]} {label:22s} {report}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
