"""The training loop: steps, logging, evaluation and checkpoints around an engine.

How one optimizer step is computed (model chunks, optimizer, schedules, parallel layout) is the
engine's business (``engine/``); this module decides only what happens when. All mutable
training state lives in :class:`TrainState`, which is what a checkpoint saves and restores.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import tensor_parallel

from omnimoe_data.loader import TokenShardLoader
from omnimoe_train import checkpoint as ckpt
from omnimoe_train.config import RootConfig
from omnimoe_train.data import ensure_dataset, tokenizer_vocab_size
from omnimoe_train.distributed import Runtime
from omnimoe_train.engine import Engine, build_engine
from omnimoe_train.metrics import MetricsSink
from omnimoe_train.model.expert_stats import ExpertStats, collect_expert_metrics
from omnimoe_train.model.gpt import padded_vocab_size


@dataclass
class TrainState:
    engine: Engine
    train_loader: TokenShardLoader
    step: int = 0
    consumed_tokens: int = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            **self.engine.state_dict(),
            "data": self.train_loader.state_dict(),
            "step": self.step,
            "consumed_tokens": self.consumed_tokens,
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
                "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.engine.load_state_dict(state)
        self.train_loader.load_state_dict(state["data"])
        self.step, self.consumed_tokens = state["step"], state["consumed_tokens"]
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["rng"]["cuda"])
        tensor_parallel.get_cuda_rng_tracker().set_states(state["rng"]["tracker"])


class Trainer:
    def __init__(self, cfg: RootConfig, runtime: Runtime, run_dir: Path) -> None:
        self.cfg, self.rt, self.run_dir = cfg, runtime, run_dir
        d = cfg.data
        self.data_dir = ensure_dataset(d, rank=runtime.rank)
        vocab = cfg.model.vocab_size or tokenizer_vocab_size(self.data_dir)
        self.vocab_size = padded_vocab_size(vocab, cfg.parallel.tp)
        self.tokens_per_step = d.global_batch_size * d.seq_len
        self.engine = build_engine(cfg, runtime, self.vocab_size)
        self.num_microbatches = self.engine.num_microbatches
        # The loader takes only the DP coordinates: every TP (and PP) rank of a replica reads the
        # same micro-batches, as megatron's TP layers and pipeline stages require.
        loader = TokenShardLoader(
            self.data_dir,
            "train",
            d.micro_batch_size,
            dp_rank=runtime.dp_rank,
            dp_size=runtime.dp_size,
            seed=d.seed,
            num_workers=d.num_workers,
        )
        e = self.engine
        self.state = TrainState(e, loader)
        self.expert_stats = [m for c in e.model for m in c.modules() if isinstance(m, ExpertStats)]

    def num_parameters(self) -> int:
        return self.engine.num_parameters()

    def train_step(self) -> tuple[torch.Tensor, float]:
        s = self.state
        loss_sum = self.engine.forward_backward_step(iter(s.train_loader))
        grad_norm = self.engine.optimizer_step()
        s.step += 1
        s.consumed_tokens += self.tokens_per_step
        return loss_sum, grad_norm

    @torch.no_grad()
    def evaluate(self) -> float:
        d = self.cfg.data
        for chunk in self.engine.model:
            chunk.eval()
        loader = TokenShardLoader(
            self.data_dir,
            "val",
            d.micro_batch_size,
            dp_rank=self.rt.dp_rank,
            dp_size=self.rt.dp_size,
            seed=d.seed,
            infinite=False,
        )
        batches = list(itertools.islice(iter(loader), self.cfg.trainer.eval_iters))
        if dist.is_initialized():
            # Expert dispatch and pipeline stages are collectives: every rank must run the same
            # number of micro-batches even if its share of the validation split is shorter.
            count = torch.tensor([len(batches)], device=self.rt.device)
            dist.all_reduce(count, op=dist.ReduceOp.MIN)
            batches = batches[: int(count.item())]
        total = torch.zeros(2, dtype=torch.float64, device=self.rt.device)
        if batches:
            total = self.engine.run_schedule(iter(batches), len(batches), forward_only=True)
        return self.engine.mean_loss(total)

    def _expert_metrics(self) -> dict[str, float]:
        return collect_expert_metrics(
            self.expert_stats, sequence_parallel=self.cfg.parallel.sequence_parallel
        )

    # -- loop ---------------------------------------------------------------------------------
    def fit(self, sink: MetricsSink) -> dict[str, Any]:
        cfg, s = self.cfg, self.state
        t = cfg.trainer
        ckpt_root = Path(cfg.checkpoint.dir)
        if not ckpt_root.is_absolute():
            ckpt_root = self.run_dir / ckpt_root
        resume = ckpt.resolve_resume(ckpt_root, cfg.checkpoint.resume)
        if resume is not None:
            state, _ = ckpt.load_checkpoint(resume, rank=self.rt.rank)
            s.load_state_dict(state)
            sink.console.log(f"resumed from {resume} at step {s.step}")

        summary: dict[str, Any] = {"num_parameters": self.num_parameters()}
        if self.rt.is_main and cfg.model.mlp == "omnimoe":
            sink.console.log(self.engine.sharding_note)
        if s.step == 0:
            summary["initial_val_loss"] = self.evaluate()
            sink.log({"step": 0, "val_loss": summary["initial_val_loss"]})
        window_loss = torch.zeros(2, dtype=torch.float64, device=self.rt.device)
        window_start, window_steps = time.perf_counter(), 0
        if self.rt.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        while s.step < t.max_steps:
            loss_sum, grad_norm = self.train_step()
            window_loss += loss_sum
            window_steps += 1
            if s.step % t.log_interval == 0 or s.step == t.max_steps:
                elapsed = time.perf_counter() - window_start
                loss = self.engine.mean_loss(window_loss)
                record = {
                    "step": s.step,
                    "loss": loss,
                    "lr": self.engine.current_lr(),
                    "grad_norm": grad_norm,
                    "tokens_per_s": window_steps * self.tokens_per_step / elapsed,
                    "consumed_tokens": s.consumed_tokens,
                    **self._expert_metrics(),
                    **self.engine.dispatch_metrics(window_steps),
                }
                if self.rt.device.type == "cuda":
                    record["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
                sink.log(record)
                sink.advance(s.step, loss, record["tokens_per_s"])
                summary["last_train"] = record
                window_loss.zero_()
                window_start, window_steps = time.perf_counter(), 0
            else:
                sink.advance(s.step)
            if s.step % t.eval_interval == 0 or s.step == t.max_steps:
                summary["final_val_loss"] = self.evaluate()
                sink.log({"step": s.step, "val_loss": summary["final_val_loss"]})
            interval = cfg.checkpoint.interval
            if (interval and s.step % interval == 0) or (
                s.step == t.max_steps and cfg.checkpoint.save_final
            ):
                self._save(ckpt_root)
        return summary

    def _save(self, root: Path) -> None:
        p = self.cfg.parallel
        meta = {"world_size": self.rt.world_size, "tp": p.tp, "pp": p.pp, "vpp": p.vpp, "ep": p.ep}
        ckpt.save_checkpoint(
            root,
            self.state.step,
            self.state.state_dict(),
            meta,
            rank=self.rt.rank,
            keep=self.cfg.checkpoint.keep,
        )
