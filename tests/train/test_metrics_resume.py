"""A resumed run continues its metrics: appends to ``metrics.jsonl`` (even after a killed run's
half-written line) and reuses the run directory's W&B run id."""

from __future__ import annotations

import json
import re
from pathlib import Path

from omnimoe_train.config import WandbConfig
from omnimoe_train.metrics import MetricsSink, wandb_run_id


def test_appends_after_a_half_written_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 2, "loss": 3.0}\n{"step": 3, "lo')  # killed mid-write
    sink = MetricsSink(
        tmp_path, WandbConfig(mode="disabled"), {}, enabled=True, max_steps=10, progress=False
    )
    sink.log({"step": 2, "resumed_from": "step_00000002"})
    sink.log({"step": 4, "loss": 2.5})
    sink.close()
    lines = path.read_text().splitlines()
    assert lines[0] == '{"step": 2, "loss": 3.0}' and lines[1] == '{"step": 3, "lo'
    assert [json.loads(line) for line in lines[2:]] == [
        {"step": 2, "resumed_from": "step_00000002"},
        {"step": 4, "loss": 2.5},
    ]


def test_wandb_run_id_is_kept_in_the_run_directory(tmp_path: Path) -> None:
    first = wandb_run_id(tmp_path)
    assert re.fullmatch(r"[a-z0-9]{8}", first)
    assert wandb_run_id(tmp_path) == first  # a rerun in the same directory: the same W&B run
    assert (tmp_path / "wandb_run_id").read_text().strip() == first
