"""Entry points of the Triton backend, as dispatched from ``omnimoe_kernels``.

Importing this module needs Triton; ``omnimoe_kernels`` imports it only when a call resolves to
the Triton backend (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

from omnimoe_kernels.experts_autograd import atomic_experts_triton
from omnimoe_kernels.router_gates_autograd import gate_log_probs_triton
from omnimoe_kernels.router_topk import cartesian_topk_triton

__all__ = ["atomic_experts_triton", "cartesian_topk_triton", "gate_log_probs_triton"]
