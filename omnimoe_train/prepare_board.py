"""Rank 0 prepares the data while the other ranks wait for it, through the process group's
key-value store (``omnimoe_train.data.prepare_data``).

Why not a collective, as before (``broadcast_object_list``): a waiting rank sat in it for the
whole preparation, and a collective waits at most the process group's timeout (10 minutes,
``distributed.init_runtime``). A longer preparation (a large corpus) made every other rank fail
(gloo: a timed-out receive; NCCL: the watchdog's abort); and blocked in C++, a waiting rank
could not pass a stop signal on. Here a waiting rank polls the store a few times a second, on
the host: for rank 0's outcome, for rank 0's heartbeat (a thread of rank 0 beats every
second; silent as long as that timeout, rank 0 is taken for gone), and it posts its own stop
request, which rank 0 reads between two units of preparation work. Rank 0 returns once every
rank has read its outcome: a rank 0 that exits at once (a data error, a stop) would take the
store with it where it hosts it (unless an agent does, as torchrun's), and a rank that had not
read the outcome yet failed on the lost connection.

Keys are ``omnimoe/prepare/<round>/...``: every rank counts its preparations alike (the jobs of
a ``-m`` sweep reuse one process group, hence one store).
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch.distributed as dist

POLL_S = 0.25  # a waiting rank's store requests: 2 per poll
BEAT_S = 1.0
SILENCE_S = 600.0  # as long as a collective waits (init_runtime's process-group timeout)
READ_S = 60.0  # rank 0 waits at most this long for the others to read its outcome

_rounds = itertools.count()


class RankZeroSilent(RuntimeError):
    """Rank 0 neither answered nor beat for :data:`SILENCE_S` (killed, or its host is gone)."""


class PrepareBoard:
    """One preparation's keys in ``store``: rank 0's outcome, its heartbeat, stop requests."""

    def __init__(self, store: Any, readers: int) -> None:
        prefix = f"omnimoe/prepare/{next(_rounds)}/"
        self.store, self.readers = store, readers  # readers: the ranks that wait (world - 1)
        self.outcome_key, self.stop_key, self.beat_key, self.read_key = (
            prefix + name for name in ("outcome", "stop", "beat", "read")
        )
        self.stop_posted = False  # rank 0: a waiting rank asked to stop (seen by the beat)

    @staticmethod
    def open() -> PrepareBoard | None:
        """The board of the next preparation (collective in that every rank must call it, in
        the same order); None without other ranks."""
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return None
        store = dist.distributed_c10d._get_default_store()
        return PrepareBoard(store, dist.get_world_size() - 1)

    # -- rank 0 --------------------------------------------------------------------------------
    @contextmanager
    def beating(self) -> Iterator[None]:
        """While rank 0 prepares: a thread beats every :data:`BEAT_S` and reads the stop
        requests into :attr:`stop_posted` (the main thread never waits on the store)."""
        done = threading.Event()

        def beat() -> None:
            try:
                while True:
                    self.store.add(self.beat_key, 1)
                    if not self.stop_posted and self.store.check([self.stop_key]):
                        self.stop_posted = True
                    if done.wait(BEAT_S):
                        return
            except Exception:  # noqa: BLE001 - the store is gone: the waiting ranks will say it
                return

        thread = threading.Thread(target=beat, name="omnimoe-prepare-beat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()

    def post(self, outcome: dict[str, Any]) -> None:
        """Rank 0's outcome, for the waiting ranks (JSON: error, location, stopped, crash);
        returns once they have all read it (at most :data:`READ_S`: a rank that is gone)."""
        self.store.set(self.outcome_key, json.dumps(outcome))
        deadline = time.monotonic() + READ_S
        while int(self.store.add(self.read_key, 0)) < self.readers:
            if time.monotonic() > deadline:
                return
            time.sleep(POLL_S / 5)

    # -- the other ranks -------------------------------------------------------------------------
    def wait(self, stop_requested: Callable[[], bool]) -> dict[str, Any]:
        """Rank 0's outcome, once posted. Posts this rank's stop request (once, when
        ``stop_requested()`` turns true). Raises :class:`RankZeroSilent` after
        :data:`SILENCE_S` without a beat."""
        beats, heard = -1, time.monotonic()
        posted = False
        while not self.store.check([self.outcome_key]):
            if not posted and stop_requested():
                self.store.set(self.stop_key, "1")
                posted = True
            count = int(self.store.add(self.beat_key, 0))
            now = time.monotonic()
            if count != beats:
                beats, heard = count, now
            elif now - heard > SILENCE_S:
                raise RankZeroSilent(
                    f"rank 0 has not answered for {SILENCE_S:.0f} s while it prepared the "
                    f"data (ended, or its host is gone: see its output)"
                )
            time.sleep(POLL_S)
        outcome = json.loads(self.store.get(self.outcome_key))
        self.store.add(self.read_key, 1)
        return outcome
