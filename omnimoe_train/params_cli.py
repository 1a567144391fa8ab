"""``omnimoe-params``: parameters and training FLOPs of the model a config describes.

Takes the same Hydra overrides as ``omnimoe-train`` (``omnimoe-params model=a1_7b model.mlp=peer``),
validates them the same way (one line, exit 2), except for the rules about this machine and about
how the global batch splits over the data-parallel ranks, builds the model on the meta device
(nothing is allocated; ``model.accounting``) and prints a table per component, then, as its last
line, one JSON object with ``total_params``, ``active_params`` and ``flops_per_token``.

The vocabulary is ``model.vocab_size`` (the paper scales set the paper's 128,256), else the size
of the tokenizer a run would train (``data.vocab_size``), padded as the trainer pads it.
"""

from __future__ import annotations

import json
import math
import sys
from typing import NoReturn

from rich.console import Console
from rich.table import Table

from omnimoe_train.config import RootConfig, register_configs
from omnimoe_train.exit_codes import exit_usage

USAGE = """\
usage: omnimoe-params [key=value ...]

Parameters and training FLOPs of the model a config describes: the same Hydra overrides as
omnimoe-train (e.g. omnimoe-params model=a1_7b model.mlp=peer), checked the same way (one line,
exit 2), except for the rules about this machine and about the global batch's split over the
data-parallel ranks. Prints a table per component, then one JSON line with total_params,
active_params and flops_per_token. Nothing is allocated (the model is built on the meta device).
"""


def _fail(message: str) -> NoReturn:
    exit_usage("omnimoe-params", message)


def compose(overrides: list[str]) -> RootConfig:
    """The validated config ``omnimoe-train`` would run with these overrides (exit 2 if bad)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    from omnimoe_train.cli import to_root_config
    from omnimoe_train.compose_errors import CONFIG_MODULE, compose_error
    from omnimoe_train.validation import ConfigError, validate, world_size_from_env

    if any(a in ("-h", "--help") for a in overrides):
        # What a new user types first: the usage, exit 0 (any other option is an error below).
        print(USAGE, end="")
        sys.exit(0)
    if any(a.startswith("-") for a in overrides):
        _fail("takes Hydra overrides only (key=value ...), no options or multirun")
    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            cfg = to_root_config(hydra_compose(config_name="config", overrides=overrides))
        p = cfg.parallel
        # Without a launcher, check the layout rules against the smallest world that fits it.
        minimal_world = p.pp * math.lcm(p.tp, p.ep)
        # The config may be meant for another machine: its GPU and packages are not checked.
        # Nor is how the global batch splits over that guessed world's data-parallel ranks:
        # counting parameters needs no batch, and the real world size is the launcher's.
        validate(
            cfg,
            world_size=max(world_size_from_env(), minimal_world),
            this_machine=False,
            batch_rules=False,
        )
    except ConfigError as exc:
        _fail(str(exc))
    except Exception as exc:  # noqa: BLE001 - Hydra/OmegaConf composition errors
        _fail(compose_error(exc, sweeps=False))
    return cfg


def _fmt(value: float) -> str:
    if value >= 1e9:
        return f"{value / 1e9:,.3f}B"
    if value >= 1e6:
        return f"{value / 1e6:,.2f}M"
    return f"{value:,.0f}"


def report_table(acc, title: str) -> Table:  # noqa: ANN001 - model.accounting.Accounting
    table = Table(title=title)
    for name in ("component", "total params", "active params", "training GFLOP/token"):
        table.add_column(name, justify="left" if name == "component" else "right")
    for c in acc.components:
        table.add_row(c.name, _fmt(c.total), _fmt(c.active), f"{6 * c.macs / 1e9:.3f}")
    table.add_row(
        "attention scores", "", "", f"{acc.attention_flops_per_token / 1e9:.3f}", end_section=True
    )
    table.add_row(
        "total",
        _fmt(acc.total_params),
        _fmt(acc.active_params) + " (without embeddings)",
        f"{acc.flops_per_token / 1e9:.3f}",
    )
    return table


def main(argv: list[str] | None = None) -> None:
    from omnimoe_train.run import quiet_libraries

    quiet_libraries()
    register_configs()
    cfg = compose(list(sys.argv[1:] if argv is None else argv))
    from omnimoe_train.model.accounting import model_accounting
    from omnimoe_train.model.gpt import padded_vocab_size

    m = cfg.model
    vocab = padded_vocab_size(m.vocab_size or cfg.data.vocab_size, cfg.parallel.tp)
    acc = model_accounting(m, seq_len=cfg.data.seq_len, vocab_size=vocab)
    title = f"{m.name} ({m.mlp}), vocabulary {vocab:,}, sequence {cfg.data.seq_len}"
    Console(width=110).print(report_table(acc, title))
    summary = {"model": m.name, "mlp": m.mlp, "vocab_size": vocab, **acc.summary()}
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
