"""Size limits of the Triton kernels, defined once: the kernels enforce them and
``omnimoe_train.validation.model`` turns them into configuration rules checked before any work.

Shape suffixes: T tokens, N experts, n = sqrt(N) (router half), K top-k, P = T * K pairs.
"""

from __future__ import annotations

#: Largest K of the Triton router: its scratch, candidate sort (``tl.sort`` of A = next power
#: of two >= min(K, n) keys) and emit grid are sized for at most 4096 selected experts.
ROUTER_MAX_TOP_K = 4096

#: Largest N of the expert kernels: expert ids and the run offsets ``arange(N + 1)`` of the
#: gradient kernel are int32.
EXPERTS_MAX_NUM = 2**31 - 2

#: Largest D (columns per table row) of the expert kernels: the gradient kernel's grid has
#: ceil(D / GRAD_BD) programs in its second dimension, at most 65535 on CUDA, GRAD_BD = 128.
EXPERTS_MAX_HIDDEN = 65535 * 128

#: Largest P = T * K of one expert-kernel call: pair counts and flat positions stay below 2**31,
#: so 32-bit arithmetic on them (sort keys, kernel arguments) never wraps.
#: Under expert parallelism one call sees the pairs of the whole expert-parallel group.
EXPERTS_MAX_PAIRS = 2**31 - 1

#: Largest n (scores per gate) of the Triton router-gate kernels: a token's n scores are one
#: register tile of next_power_of_two(n) floats over at most 16 warps, 8 per thread at 4096
#: (ptxas for sm_90 spills beyond). Larger gates (the dense router ablation at large N) take
#: the PyTorch path.
GATES_MAX_SCORES = 4096
