"""Rules checked before any work: the Triton kernels' limits, bounded folder names, and the
rules between the config and the data (``validation.validate_against_data``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import omnimoe_kernels
from omnimoe_kernels import limits
from omnimoe_train import names, validation
from omnimoe_train.checkpoint.files import list_checkpoints, step_dir_name
from omnimoe_train.evaluation import eval_microbatches_per_rank
from omnimoe_train.validation import (
    ConfigError,
    DataFacts,
    dataset_facts,
    tokenizer_facts,
    validate,
    validate_against_data,
)
from omnimoe_train.validation.choices import CHOICES
from tests.data.helpers import make_token_dataset
from tests.train.conftest import compose_config


def _key_of(*overrides: str, world_size: int = 1) -> str | None:
    try:
        validate(compose_config(*overrides), world_size=world_size)
    except ConfigError as exc:
        assert "\n" not in str(exc)
        return exc.key
    return None


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (("model.num_experts=9216", "model.top_k=5000"), "model.top_k"),  # the case
        (("model.num_experts=9216", "model.top_k=4096"), None),
        (("model.num_experts=9216", "model.top_k=5000", "model.expert_backend=torch"), None),
        (("model.expert_grad_path=gemm",), "model.expert_grad_path"),
        (("model.expert_grad_path=dense",), None),
        (("model.expert_grad_coef=fp8",), "model.expert_grad_coef"),
        (("model.expert_grad_coef=bf16",), None),
        (("model.expert_grad_segment_pairs=8",), "model.expert_grad_segment_pairs"),
        (("model.expert_grad_segment_pairs=-1",), "model.expert_grad_segment_pairs"),
        (("model.expert_grad_segment_pairs=1024",), None),
        (("model.num_experts=2147488281", "model.top_k=8"), "model.num_experts"),  # 46341^2
        (
            (
                "data.micro_batch_size=16384",
                "data.global_batch_size=16384",
                "data.seq_len=16384",
                "model.top_k=8",
            ),
            "data.micro_batch_size",
        ),  # 2^31 pairs  # fmt: skip
        (
            (
                "model.hidden_size=8388608",
                "model.num_attention_heads=1",
                "model.num_experts=4",
                "model.top_k=1",
            ),
            "model.hidden_size",
        ),  # fmt: skip
        (("model.mlp=dense", "model.top_k=5000"), None),  # no router, no limit
    ],
)
def test_kernel_limits_are_rules(overrides: tuple[str, ...], key: str | None) -> None:
    assert _key_of(*overrides) == key


def test_kernel_limits_are_defined_once() -> None:
    """The rules use the very constants the kernels enforce."""
    from omnimoe_kernels import experts_autograd, router_topk

    assert validation.ROUTER_MAX_TOP_K is limits.ROUTER_MAX_TOP_K is router_topk.ROUTER_MAX_TOP_K
    assert experts_autograd.EXPERTS_MAX_NUM is limits.EXPERTS_MAX_NUM
    assert validation.EXPERTS_MAX_PAIRS is experts_autograd.EXPERTS_MAX_PAIRS
    assert omnimoe_kernels.ROUTER_MAX_TOP_K == 4096
    from omnimoe_kernels import experts_grad

    assert validation.EXPERTS_MAX_HIDDEN == 65535 * experts_grad.GRAD_BD


def test_router_refuses_top_k_above_its_limit() -> None:
    import torch

    from omnimoe_kernels.router_topk import cartesian_topk_triton

    rows = torch.zeros(1, 65)  # n^2 = 4225 > the limit
    with pytest.raises(ValueError, match="4096"):
        cartesian_topk_triton(rows, rows, limits.ROUTER_MAX_TOP_K + 1)


# --- names built from user input ---------------------------------------------------------------


def test_path_component_is_bounded_readable_and_distinct() -> None:
    assert names.path_component("tiny-omnimoe") == "tiny-omnimoe"
    assert names.path_component("a/b\\c\nd") == "a_b_c_d"
    assert names.path_component("..") == "__"
    long_a = "data.inputs=[" + "é" * 300 + "a]"
    long_b = "data.inputs=[" + "é" * 300 + "b]"
    a, b = names.path_component(long_a), names.path_component(long_b)
    assert len(a.encode()) <= names.NAME_MAX_BYTES and a != b
    assert a.startswith("data.inputs=[é") and "/" not in a
    assert a.encode().decode() == a  # cut at a character boundary


def test_job_dirname_shows_the_swept_keys_only() -> None:
    overrides = [f"model.k{i}={'x' * 30}" for i in range(20)] + ["model.top_k=2"]
    try:
        names.set_swept_keys(["model.top_k"])
        assert names.job_dirname(0, overrides) == "0_model.top_k=2"
        names.set_swept_keys([])
        unswept = names.job_dirname(3, overrides)
        assert unswept.startswith("3_model.k0=") and len(unswept.encode()) <= 120
    finally:
        names.set_swept_keys([])


@pytest.mark.parametrize("key", ["checkpoint.dir", "data.dir"])
def test_path_components_over_the_file_system_limit_are_refused(key: str) -> None:
    assert _key_of(f"{key}=/tmp/{'d' * 256}/x") == key
    assert _key_of(f"{key}=/tmp/{'d' * 255}/x") is None


def test_wandb_tags_follow_wandb_rule() -> None:
    assert _key_of(f"logging.wandb.tags=[{'t' * 65}]") == "logging.wandb.tags"
    assert _key_of(f"logging.wandb.tags=[{'t' * 64}]") is None
    assert _key_of("logging=disabled", f"logging.wandb.tags=[{'t' * 65}]") is None


def test_checkpoints_past_step_99999999_are_listed(tmp_path: Path) -> None:
    for step in (99_999_999, 100_000_000, 5):
        (tmp_path / step_dir_name(step)).mkdir()
    assert [p.name for p in list_checkpoints(tmp_path)][-1] == "step_100000000"


# --- rules between the config and the data ------------------------------------------------------


def _facts(**kw: object) -> DataFacts:
    return DataFacts(**{"where": "data.dir=d", "vocab_size": 300, **kw})


@pytest.mark.parametrize(
    ("overrides", "facts", "key"),
    [
        (("model.vocab_size=100",), _facts(), "model.vocab_size"),  # the case
        (("model.vocab_size=300",), _facts(), None),
        ((), _facts(), None),  # unset: taken from the tokenizer
        (("data.seq_len=32",), _facts(seq_len=16), "data.seq_len"),
        (("data.seq_len=16",), _facts(seq_len=16), None),
        (("data.val_fraction=0.02",), _facts(split_samples={"train": 900, "val": 0}), "data.val_fraction"),
        (("data.val_fraction=0.02",), _facts(split_samples={"train": 900}), "data.val_fraction"),
        (("data.val_fraction=0",), _facts(split_samples={"train": 900, "val": 0}), None),
        (("data.val_fraction=0.02",), _facts(split_samples={"train": 900, "val": 1}), None),
        (("data.global_batch_size=16",), _facts(split_samples={"train": 9, "val": 1}), "data.global_batch_size"),
        (("data.global_batch_size=16",), _facts(split_samples={"train": 16, "val": 1}), None),
    ],
)  # fmt: skip
def test_rules_against_the_data(
    overrides: tuple[str, ...], facts: DataFacts, key: str | None
) -> None:
    try:
        validate_against_data(compose_config("data.seq_len=16", *overrides), facts)
    except ConfigError as exc:
        assert exc.key == key and "\n" not in str(exc)
        return
    assert key is None


def test_tokenizer_facts(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models

    vocab = {f"w{i}": i for i in range(299)} | {"<|endoftext|>": 299}
    path = tmp_path / "tokenizer.json"
    Tokenizer(models.WordLevel(vocab, unk_token="w0")).save(str(path))
    assert tokenizer_facts(str(path)).vocab_size == 300
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match=r"^data\.tokenizer: .*bad\.json: cannot load tokenizer"):
        tokenizer_facts(str(tmp_path / "bad.json"))


def test_dataset_facts(tmp_path: Path) -> None:
    assert dataset_facts(tmp_path, "x") is None
    data_dir = make_token_dataset(tmp_path / "d", [4, 3, 2], sample_len=9)
    facts = dataset_facts(data_dir, "x")
    manifest = json.loads((data_dir / "manifest.json").read_text())
    assert facts == DataFacts("x", manifest["vocab_size"], 8, {"train": 9, "val": 7})


@pytest.mark.parametrize(
    ("batches", "dp", "multiple", "expected"),
    [(3, 1, 2, 4), (5, 2, 1, 3), (5, 1, 1, 5), (1, 4, 1, 1), (6, 2, 2, 4)],
)
def test_eval_microbatches_per_rank(batches: int, dp: int, multiple: int, expected: int) -> None:
    assert eval_microbatches_per_rank(batches, dp, multiple) == expected


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("trainer.max_time=soon", "trainer.max_time"),
        ("trainer.max_time=0s", "trainer.max_time"),
        ("trainer.max_time=23h30m", None),
        ("trainer.max_time=23:30:00", None),
        ("trainer.spike_zscore=-1", "trainer.spike_zscore"),
        ("trainer.spike_window=1", "trainer.spike_window"),
        ("trainer.max_bad_steps=0", "trainer.max_bad_steps"),
        ("trainer.nan_loss_steps=[0]", "trainer.nan_loss_steps"),
        ("checkpoint.keep_steps=[-5]", "checkpoint.keep_steps"),
        ("checkpoint.keep_steps=[100,200]", None),
    ],
)
def test_fault_tolerance_keys(override: str, key: str | None) -> None:
    assert _key_of(override) == key


@pytest.mark.parametrize(
    ("overrides", "world_size", "fix"),
    [
        # The default tiny batches (global 16 = micro 16) under launch/torchrun.sh 2 at dp 2.
        ((), 2, "set data.global_batch_size=32 or data.micro_batch_size=8"),
        (
            ("data.global_batch_size=24", "data.micro_batch_size=16"),
            4,
            "=64 or data.micro_batch_size=6",
        ),
        (
            ("data.global_batch_size=15", "data.micro_batch_size=4"),
            2,
            "set data.global_batch_size=16",
        ),
    ],
)
def test_batch_rule_says_which_override_fixes_it(
    overrides: tuple[str, ...], world_size: int, fix: str
) -> None:
    with pytest.raises(ConfigError) as info:
        validate(compose_config(*overrides), world_size=world_size)
    assert info.value.key == "data.global_batch_size" and info.value.rule.endswith(fix)
    for suggestion in info.value.rule.split("; set ")[1].split(" or "):
        validate(compose_config(*overrides, suggestion), world_size=world_size)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        # 0 is not null (one group per head): megatron's attention would divide by it.
        ("model.num_query_groups=0", "model.num_query_groups"),
        ("model.num_query_groups=1", None),
        # torch.optim.AdamW's own rules, which otherwise fail with a traceback at model build.
        ("optim.beta1=-0.1", "optim.beta1"),
        ("optim.beta2=1.0", "optim.beta2"),
        ("optim.beta2=0.0", None),
        ("optim.eps=0", "optim.eps"),
        ("optim.eps=-1e-8", "optim.eps"),
        ("optim.weight_decay=-0.1", "optim.weight_decay"),
        ("optim.weight_decay=nan", "optim.weight_decay"),
        ("optim.weight_decay=0", None),
        # An infinite peak LR trains on with non-finite losses until the bad-step guard stops it.
        ("optim.lr=inf", "optim.lr"),
        ("model.init_std=-0.02", "model.init_std"),  # torch: "normal expects std >= 0.0"
        ("model.init_std=0.01", None),
        ("model.rope_base=0", "model.rope_base"),  # NaN losses from the first step
        ("model.norm_eps=-1", "model.norm_eps"),  # NaN losses from the first step
        ("model.norm_eps=0", None),
        # torch.manual_seed: "Overflow when unpacking long long", after the data was prepared
        # (megatron's RNG tracker adds 2718 + the TP rank to the seed).
        ("trainer.seed=99999999999999999999999", "trainer.seed"),
        ("trainer.seed=18446744073709551615", "trainer.seed"),
        ("trainer.seed=-1", "trainer.seed"),
        ("trainer.seed=9223372036854775807", None),
        ("trainer.seed=0", None),
    ],
)
def test_values_megatron_or_torch_would_refuse_later_are_rules(override: str, key: str) -> None:
    assert _key_of(override) == key


@pytest.mark.parametrize(
    ("overrides", "interpret", "key"),
    [
        (("model.expert_backend=triton", "trainer.device=cpu"), None, "model.expert_backend"),
        (("model.expert_backend=triton", "trainer.device=cpu"), "1", None),  # the interpreter
        (("model.expert_backend=triton", "trainer.device=cpu", "model.mlp=dense"), None, None),
        (("model.expert_backend=torch", "trainer.device=cpu"), None, None),
    ],
)
def test_triton_expert_backend_needs_a_device_for_triton(
    overrides: tuple[str, ...], interpret: str | None, key: str | None, monkeypatch
) -> None:
    """Without CUDA or Triton's CPU interpreter the kernels cannot launch (was a traceback from
    Triton, '0 active drivers', at the first evaluation); a dense MLP runs none of them."""
    if interpret is None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
    assert _key_of(*overrides) == key


@pytest.mark.parametrize("key", sorted(CHOICES))
def test_every_enumerated_key_refuses_a_value_not_listed(key: str) -> None:
    """Each key of ``CHOICES`` is checked (a key missing from the rules fails later, e.g.
    ``optim.decay_style`` as a KeyError traceback when the LR scheduler is built)."""
    assert _key_of(f"{key}=no_such_value") == key


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("optim.min_lr_ratio=-0.1", "optim.min_lr_ratio"),
        ("optim.min_lr_ratio=1.5", "optim.min_lr_ratio"),
        ("optim.min_lr_ratio=nan", "optim.min_lr_ratio"),
        ("optim.min_lr_ratio=0", None),
        ("optim.min_lr_ratio=1", None),  # a constant LR after warmup
        ("optim.decay_fraction=-0.2", "optim.decay_fraction"),
        ("optim.decay_fraction=1.01", "optim.decay_fraction"),
        ("optim.decay_fraction=0", None),
        ("optim.decay_fraction=1", None),
        ("optim.warmup_steps=-1", "optim.warmup_steps"),
        ("optim.warmup_steps=350", "optim.warmup_steps"),  # = trainer.max_steps (350)
        ("optim.warmup_steps=349", None),
        ("optim.warmup_steps=0", None),
        # Named here, not only through CHOICES: a style dropped from the rules would be a
        # KeyError traceback when the scheduler is built.
        ("optim.decay_style=exponential", "optim.decay_style"),
        ("optim.decay_style=sqrt", None),
    ],
)
def test_schedule_rules(override: str, key: str | None) -> None:
    assert _key_of(override, "trainer.max_steps=350") == key
