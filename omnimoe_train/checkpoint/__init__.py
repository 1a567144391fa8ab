"""Checkpoints and fault tolerance, written once for every engine.

- ``files``: the on-disk layout of one checkpoint folder (``meta.json`` with a checksum per
  file, written last), listing and verifying them.
- ``atomic``: JSON files written whole or not at all (``meta.json``, the run's
  ``exit_status.json``), without torch.
- ``manager``: when a checkpoint becomes the newest (atomic publish), which are kept, which one
  a run resumes from (falling back past corrupt ones), synchronous and asynchronous saves.
- ``sharded``: the megatron-core engine's state as a ``dist_checkpointing`` sharded state dict
  (reshardable across TP/PP/EP/DP and both expert-table sharding modes).
- ``session``: what the loop saves besides the engine's state, and loading it back.
- ``compat``: whether a checkpoint fits the run about to resume from it (``meta.json`` only).
- ``resume``: the checkpoint a run continues from, checked before data or model work.
- ``signals``: SIGTERM/SIGUSR1 and ``trainer.max_time`` -> every rank stops at the same step.
- ``cli``: ``omnimoe-ckpt inspect`` / ``consolidate``.

Exit codes are in :mod:`omnimoe_train.exit_codes`. This ``__init__`` imports nothing heavy so
that config validation can use :func:`signals.parse_duration` before any torch work.
"""
