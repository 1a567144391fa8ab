"""``omnimoe-train`` held at a FIFO at one point of a run, for the stop-signal tests.

    python -m tests.checkpoint.held_cli WHERE FIFO [omnimoe-train overrides...]

``FIFO`` may hold ``{rank}``: the worker's ``$RANK`` (0 without one).

``WHERE``: ``setup`` (in the trainer's setup, after its stop handler is installed: where the
data is prepared), ``preparing`` (in the data preparation, between two blocks being encoded:
blocks of 16 kB instead of 8 MiB, so a small corpus makes several; it holds before the second
block's result is handed on, the first one's shards written, the pool's workers alive with
blocks left to encode) or ``after_fit`` (once ``Trainer.fit`` has returned, before the run
writes its summary). There the process opens ``FIFO`` and reads it to the end: it waits until
the test opens the writing end (which tells the test it is there) and again until the test
closes it, so a signal sent in between arrives at that point. Every other part of the run is
real.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any


def main() -> None:
    from omnimoe_train.run import quiet_libraries

    quiet_libraries()
    from omnimoe_train import trainer, training_setup

    where = sys.argv[1]
    fifo = sys.argv[2].format(rank=os.environ.get("RANK", "0"))  # one each under torchrun

    def hold() -> None:
        with open(fifo, "rb") as pipe:
            pipe.read()

    if where == "setup":
        real_prepare = training_setup.prepare_data

        @functools.wraps(real_prepare)
        def prepare_data(*args: Any, **kwargs: Any) -> Any:
            hold()
            return real_prepare(*args, **kwargs)

        training_setup.prepare_data = prepare_data
    elif where == "preparing":
        from omnimoe_data import prepare as preparation
        from omnimoe_train import data

        data.DEFAULT_BLOCK_BYTES = 16_000
        real_map = preparation.ordered_map

        def ordered_map(fn: Any, tasks: list, workers: int) -> Any:
            for index, result in enumerate(real_map(fn, tasks, workers)):
                if index == 1 and fn.__name__ == "encode_block":
                    hold()
                yield result

        preparation.ordered_map = ordered_map
    elif where == "after_fit":
        real_fit = trainer.Trainer.fit

        @functools.wraps(real_fit)
        def fit(self: Any, sink: Any) -> Any:
            summary = real_fit(self, sink)
            hold()
            return summary

        trainer.Trainer.fit = fit  # type: ignore[method-assign]
    else:
        raise SystemExit(f"held_cli: WHERE must be setup, preparing or after_fit (got {where!r})")
    sys.argv = ["omnimoe-train", *sys.argv[3:]]
    from omnimoe_train.cli import main as train

    train()


if __name__ == "__main__":
    main()
