"""Rank-side bodies of the sharding tests: run the sharded op, compare with one process.

Every rank builds the SAME global problem from a seed (x for the tokens of all ranks, full U and
V, routing), runs the single-process ``atomic_experts`` on the concatenation as the reference,
and the sharded op on its own tokens and its table shard. It then checks, within ``RTOL``
relative to the largest reference entry (or to an entry's own rounding-error scale, where its
terms cancel: ``_error_scales``): its outputs, the group loss, dx and dweights of its tokens,
and the table gradients gathered from all shards; and that the bytes the op reports equal the
cost-model formulas for the routing actually used. Shape legend: see
``omnimoe_train.parallel.collectives``.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist

import omnimoe_kernels
from omnimoe_train.parallel.cost_model import dim_bytes, rows_bytes
from omnimoe_train.parallel.dim_sharding import sharded_atomic_experts_dim
from omnimoe_train.parallel.rows_dispatch import sharded_atomic_experts_rows

# fp32: relative to the largest reference entry of each compared tensor, or to the entry's own
# error scale (``_error_scales``) where that is larger (its terms cancel)
RTOL = 1e-5


@dataclass(frozen=True)
class Case:
    """One global problem. ``indices`` (one tuple of K expert ids per token, tokens of rank 0
    first) fixes the routing; ``None`` draws K distinct experts per token uniformly."""

    tokens_per_rank: tuple[int, ...]
    hidden: int
    num_experts: int
    top_k: int
    seed: int = 0
    indices: tuple[tuple[int, ...], ...] | None = None


def _build(case: Case, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(case.seed)
    num_tokens, n_exp, d, k = sum(case.tokens_per_rank), case.num_experts, case.hidden, case.top_k

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    if case.indices is None:
        scores_GN = torch.rand(num_tokens, n_exp, generator=gen)
        indices_GK = scores_GN.argsort(dim=1)[:, :k]
    else:
        indices_GK = torch.tensor(case.indices, dtype=torch.int64).reshape(num_tokens, k)
    weights_GK = torch.rand(num_tokens, k, generator=gen, dtype=torch.float64).to(dtype) + 0.1
    return {
        "x": randn(num_tokens, d),
        "up": randn(n_exp, d) / d**0.5,
        "down": randn(n_exp, d),
        "weights": weights_GK,
        "indices": indices_GK,
        "cotangent": randn(num_tokens, d),
    }


def _error_scales(full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per entry of y, dx, dweights, dU and dV: a magnitude M (float64, same shape) such that
    fp32 rounding moves the entry by a small multiple of eps * M, whatever the summation order.

    Standard forward error analysis of the op's terms: a sum's error is bounded by the sum of
    its terms' magnitudes, and an error e in h moves silu(h) by at most 1.1 e and silu'(h) by
    at most 0.5 e (the bounds of |silu'| and |silu''|). So where terms cancel (tiny d, one
    pair per token), an entry may be far off relative to the largest entry and still right."""
    f = {k: v.detach().cpu().double() for k, v in full.items() if k != "indices"}
    idx_GK = full["indices"].cpu()
    up_GKD, down_GKD = f["up"][idx_GK], f["down"][idx_GK]
    x_GD, c_GD, w_GK = f["x"], f["cotangent"], f["weights"]
    h_GK = (up_GKD * x_GD[:, None]).sum(-1)
    mag_h = (up_GKD.abs() * x_GD.abs()[:, None]).sum(-1)
    sig = torch.sigmoid(h_GK)
    mag_s = (h_GK * sig).abs() + 1.1 * mag_h  # silu(h) and its error's propagation
    mag_ds = (sig * (1 + h_GK * (1 - sig))).abs() + 0.5 * mag_h  # silu'(h)
    mag_da = (c_GD.abs()[:, None] * down_GKD.abs()).sum(-1)  # da = dy . down_e
    mag_a, mag_g = w_GK.abs() * mag_s, w_GK.abs() * mag_ds * mag_da
    flat = idx_GK.reshape(-1)

    def table(coef_GK: torch.Tensor, rows_GD: torch.Tensor) -> torch.Tensor:
        terms = (coef_GK[..., None] * rows_GD.abs()[:, None]).flatten(0, 1)
        return torch.zeros_like(f["up"]).index_add_(0, flat, terms)

    return {
        "y": (mag_a[..., None] * down_GKD.abs()).sum(1),
        "dx": (mag_g[..., None] * up_GKD.abs()).sum(1),
        "dweights": mag_s * mag_da,
        "dU": table(mag_g, x_GD),
        "dV": table(mag_a, c_GD),
    }


