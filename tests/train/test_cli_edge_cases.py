"""``omnimoe-train`` as a new user meets it (issue 9): usage errors refused in one line with
exit 2 before any work, no evaluation with data.val_fraction=0, and a sweep with many overrides.

``TINY`` is the issue's set of overrides (a 2-layer model on a 200 kB slice of the default
corpus); the runs that prepare data share one cache folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.cli_helpers import assert_usage_error, run_train_cli, tiny
from tests.data.helpers import make_token_dataset

TINY = tiny()
ERROR = "omnimoe-train: error: "


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def _tokenizer(folder: Path, size: int) -> Path:
    from tokenizers import Tokenizer, models

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {f"w{i}": i for i in range(size - 1)} | {"<|endoftext|>": size - 1}
    path = folder / "tokenizer.json"
    Tokenizer(models.WordLevel(vocab, unk_token="w0")).save(str(path))
    return path


def _dataset(folder: Path, *, val: bool) -> Path:
    """A prepared dataset of seq_len 16 (vocabulary 300), with or without a validation split."""
    data_dir = make_token_dataset(folder, [20, 10], sample_len=17)
    manifest = json.loads((data_dir / "manifest.json").read_text())
    manifest["vocab_size"] = 300
    if not val:
        manifest["splits"]["val"] = {"shards": [], "samples": 0}
    (data_dir / "manifest.json").write_text(json.dumps(manifest))
    return data_dir


@pytest.mark.parametrize(
    ("case", "key"),
    [
        ("top_k_above_router_limit", "model.top_k"),
        ("pairs_above_expert_kernel_limit", "data.micro_batch_size"),
        ("vocab_below_given_tokenizer", "model.vocab_size"),
        ("seq_len_differs_from_data_dir", "data.seq_len"),
        ("empty_val_split_in_data_dir", "data.val_fraction"),
        ("global_batch_above_train_split", "data.global_batch_size"),
        ("run_dir_component_too_long", "hydra.run.dir"),
        ("checkpoint_dir_component_too_long", "checkpoint.dir"),
        ("wandb_tag_too_long", "logging.wandb.tags"),
    ],
)
def test_refused_before_any_work(tmp_path: Path, case: str, key: str) -> None:
    inputs = tmp_path / "inputs"
    args = {
        "top_k_above_router_limit": ["model.num_experts=9216", "model.top_k=5000"],
        "pairs_above_expert_kernel_limit": [
            "data.micro_batch_size=16384", "data.global_batch_size=16384",
            "data.seq_len=16384", "model.top_k=8",
        ],
        "vocab_below_given_tokenizer": [
            f"data.tokenizer={_tokenizer(inputs, 300) if case.startswith('vocab') else ''}",
            "model.vocab_size=100",
        ],
        "seq_len_differs_from_data_dir": [
            f"data.dir={_dataset(inputs, val=True) if case.startswith('seq') else ''}",
            "data.seq_len=32",
        ],
        "empty_val_split_in_data_dir": [
            f"data.dir={_dataset(inputs, val=False) if case.startswith('empty') else ''}",
            "data.seq_len=16",
        ],
        "global_batch_above_train_split": [  # 30 training samples
            f"data.dir={_dataset(inputs, val=True) if case.startswith('global') else ''}",
            "data.seq_len=16", "data.micro_batch_size=4", "data.global_batch_size=32",
        ],
        "run_dir_component_too_long": [f"hydra.run.dir={tmp_path}/{'r' * 256}"],
        "checkpoint_dir_component_too_long": [f"checkpoint.dir={'c' * 256}"],
        "wandb_tag_too_long": ["logging=offline", f"logging.wandb.tags=[{'t' * 65}]"],
    }[case]  # fmt: skip
    before = sorted(p.name for p in inputs.rglob("*")) if inputs.exists() else []
    workdir = tmp_path / "cache"
    workdir.mkdir()
    result = run_train_cli([*TINY, *args], cache=workdir, timeout=120)
    assert_usage_error(result, f"{ERROR}{key}:", workdir)
    after = sorted(p.name for p in inputs.rglob("*")) if inputs.exists() else []
    assert after == before  # a given dataset or tokenizer is left as it was


def test_misspelt_deepspeed_key_is_one_line_before_deepspeed_starts(tmp_path: Path) -> None:
    """The tester's case: used to be exit 1 and a 40-line pydantic error after the op build."""
    args = ["trainer.engine=deepspeed", "+deepspeed.zero_optimization.stagee=2"]
    result = run_train_cli([*TINY, *args], cache=tmp_path, timeout=120)
    assert_usage_error(
        result,
        f"{ERROR}deepspeed.zero_optimization.stagee: unknown key (not in DeepSpeed's "
        "DeepSpeedZeroConfig)",
        tmp_path,
    )


