"""Achieved TFLOP/s and model FLOPs utilisation (MFU) from tokens/s and the model's FLOPs/token.

``flops_per_token`` comes from ``model.accounting`` (the count ``omnimoe-params`` prints). MFU is
the achieved rate per device over that device's dense bf16 tensor-core peak, looked up by name in
:data:`BF16_PEAK_TFLOPS` (vendor datasheet figures, without structured sparsity). A device not in
the table, or the CPU, gets ``tflops`` only.
"""

from __future__ import annotations

import torch

# Dense bf16 peak TFLOP/s per device; a key matches when it occurs in torch's device name, longest
# key first (so "H100 PCIe" wins over "H100", "GH200" over "H200", "A100" over "A10").
BF16_PEAK_TFLOPS: dict[str, float] = {
    "B200": 2250.0,
    "B100": 1750.0,
    "GH200": 989.4,
    "H200 NVL": 835.0,
    "H200": 989.4,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H100": 989.4,  # SXM
    "H800": 989.4,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.1,
    "L40": 181.0,
    "L4": 121.0,
    "A10": 125.0,
    "RTX 6000 Ada": 364.2,
    "RTX A6000": 154.8,
    "RTX 4090": 165.2,
}


def peak_tflops(device_name: str) -> float | None:
    """The bf16 peak of a device from its name (``torch.cuda.get_device_name``), or None."""
    for key in sorted(BF16_PEAK_TFLOPS, key=len, reverse=True):
        if key in device_name:
            return BF16_PEAK_TFLOPS[key]
    return None


def throughput_metrics(
    flops_per_token: float, tokens_per_s: float, *, world_size: int, device: torch.device
) -> dict[str, float]:
    """``tflops`` (achieved model TFLOP/s per device) and, on a known GPU, ``mfu`` (0..1).

    ``tokens_per_s`` is the whole job's rate; every device holds an equal share of the work.
    """
    tflops = flops_per_token * tokens_per_s / max(world_size, 1) / 1e12
    record = {"tflops": tflops}
    if device.type == "cuda":
        peak = peak_tflops(torch.cuda.get_device_name(device))
        if peak is not None:
            record["mfu"] = tflops / peak
    return record
