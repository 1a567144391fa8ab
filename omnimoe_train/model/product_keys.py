"""Multi-head product-key retrieval: the router of PKM (Lample et al. 2019) and PEER (He 2024).

Shape suffixes: T tokens, D hidden, H heads, c the two key halves, n sub-keys per half,
N = n*n slots, k top-k per head, q query width per head.

Each head maps the token to a query (one linear layer for all heads), normalised by BatchNorm
("query batch norm", PKM Sec. 3.3; PEER Sec. 3.2), and split into two halves. Half c of head h
scores the n sub-keys of that half: ``s_c[i] = q_c . key_c[i]``. Slot (i, j) scores
``s_0[i] + s_1[j]``, and the k best of the n*n sums are found exactly by our Cartesian top-K
kernel (``omnimoe_kernels.cartesian_topk``: the same search as the OmniMoE router, on raw scores
instead of log-probabilities). The weights are a softmax over the head's k scores; the K = H*k
(slot, weight) pairs of all heads are returned together, so the caller sums over heads.

PKM gives every head its own sub-keys; PEER shares one set across heads (``shared_keys``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import omnimoe_kernels
from omnimoe_train.model.router import GateNorm, Routing, square_side


class ProductKeyRouter(nn.Module):
    """Routes each token to ``heads * top_k_per_head`` of ``num_slots = n*n`` slots."""

    def __init__(
        self,
        hidden_size: int,
        num_slots: int,
        top_k_per_head: int,
        heads: int,
        key_dim: int,
        *,
        shared_keys: bool,
        backend: str = "auto",
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        n = square_side(num_slots, "num_slots")
        if key_dim % 2:
            raise ValueError(f"key_dim={key_dim} must be even (two half-keys)")
        self.n, self.k, self.heads, self.backend = n, top_k_per_head, heads, backend
        self.shared_keys = shared_keys
        # fp32 like the OmniMoE gates: top-k over near-equal bf16 sums would be decided by rounding.
        self.query_qD = nn.Parameter(torch.empty(heads * key_dim, hidden_size, dtype=torch.float32))
        nn.init.normal_(self.query_qD, std=init_std)
        self.query_norm = GateNorm(heads * key_dim)
        key_heads = 1 if shared_keys else heads
        half = key_dim // 2
        # PKM's init: uniform keys of unit-order norm, so the normalised queries score them evenly.
        bound = 1.0 / math.sqrt(half)
        self.keys_Hcnq = nn.Parameter(
            torch.empty(key_heads, 2, n, half, dtype=torch.float32).uniform_(-bound, bound)
        )

    def forward(self, x_TD: torch.Tensor) -> Routing:
        T = x_TD.shape[0]
        H, n = self.heads, self.n
        x_TD = x_TD.to(self.query_qD.dtype)
        q_THcq = self.query_norm(x_TD @ self.query_qD.t()).view(T, H, 2, -1)
        keys = self.keys_Hcnq.expand(H, -1, -1, -1)
        s_THcn = torch.einsum("thcq,hcnq->thcn", q_THcq, keys)
        rows_Rn = s_THcn[:, :, 0].reshape(T * H, n)  # R = T*H (token, head) rows
        cols_Rn = s_THcn[:, :, 1].reshape(T * H, n)
        scores_Rk, indices_Rk = omnimoe_kernels.cartesian_topk(
            rows_Rn, cols_Rn, self.k, backend=self.backend
        )
        weights_TK = torch.softmax(scores_Rk, dim=-1).reshape(T, H * self.k)
        with torch.no_grad():
            # softmax over the n*n sums factorises: H(grid) = H(softmax rows) + H(softmax cols).
            lr, lc = F.log_softmax(rows_Rn, -1), F.log_softmax(cols_Rn, -1)
            entropy_R = -(lr.exp() * lr).sum(-1) - (lc.exp() * lc).sum(-1)
            entropy_T = entropy_R.view(T, H).mean(-1)
        return Routing(weights_TK, indices_Rk.reshape(T, H * self.k), entropy_T)

    def reads_per_token(self) -> dict[str, float]:
        """How many times a token's forward reads each parameter (shared keys: once per head)."""
        return {"query_qD": 1.0, "keys_Hcnq": float(self.heads if self.shared_keys else 1)}