def test_cuda_device_without_a_gpu_is_one_line_before_any_work(tmp_path: Path) -> None:
    """Used to be exit 1 with a RuntimeError traceback from the process-group setup."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: trainer.device=cuda is valid here")
    result = run_train_cli([*TINY, "trainer.device=cuda"], cache=tmp_path, timeout=120)
    assert_usage_error(
        result, f"{ERROR}trainer.device: cuda but no CUDA device is visible", tmp_path
    )


@pytest.mark.parametrize(
    ("args", "key"),
    [
        (["+model.mlpp=dense", "+trainer.maxsteps=3", "trainer.max_steps=2"], "model.mlpp"),
        (["+trainer.maxsteps=3"], "trainer.maxsteps"),
        (["+logging.wandb.projet=x"], "logging.wandb.projet"),
        (["+seed=1"], "seed"),
    ],
)
def test_added_key_not_in_the_schema_is_refused(tmp_path: Path, args: list[str], key: str) -> None:
    """``+key=value`` lifts the schema's struct flag: a typo used to be ignored (exit 0)."""
    result = run_train_cli([*TINY, *args], cache=tmp_path, timeout=120)
    assert_usage_error(result, f"{ERROR}{key}: unknown key (not in the config schema)", tmp_path)


def test_vocab_below_the_prepared_tokenizer_is_refused_before_model_work(
    tmp_path: Path, cache: Path
) -> None:
    """The issue's case: the tokenizer is known only after preparation; still no model work."""
    run_dir = tmp_path / "run"
    result = run_train_cli([*TINY, "model.vocab_size=100", f"hydra.run.dir={run_dir}"], cache=cache)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(f"{ERROR}model.vocab_size: must be >= the tokenizer's vocabulary")
    assert "Traceback" not in result.stderr
    assert not (run_dir / "config.yaml").exists() and not (run_dir / "metrics.jsonl").exists()


@pytest.mark.slow
def test_empty_validation_split_is_refused_after_preparation(tmp_path: Path) -> None:
    """val_fraction > 0 whose hash split leaves no validation document: one line, exit 2."""
    run_dir = tmp_path / "run"
    result = run_train_cli(
        [*TINY, "data.val_fraction=1e-9", f"hydra.run.dir={run_dir}"], cache=tmp_path / "cache"
    )
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{ERROR}data.val_fraction: the validation split is empty")
    assert "data.val_fraction=0 to train without evaluation" in last
    assert "Traceback" not in result.stderr and not (run_dir / "metrics.jsonl").exists()


def test_val_fraction_zero_trains_without_evaluation(tmp_path: Path, cache: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_train_cli(
        [*TINY, "data.val_fraction=0", "trainer.max_steps=3", f"hydra.run.dir={run_dir}"],
        cache=cache,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert not any("val_loss" in r for r in records)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["evaluation"] == "off: data.val_fraction=0"
    assert "initial_val_loss" not in summary and "final_val_loss" not in summary
    assert "evaluation off: data.val_fraction=0" in result.stderr


@pytest.mark.slow
def test_sweep_with_many_overrides_names_jobs_by_the_swept_keys(
    tmp_path: Path, cache: Path
) -> None:
    """The issue's sweep: job folders are the job number and the swept key's value; each job
    records all its overrides in .hydra/overrides.yaml."""
    sweep = tmp_path / "sweep"
    result = run_train_cli(
        ["-m", *TINY, "model.top_k=2,4", "trainer.max_steps=5", f"hydra.sweep.dir={sweep}"],
        cache=cache,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["0_model.top_k=2", "1_model.top_k=4"]
    for job, top_k in zip(jobs, (2, 4), strict=True):
        recorded = yaml.safe_load((sweep / job / ".hydra" / "overrides.yaml").read_text())
        # Hydra folds the sweep into TINY's own model.top_k entry and writes false as False.
        expected = [o if o != "model.top_k=4" else f"model.top_k={top_k}" for o in TINY]
        assert [o.lower() for o in recorded] == [*expected, "trainer.max_steps=5"]
        summary = json.loads((sweep / job / "summary.json").read_text())
        assert summary["final_val_loss"] < summary["initial_val_loss"]
