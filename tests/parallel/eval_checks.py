"""Rank-side bodies of the evaluation test: ``Trainer.evaluate`` gives one process's val_loss
under every layout, also when the micro-batch count does not suit the interleaved pipeline
schedule or the split ends in a partial micro-batch.

Dataset: the synthetic token dataset of ``tests.data.helpers`` with 13 validation samples.
Cases: ``vpp``: 3 micro-batches of 2 (the interleaved schedule runs groups of pp = 2);
``partial``: micro-batches of 3 over the whole split (``eval_iters`` far above it), the fifth
holding one sample. The reference (world 1) also evaluates the same batches without padding
(the schedule of one process takes any shape), which ``evaluate``'s padded path must equal.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import torch
from megatron.core import parallel_state

from omnimoe_train.distributed import init_runtime
from omnimoe_train.trainer import Trainer

from .layout_checks import VOCAB, _close, _full_name, _local_params, _local_slice, layout_config

RTOL = 1e-6
CASES = {
    "vpp": ("data.micro_batch_size=2", "data.global_batch_size=4", "trainer.eval_iters=3"),
    "partial": ("data.micro_batch_size=3", "data.global_batch_size=6", "trainer.eval_iters=100000"),
}


def make_eval_dataset(root: Path) -> Path:
    from tests.data.helpers import make_token_dataset

    data_dir = make_token_dataset(root, [7, 6], sample_len=17)  # val: 13 samples, ids < 64
    manifest = json.loads((data_dir / "manifest.json").read_text())
    manifest.update(tokenizer="tokenizer.json", vocab_size=VOCAB)
    (data_dir / "manifest.json").write_text(json.dumps(manifest))
    (data_dir / "tokenizer.json").write_text("{}")  # model.vocab_size is set: never read
    return data_dir


def _config(layout: str, case: str, data_dir: Path) -> Any:
    return layout_config(layout, f"data.dir={data_dir}", *CASES[case])


def make_eval_reference(data_dir: Path, run_dir: Path, path: Path) -> None:
    """World 1: initial weights and, per case, the val_loss of ``evaluate``."""
    out: dict[str, Any] = {}
    for case in CASES:
        cfg = _config("single", case, data_dir)
        rt = init_runtime(cfg)
        trainer = Trainer(cfg, rt, run_dir)
        model = trainer.engine.model[0].module
        out.setdefault("init", {n: p.detach().clone() for n, p in model.named_parameters()})
        for n, p in model.named_parameters():  # every case starts from the same weights
            with torch.no_grad():
                p.copy_(out["init"][n])
        out[case] = trainer.evaluate()
        # The same micro-batches, the last one partial, unpadded: one process needs no padding.
        loader = trainer.val_loader
        batches = list(itertools.islice(iter(loader), cfg.trainer.eval_iters))
        total = trainer.engine.run_schedule(iter(batches), len(batches), forward_only=True)
        expected = trainer.engine.mean_loss(total)
        assert abs(out[case] - expected) <= RTOL * abs(expected), (case, out[case], expected)
        parallel_state.destroy_model_parallel()
    torch.save(out, path)


def check_eval(data_dir: Path, run_dir: Path, ref_path: Path, runs: list[tuple[str, str]]) -> None:
    """On every rank: each (layout, case) evaluates to the reference val_loss."""
    ref = torch.load(ref_path, weights_only=False)
    for layout, case in runs:
        cfg = _config(layout, case, data_dir)
        rt = init_runtime(cfg)
        trainer = Trainer(cfg, rt, run_dir)
        for name, param, model in _local_params(trainer.engine):
            full = _full_name(name, model, cfg.model.tie_embeddings)
            with torch.no_grad():
                param.copy_(_local_slice(ref["init"][full], param, trainer.engine.table_sharding))
        got = trainer.evaluate()
        _close(f"{layout} {case} val_loss", torch.tensor(got), torch.tensor(ref[case]), RTOL)
        parallel_state.destroy_model_parallel()
