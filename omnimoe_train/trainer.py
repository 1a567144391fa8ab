"""The training loop: steps, logging, evaluation and checkpoints around an engine.

How one optimizer step is computed (model chunks, optimizer, schedules, parallel layout) is the
engine's business (``engine/``); this module decides only what happens when. All mutable
training state lives in :class:`TrainState`, which is what a checkpoint saves and restores.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from megatron.core import tensor_parallel

from omnimoe_data.loader import TokenShardLoader
from omnimoe_train import checkpoint as ckpt
from omnimoe_train.config import RootConfig
from omnimoe_train.data import build_loader, prepare_data
from omnimoe_train.distributed import Runtime
from omnimoe_train.engine.megatron import PAD_ID, MegatronEngine
from omnimoe_train.metrics import MetricsSink
from omnimoe_train.mfu import throughput_metrics
from omnimoe_train.model.accounting import model_accounting
from omnimoe_train.model.expert_stats import ExpertStats, collect_aux_loss, collect_expert_metrics
from omnimoe_train.model.gpt import padded_vocab_size
from omnimoe_train.validation import (
    ATOMIC_EXPERT_MLPS,
    MEGATRON_MOE_MLPS,
    data_facts_before_preparation,
    validate_against_data,
)

EVAL_OFF = "off: data.val_fraction=0"


@dataclass
class TrainState:
    engine: MegatronEngine
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


def eval_microbatches_per_rank(num_batches: int, dp: int, multiple: int) -> int:
    """Micro-batches every rank runs to evaluate ``num_batches`` global ones: ceil(num / dp),
    rounded up to ``multiple`` (the interleaved pipeline schedule runs groups of pp)."""
    return math.ceil(math.ceil(num_batches / dp) / multiple) * multiple


class Trainer:
    """Data, engine and loaders of one run; :meth:`fit` is the loop.

    Raises ``ConfigError`` (a rule between the config and the data, see
    ``validation.validate_against_data``) or ``DataError`` before any model work.
    """

    def __init__(self, cfg: RootConfig, runtime: Runtime, run_dir: Path) -> None:
        self.cfg, self.rt, self.run_dir = cfg, runtime, run_dir
        d = cfg.data
        # Checked before preparation too: a dataset already in data.dir is never re-cut.
        for facts in data_facts_before_preparation(d):
            validate_against_data(cfg, facts)
        self.data = prepare_data(d, rank=runtime.rank)
        self.data_dir = self.data.description
        for facts in self.data.facts():  # each dataset read (a mixture: every one)
            validate_against_data(cfg, facts)
        vocab = cfg.model.vocab_size or self.data.vocab_size
        self.vocab_size = padded_vocab_size(vocab, cfg.parallel.tp)
        self.tokens_per_step = d.global_batch_size * d.seq_len
        # The loader takes only the DP coordinates: every TP (and PP) rank of a replica reads the
        # same micro-batches, as megatron's TP layers and pipeline stages require. Its order of
        # global batches does not depend on the DP size (omnimoe_data.order). Built before the
        # model, so a split too small for the layout is refused before any model work.
        loader = build_loader(
            d,
            self.data,
            "train",
            dp_rank=runtime.dp_rank,
            dp_size=runtime.dp_size,
            pin_memory=runtime.device.type == "cuda",
        )
        # Evaluation reads the validation split in file order as one sequence (each rank then
        # takes its share, see ``evaluate``); there is none with data.val_fraction=0.
        self.val_loader = None
        if d.val_fraction > 0:
            self.val_loader = build_loader(
                d, self.data, "val", dp_rank=0, dp_size=1, infinite=False
            )
        self.engine = MegatronEngine(cfg, runtime, self.vocab_size)
        self.num_microbatches = self.engine.num_microbatches
        e = self.engine
        self.state = TrainState(e, loader)
        self.expert_stats = [m for c in e.model for m in c.modules() if isinstance(m, ExpertStats)]
        # The same count omnimoe-params prints (the whole model, whatever this rank holds).
        self.flops_per_token = model_accounting(
            cfg.model, seq_len=d.seq_len, vocab_size=self.vocab_size
        ).flops_per_token

    def num_parameters(self) -> int:
        return sum(p.numel() for c in self.engine.model for p in c.parameters())

    def train_step(self) -> tuple[torch.Tensor, float]:
        s = self.state
        loss_sum = self.engine.forward_backward_step(iter(s.train_loader))
        grad_norm = self.engine.optimizer_step()
        s.step += 1
        s.consumed_tokens += self.tokens_per_step
        return loss_sum, grad_norm

    def eval_samples(self) -> int:
        """Validation samples of one evaluation: the first ``trainer.eval_iters`` micro-batches
        of the split in file order (fewer if the split is shorter; the last may be partial)."""
        assert self.val_loader is not None
        requested = self.cfg.trainer.eval_iters * self.cfg.data.micro_batch_size
        return min(requested, self.val_loader.total)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Token-weighted mean loss over :meth:`eval_samples`, the same value for every layout.

        The B global micro-batches are split into contiguous runs of M = ceil(B / dp) per
        data-parallel rank (M rounded up to a multiple of pp under the interleaved schedule), so
        every rank and pipeline stage runs M micro-batches of one shape: a partial last one and
        the runs past B are filled with padding rows (``PAD_ID``) that count neither in the
        loss nor in the token count. Padding, not dropping: the mean is over exactly the
        samples one process evaluates. (BatchNorm uses its running statistics in evaluation,
        so padding rows change no other token's loss.)
        """
        d, p = self.cfg.data, self.cfg.parallel
        loader = self.val_loader
        assert loader is not None, "evaluation is off (data.val_fraction=0)"
        for chunk in self.engine.model:
            chunk.eval()
        mbs = d.micro_batch_size
        num_batches = math.ceil(self.eval_samples() / mbs)
        per_rank = eval_microbatches_per_rank(num_batches, self.rt.dp_size, p.pp if p.vpp else 1)
        first = self.rt.dp_rank * per_rank
        # Start at this rank's first micro-batch (samples before it are not read).
        loader.seek(min(first, loader.batches_per_pass))
        pad = torch.full((mbs, loader.seq_len + 1), PAD_ID, dtype=torch.long)
        batches = []
        for index in range(first, first + per_rank):
            # The loader's last batch of the split is partial; past B only padding is left.
            batch = next(loader) if index < num_batches else pad[:0]
            batches.append(torch.cat([batch, pad[batch.shape[0] :]]))
        total = self.engine.run_schedule(iter(batches), per_rank, forward_only=True)
        return self.engine.mean_loss(total)

    def _expert_metrics(self, steps: int) -> dict[str, float]:
        metrics = collect_expert_metrics(
            self.expert_stats, sequence_parallel=self.cfg.parallel.sequence_parallel
        )
        m = self.cfg.model
        if m.mlp in MEGATRON_MOE_MLPS and m.moe_aux_loss_coeff > 0:
            metrics |= collect_aux_loss(
                num_layers=m.num_layers, microbatches=steps * self.num_microbatches
            )
        return metrics

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
        if self.rt.is_main and cfg.model.mlp in ATOMIC_EXPERT_MLPS:
            sink.console.log(self.engine.sharding_note)
        evaluating = self.val_loader is not None
        if evaluating:
            summary["evaluation"] = f"{self.eval_samples()} validation samples per evaluation"
        else:
            summary["evaluation"] = EVAL_OFF
            if self.rt.is_main:
                sink.console.log(f"evaluation {EVAL_OFF}: no val_loss is logged")
        if s.step == 0 and evaluating:
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
                tokens_per_s = window_steps * self.tokens_per_step / elapsed
                record = {
                    "step": s.step,
                    "loss": loss,
                    "lr": self.engine.current_lr(),
                    "grad_norm": grad_norm,
                    "tokens_per_s": tokens_per_s,
                    **throughput_metrics(
                        self.flops_per_token,
                        tokens_per_s,
                        world_size=self.rt.world_size,
                        device=self.rt.device,
                    ),
                    "consumed_tokens": s.consumed_tokens,
                    **self._expert_metrics(window_steps),
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
            if evaluating and (s.step % t.eval_interval == 0 or s.step == t.max_steps):
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
