"""Lines the console shows at the edges of a run: a bad shard's error line is the last one
(the progress bar is not drawn after it), and a resume under another layout says what changed
in one readable line."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from omnimoe_data.prepare import prepare
from omnimoe_train.checkpoint.files import FORMAT, META
from omnimoe_train.checkpoint.session import Checkpointing, TrainState
from omnimoe_train.config import CheckpointConfig
from tests.cli_helpers import run_train_cli, tiny
from tests.data.helpers import make_docs, write_txt_folder

LAYOUT = {
    "world_size": 2, "tp": 1, "pp": 1, "vpp": None, "ep": 2, "dp": 2,
    "sequence_parallel": False, "expert_table_sharding": "rows", "distributed_optimizer": False,
}  # fmt: skip


def test_a_bad_shard_error_is_the_last_line_on_the_console(tmp_path: Path) -> None:
    """A shard found corrupt once training ran (its sha256 is checked on first read): the
    progress bar was drawn once more after the error line, when the run stopped it."""
    corpus = write_txt_folder(tmp_path / "corpus", make_docs(200))
    data = tmp_path / "ds"
    manifest = prepare(
        [corpus], data, vocab_size=300, seq_len=32, samples_per_shard=16, val_fraction=0.0,
        progress=False,
    ).manifest  # fmt: skip
    for shard in manifest["splits"]["train"]["shards"]:  # the same size, other bytes
        path = data / shard["name"]
        raw = bytearray(path.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        path.write_bytes(raw)
    args = tiny(
        data__max_bytes=None, data__vocab_size=None, data__val_fraction=0,
        trainer__device="cpu", trainer__max_steps=5, trainer__progress="true",
    )  # fmt: skip
    result = run_train_cli([*args, f"data.dir={data}", f"hydra.run.dir={tmp_path / 'run'}"],
                           cache=tmp_path / "cache")  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("omnimoe-train: error: ") and "bad shard" in last, result.stderr[-3000:]


class _Engine:
    def __init__(self, client: dict[str, Any]) -> None:
        self.client = client

    def layout(self) -> dict[str, Any]:
        return {**LAYOUT, "world_size": 1, "ep": 1, "dp": 1, "expert_table_sharding": "none"}

    def load_checkpoint(self, path: Path, *, scratch: Path | None = None) -> dict[str, Any]:
        assert scratch is not None and scratch.parent == path.parent  # the run's folder
        return self.client


class _Loaded:
    """A loader or bad-step guard: takes a state dict."""

    def load_state_dict(self, state: Any) -> None:
        del state


def test_a_layout_change_on_resume_is_one_readable_line(tmp_path: Path) -> None:
    """The line printed the checkpoint's layout as a raw Python dict (``{'world_size': 2,
    'tp': 1, ...}``), every key, changed or not. Now: the keys that changed, ``old -> new``."""
    folder = tmp_path / "checkpoints" / "step_00000004"
    folder.mkdir(parents=True)
    (folder / "model.pt").write_bytes(b"")  # the engine below loads nothing from it
    listed = {"model.pt": {"bytes": 0, "sha256": hashlib.sha256(b"").hexdigest()}}
    meta = {"format": FORMAT, "step": 4, "files": listed, "layout": LAYOUT}
    (folder / META).write_text(json.dumps(meta))
    client = {
        "step": 4, "consumed_tokens": 64, "window": [0.0, 0.0, 0.0], "guard": {}, "data": {},
        "_rank_local_restored": False,
    }  # fmt: skip
    session = Checkpointing(
        CheckpointConfig(), folder.parent, _Engine(client), run_config={}, warn=print
    )
    lines = session.load(folder, TrainState(), _Loaded(), _Loaded())  # type: ignore[arg-type]
    assert lines[1] == (
        "layout changed since step_00000004 (world_size 2 -> 1, ep 2 -> 1, dp 2 -> 1, "
        "expert_table_sharding rows -> none): the RNG states start fresh"
    )
