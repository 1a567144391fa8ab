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


@pytest.mark.parametrize(
    ("value", "text"), [(float("nan"), "nan"), (float("inf"), "inf"), (None, "n/a")]
)
def test_a_bad_value_reads_nan_and_a_missing_one_n_a(value, text) -> None:
    """A bad step's loss, and a window whose steps were all skipped: was ``loss None``."""
    assert console_format("loss", value) == text


def _sink(tmp_path, monkeypatch):  # noqa: ANN202
    from omnimoe_train.config import WandbConfig
    from omnimoe_train.metrics import MetricsSink

    monkeypatch.setenv("COLUMNS", "80")  # a log file's width: what rich wraps at
    sink = MetricsSink(
        tmp_path, WandbConfig(mode="disabled"), {}, enabled=True, max_steps=10, progress=False
    )
    return sink


def test_step_lines_of_bad_steps_and_skipped_windows(tmp_path, monkeypatch, capsys) -> None:
    import json

    sink = _sink(tmp_path, monkeypatch)
    sink.log({"step": 3, "bad_step": "nonfinite_loss", "skipped": True, "loss": float("nan")})
    sink.log({"step": 3, "loss": None, "lr": 1e-3})
    sink.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2, lines
    assert lines[0].endswith("  loss nan") and "  loss n/a  " in lines[1], lines
    assert not any("None" in line for line in lines)
    logged = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in logged] == [None, None]  # JSON has no NaN


def test_notices_stay_on_one_line(tmp_path, monkeypatch, capsys) -> None:
    """rich's ``console.log`` wrapped a notice (a sharding note, a resume warning) at 80
    columns; a step line with many metrics stays one line too."""
    sink = _sink(tmp_path, monkeypatch)
    notice = "expert tables: " + " ".join(f"word{i}" for i in range(40)) + " [rows] /a/b[1]"
    sink.console.log(notice)
    sink.log({"step": 1, **{f"metric_{i}": float(i) for i in range(20)}})
    sink.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2, lines
    assert lines[0].endswith(notice) and len(lines[0]) > 80, lines
    assert lines[1].endswith("metric_19 19"), lines
