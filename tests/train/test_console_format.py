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
