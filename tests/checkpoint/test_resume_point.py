"""``checkpoint.resume``: the checkpoint a run continues from, found and checked on plain files
(one process, no engine, no model) the way the trainer does before it prepares data or builds
a model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from omnimoe_train.checkpoint.compat import RunAlreadyComplete
from omnimoe_train.checkpoint.files import CheckpointCorrupt
from omnimoe_train.checkpoint.resume import ResumePoint, find_resume_point, open_checkpointing
from omnimoe_train.checkpoint.session import CheckpointLoadError
from omnimoe_train.config import CheckpointConfig, ModelConfig, OptimConfig, TrainerConfig
from omnimoe_train.validation import ConfigError


def _save(ckpt_root: Path, step: int, meta: dict) -> None:
    """One published checkpoint at ``step`` with ``meta`` (an engine's files stand in)."""
    writer = open_checkpointing(CheckpointConfig(), ckpt_root.parent, run_config={}, warn=print)
    assert writer.manager.root == ckpt_root

    def write(folder: Path) -> None:
        (folder / "weights.bin").write_bytes(bytes([step]) * 100)

    writer.manager.save(step, write, {"step": step, **meta})


def _meta(*, max_steps: int = 100, seed: int = 0) -> dict:
    """What ``Checkpointing.save`` records about the run (``meta.json``), the rest left out."""
    return {
        "engine": "megatron",
        "vocab_size": 512,
        "config": {
            "model": vars(ModelConfig()),
            "trainer": {"max_steps": max_steps},
            "optim": vars(OptimConfig()),
            "data": {"seed": seed},
        },
        "data": {"data_ids": ["aa"], "weights": [1.0], "seed": seed},
    }


def _find(run_dir: Path, *, max_steps: int = 100, seed: int = 0, **ckpt: object):  # noqa: ANN202
    warnings: list[str] = []
    checkpointing = open_checkpointing(
        CheckpointConfig(**ckpt), run_dir, run_config={}, warn=warnings.append
    )
    point = find_resume_point(
        checkpointing,
        trainer=TrainerConfig(max_steps=max_steps),
        model=ModelConfig(),
        optim=OptimConfig(),
        data_seed=seed,
    )
    return point, warnings


def test_a_fresh_run_dir_starts_from_step_0(tmp_path: Path) -> None:
    assert _find(tmp_path)[0] is None
    assert not (tmp_path / "checkpoints").exists()  # made at the first save, not here


def test_the_newest_checkpoint_is_found_with_its_meta(tmp_path: Path) -> None:
    _save(tmp_path / "checkpoints", 4, _meta())
    _save(tmp_path / "checkpoints", 8, _meta())
    point, warnings = _find(tmp_path)
    assert isinstance(point, ResumePoint) and not warnings
    assert point.path == tmp_path / "checkpoints" / "step_00000008"
    assert point.name == "step_00000008" and point.meta["step"] == 8
    assert point.schedule_note is None
    # The checkpoint's padded vocabulary when the layout can take it; more entries: refused.
    assert point.vocab_size(500, tp=2) == 512
    assert point.vocab_size(500, tp=3) is None
    with pytest.raises(CheckpointLoadError, match="model.vocab_size=512"):
        point.vocab_size(600, tp=1)
    point.check_data_order({"data_ids": ["aa"], "weights": [1.0], "seed": 0})
    with pytest.raises(CheckpointLoadError, match="data.weights differ"):
        point.check_data_order({"data_ids": ["aa"], "weights": [0.5], "seed": 0})


def test_auto_is_case_insensitive_as_none_and_the_pre_check_are(tmp_path: Path) -> None:
    """``checkpoint.resume=AUTO`` passed the pre-check (which lowers the case) and was then
    taken for a folder named AUTO: "AUTO: no checkpoint folders (step_<8 digits>) in it"."""
    _save(tmp_path / "checkpoints", 8, _meta())
    point, _ = _find(tmp_path, resume="AUTO")
    assert point is not None and point.name == "step_00000008"


def test_a_longer_run_resumes_with_the_schedule_change_in_one_line(tmp_path: Path) -> None:
    _save(tmp_path / "checkpoints", 8, _meta(max_steps=100))
    point, _ = _find(tmp_path, max_steps=200)
    assert point is not None and point.schedule_note is not None
    assert point.schedule_note.startswith(
        "warning: learning-rate schedule changes from step 8 on: trainer.max_steps 100 -> 200 "
    )


def test_what_meta_json_alone_refuses_is_refused_here(tmp_path: Path) -> None:
    _save(tmp_path / "checkpoints", 8, _meta(seed=0))
    with pytest.raises(RunAlreadyComplete):
        _find(tmp_path, max_steps=8)
    with pytest.raises(CheckpointLoadError, match="data.seed=0, this run asks 3"):
        _find(tmp_path, seed=3)
    with pytest.raises(CheckpointCorrupt, match="no checkpoint folders"):
        _find(tmp_path, resume=str(tmp_path / "elsewhere"))


def test_a_refused_resume_leaves_the_run_dirs_checkpoints_in_place(tmp_path: Path) -> None:
    """Was: ``checkpoint.resume=<another run's checkpoint>`` refused (another model, exit 2)
    had already renamed this run's checkpoints ``*.superseded``; rerunning the run's own
    command then found none of its own and silently started over from step 0."""
    _save(tmp_path / "checkpoints", 8, _meta())
    other = tmp_path / "other" / "checkpoints"
    _save(other, 5, {**_meta(), "config": {**_meta()["config"], "data": {"seed": 3}}})
    with pytest.raises(CheckpointLoadError, match="data.seed=3"):
        _find(tmp_path, resume=str(other))
    with pytest.raises(CheckpointLoadError, match="data.seed=3"):
        _find(tmp_path, resume=str(other / "step_00000005"))
    point, warnings = _find(tmp_path)  # the run's own command: continues where it was
    assert point is not None and point.name == "step_00000008" and not warnings


def test_a_file_in_the_way_of_checkpoint_dir_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "checkpoints").write_text("not a folder")
    with pytest.raises(ConfigError, match=r"^checkpoint\.dir: .* is a file, not a folder"):
        _find(tmp_path)
    # An absolute checkpoint.dir is used as given, not under the run dir.
    elsewhere = tmp_path / "elsewhere"
    _save(elsewhere / "checkpoints", 4, _meta())
    point, _ = _find(tmp_path / "run", dir=str(elsewhere / "checkpoints"))
    assert point is not None and point.path == elsewhere / "checkpoints" / "step_00000004"


def test_the_resume_module_imports_neither_megatron_nor_triton() -> None:
    """As ``compat``: the kernel tests' conftest sets TRITON_INTERPRET before Triton is first
    imported, so a test module collected earlier must not import it first."""
    code = (
        "import sys, omnimoe_train.checkpoint.resume; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('megatron', 'triton')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