def _assert_close(
    name: str,
    actual: torch.Tensor,
    expected: torch.Tensor,
    scale: float | torch.Tensor | None = None,
) -> None:
    """``scale``: what the error is relative to: the largest entry of ``expected`` (None), a
    number, or per entry (a tensor like ``expected``: each entry's larger of that and the
    largest entry)."""
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    actual, expected = actual.detach().cpu(), expected.detach().cpu()
    if expected.numel() == 0:
        return
    largest = expected.abs().max().double()
    if scale is None:
        scale = largest
    elif isinstance(scale, torch.Tensor):
        scale = torch.maximum(scale.detach().cpu().double(), largest)
    scale = torch.as_tensor(scale, dtype=torch.float64).clamp_min(1e-12)
    error = ((actual - expected).abs().double() / scale).max().item()
    assert error <= RTOL, (
        f"{name}: max error {error:.3g} x its scale > {RTOL} (rank {dist.get_rank()})"
    )


def _all_gather(t: torch.Tensor, dim: int) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=dim)


def _sum_over_ranks(value: float) -> float:
    nccl = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else None
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item()


def _owner_ranks(case: Case, indices_TK: torch.Tensor) -> int:
    """Sum over this rank's tokens of the ranks owning at least one of the token's experts."""
    dest_TK = indices_TK // (case.num_experts // dist.get_world_size())
    return sum(len(set(row)) for row in dest_TK.tolist())


