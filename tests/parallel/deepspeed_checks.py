"""Rank-side bodies of the DeepSpeed engine tests (gloo, CPU, fp32).

``check_zero_stages``: on every rank of a dp = 2 world, the megatron engine trains the tiny model
of ``layout_checks`` for a few steps on fixed global batches; then the DeepSpeed engine, built
through the same path (same seed: same initial weights, checked bitwise), trains on the same
micro-batches at each ZeRO stage. Losses, grad norms and final parameters must agree.

Tolerance: 1e-6 relative, per parameter tensor as ``||p_ds - p_mg|| / ||p_mg||``. The engines do
not add in the same order everywhere -- ZeRO-2/3 reduce every micro-batch's gradients (megatron
reduces the accumulated sum once), DeepSpeed sums the grad norm for clipping in another order,
and ZeRO-3's gather/release hooks change the order in which autograd accumulates the gradient
of a tensor with several consumers (the MLP input feeds the router, the experts and the shared
branch) -- so after a few Adam steps single entries differ by a few 1e-7 of their tensor's
largest entry (measured: stage 0/1 within 2e-7, stage 2/3 within 4e-7 in norm). With the
optimizer offloaded, DeepSpeed's CPU Adam (a C++ kernel) replaces torch's AdamW: within 4e-7 too.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from omnimoe_train.distributed import init_runtime
from tests.parallel.layout_checks import MODEL, VOCAB, rank_microbatches
from tests.train.conftest import compose_config

STEPS = 4
RTOL = 1e-6
# Global batch 8 = micro-batch 2 x dp 2 x 2 accumulation steps; clipping at 0.5 is active
# (the grad norms here are 0.75-0.9), so both are exercised.
OVERRIDES = (*MODEL, "data.global_batch_size=8", "optim.clip_grad=0.5")


def deepspeed_config(preset: str, *extra: str) -> Any:
    return compose_config(*OVERRIDES, "trainer.engine=deepspeed", f"deepspeed={preset}", *extra)


def train(engine: Any, cfg: Any, steps: int) -> tuple[list[float], list[float]]:
    rt = engine.rt
    losses, norms = [], []
    for step in range(steps):
        batches = rank_microbatches(step, cfg, rt.dp_rank, rt.dp_size)
        losses.append(engine.mean_loss(engine.forward_backward_step(iter(batches))))
        norms.append(engine.optimizer_step())
    return losses, norms


def full_params(engine: Any) -> dict[str, torch.Tensor]:
    """Every parameter at full size (gathered from ZeRO-3 partitions), cloned."""
    import deepspeed

    module = engine.engine.module
    params = dict(module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values()), enabled=engine.zero_stage == 3):
        return {name: p.detach().clone() for name, p in params.items()}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    diff = (actual.double() - expected.double()).norm()
    return (diff / expected.double().norm().clamp_min(1e-30)).item()


def assert_close_lists(what: str, got: list[float], want: list[float], rtol: float = RTOL) -> None:
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert abs(g - w) <= rtol * abs(w), f"{what} at step {i + 1}: {g!r} != {w!r}"


def check_zero_stages(presets: list[str]) -> None:
    from omnimoe_train.engine.deepspeed import DeepSpeedEngine
    from omnimoe_train.engine.megatron import MegatronEngine

    cfg = compose_config(*OVERRIDES)
    rt = init_runtime(cfg)
    reference = MegatronEngine(cfg, rt, VOCAB)
    module = reference.model[0].module
    init = {n: p.detach().clone() for n, p in module.named_parameters()}
    ref_losses, ref_norms = train(reference, cfg, STEPS)
    final = {n: p.detach().clone() for n, p in module.named_parameters()}
    parallel_state.destroy_model_parallel()

    for preset in presets:
        cfg = deepspeed_config(preset)
        rt = init_runtime(cfg)
        engine = DeepSpeedEngine(cfg, rt, VOCAB)
        assert preset.startswith(f"zero{engine.zero_stage}")
        assert ("offload" in preset) == (engine.offload["optimizer"] == "cpu")
        assert engine.num_parameters() == sum(p.numel() for p in init.values())
        start = full_params(engine)
        assert start.keys() == init.keys()
        for name, value in start.items():
            assert torch.equal(value, init[name]), f"{preset}: initial {name} differs"
        losses, norms = train(engine, cfg, STEPS)
        assert_close_lists(f"{preset} loss", losses, ref_losses)
        assert_close_lists(f"{preset} grad norm", norms, ref_norms)
        errors = {n: relative_error(p, final[n]) for n, p in full_params(engine).items()}
        worst = max(errors, key=errors.get)
        assert errors[worst] <= RTOL, f"{preset}: {worst} off by {errors[worst]:.2e}"
        # The WSD schedule advanced once per optimizer step, as the megatron engine's did.
        assert engine.current_lr() == reference.current_lr()
        parallel_state.destroy_model_parallel()


def check_skip_and_norm(runs: list[tuple[str, str]]) -> None:
    """``grad_norm`` before the step equals the norm DeepSpeed clips with; ``skip_update``
    leaves every weight and the LR schedule unchanged, and training then continues. Each of
    DeepSpeed's optimizer wrappers is covered: none (ZeRO-0 fp32), ZeRO-0 bf16, the BF16
    optimizer (ZeRO-1 bf16), ZeRO-1/2, ZeRO-3, and the offloaded CPU Adam."""
    from omnimoe_train.engine.deepspeed import DeepSpeedEngine

    for preset, precision in runs:
        cfg = deepspeed_config(preset, f"trainer.precision={precision}")
        rt = init_runtime(cfg)
        engine = DeepSpeedEngine(cfg, rt, VOCAB)
        train(engine, cfg, 1)
        batches = rank_microbatches(1, cfg, rt.dp_rank, rt.dp_size)
        norms_before = [b.clone() for b in engine.stats_snapshot.buffers]
        engine.forward_backward_step(iter(batches))
        assert any(
            not torch.equal(a, b) for a, b in zip(norms_before, engine.stats_snapshot.buffers)
        )
        before, lr = full_params(engine), engine.current_lr()
        norm = engine.grad_norm()
        engine.skip_update()
        after = full_params(engine)
        for saved, buf in zip(norms_before, engine.stats_snapshot.buffers, strict=True):
            assert torch.equal(saved, buf), f"{preset}: skipped step moved router statistics"
        for name, value in before.items():
            assert torch.equal(value, after[name]), f"{preset}: skipped step changed {name}"
        assert engine.current_lr() == lr
        engine.forward_backward_step(iter(batches))  # the same batch again: the same norm
        assert engine.grad_norm() == norm
        engine.apply_update(norm)
        applied = engine.engine.get_global_grad_norm()
        if applied is not None:  # DeepSpeed's own norm (ZeRO and bf16 optimizers keep it)
            assert abs(float(applied) - norm) <= 1e-6 * norm, f"{preset}: {applied} != {norm}"
        assert any(not torch.equal(v, before[n]) for n, v in full_params(engine).items())
        parallel_state.destroy_model_parallel()


def router_statistics(engine: Any) -> dict[str, torch.Tensor]:
    """The router BatchNorm running statistics (buffers), cloned."""
    module = engine.engine.module
    return {n: b.detach().clone() for n, b in module.named_buffers() if "running_" in n}


def group_hyper(engine: Any) -> list[dict[str, Any]]:
    """Each param group's hyper-parameters (what the config decides, not the schedule's lr)."""
    keys = ("weight_decay", "wd_mult", "lr_mult", "max_lr", "min_lr", "betas", "eps")
    return [{k: g.get(k) for k in keys} for g in engine.client_optimizer.param_groups]


def save_and_continue(preset: str, root: Path) -> None:
    """Train 2 steps, checkpoint into ``root/step_00000002``, keep training 2 steps; rank 0
    writes the live weights and router statistics at the save and the 2 losses after it to
    ``root/reference.pt``."""
    from omnimoe_train.engine.deepspeed import DeepSpeedEngine

    cfg = deepspeed_config(preset)
    rt = init_runtime(cfg)
    engine = DeepSpeedEngine(cfg, rt, VOCAB)
    train(engine, cfg, 2)
    folder = root / "step_00000002"
    if rt.rank == 0:
        folder.mkdir(parents=True)
    dist.barrier()
    engine.save_checkpoint(folder, {"step": 2}, async_save=False)
    live, statistics = full_params(engine), router_statistics(engine)
    losses = [train_step(engine, cfg, step) for step in (2, 3)]
    if rt.rank == 0:
        torch.save(
            {"live": live, "statistics": statistics, "losses": losses}, root / "reference.pt"
        )
    parallel_state.destroy_model_parallel()


def in_sequence(*calls: tuple[Callable[..., None], tuple[Any, ...]]) -> None:
    """Run each ``(fn, args)`` of ``calls`` in turn in this world: several loads of one saved
    checkpoint share one spawn of the ranks (each spawn imports torch, megatron and DeepSpeed
    again: ~12 s on two cores). Each body builds its own engine and tears its groups down."""
    for fn, args in calls:
        fn(*args)


def train_step(engine: Any, cfg: Any, step: int) -> float:
    batches = rank_microbatches(step, cfg, engine.rt.dp_rank, engine.rt.dp_size)
    loss = engine.mean_loss(engine.forward_backward_step(iter(batches)))
    engine.optimizer_step()
    return loss


def load_as_a_run(engine: Any, root: Path) -> dict[str, Any]:
    """``engine.load_checkpoint(root / "step_00000002")`` as a run whose checkpoint folder is
    ``root / "run"`` does it: a conversion writes only under ``root/run/.convert.tmp`` (never
    beside the source, which may be another run's or read-only) and removes it."""
    from omnimoe_train.engine import deepspeed_checkpoint

    scratch = root / "run" / ".convert.tmp"
    used: list[Path] = []
    original = deepspeed_checkpoint.to_universal

    def spy(directory: Path, where: Path, **kwargs: Any) -> None:
        used.append(where)
        original(directory, where, **kwargs)

    before = {p.name for p in root.iterdir()} | {"run"}
    deepspeed_checkpoint.to_universal = spy
    try:
        client = engine.load_checkpoint(root / "step_00000002", scratch=scratch)
    finally:
        deepspeed_checkpoint.to_universal = original
    assert all(where == scratch for where in used), used
    dist.barrier()  # rank 0 removes it once every rank has loaded
    assert not scratch.exists()
    assert {p.name for p in root.iterdir()} <= before  # nothing written beside the source
    return client


def resume_with_a_failing_conversion(preset: str, root: Path) -> None:
    """Rank 0's conversion fails: every rank gets the same one-line ``CheckpointLoadError``
    (it used to raise on rank 0 alone while the others waited for it in a barrier), and the
    scratch folder is gone."""
    from omnimoe_train.checkpoint.session import CheckpointLoadError
    from omnimoe_train.engine import deepspeed_checkpoint
    from omnimoe_train.engine.deepspeed import DeepSpeedEngine

    cfg = deepspeed_config(preset)
    rt = init_runtime(cfg)
    engine = DeepSpeedEngine(cfg, rt, VOCAB)
    original = deepspeed_checkpoint.to_universal

    def failing(directory: Path, where: Path, **kwargs: Any) -> None:
        (where / "partial").mkdir(parents=True)
        raise RuntimeError("no space left for the conversion\nsecond line")

    if rt.rank == 0:
        deepspeed_checkpoint.to_universal = failing
    try:
        engine.load_checkpoint(root / "step_00000002", scratch=root / "run" / ".convert.tmp")
    except CheckpointLoadError as exc:
        message = str(exc)
    else:
        raise AssertionError("the load did not fail")
    finally:
        deepspeed_checkpoint.to_universal = original
    assert "\n" not in message, message
    assert message.startswith(f"{root / 'step_00000002'}: could not convert it"), message
    assert message.endswith(": no space left for the conversion"), message
    dist.barrier()
    assert not (root / "run" / ".convert.tmp").exists()
    parallel_state.destroy_model_parallel()


def resume_with_a_shard_failing_on_rank1(preset: str, root: Path) -> None:
    """A published dp-2 checkpoint whose shard fails to load on rank 1 alone: inside
    DeepSpeed's own ``load_checkpoint`` (its reader raises on rank 1's ZeRO partition, as a
    corrupt file does; not under ZeRO-3, see below), then before it: rank 1's partition file
    gone, then corrupt (same size), files only rank 1 reads. Each time every rank raises the
    same one-line ``CheckpointLoadError`` naming rank 1 and the cause. Rank 0 used to load and
    carry on while rank 1 raised (a run's rank 0 then waited for it in the first collective);
    under ZeRO-3, DeepSpeed's load runs collectives between its reads, so rank 1's files are
    checked before it (a failure inside it still mismatches the ranks' collectives)."""
    from omnimoe_train.checkpoint.files import FORMAT, checksum_files
    from omnimoe_train.checkpoint.session import CheckpointLoadError
    from omnimoe_train.engine.deepspeed import DeepSpeedEngine

    folder = root / "step_00000002"

    def load_error(engine: Any) -> str:
        try:
            engine.load_checkpoint(folder, scratch=root / "run" / ".convert.tmp")
        except CheckpointLoadError as exc:
            return str(exc)
        raise AssertionError(f"rank {dist.get_rank()}: the load did not fail")

    cfg = deepspeed_config(preset)
    rt = init_runtime(cfg)
    engine = DeepSpeedEngine(cfg, rt, VOCAB)
    files = checksum_files(folder)  # published, as the checkpoint manager does
    if rt.rank == 0:
        meta = {"format": FORMAT, "step": 2, "files": files}
        (folder / "meta.json").write_text(json.dumps(meta))
    shard = next((folder / "deepspeed").glob("zero_pp_rank_1_*optim_states.pt"))
    original = shard.read_bytes()
    dist.barrier()  # every rank has named and read it before it is damaged
    messages: list[str] = []
    if preset != "zero3":
        reader = engine.engine.checkpoint_engine
        real_load = reader.load

        def corrupt_on_rank1(path: str, *args: Any, **kwargs: Any) -> Any:
            if "zero_pp_rank_1_" in str(path):
                raise RuntimeError(
                    "PytorchStreamReader failed reading zip archive: failed finding central "
                    "directory\nsecond line"
                )
            return real_load(path, *args, **kwargs)

        if rt.rank == 1:
            reader.load = corrupt_on_rank1
        try:
            messages.append(load_error(engine))
        finally:
            reader.load = real_load
        dist.barrier()
    for damage in ("remove", "corrupt"):
        if rt.rank == 0:
            if damage == "remove":
                shard.unlink()
            else:
                middle = len(original) // 2
                flipped = bytes([original[middle] ^ 0xFF])
                shard.write_bytes(original[:middle] + flipped + original[middle + 1 :])
        dist.barrier()
        try:
            messages.append(load_error(engine))
        finally:
            dist.barrier()
            if rt.rank == 0:
                shard.write_bytes(original)
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, messages)
    assert everyone[0] == everyone[1], everyone  # the same lines on every rank
    start = f"{folder}: could not be loaded on rank 1: "
    want = [
        f"{start}deepspeed/{shard.name} is unreadable (No such file or directory)",
        f"{start}deepspeed/{shard.name} is corrupt (SHA-256 mismatch)",
    ]
    if preset != "zero3":
        want.insert(
            0,
            f"{start}PytorchStreamReader failed reading zip archive: failed finding central "
            "directory",
        )
    assert messages == want, messages
    parallel_state.destroy_model_parallel()


