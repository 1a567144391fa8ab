"""``parallel.ep_overlap``: the expert-parallel exchanges overlapped with independent work.

The autograd order the overlap relies on (single process, logged fake exchanges), the
overlapped sharded ops against the one-call ops bit for bit on gloo ranks (uneven and empty
ranks included), and whole ep2 layouts trained with the overlap on and off, bit for bit.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from omnimoe_train.parallel.collectives import InFlight
from omnimoe_train.parallel.overlap import start_exchange
from omnimoe_train.parallel.setup import ep_overlap_enabled
from omnimoe_train.validation import ConfigError, validate
from tests.train.conftest import compose_config

from .distributed import run_distributed
from .layout_checks import check_ep_overlap_bitwise
from .sharding_checks import Case, check_overlap_bitwise


def _logged_exchange(log: list[str], name: str, scale: float):
    """A stand-in collective: multiplies by ``scale``; logs when issued and when waited for."""

    def exchange(t: torch.Tensor) -> InFlight:
        log.append(f"{name} issued")

        def landed(out: torch.Tensor) -> torch.Tensor:
            log.append(f"{name} waited")
            return out

        return InFlight(t * scale, None, keep=(t,), then=landed)

    return exchange


class _Logged(torch.autograd.Function):
    """tanh, logging its forward and backward under ``name``."""

    @staticmethod
    def forward(ctx, log: list[str], name: str, t: torch.Tensor) -> torch.Tensor:
        log.append(f"{name} forward")
        ctx.log, ctx.name = log, name
        out = torch.tanh(t)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.log.append(f"{ctx.name} backward")
        (out,) = ctx.saved_tensors
        return None, None, grad * (1 - out * out)


def test_backward_overlaps_the_shared_branch() -> None:
    """Output side (rows' y, dim's y slices): work between start and finish that only the
    loss joins (the shared branch) has its backward between the adjoint's issue and wait."""
    log: list[str] = []
    x = torch.linspace(-1, 1, 6).view(3, 2).requires_grad_()
    pending = start_exchange(x, _logged_exchange(log, "y", 3.0), _logged_exchange(log, "dy", 5.0))
    shared = _Logged.apply(log, "shared", x)
    y = pending.finish()
    (y + shared).sum().backward()
    assert log == [
        "y issued", "shared forward", "y waited",
        "dy issued", "shared backward", "dy waited",
    ]  # fmt: skip
    assert torch.equal(x.grad, 5.0 + (1 - torch.tanh(x.detach()) ** 2))


def test_backward_overlaps_the_router() -> None:
    """Token side (rows' x, dim's x slices): the router, computed while x travels, feeds the
    experts with the landed x; its backward runs between dx's issue and wait."""
    log: list[str] = []
    x = torch.linspace(-1, 1, 6).view(3, 2).requires_grad_()
    pending = start_exchange(x, _logged_exchange(log, "x", 2.0), _logged_exchange(log, "dx", 7.0))
    weights = _Logged.apply(log, "router", x)
    x_landed = pending.finish()
    (x_landed * weights).sum().backward()
    assert log == [
        "x issued", "router forward", "x waited",
        "dx issued", "router backward", "dx waited",
    ]  # fmt: skip
    expected = 7.0 * torch.tanh(x.detach()) + 2.0 * x.detach() * (1 - torch.tanh(x.detach()) ** 2)
    assert torch.allclose(x.grad, expected)


def test_overlapped_ops_equal_one_call_ops_bitwise() -> None:
    cases = [
        Case((6, 3), 8, 16, 5, seed=1),
        Case((4, 4), 12, 64, 12, seed=2),
        Case((0, 4), 4, 16, 3, indices=((0, 1, 2), (3, 4, 5), (7, 6, 0), (2, 5, 1))),
        Case((0, 0), 4, 16, 3, indices=()),
    ]
    run_distributed(check_overlap_bitwise, 2, cases, ("rows", "dim"))


def test_ep_layouts_train_the_same_with_overlap_on_and_off() -> None:
    run_distributed(check_ep_overlap_bitwise, 2, ["ep2_rows", "ep2_dim"], 3, timeout_s=300)


def test_ep_overlap_must_be_a_bool_or_null() -> None:
    cfg = compose_config(
        "parallel=ep2_rows", "parallel.ep_overlap=false", "data.global_batch_size=32"
    )
    assert cfg.parallel.ep_overlap is False
    validate(cfg, world_size=2)
    default = compose_config("parallel=ep2_rows", "data.global_batch_size=32")
    assert default.parallel.ep_overlap is None  # null: follows trainer.cuda_graphs
    validate(default, world_size=2)
    bad = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, ep_overlap="yes"))
    with pytest.raises(ConfigError) as err:
        validate(bad, world_size=2)
    assert err.value.key == "parallel.ep_overlap"


@pytest.mark.parametrize(
    ("setting", "cuda_graphs", "expected"),
    [
        (None, "none", False),
        (None, "mlp", True),
        (True, "none", True),
        (False, "mlp", False),
    ],
)
def test_ep_overlap_null_follows_the_cuda_graphs(
    setting: bool | None, cuda_graphs: str, expected: bool
) -> None:
    assert ep_overlap_enabled(setting, cuda_graphs) is expected


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ((), "overlap off"),
        (("trainer.cuda_graphs=mlp",), "overlap on"),
        (("parallel.ep_overlap=true",), "overlap on"),
        (("parallel.expert_table_sharding=auto", "trainer.cuda_graphs=mlp"), "overlap on"),
    ],
)
def test_start_up_line_says_whether_the_exchanges_overlap(
    overrides: tuple[str, ...], expected: str
) -> None:
    from omnimoe_train.parallel.setup import resolve_table_sharding

    cfg = compose_config("parallel=ep2_rows", "data.global_batch_size=32", *overrides)
    mode, line = resolve_table_sharding(cfg, world_size=2, bf16=True)
    assert mode in ("rows", "dim") and expected in line and "\n" not in line


@pytest.mark.parametrize(
    ("mlp", "expected"),
    [
        ("dense", "model.mlp=dense has no expert tables: parallel.ep=2 runs its layers data"),
        ("pkm", "model.mlp=pkm has no expert tables"),
        ("gshard", "model.mlp=gshard: megatron-core's experts over parallel.ep=2 ranks"),
    ],
)
def test_start_up_line_says_what_ep_does_to_an_mlp_without_atomic_expert_tables(
    mlp: str, expected: str
) -> None:
    """parallel.ep > 1 with an MLP that has no atomic-expert tables: the line says what the
    layout does to it (it used to say "parallel.ep=1")."""
    from omnimoe_train.parallel.setup import resolve_table_sharding

    cfg = compose_config("parallel=ep2_rows", "data.global_batch_size=32", f"model.mlp={mlp}")
    mode, line = resolve_table_sharding(cfg, world_size=2, bf16=True)
    assert mode == "none" and line.startswith(expected) and "ep=1" not in line
