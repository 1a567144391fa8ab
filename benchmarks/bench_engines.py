"""Megatron engine vs DeepSpeed (ZeRO, CPU offload) on one GPU: model capacity and speed.

Two measurements (issue 16, item 5), each a series of short ``omnimoe-train`` runs in
subprocesses, one JSON line per run appended to ``OUT/engines.jsonl`` as soon as it ends (so a
command cut short by a time limit keeps what it finished), and a Markdown table at the end:

* ``capacity``: the largest OmniMoE model that trains. A ladder of models that grow the expert
  tables (``--experts``: N per layer; d = 2048, 24 layers, GQA 16/4 heads, shared SwiGLU 4096,
  K = 64) is climbed per engine until a run fails (out of GPU or host memory); each run trains
  ``--steps`` steps at micro-batch 1 x 1024 tokens (4 micro-batches per step).
* ``throughput``: ``model=a80m`` at the paper's batch (128 x 1024 tokens, micro-batch 16) for
  every engine, tokens/s after the first logged step.

Each record: engine, model overrides, total parameters (the run's ``summary.json``), exit code,
tokens/s (median of logged steps after the first), peak GPU memory (``peak_memory_gib`` of
``metrics.jsonl``: torch's allocator peak), peak host memory (RSS of the run's process tree,
sampled every 0.2 s; pinned offload buffers count), wall seconds, and the last error line.

Run on the GPU machine from the repository root after ``source benchmarks/device_env.sh``
(DeepSpeed and its pure-Python dependencies among the carried wheels; the first offload run
compiles DeepSpeed's CPU Adam, about a minute):

    python benchmarks/bench_engines.py throughput --out $OUT
    python benchmarks/bench_engines.py capacity --engines megatron --experts 36864,65536,102400
    python benchmarks/bench_engines.py capacity --engines zero2_offload,zero3_offload ...

``--dry-run`` prints the commands and the predicted parameter counts; ``--smoke`` runs a tiny
CPU version of either measurement (to check the script, not to measure).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ENGINES = {
    "megatron": ["trainer.engine=megatron"],
    "zero0": ["trainer.engine=deepspeed", "deepspeed=zero0"],
    "zero1": ["trainer.engine=deepspeed", "deepspeed=zero1"],
    "zero2": ["trainer.engine=deepspeed", "deepspeed=zero2"],
    "zero3": ["trainer.engine=deepspeed", "deepspeed=zero3"],
    "zero2_offload": ["trainer.engine=deepspeed", "deepspeed=zero2_offload"],
    "zero3_offload": ["trainer.engine=deepspeed", "deepspeed=zero3_offload"],
}
CAPACITY_SHAPE = {"layers": 24, "d": 2048, "heads": 16, "groups": 4, "ffn": 4096, "top_k": 64}
CAPACITY_EXPERTS = [36864, 65536, 102400, 147456]  # 192^2 .. 384^2
COMMON = [
    "logging=disabled",
    "trainer.progress=false",
    "trainer.log_interval=1",
    "trainer.eval_iters=1",
    "checkpoint.save_final=false",
]


def capacity_model(num_experts: int, shape: dict[str, int]) -> list[str]:
    return [
        "model.name=capacity",
        f"model.num_layers={shape['layers']}",
        f"model.hidden_size={shape['d']}",
        f"model.num_attention_heads={shape['heads']}",
        f"model.num_query_groups={shape['groups']}",
        f"model.ffn_hidden_size={shape['ffn']}",
        f"model.num_experts={num_experts}",
        f"model.top_k={shape['top_k']}",
    ]


def predicted_parameters(num_experts: int, shape: dict[str, int], vocab: int = 4096) -> int:
    """Analytic count: tables 2*N*d, attention, shared SwiGLU, router gates, norms; tied vocab."""
    d, heads, groups, ffn = shape["d"], shape["heads"], shape["groups"], shape["ffn"]
    head_dim = d // heads
    attention = d * (heads + 2 * groups) * head_dim + heads * head_dim * d
    per_layer = (
        attention + 3 * d * ffn + 2 * num_experts * d + 2 * int(num_experts**0.5) * d + 2 * d
    )
    return shape["layers"] * per_layer + vocab * d + d


class PeakRss:
    """Largest resident set of a process and its children, sampled in a thread."""

    def __init__(self, pid: int, every_s: float = 0.2) -> None:
        self.pid, self.every_s, self.peak = pid, every_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                root = psutil.Process(self.pid)
                procs = [root, *root.children(recursive=True)]
                self.peak = max(self.peak, sum(p.memory_info().rss for p in procs))
            except psutil.Error:
                pass
            self._stop.wait(self.every_s)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def run_one(name: str, overrides: list[str], work: Path, timeout_s: int) -> dict:
    run_dir = work / "runs" / f"{name}-{time.time_ns()}"
    # faulthandler: a run killed at the time limit first gets SIGABRT, which prints every
    # thread's Python stack into the log (where a slow exit or a hang sits).
    env = {**os.environ, "OMNIMOE_RUN_DIR": str(run_dir), "PYTHONUNBUFFERED": "1"}
    env["PYTHONFAULTHANDLER"] = "1"
    cmd = [sys.executable, "-m", "omnimoe_train.cli", *overrides]
    started = time.perf_counter()
    with open(work / "last_run.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        rss = PeakRss(proc.pid)
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            code = "timeout"
        exited = time.time()
        peak_rss = rss.stop()
    lines = (work / "last_run.log").read_text(errors="replace").strip().splitlines()
    errors = [ln for ln in lines if "Error" in ln or "error:" in ln]
    record: dict = {
        "engine": name,
        "overrides": overrides,
        "exit": code,
        "wall_s": round(time.perf_counter() - started, 1),
        "host_peak_gib": round(peak_rss / 2**30, 2),
        "error": (errors[-1] if errors else (lines[-1] if lines else ""))[:300] if code else None,
    }
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        steps = [json.loads(x) for x in metrics.read_text().splitlines()]
        train = [r for r in steps if "tokens_per_s" in r]
        if len(train) > 1:
            record["tokens_per_s"] = round(statistics.median(r["tokens_per_s"] for r in train[1:]))
        peaks = [r["peak_memory_gib"] for r in train if "peak_memory_gib" in r]
        if peaks:
            record["gpu_peak_gib"] = round(max(peaks), 2)
    summary = run_dir / "summary.json"
    if summary.is_file():
        record["parameters"] = json.loads(summary.read_text()).get("num_parameters")
        # Seconds from the run's summary (training and final validation done) to the process
        # exit: teardown (process group, offload buffers, interpreter shutdown).
        record["exit_after_summary_s"] = round(exited - summary.stat().st_mtime, 1)
    if code:
        record["log_tail"] = lines[-40:]
    return record


def plan(args: argparse.Namespace) -> list[tuple[str, list[str], int | None]]:
    """(engine, overrides, predicted parameters) in run order."""
    engines = args.engines.split(",")
    if args.mode == "throughput":
        if args.smoke:
            model = ["trainer.device=cpu", "data.seq_len=64", "data.micro_batch_size=4"]
            model += ["data.global_batch_size=8", "trainer.max_steps=3"]
        else:
            model = ["model=a80m", "data.seq_len=1024", "data.micro_batch_size=16"]
            model += ["data.global_batch_size=128", f"trainer.max_steps={args.steps}"]
        model += [f"trainer.eval_interval={args.steps}", "optim.warmup_steps=1"]
        return [(e, [*ENGINES[e], *model, *COMMON], None) for e in engines]
    shape = dict(CAPACITY_SHAPE)
    batch = ["data.seq_len=1024", "data.micro_batch_size=1", "data.global_batch_size=4"]
    if args.smoke:
        shape.update(layers=2, d=64, heads=4, groups=2, ffn=128, top_k=4)
        batch = ["trainer.device=cpu", "data.seq_len=32", "data.micro_batch_size=1"]
        batch += ["data.global_batch_size=2"]
    steps = [f"trainer.max_steps={args.steps}", f"trainer.eval_interval={args.steps}"]
    steps += ["optim.warmup_steps=1"]
    experts = [int(n) for n in args.experts.split(",")]
    return [
        (e, [*ENGINES[e], *capacity_model(n, shape), *batch, *steps, *COMMON], n)
        for e in engines
        for n in experts
    ]


def table(records: list[dict]) -> str:
    rows = [
        "| engine | N | parameters | exit | tokens/s | GPU peak GiB | host peak GiB | wall s | exit after summary s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        n = r.get("parameters")
        params = "-" if not n else (f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M")
        rows.append(
            f"| {r['engine']} | {r.get('num_experts') or '-'} | {params} | {r['exit']} | {r.get('tokens_per_s', '-')} | "
            f"{r.get('gpu_peak_gib', '-')} | {r['host_peak_gib']} | {r['wall_s']} | {r.get('exit_after_summary_s', '-')} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["capacity", "throughput"])
    parser.add_argument("--engines", default=None, help=f"comma list of {', '.join(ENGINES)}")
    parser.add_argument("--experts", default=",".join(map(str, CAPACITY_EXPERTS)))
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--timeout", type=int, default=420, help="seconds per run")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench-engines"))
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU runs (checks the script)")
    args = parser.parse_args()
    default_engines = {
        "capacity": "megatron,zero2_offload,zero3_offload",
        "throughput": "megatron,zero0,zero1,zero2,zero3",
    }
    args.engines = args.engines or default_engines[args.mode]
    args.steps = args.steps or (4 if args.mode == "capacity" else 12)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-engines-"))
    os.environ.setdefault("OMNIMOE_CACHE", str(work / "cache"))
    records: list[dict] = []
    failed: set[str] = set()
    for engine, overrides, experts in plan(args):
        predicted = predicted_parameters(experts, CAPACITY_SHAPE) if experts else None
        line = f"{engine}: {' '.join(overrides)}"
        if args.dry_run:
            print(line + (f"  (~{predicted / 1e9:.2f}B parameters)" if predicted else ""))
            continue
        if engine in failed:  # capacity: a larger model cannot fit where a smaller one failed
            continue
        record = run_one(engine, overrides, work, args.timeout)
        record["mode"] = args.mode
        record["num_experts"] = experts
        record["predicted_parameters"] = predicted
        records.append(record)
        with open(out / "engines.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)
        if record["exit"] != 0 and args.mode == "capacity":
            failed.add(engine)
    if records:
        print(table(records))


if __name__ == "__main__":
    main()
