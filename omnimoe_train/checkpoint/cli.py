"""``omnimoe-ckpt``: look into checkpoints and turn one into a single-process weights file.

    omnimoe-ckpt inspect PATH [--json]     PATH: a checkpoint folder, a folder of them or a run dir
    omnimoe-ckpt consolidate PATH OUT      full model weights of any layout -> one torch file

``inspect`` verifies every file's size and SHA-256 against ``meta.json`` and reports step,
tokens, the layout that wrote it and tensor sizes (read from the ``dist_checkpointing``
metadata, no tensor data loaded; a DeepSpeed checkpoint's from rank 0's module-state file,
memory-mapped, ``engine.deepspeed_checkpoint.tensor_sizes``). Exit 0 if valid, 2 (one line
naming the bad file) if not. For a folder of checkpoints: exit 0 if any is valid (a resume
falls back past invalid newer ones; a last line names the one it would take), 2 if none is.

``consolidate`` builds the model on one process (CPU, fp32, no parallelism) and loads the
checkpoint into it through the same resharding load as a resumed run, then writes
``{"model": state_dict, "step", "vocab_size", "config"}`` with ``torch.save`` (under a
temporary name, renamed when complete). The keys are those of a single-process ``GPTModel``
built from the same config (``model.gpt.build_model``), so ``load_state_dict`` takes them as is.
A DeepSpeed engine's checkpoint is merged by DeepSpeed's own ``zero_to_fp32`` from its ZeRO
partitions instead (``engine.deepspeed_checkpoint.consolidate``; the same keys, fp32).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, NoReturn

from omnimoe_data.shards import file_in_the_way
from omnimoe_train.checkpoint.files import (
    CheckpointCorrupt,
    find_problem,
    list_checkpoints,
    read_meta,
    step_of,
)
from omnimoe_train.exit_codes import EXIT_USAGE, exit_usage, quiet_broken_pipe

CONSOLIDATED_FORMAT = "omnimoe-consolidated/1"


def _fail(message: str) -> NoReturn:
    exit_usage("omnimoe-ckpt", message)


# Model-state tensors that are not parameters: the router's BatchNorm running statistics.
BUFFER_SUFFIXES = ("running_mean", "running_var")


def tensor_sizes(folder: Path) -> dict[str, Any]:
    """Counts and sizes of the stored tensors, from the metadata alone: parameters, buffers
    (``BUFFER_SUFFIXES``) and optimizer state."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = FileSystemReader(str(folder)).read_metadata()
    model = optimizer = buffers = 0
    model_tensors = optimizer_tensors = 0
    for key, entry in metadata.state_dict_metadata.items():
        if not isinstance(entry, TensorStorageMetadata):
            continue
        numel = 1
        for dim in entry.size:
            numel *= dim
        if key.startswith("optimizer."):
            optimizer, optimizer_tensors = optimizer + numel, optimizer_tensors + 1
        elif key.endswith(BUFFER_SUFFIXES):
            buffers += numel
        else:
            model, model_tensors = model + numel, model_tensors + 1
    return {
        "model_parameters": model,
        "model_tensors": model_tensors,
        "model_buffer_values": buffers,
        "optimizer_elements": optimizer,
        "optimizer_tensors": optimizer_tensors,
    }


def describe(folder: Path) -> dict[str, Any]:
    """Everything ``inspect`` reports about one checkpoint folder."""
    problem = find_problem(folder)
    report: dict[str, Any] = {"path": str(folder), "valid": problem is None, "problem": problem}
    try:
        meta = read_meta(folder)
    except CheckpointCorrupt:
        return report
    files = meta.get("files", {})
    report.update(
        step=meta.get("step"),
        consumed_tokens=meta.get("consumed_tokens"),
        engine=meta.get("engine"),
        layout=meta.get("layout"),
        vocab_size=meta.get("vocab_size"),
        files=len(files),
        bytes=sum(entry["bytes"] for entry in files.values()),
    )
    if problem is None and meta.get("engine") == "megatron":
        report.update(tensor_sizes(folder))
    elif problem is None and meta.get("engine") == "deepspeed":
        from omnimoe_train.engine import deepspeed_checkpoint

        report.update(deepspeed_checkpoint.tensor_sizes(folder, BUFFER_SUFFIXES))
    return report


