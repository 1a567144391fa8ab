"""The warmup-stable-decay schedule's shape: ``lr_schedule`` (the phase lengths) and the
scheduler ``engine.optim.wsd_scheduler`` builds from them, stepped as the engines step it,
against the schedule written out here: linear warmup from 0, the peak LR until the decay
starts, then the decay style down to ``lr * min_lr_ratio``, and that floor afterwards."""

from __future__ import annotations

import math

import pytest
import torch

from omnimoe_train.config import OptimConfig
from omnimoe_train.engine.optim import wsd_scheduler
from omnimoe_train.lr_schedule import wsd_decay_start, wsd_decay_steps

# lr 0.5, floor 0.05 (with lr 1.0 a floor of min_lr_ratio alone would pass): warmup over
# steps 1-4, stable 4-15, decay 15-20 (the last 25%).
LR, FLOOR, WARMUP, MAX_STEPS, FRACTION = 0.5, 0.05, 4, 20, 0.25


def _expected(step: int, style: str) -> float:
    """The LR after ``step`` optimizer steps, written from the schedule's definition."""
    if step <= WARMUP:
        return LR * step / WARMUP
    decay_start, decay_steps = 15, 5
    if step <= decay_start:
        return LR
    if step >= MAX_STEPS:
        return FLOOR
    ratio = (step - decay_start) / decay_steps
    coeff = {
        "linear": 1 - ratio,
        "cosine": 0.5 * (1 + math.cos(math.pi * ratio)),
        "sqrt": 1 - math.sqrt(ratio),
    }[style]
    return FLOOR + coeff * (LR - FLOOR)


def _lrs(style: str, steps: int, weight_decay: float = 0.1) -> tuple[list[float], list[float]]:
    """(lr, weight decay) of the param group before step 1 and after each of ``steps`` steps."""
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([param], lr=123.0)  # the scheduler overwrites it at once
    o = OptimConfig(
        lr=LR,
        min_lr_ratio=FLOOR / LR,
        warmup_steps=WARMUP,
        decay_fraction=FRACTION,
        decay_style=style,
        weight_decay=weight_decay,
    )
    scheduler = wsd_scheduler(optimizer, o, MAX_STEPS)
    lrs, wds = [optimizer.param_groups[0]["lr"]], [optimizer.param_groups[0]["weight_decay"]]
    for _ in range(steps):
        scheduler.step(increment=1)
        lrs.append(optimizer.param_groups[0]["lr"])
        wds.append(optimizer.param_groups[0]["weight_decay"])
    return lrs, wds


def test_phase_lengths() -> None:
    assert wsd_decay_steps(FRACTION, MAX_STEPS) == 5
    assert wsd_decay_start(FRACTION, MAX_STEPS) == 15
    assert wsd_decay_steps(0.27, 10) == 2  # 2.7 steps: the fraction rounds down
    assert wsd_decay_start(0.27, 10) == 8
    assert wsd_decay_steps(0.0, 100) == 1  # at least one decay step
    assert wsd_decay_start(0.0, 100) == 99
    assert wsd_decay_steps(1.0, 7) == 7  # all decay: it starts at step 0
    assert wsd_decay_start(1.0, 7) == 0


@pytest.mark.parametrize("style", ["linear", "cosine", "sqrt"])
def test_schedule_shape(style: str) -> None:
    lrs, wds = _lrs(style, MAX_STEPS + 3)
    for step, lr in enumerate(lrs):
        assert lr == pytest.approx(_expected(step, style), abs=1e-12), (style, step)
    # The boundaries by name: warmup starts at 0 and reaches the peak at its last step, the
    # peak holds to the decay's start, the decay ends on the floor and stays there.
    assert lrs[0] == 0.0
    assert lrs[WARMUP - 1] < LR and lrs[WARMUP] == pytest.approx(LR)
    assert all(lr == pytest.approx(LR) for lr in lrs[WARMUP : 15 + 1])
    assert lrs[16] < LR
    assert all(a > b for a, b in zip(lrs[15:MAX_STEPS], lrs[16 : MAX_STEPS + 1], strict=True))
    assert lrs[MAX_STEPS:] == pytest.approx([FLOOR] * 4)
    assert wds == pytest.approx([0.1] * len(wds))  # weight decay constant throughout


def test_decay_styles_differ_mid_decay() -> None:
    """At step 18, 3/5 of the way through the decay, linear, cosine and sqrt each give their
    own value: a style mapped to another's megatron name fails here."""
    mid = {style: _lrs(style, 18)[0][18] for style in ("linear", "cosine", "sqrt")}
    assert mid["linear"] == pytest.approx(FLOOR + 0.4 * (LR - FLOOR))
    assert mid["cosine"] == pytest.approx(
        FLOOR + 0.5 * (1 + math.cos(0.6 * math.pi)) * (LR - FLOOR)
    )
    assert mid["sqrt"] == pytest.approx(FLOOR + (1 - math.sqrt(0.6)) * (LR - FLOOR))
    assert len({round(v, 9) for v in mid.values()}) == 3


def test_no_warmup_starts_at_the_peak() -> None:
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.0)
    o = OptimConfig(lr=0.5, min_lr_ratio=0.2, warmup_steps=0, decay_fraction=0.5)
    scheduler = wsd_scheduler(optimizer, o, 10)
    lrs = [optimizer.param_groups[0]["lr"]]
    for _ in range(10):
        scheduler.step(increment=1)
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs[:6] == pytest.approx([0.5] * 6)
    assert lrs[6:] == pytest.approx([0.1 + (1 - i / 5) * 0.4 for i in range(1, 6)])
