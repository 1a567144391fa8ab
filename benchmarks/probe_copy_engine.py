"""Do copy-engine exchanges slow the compute beside them less than NCCL's? (issue 12 probe)

Under ``parallel.ep_overlap`` the expert-parallel exchanges run beside the layer's compute, and
their NCCL kernels take SMs from it (0.5-0.7 ms of NCCL kernels per a80m layer step). PyTorch's
symmetric memory can move the same bytes with the GPUs' copy engines instead (the pattern of
``torch.distributed._symmetric_memory._low_contention_all_gather``: each rank stages its
tensor in a symmetric workspace, a barrier, each rank pulls its peers' tensors with
``copy_``, a barrier). This probe answers, before any layer is rewritten:

1. values: the copy-engine all-gather and reduce-scatter equal NCCL's (bitwise);
2. capture: both replay from one CUDA graph with the compute (the layer's MLP is graphed);
3. contention: ms of a compute load (bf16 GEMMs of a80m's shared SwiGLU, 16,384 tokens) alone,
   beside NCCL's exchange on NCCL's stream, and beside the copy-engine exchange on a side
   stream; ms of each exchange alone. An a80m layer step exchanges x (all-gather, 25 MB per
   rank) and y (reduce-scatter) forward and their mirrors backward under ``rows``.

    torchrun --standalone --nproc-per-node 2 benchmarks/probe_copy_engine.py [--json out.json]

Needs 2+ CUDA GPUs with peer access (one line and exit 2 otherwise). Measured on 2 H200s
(twelfth session, docs/benchmarks.md): values equal, both capture, but the compute load took
1.632 ms alone, 1.747 beside NCCL's exchange and 1.793 beside the copy-engine one, so the EP
exchanges got no copy-engine path.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist
from nccl_bandwidth import time_op


class CopyEngineExchange:
    """All-gather and reduce-scatter of equal (T, D) blocks over a symmetric workspace, the
    bytes moved by ``copy_`` between mapped buffers (copy engines), on ``self.stream``."""

    def __init__(self, numel: int, dtype: torch.dtype, device: torch.device) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        group = dist.group.WORLD
        if hasattr(symm_mem, "enable_symm_mem_for_group"):  # required by older releases
            symm_mem.enable_symm_mem_for_group(group.group_name)
        self.size, self.rank = dist.get_world_size(), dist.get_rank()
        self.workspace = symm_mem.empty(self.size * numel, dtype=dtype, device=device)
        self.handle = symm_mem.rendezvous(self.workspace, group)
        self.stream = torch.cuda.Stream(device)

    def _peer(self, rank: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return self.handle.get_buffer(rank, (self.size, *shape), dtype)

    def all_gather(self, t_TD: torch.Tensor, out_GD: torch.Tensor) -> None:
        """out = [t of rank 0; t of rank 1; ...]: stage mine, barrier, pull every rank's."""
        mine = self._peer(self.rank, tuple(t_TD.shape), t_TD.dtype)[0]
        mine.copy_(t_TD)
        self.handle.barrier()
        for q, block in enumerate(out_GD.chunk(self.size)):
            block.copy_(self._peer(q, tuple(t_TD.shape), t_TD.dtype)[0])
        self.handle.barrier()  # nobody restages before every peer has pulled

    def reduce_scatter(self, t_GD: torch.Tensor, out_TD: torch.Tensor) -> None:
        """out = sum over ranks of their rows of my block: stage all blocks, pull mine from
        every peer (copy engines), sum on the SMs (one elementwise pass)."""
        blocks = t_GD.chunk(self.size)
        staged = self._peer(self.rank, tuple(blocks[0].shape), t_GD.dtype)
        staged.copy_(t_GD.view(staged.shape))
        self.handle.barrier()
        pulled = torch.empty_like(staged)
        for q in range(self.size):
            pulled[q].copy_(self._peer(q, tuple(blocks[0].shape), t_GD.dtype)[self.rank])
        self.handle.barrier()
        torch.sum(pulled, dim=0, out=out_TD)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384, help="T per rank")
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--ffn", type=int, default=2048, help="compute load: SwiGLU width")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if torch.cuda.device_count() < 2 or "LOCAL_RANK" not in os.environ:
        print(
            f"probe_copy_engine.py: error: needs 2+ CUDA GPUs under torchrun "
            f"(torchrun --standalone --nproc-per-node 2 ...); {torch.cuda.device_count()} "
            f"visible{'' if 'LOCAL_RANK' in os.environ else ', not under torchrun'}",
            file=sys.stderr,
        )
        sys.exit(2)
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    size, rank = dist.get_world_size(), dist.get_rank()
    T, D, F = args.tokens, args.hidden, args.ffn
    gen = torch.Generator(device=device).manual_seed(rank)
    x_TD = torch.randn(T, D, generator=gen, device=device).bfloat16()
    y_GD = torch.randn(size * T, D, generator=gen, device=device).bfloat16()
    w_DF = torch.randn(D, 2 * F, generator=gen, device=device).bfloat16() / D**0.5
    w_FD = torch.randn(F, D, generator=gen, device=device).bfloat16() / F**0.5
    ce = CopyEngineExchange(size * T * D, torch.bfloat16, device)
    gathered = {k: torch.empty(size * T, D, device=device).bfloat16() for k in ("nccl", "ce")}
    scattered = {k: torch.empty(T, D, device=device).bfloat16() for k in ("nccl", "ce")}

    def compute() -> None:  # the shared SwiGLU's forward GEMMs, four times (~1 ms)
        for _ in range(4):
            gate, up = (x_TD @ w_DF).chunk(2, dim=1)
            torch.nn.functional.silu(gate).mul_(up) @ w_FD

    def nccl_exchange(async_op: bool) -> list:
        return [
            dist.all_gather_into_tensor(gathered["nccl"], x_TD, async_op=async_op),
            dist.reduce_scatter_tensor(scattered["nccl"], y_GD, async_op=async_op),
        ]

    def ce_exchange() -> None:
        ce.all_gather(x_TD, gathered["ce"])
        ce.reduce_scatter(y_GD, scattered["ce"])

    def ce_beside_compute() -> None:
        ce.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(ce.stream):
            ce_exchange()
        compute()
        torch.cuda.current_stream().wait_stream(ce.stream)

    def nccl_beside_compute() -> None:
        works = nccl_exchange(async_op=True)
        compute()
        for work in works:
            work.wait()

    nccl_exchange(async_op=False)
    ce_exchange()
    torch.cuda.synchronize()
    result = {
        "all_gather_equal": torch.equal(gathered["nccl"], gathered["ce"]),
        # A sum of P bf16 blocks in another order may round differently: report the largest.
        "reduce_scatter_max_abs_diff": (scattered["nccl"].float() - scattered["ce"].float())
        .abs()
        .max()
        .item(),
        "compute_ms": time_op(compute, args.iters),
        "nccl_exchange_ms": time_op(lambda: nccl_exchange(async_op=False), args.iters),
        "ce_exchange_ms": time_op(ce_exchange, args.iters),
        "compute_beside_nccl_ms": time_op(nccl_beside_compute, args.iters),
        "compute_beside_ce_ms": time_op(ce_beside_compute, args.iters),
    }
    for name, step in (("nccl", nccl_beside_compute), ("ce", ce_beside_compute)):
        try:  # the layer's MLP is replayed from CUDA graphs: the exchange must capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
            result[f"graph_{name}_ms"] = time_op(graph.replay, args.iters)
        except Exception as err:  # noqa: BLE001 -- a probe reports what failed, then goes on
            result[f"graph_{name}_ms"] = f"capture failed: {type(err).__name__}: {err}"[:300]
    if rank == 0:
        print(f"{size} ranks, T={T}, D={D}, NCCL {torch.cuda.nccl.version()}")
        for key, value in result.items():
            print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "result": result}, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