def _summary_line(report: dict[str, Any]) -> str:
    name = Path(report["path"]).name
    if not report["valid"]:
        return f"{name}: INVALID: {report['problem']}"
    layout = report.get("layout") or {}
    shape = ", ".join(f"{k} {v}" for k, v in layout.items() if k != "world_size")
    lines = [
        f"{name}: valid ({report['files']} files, {report['bytes'] / 2**20:.2f} MiB, "
        "sizes and SHA-256 verified)",
        f"  step {report['step']}, {report['consumed_tokens'] or 0:,} tokens, engine "
        f"{report['engine']}, written by world {layout.get('world_size')} ({shape})",
    ]
    if "model_parameters" in report:
        # A DeepSpeed checkpoint's optimizer state (its own files, ZeRO partitions) is not counted.
        optimizer = (
            f"optimizer: {report['optimizer_elements']:,} values in "
            f"{report['optimizer_tensors']} tensors"
            if "optimizer_elements" in report
            else "optimizer: not counted (DeepSpeed's files)"
        )
        lines.append(
            f"  model: {report['model_parameters']:,} parameters in {report['model_tensors']} "
            f"tensors (+ {report['model_buffer_values']:,} BatchNorm statistics); {optimizer}; "
            f"vocab {report['vocab_size']}"
        )
    return "\n".join(lines)


def _is_checkpoint(path: Path) -> bool:
    return step_of(path) is not None or (path / "meta.json").exists()


def _checkpoints_in(path: Path) -> list[Path]:
    """The checkpoints of a folder of them, or of a run directory (its ``checkpoints/``, the
    default ``checkpoint.dir``: the folder a user has at hand after a run)."""
    return list_checkpoints(path) or list_checkpoints(path / "checkpoints")


def inspect(path: Path, as_json: bool) -> int:
    if not path.exists():  # not "meta.json is missing (the save did not finish)"
        _fail(f"{path}: no such checkpoint folder")
    one = _is_checkpoint(path)
    folders = [path] if one else _checkpoints_in(path)
    if not folders:
        _fail(
            f"{path}: not a checkpoint folder and holds no step_<8 digits> folders "
            "(nor does its checkpoints/)"
        )
    reports = [describe(folder) for folder in folders]
    if as_json:
        print(json.dumps(reports if len(reports) > 1 else reports[0], indent=2))
    else:
        for report in reports:
            print(_summary_line(report))
    if not any(r["valid"] for r in reports):
        bad = reports[-1]
        print(f"omnimoe-ckpt: error: {bad['path']}: {bad['problem']}", file=sys.stderr)
        return EXIT_USAGE
    if not one and not as_json:
        print(_resume_line(reports))
    return 0


def _resume_line(reports: list[dict[str, Any]]) -> str:
    """Which checkpoint of a folder a resume takes (``checkpoint.resume=auto`` or the folder):
    the newest valid one, past invalid newer ones (exit 0: a resume falls back to it)."""
    last = max(i for i, r in enumerate(reports) if r["valid"])  # reports: oldest first
    newer = [Path(r["path"]).name for r in reports[last + 1 :]]
    line = f"resume: continues from {Path(reports[last]['path']).name}"
    if newer:
        line += f", the newest valid one (the invalid {', '.join(newer)} skipped)"
    return line


