"""Checkpoint cost for one model config: save (sync and async), load, size.

Builds the real engine (``MegatronEngine``) for the config given as omnimoe-train overrides,
runs a few optimizer steps on random tokens (so the Adam state exists), then through the real
``CheckpointManager`` (checksums, ``meta.json``, atomic publish):

- sync save: time the training loop is blocked = the whole save + publish;
- async save (``checkpoint.async_save``): the loop is blocked for the ``save`` call (state staged
  to host memory, writer process forked) and again for the publish (checksums, ``meta.json``,
  rename) when the write has ended; training steps run in between. Reported: both blocked parts,
  the write time in the background, and the step time while it runs vs. without;
- load: ``engine.load_checkpoint`` of the newest (verification of checksums included);
- size: bytes on disk of one checkpoint.

The first save of a process pays one-time costs (megatron's writer queue); it is reported
separately, and the other numbers are medians over ``--repeats``.

    python benchmarks/bench_checkpoint.py model=a80m --vocab 128000 --json ckpt.json  # a GPU
    python benchmarks/bench_checkpoint.py trainer.device=cpu model.num_layers=2 \\
        model.hidden_size=32 model.num_experts=64 model.ffn_hidden_size=64     # tiny, CPU
Runs under torchrun too (every rank saves its shard; rank 0 prints).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from omnimoe_train.run import quiet_libraries

quiet_libraries()

from hydra import compose, initialize_config_module  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from omnimoe_train.checkpoint.files import find_problem  # noqa: E402
from omnimoe_train.checkpoint.manager import CheckpointManager  # noqa: E402
from omnimoe_train.cli import to_root_config  # noqa: E402
from omnimoe_train.config import register_configs  # noqa: E402
from omnimoe_train.distributed import init_runtime, shutdown_runtime  # noqa: E402
from omnimoe_train.engine.megatron import MegatronEngine  # noqa: E402
from omnimoe_train.model.gpt import padded_vocab_size  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _batches(engine: MegatronEngine, vocab: int, seed: int) -> list[torch.Tensor]:
    d = engine.cfg.data
    gen = torch.Generator().manual_seed(seed)
    shape = (d.micro_batch_size, d.seq_len + 1)
    return [torch.randint(0, vocab, shape, generator=gen) for _ in range(engine.num_microbatches)]


def _step(engine: MegatronEngine, vocab: int, seed: int) -> float:
    """One training step; returns its wall time (synchronised)."""
    start = time.perf_counter()
    engine.forward_backward_step(iter(_batches(engine, vocab, seed)))
    engine.optimizer_step()
    _sync(engine.rt.device)
    return time.perf_counter() - start


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def run(overrides: list[str], repeats: int, vocab: int | None, root: Path) -> dict[str, Any]:
    register_configs()
    with initialize_config_module(config_module="omnimoe_conf", version_base="1.3"):
        cfg = to_root_config(compose(config_name="config", overrides=overrides))
    # The vocabulary a run of this config would have (the tokenizer it trains), unless given.
    vocab = vocab or cfg.model.vocab_size or cfg.data.vocab_size
    rt = init_runtime(cfg)
    engine = MegatronEngine(cfg, rt, padded_vocab_size(vocab, cfg.parallel.tp))
    config = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    manager = CheckpointManager(root, cfg.checkpoint)
    manager.cfg.keep = 1_000_000  # keep everything: each repeat writes a new step
    step = 0
    base_steps = [_step(engine, vocab, step := step + 1) for _ in range(3)]
    step_time = statistics.median(base_steps[1:])

    def save(async_save: bool) -> float:
        start = time.perf_counter()
        manager.save(
            step,
            lambda d: engine.save_checkpoint(d, {"step": step}, async_save=async_save),
            {**engine.checkpoint_meta(), "config": config},
        )
        _sync(rt.device)
        return time.perf_counter() - start

    first_save = save(False)
    sync_saves = []
    for _ in range(repeats):
        _step(engine, vocab, step := step + 1)
        sync_saves.append(save(False))
    newest = root / f"step_{step:08d}"
    size = _size(newest)

    async_blocked, async_publish, async_total, steps_during = [], [], [], []
    for _ in range(repeats):
        _step(engine, vocab, step := step + 1)
        start = time.perf_counter()
        async_blocked.append(save(True))
        pending = manager._pending  # noqa: SLF001 - the benchmark looks at the write in flight
        while pending is not None and not pending[3].done(blocking=False):
            steps_during.append(_step(engine, vocab, step := step + 1))
        publish_start = time.perf_counter()
        manager.wait()  # the write has ended: this is the publish (checksums, meta, rename)
        async_publish.append(time.perf_counter() - publish_start)
        async_total.append(time.perf_counter() - start)

    newest = root / f"step_{manager.last_saved_step:08d}"
    assert find_problem(newest) is None
    loads = []
    for _ in range(repeats):
        start = time.perf_counter()
        assert find_problem(newest) is None  # what a resume verifies first
        engine.load_checkpoint(newest)
        _sync(rt.device)
        loads.append(time.perf_counter() - start)

    def med(xs: list[float]) -> float | None:
        return statistics.median(xs) if xs else None

    result = {
        "config": overrides,
        "vocab_size": engine.vocab_size,
        "device": str(rt.device),
        "precision": "bf16" if rt.bf16 else "fp32",
        "world_size": rt.world_size,
        "parameters_per_rank": sum(p.numel() for c in engine.model for p in c.parameters()),
        "checkpoint_bytes": size,
        "step_s": step_time,
        "first_save_s": first_save,
        "sync_save_blocked_s": med(sync_saves),
        "async_save_call_blocked_s": med(async_blocked),
        "async_publish_blocked_s": med(async_publish),
        "async_save_total_s": med(async_total),
        "steps_during_async_write": len(steps_during),
        "step_s_during_async_write": med(steps_during),
        "load_s": med(loads),
    }
    shutdown_runtime()
    return result


def _table(r: dict[str, Any]) -> str:
    def s(x: float | None) -> str:
        return "-" if x is None else f"{x:.3f} s"

    rows = [
        ("model", " ".join(r["config"]) or "(defaults)"),
        ("device", f"{r['device']} {r['precision']}, world {r['world_size']}"),
        ("parameters per rank", f"{r['parameters_per_rank']:,}"),
        ("checkpoint size", f"{r['checkpoint_bytes'] / 2**20:.2f} MiB"),
        ("training step", s(r["step_s"])),
        ("first save (one-time costs)", s(r["first_save_s"])),
        ("sync save: loop blocked", s(r["sync_save_blocked_s"])),
        ("async save: blocked in save()", s(r["async_save_call_blocked_s"])),
        ("async save: blocked in publish", s(r["async_publish_blocked_s"])),
        ("async save: until published", s(r["async_save_total_s"])),
        (
            "step during async write",
            f"{s(r['step_s_during_async_write'])} ({r['steps_during_async_write']} steps)",
        ),
        ("load (verify + load)", s(r["load_s"])),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("overrides", nargs="*", help="omnimoe-train overrides, e.g. model=a80m")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--vocab", type=int, default=None, help="vocabulary before padding (default: the config's)"
    )
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: tmp)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and args.dir is None:
        parser.error("--dir (a folder every rank sees) is needed with more than one rank")
    root = args.dir or Path(tempfile.mkdtemp(prefix="bench_ckpt_"))
    try:
        result = run(args.overrides, args.repeats, args.vocab, root / "checkpoints")
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    if rank == 0:
        print(_table(result))
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
