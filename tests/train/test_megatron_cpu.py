"""The CPU compatibility layer: active only without a GPU, and each patch does its job."""

from __future__ import annotations

import pytest
import torch

from omnimoe_train.megatron_cpu import apply_cpu_patches

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="CPU-only layer; a GPU is present"
)


@pytest.fixture(scope="module", autouse=True)
def patched() -> None:
    assert apply_cpu_patches() is True
    assert apply_cpu_patches() is True  # idempotent


def test_cuda_device_requests_land_on_cpu() -> None:
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.tensor([1.0], device=torch.device("cuda")).device.type == "cpu"
    assert torch.ones(3).cuda().device.type == "cpu"
    assert torch.ones(3).to("cuda").device.type == "cpu"
    assert torch.ones(3, device=torch.cuda.current_device()).device.type == "cpu"


def test_tensor_type_reports_cuda_name() -> None:
    # megatron's optimizer asserts grads are 'torch.cuda.FloatTensor'.
    assert torch.ones(1).type() == "torch.cuda.FloatTensor"
    assert torch.ones(1).type(torch.float64).dtype == torch.float64  # conversions untouched


def test_causal_mask_on_cpu() -> None:
    from megatron.core.transformer.utils import get_default_causal_mask

    mask = get_default_causal_mask(4)
    assert mask.device.type == "cpu"
    assert torch.equal(mask, torch.triu(torch.ones(4, 4, dtype=torch.bool), diagonal=1))


def test_rng_tracker_fork_is_reproducible_and_restores_state() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    tracker = mrandom.get_cuda_rng_tracker()
    tracker.reset()
    tracker.add("test-stream", 123)
    torch.manual_seed(7)
    with tracker.fork("test-stream"):
        a = torch.rand(4)
    after_fork = torch.rand(4)
    tracker.reset()
    tracker.add("test-stream", 123)
    torch.manual_seed(7)
    with tracker.fork("test-stream"):
        b = torch.rand(4)
    assert torch.equal(a, b)
    torch.manual_seed(7)
    assert torch.equal(torch.rand(4), after_fork)  # the default stream was not advanced


def test_streams_and_events_are_inert() -> None:
    stream = torch.cuda.Stream()
    event = torch.cuda.Event()
    event.record(stream)
    stream.wait_event(event)
    with torch.cuda.stream(stream):
        pass
    torch.cuda.synchronize()
    assert event.query()
