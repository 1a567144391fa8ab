"""Compile the router-gate softmax kernels for sm_90 with Triton's bundled ptxas (no GPU
needed) and print each kernel's local-memory stack bytes per thread (0 = no spills).

    python tests/kernels/gate_kernels_ptxas.py 1024     # n; prints "<kernel> <stack bytes>"
    python tests/kernels/gate_kernels_ptxas.py split    # the bf16 split of the gate GEMMs

The launch configuration is the launchers' own (``router_gates._tile``, ``BWD_ROWS``), two
gates, batch statistics (the mode with the most live registers); the split's as
``gate_gemms`` launches it (all four slots, and two pieces only).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from omnimoe_kernels import bf16_split, router_gates


def stack_bytes(fn, signature: dict, constexprs: dict, num_warps: int) -> str:
    """ptxas's STACK (local memory bytes per thread) of one compiled kernel."""
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run(
            [tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    (stack,) = re.findall(r"STACK:(\d+)", usage)
    return stack


def main(n: int) -> None:
    np2, bt, warps = router_gates._tile(n)
    p, i, c = "*fp32", "i32", "constexpr"
    shape = {"T": i, "n": i, "H": i, "G": c, "NP": c, "BT": c}
    fwd = {"z_ptr": p, "mean_ptr": p, "rstd_ptr": p, "y_ptr": p, "ent_ptr": p}
    fwd |= {**shape, "NORM": c}
    bwd = {"zh_ptr": p, "dy0_ptr": p, "dy1_ptr": p, "s0t": i, "s0n": i, "s1t": i, "s1n": i}
    bwd |= {"rstd_ptr": p, "dz_ptr": p, "part_ptr": p, **shape, "SUB": c, "MODE": c}
    consts = {"G": 2, "NP": np2, "BT": bt}
    sub = max(1, router_gates.BWD_ROWS // bt)
    fwd_consts = {**consts, "NORM": True}
    print("_gates_fwd", stack_bytes(router_gates._gates_fwd, fwd, fwd_consts, warps))
    bwd_consts = {**consts, "SUB": sub, "MODE": 2}
    print("_gates_bwd", stack_bytes(router_gates._gates_bwd, bwd, bwd_consts, warps))


def main_split() -> None:
    sig = {"a_ptr": "*fp32", "out_ptr": "*i16", "n": "i32", "C": "i32"}
    sig |= dict.fromkeys(("S", "HI", "MID", "LO", "HI2", "BLOCK"), "constexpr")
    for name, slots in {"_split": (4, 1, 2, 0, 3), "_split_two": (3, 1, 0, -1, 2)}.items():
        consts = dict(zip(("S", "HI", "MID", "LO", "HI2"), slots, strict=True))
        consts["BLOCK"] = bf16_split.BLOCK
        print(name, stack_bytes(bf16_split._split, sig, consts, 4))


if __name__ == "__main__":
    main_split() if sys.argv[1] == "split" else main(int(sys.argv[1]))
