"""Accuracy of the Triton atomic-experts op at training shapes (GPU).

For each shape: bf16 inputs, the Triton op's output and gradients against a float64 reference on
the same (bf16-rounded) values, next to the error of the PyTorch bf16 path (the reference computed
in fp32 from the same bf16 inputs, rounded to bf16) -- the error a correct bf16 kernel should match.
Usage: python benchmarks/check_kernel_accuracy.py
"""

from __future__ import annotations

import torch

from omnimoe_kernels import atomic_experts, atomic_experts_reference

SHAPES = [  # (T, D, N, K): a80m's layer (half a micro-batch: the fp64 reference must fit), paper N
    (8192, 768, 5776, 64),
    (4096, 1024, 102400, 64),
]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def run(T: int, D: int, N: int, K: int) -> None:
    g = torch.Generator(device="cuda").manual_seed(T + N)
    x = torch.randn(T, D, device="cuda", generator=g).bfloat16()
    up = (torch.randn(N, D, device="cuda", generator=g) * D**-0.5).bfloat16()
    down = (torch.randn(N, D, device="cuda", generator=g) * 0.02).bfloat16()
    w = torch.softmax(torch.randn(T, K, device="cuda", generator=g), -1)
    idx = torch.stack([torch.randperm(N, device="cuda", generator=g)[:K] for _ in range(T)])
    dy = torch.randn(T, D, device="cuda", generator=g).bfloat16()

    def grads(fn, dtype):  # noqa: ANN001, ANN202
        leaves = [t.to(dtype).detach().requires_grad_() for t in (x, up, down)]
        wl = (
            w.to(torch.float64 if dtype == torch.float64 else torch.float32)
            .detach()
            .requires_grad_()
        )
        y = fn(*leaves, wl, idx)
        y.backward(dy.to(y.dtype))
        return [y.detach(), *(t.grad for t in leaves), wl.grad]

    ref = grads(atomic_experts_reference, torch.float64)
    tri = grads(lambda *a: atomic_experts(*a, backend="triton"), torch.bfloat16)
    tor = grads(atomic_experts_reference, torch.bfloat16)
    names = ["y", "dx", "dup", "ddown", "dweights"]
    print(f"T={T} D={D} N={N} K={K}")
    for n, r, a, b in zip(names, ref, tri, tor, strict=True):
        print(f"  {n:9s} triton {rel(a, r):.2e}   torch-bf16 {rel(b, r):.2e}")


if __name__ == "__main__":
    for shape in SHAPES:
        run(*shape)
        torch.cuda.empty_cache()