def resume_and_continue(preset: str, root: Path, saved_preset: str | None = None) -> None:
    """A fresh engine (any dp size, any ZeRO stage 1-3 when ``saved_preset`` names the one the
    checkpoint was written with; ZeRO-0 at any dp size) loads ``root/step_00000002``: its
    weights and router BatchNorm statistics are the saved ones bitwise, its param groups keep
    their hyper-parameters, and its next 2 losses are the reference's -- bitwise on the saved
    layout; on another the gradients add up in another order, and after one Adam step (lr
    1e-2) the losses differ by a few 1e-7 (measured 2.1e-7), so within 1e-6. A lost or reset
    optimizer state would move them by ~1e-3, weight decay on the norms (the ZeRO-3 universal
    load gave every group the first one's) by 2e-6."""
    from omnimoe_train.engine.deepspeed import DeepSpeedEngine

    cfg = deepspeed_config(preset)
    rt = init_runtime(cfg)
    engine = DeepSpeedEngine(cfg, rt, VOCAB)
    hyper = group_hyper(engine)
    ref = torch.load(root / "reference.pt", weights_only=False)
    client = load_as_a_run(engine, root)
    same_layout = rt.dp_size == 2 and saved_preset in (None, preset)
    assert client == {"step": 2, "_rank_local_restored": same_layout}, client
    for name, value in full_params(engine).items():
        assert torch.equal(value, ref["live"][name]), f"loaded {name} differs"
    statistics = router_statistics(engine)
    assert statistics.keys() == ref["statistics"].keys()
    for name, value in statistics.items():
        assert torch.equal(value, ref["statistics"][name]), f"loaded {name} differs"
    assert group_hyper(engine) == hyper
    losses = [train_step(engine, cfg, step) for step in (2, 3)]
    if same_layout:
        assert losses == ref["losses"], (losses, ref["losses"])
    else:
        assert_close_lists("loss after resume", losses, ref["losses"], rtol=1e-6)
    parallel_state.destroy_model_parallel()