def check_case(
    case: Case,
    mode: str,
    dtype: torch.dtype = torch.float32,
    known_tokens: bool = False,
    backend: str = "auto",
    device: str = "cpu",
    distinct_ids: bool = False,
    ascending_ids: bool = False,
    strided_ids: bool = False,
) -> None:
    """Run one case in ``mode`` on this rank and assert it matches the single-process op.
    ``known_tokens``: pass every rank's token count (no count exchange); ``distinct_ids``:
    tell the op the case's ids are distinct per token (the dense gradients skip the merge);
    ``ascending_ids``: each token's ids sorted (the routers' order) and the rows op told so;
    ``strided_ids``: the ids passed as int32 columns of a wider tensor (not contiguous)."""
    num_ranks, rank = dist.get_world_size(), dist.get_rank()
    assert len(case.tokens_per_rank) == num_ranks
    full = {name: t.to(device) for name, t in _build(case, dtype).items()}
    if ascending_ids:
        full["indices"] = full["indices"].sort(1).values
    start = sum(case.tokens_per_rank[:rank])
    mine = slice(start, start + case.tokens_per_rank[rank])

    ref = {name: full[name].clone().requires_grad_() for name in ("x", "up", "down", "weights")}
    y_ref = omnimoe_kernels.atomic_experts(
        ref["x"], ref["up"], ref["down"], ref["weights"], full["indices"], backend="torch"
    )
    loss_ref = (y_ref * full["cotangent"]).sum()
    loss_ref.backward()

    x = full["x"][mine].clone().requires_grad_()
    weights = full["weights"][mine].clone().requires_grad_()
    indices = full["indices"][mine]
    if strided_ids:
        wide = torch.cat([indices, indices[:, :1]], dim=1).to(torch.int32)
        indices = wide[:, : case.top_k]
    tokens = list(case.tokens_per_rank) if known_tokens else None
    if mode == "rows":
        rows = slice(*(case.num_experts // num_ranks * r for r in (rank, rank + 1)))
        up, down = (full[t][rows].clone().requires_grad_() for t in ("up", "down"))
        y, stats = sharded_atomic_experts_rows(
            x, up, down, weights, indices, group=None, num_experts=case.num_experts,
            group_tokens=tokens, backend=backend, distinct_ids=distinct_ids,
            ascending_ids=ascending_ids,
        )  # fmt: skip
        table_dim = 0
    else:
        cols = slice(*(case.hidden // num_ranks * r for r in (rank, rank + 1)))
        up, down = (full[t][:, cols].clone().requires_grad_() for t in ("up", "down"))
        y, stats = sharded_atomic_experts_dim(
            x, up, down, weights, indices, group=None, group_tokens=tokens, backend=backend,
            distinct_ids=distinct_ids,
        )  # fmt: skip
        table_dim = 1
    loss = (y * full["cotangent"][mine]).sum()
    loss.backward()

    scales = _error_scales(full)
    _assert_close("y", y.detach(), y_ref.detach()[mine], scales["y"][mine])
    # The loss sums terms of both signs: its rounding error is bounded relative to the sum of
    # their magnitudes, not to the (possibly near-zero) loss itself.
    terms = (y_ref * full["cotangent"]).abs().sum().item()
    loss_sum = torch.tensor([_sum_over_ranks(loss.item())])
    _assert_close("loss", loss_sum, loss_ref.detach()[None], scale=terms)
    _assert_close("dx", x.grad, ref["x"].grad[mine], scales["dx"][mine])
    _assert_close("dweights", weights.grad, ref["weights"].grad[mine], scales["dweights"][mine])
    _assert_close("dU", _all_gather(up.grad, table_dim), ref["up"].grad, scales["dU"])
    _assert_close("dV", _all_gather(down.grad, table_dim), ref["down"].grad, scales["dV"])

    elem = torch.empty((), dtype=dtype).element_size()
    shape = dict(tokens=len(indices), d=case.hidden, k=case.top_k, ranks=num_ranks)
    if mode == "rows":
        expected = rows_bytes(**shape, dtype_bytes=elem, weight_bytes=elem)
        assert int(stats.owner_ranks) == _owner_ranks(case, indices)
        mine_pairs = ((full["indices"] // (case.num_experts // num_ranks)) == rank).sum()
        assert int(stats.local_pairs) == int(mine_pairs)
    else:
        expected = dim_bytes(**shape, dtype_bytes=elem, weight_bytes=elem, score_bytes=max(elem, 4))
        assert int(stats.local_pairs) == full["indices"].numel()
    counts = 0 if known_tokens else 8 * (num_ranks - 1)
    # Per rank the formulas assume equal token counts; summed over the group they are exact for
    # any counts, so compare the sums.
    for key, measured in (("forward", stats.forward_bytes), ("backward", stats.backward_bytes)):
        total = _sum_over_ranks(measured)
        predicted = _sum_over_ranks(expected[key] + (counts if key == "forward" else 0))
        assert abs(total - predicted) <= 1e-9 * max(predicted, 1.0), (
            f"{mode} {key} bytes: measured {total} != formula {predicted}"
        )


def check_cases(cases: list[Case], modes: tuple[str, ...], dtype: torch.dtype = torch.float32):
    for case in cases:
        for mode in modes:
            check_case(case, mode, dtype)
            check_case(case, mode, dtype, known_tokens=True)


def check_cases_triton(
    cases: list[Case],
    modes: tuple[str, ...],
    device: str = "cpu",
    grad_path: str | None = None,
    distinct_ids: bool = False,
) -> None:
    """The same checks with the Triton kernels (through Triton's interpreter on CPU);
    ``grad_path`` forces the weight-gradient path of every call ("dense" / "pairs");
    ``distinct_ids`` passes the routers' promise (the cases' ids must keep it)."""
    import os

    from omnimoe_kernels import experts_dense_grad

    experts_dense_grad.FORCE_GRAD_PATH = grad_path
    if distinct_ids:  # the promise must reach the dense gradients: no merge of repeats runs

        def no_merge(*_: object, **__: object) -> None:
            raise AssertionError("merged_columns ran despite distinct_ids")

        experts_dense_grad.merged_columns = no_merge
    if device == "cpu":
        # Read when the kernel modules are first imported, which has not happened in this
        # freshly spawned process (``omnimoe_kernels`` imports them lazily).
        os.environ["TRITON_INTERPRET"] = "1"
    for case in cases:
        for mode in modes:
            check_case(
                case, mode, known_tokens=True, backend="triton", device=device,
                distinct_ids=distinct_ids,
            )  # fmt: skip


def _table_shards(
    full: dict[str, torch.Tensor], case: Case, mode: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's (up, down) shard of the full tables: its expert rows (``rows``) or its
    hidden columns (``dim``), as leaves that collect gradients."""
    num_ranks, rank = dist.get_world_size(), dist.get_rank()
    if mode == "rows":
        block = slice(*(case.num_experts // num_ranks * r for r in (rank, rank + 1)))
        return tuple(full[t][block].clone().requires_grad_() for t in ("up", "down"))
    block = slice(*(case.hidden // num_ranks * r for r in (rank, rank + 1)))
    return tuple(full[t][:, block].clone().requires_grad_() for t in ("up", "down"))


def _sharded(mode, case, x, up, down, weights, indices, tokens):  # noqa: ANN001, ANN202
    """The plain (not overlapped) sharded op of ``mode``."""
    if mode == "rows":
        return sharded_atomic_experts_rows(
            x, up, down, weights, indices, group=None, num_experts=case.num_experts,
            group_tokens=tokens,
        )  # fmt: skip
    return sharded_atomic_experts_dim(
        x, up, down, weights, indices, group=None, group_tokens=tokens
    )


def check_bytes_per_rank(case: Case) -> None:
    """With equal tokens per rank (known), predict_bytes is exact for every single rank."""
    from omnimoe_train.parallel.cost_model import predict_bytes

    assert len(set(case.tokens_per_rank)) == 1
    full = _build(case, torch.float32)
    num_ranks, rank = dist.get_world_size(), dist.get_rank()
    tokens = case.tokens_per_rank[rank]
    mine = slice(rank * tokens, (rank + 1) * tokens)
    for mode in ("rows", "dim"):
        up, down = _table_shards(full, case, mode)
        x = full["x"][mine].clone().requires_grad_()
        weights = full["weights"][mine].clone().requires_grad_()
        indices = full["indices"][mine]
        known = list(case.tokens_per_rank)
        y, stats = _sharded(mode, case, x, up, down, weights, indices, known)
        y.sum().backward()
        predicted = predict_bytes(
            mode, tokens=tokens, d=case.hidden, k=case.top_k, num_experts=case.num_experts,
            ranks=num_ranks, dtype_bytes=4,
        )  # fmt: skip
        for key, got in (("forward", stats.forward_bytes), ("backward", stats.backward_bytes)):
            assert got == pytest.approx(predicted[key], rel=1e-12), (mode, key, got, predicted)


def _run_sharded(
    case: Case, mode: str, overlap: bool, tokens: list[int] | None
) -> tuple[list[torch.Tensor], tuple[float, float]]:
    """One forward + backward of ``mode`` on this rank, the routing weights computed from x
    (so x's gradient has two paths, as in the layer: the router and the exchange) and a
    stand-in shared branch computed while the output travels (overlap on). Returns y, dx,
    dweights, dU, dV and the (forward, backward) bytes reported."""
    from omnimoe_train.parallel.dim_sharding import dim_experts_overlapped, start_dim_tokens
    from omnimoe_train.parallel.rows_dispatch import rows_experts_overlapped, start_rows_tokens

    rank = dist.get_rank()
    full = _build(case, torch.float32)
    start = sum(case.tokens_per_rank[:rank])
    mine = slice(start, start + case.tokens_per_rank[rank])
    hidden = full["x"][mine].clone().requires_grad_()
    x = hidden.view(hidden.shape)  # as in the layer: x_TD feeds the router and the exchange,
    indices = full["indices"][mine]  # its source also the shared branch (2 gradients each)
    gate = torch.linspace(-1.0, 1.0, case.hidden * case.top_k).view(case.hidden, case.top_k)
    up, down = _table_shards(full, case, mode)
    if overlap:
        starter = start_rows_tokens if mode == "rows" else start_dim_tokens
        early = starter(x, group=None, group_tokens=tokens)
    weights = torch.softmax(x @ gate, dim=-1)  # the "router": runs while x travels
    if overlap and mode == "rows":
        pending, stats = rows_experts_overlapped(
            early, up, down, weights, indices, num_experts=case.num_experts
        )
    elif overlap:
        pending, stats = dim_experts_overlapped(early, up, down, weights, indices)
    else:
        y, stats = _sharded(mode, case, x, up, down, weights, indices, tokens)
    shared = torch.tanh(hidden) * 0.5  # the "shared branch": runs while y travels
    if overlap:
        y = pending.finish()
    loss = ((y + shared) * full["cotangent"][mine]).sum()
    loss.backward()
    values = [y.detach(), hidden.grad, up.grad, down.grad]
    return values, (stats.forward_bytes, stats.backward_bytes)


def check_overlap_bitwise(cases: list[Case], modes: tuple[str, ...]) -> None:
    """The overlapped two-half ops equal the one-call ops to the bit (values, gradients) and
    report the same bytes, with the token counts known or exchanged."""
    for case in cases:
        for mode in modes:
            for tokens in (list(case.tokens_per_rank), None):
                off, off_bytes = _run_sharded(case, mode, overlap=False, tokens=tokens)
                on, on_bytes = _run_sharded(case, mode, overlap=True, tokens=tokens)
                for name, a, b in zip(("y", "dx", "dU", "dV"), off, on, strict=True):
                    assert a.shape == b.shape and torch.equal(a, b), (mode, case, name)
                assert on_bytes == off_bytes, (mode, case, on_bytes, off_bytes)


def check_odd_byte_layouts(cases: list[Case], modes: tuple[str, ...]) -> None:
    """Cases whose packed rows put a part off its dtype's boundary, in float64 (exact enough for
    ``RTOL``), and the ids as a strided int32 view; every case with the counts known and not."""
    for case in cases:
        for mode in modes:
            for known in (True, False):
                check_case(case, mode, torch.float64, known_tokens=known)
                check_case(case, mode, known_tokens=known, strided_ids=True)
