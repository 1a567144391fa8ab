"""A DeepSpeed checkpoint of one ZeRO layout made loadable by another (``load_universal``).

DeepSpeed's ``ds_to_universal`` writes a universal checkpoint (a folder per parameter under
``zero/``, plus the common optimizer state in ``zero/optimizer_state.pt``) whose form depends on
the *saving* ZeRO stage, and ``load_universal`` reads only the form of the *loading* stage
(DeepSpeed 0.19):

=====================  =================================  ====================================
                       written by stage 1-2               written by stage 3
=====================  =================================  ====================================
rank-0 module state    ``mp_rank_00_model_states.pt``     ``zero_pp_rank_0_mp_rank_00_...``
``<param>/<key>.pt``   ``{"param": full-shape tensor}``   flat tensor ``[numel]``
Adam step count        ``<param>/step.pt``                ``optimizer_state_dict.state[0]``
``ds_version``         in ``optimizer_state.pt``          absent (stage 1-2 asserts on it)
=====================  =================================  ====================================

So a change of stage between 1-2 and 3 failed inside DeepSpeed's loader (an assertion without
a message, or a ``KeyError``). :func:`to_universal` converts, then rewrites the differing parts
into the loading stage's form. ZeRO-0 has no ZeRO partitions to convert (the caller refuses a
change between stage 0 and a ZeRO stage, ``checkpoint.compat``). The Adam step count is made a
tensor whatever optimizer wrote it (:func:`_as_step`), so that a checkpoint of an offloaded run
(DeepSpeed's CPU Adam) loads into torch's AdamW at another layout.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
from pathlib import Path
from typing import Any

import torch

TAG = "deepspeed"
MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
HP_KEYS = ("fp32", "exp_avg", "exp_avg_sq")


def rank0_model_states(directory: Path) -> Path:
    """Rank 0's DeepSpeed module-state file (ZeRO-3 writes one per rank, under another name).
    Raises ``FileNotFoundError`` when ``directory/deepspeed/`` has none."""
    for name in MODEL_STATES:
        if (directory / TAG / name).is_file():
            return directory / TAG / name
    raise FileNotFoundError(f"{directory}: no DeepSpeed module state in {TAG}/")


def to_universal(directory: Path, scratch: Path, *, stage3: bool, shapes: dict[str, Any]) -> None:
    """Convert checkpoint folder ``directory`` into a universal checkpoint in ``scratch`` that a
    ZeRO-3 (``stage3``) or stage 1-2 engine loads. ``shapes``: the full shape of every
    parameter by name (the flat stage-3 tensors are reshaped to them for stages 1-2). Rank 0
    only; DeepSpeed's converter runs in this process, its output silenced."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    args = argparse.Namespace(
        input_folder=str(directory / TAG),
        output_folder=str(scratch / TAG),
        num_extract_workers=1,  # in-process: no worker pool on a training rank
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=False,
    )
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        ds_to_universal(args)
    folder = scratch / TAG
    wanted = folder / MODEL_STATES[1 if stage3 else 0]
    if not wanted.is_file():
        shutil.copy2(rank0_model_states(scratch), wanted)
    _adapt_optimizer_state(folder / "zero", stage3=stage3, shapes=shapes)


def _as_step(step: Any) -> torch.Tensor:
    """Adam's step count as torch's AdamW keeps it (a float scalar tensor); DeepSpeed's CPU
    Adam keeps an int, which torch's AdamW refuses ("`state_steps` argument must contain a
    list of singleton tensors") and CPU Adam takes either way."""
    return step if torch.is_tensor(step) else torch.tensor(float(step))


def _adapt_optimizer_state(zero: Path, *, stage3: bool, shapes: dict[str, Any]) -> None:
    from deepspeed import __version__
    from deepspeed.checkpoint.constants import (
        CAT_DIM,
        DS_VERSION,
        OPTIMIZER_STATE_DICT,
        PARAM,
        PARAM_GROUPS,
    )

    path = zero / "optimizer_state.pt"
    common = torch.load(path, weights_only=False)
    written_by_stage3 = OPTIMIZER_STATE_DICT in common
    if written_by_stage3:
        states = common[OPTIMIZER_STATE_DICT]["state"]
        for state in states.values():
            state["step"] = _as_step(state["step"])
        step = states[0]["step"]  # all sub-groups step together
    else:
        files = sorted(zero.glob("*/step.pt"))
        for file in files:
            torch.save(_as_step(torch.load(file, weights_only=False)), file)
        step = torch.load(files[0], weights_only=False)
    if stage3 and not written_by_stage3:
        # Stage 3 reads one step count and the param groups from the common state.
        common[OPTIMIZER_STATE_DICT] = {
            "state": {0: {"step": step}},
            PARAM_GROUPS: common[PARAM_GROUPS],
        }
    elif not stage3 and written_by_stage3:
        common.setdefault(DS_VERSION, __version__)  # converted by this version just now
        for name, shape in shapes.items():
            for key in HP_KEYS:
                file = zero / name / f"{key}.pt"
                flat = torch.load(file, weights_only=False)
                torch.save({PARAM: flat.view(shape), CAT_DIM: 0}, file)
            torch.save(step, zero / name / "step.pt")
    torch.save(common, path)