def resume_in_other_precision(preset: str, root: Path, precision: str) -> None:
    """The fp32 checkpoint ``root/step_00000002`` resumes in ``precision`` (bf16) on its own
    layout at ZeRO 1-3:
    DeepSpeed's files of one precision do not load in the other (``bf16_``-named optimizer
    files, other contents), so it goes through the universal checkpoint; the weights are the
    saved ones rounded, the statistics the saved ones, and training continues. Under ZeRO-0
    (no universal checkpoint) it is refused in one line naming ``trainer.precision``."""
    from omnimoe_train.engine.deepspeed import DeepSpeedEngine

    cfg = deepspeed_config(preset, f"trainer.precision={precision}")
    rt = init_runtime(cfg)
    engine = DeepSpeedEngine(cfg, rt, VOCAB)
    ref = torch.load(root / "reference.pt", weights_only=False)
    if preset == "zero0":
        try:
            engine.load_checkpoint(root / "step_00000002")
        except ValueError as exc:
            assert "set trainer.precision=fp32" in str(exc), exc
        else:
            raise AssertionError("a ZeRO-0 fp32 checkpoint loaded in bf16")
        parallel_state.destroy_model_parallel()
        return
    client = load_as_a_run(engine, root)
    assert client == {"step": 2, "_rank_local_restored": False}, client
    for name, value in full_params(engine).items():
        assert torch.equal(value, ref["live"][name].to(value.dtype)), f"loaded {name} differs"
    statistics = router_statistics(engine)
    for name, value in statistics.items():
        assert torch.equal(value, ref["statistics"][name]), f"loaded {name} differs"
    losses = [train_step(engine, cfg, step) for step in (2, 3)]
    assert_close_lists("bf16 loss after resume", losses, ref["losses"], rtol=1e-2)
    parallel_state.destroy_model_parallel()
