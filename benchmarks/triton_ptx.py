"""Compiles FG-SGD's Triton kernels (:mod:`pomfx.fused_gpu`) for a GPU architecture on any
machine, no GPU needed (Triton's compiler and its bundled ptxas run on the CPU), and prints each
kernel's registers and spills: a check that the generated source compiles for the H100/H200
(sm_90a) where no device is lent, and of the kernels' register pressure. Exits non-zero if a
kernel fails to compile or spills::

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

_ELEM = {torch.float32: "fp32", torch.float64: "fp64"}


def signature(kernel: str, dt: torch.dtype) -> dict[str, str]:
    """Triton's argument types of :mod:`pomfx.fused_gpu`'s kernels (as the optimizer calls them)."""
    f = "*" + _ELEM[dt]
    if kernel == "group_sums":
        return {"q": f, "order": "*i64", "start": "*i64", "qg": f, "BLOCK": "constexpr"}
    sig = {"X": f, "G": f, "V": f, "cg": f, "mu_eff": f, "wd": f, "types": "*i8"}
    extra = {"gid": "*i32", "qg": f, "norm_g": f} if kernel == "step" else {"q": f}
    return {**sig, **extra, "hyp": f, "N": "i32", "BLOCK": "constexpr"}


def compile_one(fn, kernel: str, dt: torch.dtype, block: int, arch: int) -> str:
    """ptxas's report ("N registers, S bytes spilled") of ``fn`` compiled for ``arch``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn, signature(kernel, dt), constexprs={"BLOCK": block})
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
    failed = False
    rows = [("group_sums", dt, None) for dt in dtypes]
    rows += [(kernel, dt, spec) for spec in itertools.product(shapes, (0, 3, 2), (False, True))
             for dt in dtypes for kernel in ("norms", "step")]  # fmt: skip
    for kernel, dt, spec in rows:
        if kernel == "group_sums":
            mod, label, block = fused_gpu._group_module(), "group sums", fused_gpu._GROUP_BLOCK
        else:
            (a, b), mode, twice = spec
            if kernel == "norms" and twice:
                continue  # norms do not retract
            mod, block = fused_gpu._kernels(a, b, mode, twice, dt), fused_gpu._BLOCK
            label = f"{a}x{b} mode {mode}{' twice' if twice else ''}"
        try:
            report = compile_one(getattr(mod, kernel), kernel, dt, block, args.arch)
            failed |= not report.endswith(" 0 bytes spilled")
        except Exception as e:  # noqa: BLE001 - reported, then the exit status says it
            report, failed = f"FAILED: {type(e).__name__}: {str(e)[:300]}", True
        print(f"{kernel:10s} {_ELEM[dt]} {label:22s} {report}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
