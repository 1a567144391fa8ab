"""The console's per-step line formats each metric in one stable shape."""

from __future__ import annotations

import pytest

from omnimoe_train.metrics import console_format


@pytest.mark.parametrize(
    ("key", "value", "text"),
    [
        ("lr", 0.002, "2.00e-03"),  # warm-up peak and decay keep one shape
        ("lr", 2.0e-4, "2.00e-04"),
        ("lr", 0.0, "0.00e+00"),
        ("tokens_per_s", 4483.2, "4,483"),
        ("loss", 7.96912, "7.969"),
        ("grad_norm", 5.0e-5, "5.00e-05"),
        ("step", 12, "12"),
    ],
)
def test_console_format(key, value, text) -> None:
    assert console_format(key, value) == text


@pytest.mark.parametrize(
    ("first", "last", "words"), [(8.0, 6.0, "(25.0% lower)"), (11.763, 11.870, "(0.9% higher)")]
)
def test_final_line_says_higher_when_the_loss_rose(first, last, words) -> None:
    """Was "val_loss 11.763 -> 11.870 (-0.9% lower)"."""
    from omnimoe_train.run import _report

    lines: list[str] = []

    class Sink:
        class console:  # noqa: N801 - stands in for rich's console object
            log = staticmethod(lines.append)

    _report(Sink, {"initial_val_loss": first, "final_val_loss": last, "wall_s": 3.0})
    assert lines == [f"val_loss {first:.3f} -> {last:.3f} {words} in 3s"]
