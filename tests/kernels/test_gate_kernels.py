"""The router gate kernels (``omnimoe_kernels.router_gates``) against the float64 PyTorch
reference (``reference.gate_log_probs_reference``): outputs, batch statistics and gradients over
a shape table, the statistics kernels on badly centred columns, bitwise repeats, the
sequence-parallel statistics group on gloo, and the kernels compiled for sm_90 without spills."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from kernel_test_utils import assert_launched, cpu_triton, gpu, rel_err, triton_launches

from omnimoe_kernels import GATES_MAX_SCORES, router_gates
from omnimoe_kernels.reference import gate_log_probs_reference
from omnimoe_kernels.router_gates_autograd import gate_log_probs_triton, supports
from tests.parallel.distributed import run_distributed

CASES = [  # T, D, n, G, x dtype, stats ("running": random running statistics)
    (37, 24, 7, 2, torch.float32, "batch"),
    (37, 24, 7, 2, torch.bfloat16, "batch"),
    (1, 8, 4, 1, torch.float32, "batch"),  # one token: zero variance, zero input gradient
    (1, 8, 4, 2, torch.float32, "running"),
    (1, 8, 5, 2, torch.bfloat16, None),
    (130, 16, 76, 2, torch.float32, "batch"),  # 2 statistics blocks, 3 backward programs
    (130, 16, 76, 1, torch.bfloat16, "running"),
    (130, 16, 76, 2, torch.float32, None),
    (9, 8, 1024, 2, torch.float32, "batch"),
    (9, 8, 1024, 1, torch.float32, "running"),
    (5, 8, 1000, 2, torch.bfloat16, None),
    (3, 8, GATES_MAX_SCORES, 2, torch.float32, "batch"),
    (8300, 4, 4, 1, torch.float32, "batch"),  # 65 statistics blocks: two merge steps
]


def _inputs(T, D, n, G, dtype, stats, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(T, D, generator=gen) * 2 + 0.5).to(dtype)
    gates = [torch.randn(n, D, generator=gen) * 0.3 for _ in range(G)]
    dys = [torch.randn(T, n, generator=gen) for _ in range(G)]
    if stats == "running":
        stats = (torch.randn(G * n, generator=gen) * 0.1, torch.rand(G * n, generator=gen) + 0.5)
        stats = tuple(s.to(device) for s in stats)
    return x.to(device), [g.to(device) for g in gates], [d.to(device) for d in dys], stats


def _run(fn, x, gates, dys, stats, group=None):
    """(outputs, dx, dgates) of one forward + backward with upstream gradients ``dys``."""
    x = x.detach().clone().requires_grad_()
    gates = [g.detach().clone().requires_grad_() for g in gates]
    kwargs = {} if group is None else {"group": group}
    logp, entropy, batch_stats = fn(x, gates, stats=stats, **kwargs)
    sum((lp * dy.to(lp)).sum() for lp, dy in zip(logp, dys, strict=True)).backward()
    return (logp, entropy, batch_stats), x.grad, [g.grad for g in gates]


def _check(T, D, n, G, dtype, stats, device) -> None:
    x, gates, dys, stats = _inputs(T, D, n, G, dtype, stats, device)
    with triton_launches() as launches:
        (logp, ent, bstats), dx, dgates = _run(gate_log_probs_triton, x, gates, dys, stats)
    assert_launched(launches, "_gates_fwd", "_gates_bwd")
    ref_stats = stats if not isinstance(stats, tuple) else tuple(s.cpu().double() for s in stats)
    (rlogp, rent, rbstats), rdx, rdgates = _run(
        lambda x, g, stats: gate_log_probs_reference(x, g, stats),
        x.cpu().double(),
        [g.cpu().double() for g in gates],
        [d.cpu().double() for d in dys],
        ref_stats,
    )
    assert len(logp) == G and all(lp.shape == (T, n) and lp.is_contiguous() for lp in logp)
    assert all(lp.dtype == torch.float32 for lp in logp) and ent.dtype == torch.float32
    assert dx.dtype == dtype and all(g.dtype == torch.float32 for g in dgates)
    assert (bstats is None) == (stats != "batch")
    for g in range(G):
        assert rel_err(logp[g], rlogp[g]) <= 1e-6, f"logp {g}"
        assert rel_err(dgates[g], rdgates[g]) <= 2e-5, f"dgate {g}"
    assert rel_err(ent, rent) <= 1e-6
    if bstats is not None:
        assert rel_err(bstats, rbstats) <= 1e-6
    if T == 1 and stats == "batch":  # the normalised score of a lone token is 0: no gradient
        assert torch.count_nonzero(dx) == 0
    else:
        assert rel_err(dx, rdx) <= (1e-5 if dtype == torch.float32 else 8e-3)


@cpu_triton
@pytest.mark.parametrize(("T", "D", "n", "G", "dtype", "stats"), CASES)
def test_gate_kernels_interpreter(T, D, n, G, dtype, stats) -> None:
    _check(T, D, n, G, dtype, stats, "cpu")


@pytest.mark.parametrize(
    ("T", "D", "n", "G", "dtype", "stats"),
    [
        *CASES,
        (16384, 768, 76, 2, torch.bfloat16, "batch"),
        (4096, 256, 1024, 2, torch.float32, "batch"),
    ],
)
@gpu[0]
@gpu[1]
def test_gate_kernels_gpu(T, D, n, G, dtype, stats) -> None:
    _check(T, D, n, G, dtype, stats, "cuda")


def _check_stats_offset(device: str) -> None:
    """Columns whose mean is 1e4 times their spread (a one-pass E[z^2] - E[z]^2 in fp32 loses
    every digit of the variance here): mean and variance match float64 on the same z."""
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(300, 40, generator=gen) * torch.rand(40, generator=gen) + 1e4
    z64 = z.double()
    z = z.to(device)
    part = router_gates.column_partials(z)
    sums, m2 = torch.empty(40, device=device), torch.empty(40, device=device)
    mean, rstd, stats = router_gates.column_stats(z, part, 300, 300, 1e-5, "all", sums, m2)
    var64, mean64 = torch.var_mean(z64, dim=0, unbiased=False)
    assert rel_err(mean, mean64) <= 1e-7
    assert rel_err(stats[1], var64 * 300 / 299) <= 1e-6  # a one-pass fp32 formula: ~30
    assert rel_err(rstd, torch.rsqrt(var64 + 1e-5)) <= 1e-6


@cpu_triton
def test_gate_statistics_offset_columns_interpreter() -> None:
    _check_stats_offset("cpu")


@gpu[0]
@gpu[1]
def test_gate_statistics_offset_columns_gpu() -> None:
    _check_stats_offset("cuda")


def _check_repeat(T, D, n, device) -> None:
    x, gates, dys, _ = _inputs(T, D, n, 2, torch.bfloat16, "batch", device, seed=2)
    first, second = (_run(gate_log_probs_triton, x, gates, dys, "batch") for _ in range(2))
    flat = [
        lambda r: r[0][0],
        lambda r: [r[0][1], r[0][2]],
        lambda r: [r[1]],
        lambda r: r[2],
    ]
    for pick in flat:
        for a, b in zip(pick(first), pick(second), strict=True):
            assert torch.equal(a, b)


@cpu_triton
def test_gate_kernels_bitwise_repeat_interpreter() -> None:
    _check_repeat(300, 16, 76, "cpu")


@gpu[0]
@gpu[1]
def test_gate_kernels_bitwise_repeat_gpu() -> None:
    _check_repeat(16384, 768, 76, "cuda")


def test_supports_routes_the_rest_to_pytorch() -> None:
    x = torch.randn(4, 8)
    assert supports(x, [torch.randn(5, 8)] * 2)
    assert not supports(x, [torch.randn(5, 8, dtype=torch.float64)])  # float64 arithmetic
    assert not supports(x, [torch.randn(5, 8)] * 3)
    assert not supports(x, [torch.randn(GATES_MAX_SCORES + 1, 8)])
    assert not supports(x[:0], [torch.randn(5, 8)])
    with pytest.raises(ValueError, match="gate kernels"):
        gate_log_probs_triton(x, [torch.randn(5, 8)] * 3, stats=None)


def _group_case() -> None:
    """Sequence parallelism: each rank holds 65 of 130 tokens; the statistics and the gradients
    (gate gradients summed over the ranks) are those of one process with all 130."""
    rank = dist.get_rank()
    x, gates, dys, _ = _inputs(130, 16, 76, 2, torch.float32, "batch", "cpu", seed=3)
    (logp, ent, bstats), dx, dgates = _run(gate_log_probs_triton, x, gates, dys, "batch")
    part = slice(rank * 65, (rank + 1) * 65)
    (p_logp, p_ent, p_bstats), p_dx, p_dgates = _run(
        gate_log_probs_triton, x[part], gates, [d[part] for d in dys], "batch", dist.group.WORLD
    )
    for dg in p_dgates:
        dist.all_reduce(dg)
    for a, b in zip(p_logp, logp, strict=True):
        assert rel_err(a, b[part]) <= 1e-6
    assert rel_err(p_ent, ent[part]) <= 1e-6
    assert rel_err(p_bstats, bstats) <= 1e-6
    assert rel_err(p_dx, dx[part]) <= 1e-5
    for a, b in zip(p_dgates, dgates, strict=True):
        assert rel_err(a, b) <= 1e-5


@cpu_triton
def test_gate_kernels_statistics_group_interpreter() -> None:
    run_distributed(_group_case, 2)


def _has_ptxas() -> bool:
    import triton

    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    return all(os.path.exists(os.path.join(bin_dir, t)) for t in ("ptxas", "cuobjdump"))


@pytest.mark.skipif(not _has_ptxas(), reason="needs Triton's NVIDIA backend (ptxas)")
@pytest.mark.parametrize("n", [76, 1024, GATES_MAX_SCORES])
def test_gate_kernels_compile_for_sm90_without_spills(n: int) -> None:
    """The softmax kernels as the launchers configure them, compiled by ptxas for sm_90 (no GPU
    needed; in a subprocess, since the interpreter's kernels cannot be compiled): they
    compile, and no thread spills to local memory."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(__file__), "gate_kernels_ptxas.py")
    done = subprocess.run(
        [sys.executable, script, str(n)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    stacks = dict(line.split() for line in done.stdout.splitlines())
    assert set(stacks) == {"_gates_fwd", "_gates_bwd"}
    assert all(v == "0" for v in stacks.values()), stacks


@cpu_triton
def test_router_on_gate_kernels_equals_pytorch_ops() -> None:
    """``CartesianRouter`` on the kernels (backend="triton") against its PyTorch-ops path in
    fp32: same experts, weights, gradients and running statistics, a training step (batch
    statistics, recorded) then an evaluation step (the updated running statistics). Few
    tokens: the interpreted top-K kernel dominates the time."""
    from omnimoe_train.model.router import CartesianRouter, GateNorm

    torch.manual_seed(0)
    routers = [CartesianRouter(24, 49, 6, backend="triton") for _ in range(2)]
    routers[1].load_state_dict(routers[0].state_dict())
    routers[1].fused = False
    for r in routers:
        for i, m in enumerate(x for x in r.modules() if isinstance(x, GateNorm)):
            m.running_mean.fill_(0.1 * (i + 1))
            m.running_var.fill_(2.0 + i)
    x = torch.randn(12, 24) * 2 + 0.5
    for step in range(2):
        got = []
        for r in routers:
            r.train(step == 0)
            xr = x.clone().requires_grad_()
            with triton_launches() as launches:
                routing = r(xr)
                g = torch.randn(
                    routing.weights_TK.shape, generator=torch.Generator().manual_seed(step)
                )
                (routing.weights_TK * g).sum().backward()
            # Both pick experts on the top-K kernel; only the fused router on the gate kernels.
            assert_launched(launches)
            assert any(name.startswith("_gates_") for name in launches) == r.fused, launches
            got.append((routing, xr.grad, [p.grad.clone() for p in r.parameters()]))
            r.zero_grad()
        (a, dx_a, dp_a), (b, dx_b, dp_b) = got
        assert torch.equal(a.indices_TK, b.indices_TK)
        assert rel_err(a.weights_TK, b.weights_TK) <= 1e-6
        assert rel_err(a.entropy_T, b.entropy_T) <= 1e-6
        assert rel_err(dx_a, dx_b) <= 1e-5
        for p, q in zip(dp_a, dp_b, strict=True):
            assert rel_err(p, q) <= 1e-5
        for buf_a, buf_b in zip(routers[0].buffers(), routers[1].buffers(), strict=True):
            assert rel_err(buf_a, buf_b) <= 1e-6