def consolidate(path: Path, out: Path) -> None:
    """Load ``path`` (any layout) on one process and write the full model weights to ``out``."""
    if not path.is_dir():
        _fail(f"{path}: no such checkpoint folder")
    if not _is_checkpoint(path):
        # A run directory or a folder of checkpoints: which one is meant is the user's choice.
        found = _checkpoints_in(path)
        hint = f"; give one checkpoint, e.g. the newest: {found[-1]}" if found else ""
        _fail(f"{path}: not a checkpoint folder (no meta.json){hint}")
    # OUT is checked before the (costly) load, so that a bad OUT costs one line, not a
    # traceback after the work, with the temporary file left behind.
    if out.is_dir():
        _fail(f"{out}: is a folder; give the file to write, e.g. {out / 'model.pt'}")
    blocker = file_in_the_way(out.parent)
    if blocker is not None:
        _fail(f"{out}: {blocker} is not a folder")
    if path.resolve() in out.resolve().parents:  # meta.json given as OUT was overwritten
        _fail(f"{out}: inside the checkpoint {path}; write the weights outside it")
    _check_writable(out)
    problem = find_problem(path)
    if problem is not None:
        _fail(f"{path}: {problem}")
    meta = read_meta(path)
    if "config" not in meta:
        _fail(f"{path}: meta.json has no run config to build the model from")
    if meta.get("engine") not in ("megatron", "deepspeed"):
        _fail(f"{path}: written by engine {meta.get('engine')!r}; not megatron or deepspeed")
    import torch
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from omnimoe_train.config import RootConfig

    try:  # a config of another version (a key since renamed) or a hand-edited one
        saved = OmegaConf.merge(OmegaConf.structured(RootConfig), meta["config"])
        OmegaConf.to_object(saved)
    except (OmegaConfBaseException, ValueError) as exc:
        line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        _fail(f"{path}: meta.json's run config does not fit this version: {line}")
    if meta["engine"] == "deepspeed":
        state = _consolidate_deepspeed(path)
    else:
        state = _consolidate_megatron(path, saved, meta)
    payload = {
        "format": CONSOLIDATED_FORMAT,
        "step": meta["step"],
        "vocab_size": meta["vocab_size"],
        "config": OmegaConf.to_container(saved.model, resolve=True),
        "model": state,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    try:
        torch.save(payload, tmp)
        tmp.replace(out)
    except (OSError, RuntimeError) as exc:  # a full disk, no permission (torch: RuntimeError)
        tmp.unlink(missing_ok=True)  # nothing half-written stays
        reason = exc.strerror if isinstance(exc, OSError) else str(exc).strip().splitlines()[-1]
        _fail(f"{out}: cannot write ({reason or exc})")
    numel = sum(t.numel() for t in state.values())
    print(f"{out}: {len(state)} tensors, {numel:,} values, step {meta['step']}")


def _check_writable(out: Path) -> None:
    """``out`` can be written where it goes: a file made (and removed) in its folder, or in the
    nearest folder above it that exists (``os.access`` says yes to root under /proc)."""
    existing = next(p for p in (out.parent, *out.parent.parents) if p.exists())
    try:
        fd, probe = tempfile.mkstemp(prefix=".omnimoe-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        _fail(f"{out}: cannot write there ({exc.strerror or exc} in {existing})")


def _consolidate_megatron(path: Path, saved: Any, meta: dict[str, Any]) -> dict[str, Any]:
    """Build the model on one process (CPU, fp32) and load the sharded checkpoint into it."""
    import torch
    from omegaconf import OmegaConf

    from omnimoe_train.config import RootConfig
    from omnimoe_train.distributed import init_runtime, shutdown_runtime
    from omnimoe_train.engine.megatron import MegatronEngine

    single = {"tp": 1, "pp": 1, "vpp": None, "ep": 1, "sequence_parallel": False}
    saved.parallel = OmegaConf.merge(saved.parallel, {**single, "distributed_optimizer": False})
    saved.trainer.device, saved.trainer.precision = "cpu", "fp32"
    saved.trainer.engine = "megatron"
    cfg: RootConfig = OmegaConf.to_object(saved)  # type: ignore[assignment]
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ[key] = "0" if key != "WORLD_SIZE" else "1"
    runtime = init_runtime(cfg)
    try:
        engine = MegatronEngine(cfg, runtime, meta["vocab_size"])
        engine.load_checkpoint(path, model_only=True)
        return {
            k: v.detach().clone()
            for k, v in engine.model[0].module.state_dict().items()
            if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")
        }
    finally:
        shutdown_runtime()


def _consolidate_deepspeed(path: Path) -> dict[str, Any]:
    """DeepSpeed's ``zero_to_fp32`` on the ZeRO partitions (no model is built)."""
    from omnimoe_train.engine.deepspeed_checkpoint import consolidate as deepspeed_weights

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return deepspeed_weights(path)


def main(argv: list[str] | None = None) -> None:
    from omnimoe_train.run import quiet_libraries

    quiet_libraries()  # before torch and megatron are imported
    parser = argparse.ArgumentParser(prog="omnimoe-ckpt", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_inspect = sub.add_parser("inspect", help="verify and describe checkpoints")
    p_inspect.add_argument("path", type=Path)
    p_inspect.add_argument("--json", action="store_true", help="machine-readable output")
    p_cons = sub.add_parser("consolidate", help="full model weights of any layout -> one file")
    p_cons.add_argument("path", type=Path)
    p_cons.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    if args.command == "inspect":
        with quiet_broken_pipe():  # omnimoe-ckpt inspect ... | head
            code = inspect(args.path, args.json)
        sys.exit(code)
    consolidate(args.path, args.out)


if __name__ == "__main__":
    main()
