"""Bytes each rank sends per OmniMoE layer for the table-sharding modes, and ``auto``.

Counts only bytes that leave a rank (the self chunk of a collective stays on the device), per
layer, per rank, for one forward and one backward of ``tokens`` tokens on the rank, with equal
token counts on the ranks (training; the token counts are then known, so no count exchange).
The formulas mirror, exchange by exchange, what ``rows_dispatch`` and ``dim_sharding`` send; the
test-suite checks them against the bytes real calls report.

rows (b = dtype_bytes, w = weight_bytes, 4 = int32 expert id; implemented):
    forward  = (P-1)*T*(D*b + K*(4 + w))  +  (P-1)*T*D*b     gather x, ids, w; scatter-sum y
    backward = (P-1)*T*D*b  +  (P-1)*T*(D*b + K*w)            gather dy; scatter-sum dx, dw
dim (s = 4 score bytes; ring all-reduce; implemented):
    forward  = 2*(P-1)*T*(D/P)*b + (P-1)*T*K*(4 + w + 2*s)    x slices + ids + w, h, y slices
    backward = 2*(P-1)*T*(D/P)*b + 2*(P-1)*T*K*s              dy slices, da, dx slices

Reference points, NOT implemented:
rows_a2a (the variable-split all-to-all the rows mode replaced; R = remote (token, rank) rows,
Q = remote pairs; a host sync per call for the split sizes):
    forward  = 2*R*D*b + Q*(8 + w) + 24*(P-1),  backward = 2*R*D*b + Q*w
    R = T * E[ranks owning a token's experts] * (P-1)/P, Q = T*K*(P-1)/P under uniform routing.
gather (ZeRO-3 style: all-gather the U/V shards before the layer, reduce-scatter their grads):
    forward = backward = 2*N*D*b*(P-1)/P                       independent of T and K

``auto`` picks the implemented mode with fewer bytes. Both do the same arithmetic per rank when
routing is balanced (rows: the pairs of the group's tokens that a rank owns; dim: all pairs of
the group on D/P columns), so bytes decide; rows also pays for load imbalance (logged as
``dispatch_load_imbalance``) which dim never has.
"""

from __future__ import annotations

SHARDING_MODES = ("rows", "dim")  # implemented, chosen between by ``auto``
PREDICTED_MODES = (*SHARDING_MODES, "rows_a2a", "gather")
_ID_BYTES = 4


def expected_dest_ranks(*, num_experts: int, top_k: int, ranks: int) -> float:
    """E[number of ranks owning at least one of a token's K experts], uniform routing.

    Exact for K distinct experts drawn uniformly (without replacement) from N split into P
    contiguous blocks of N/P: a given rank is missed with probability C(N - N/P, K) / C(N, K).
    (The with-replacement approximation P * (1 - (1 - 1/P)^K) overestimates it slightly.)
    """
    block = num_experts // ranks
    p_missed = 1.0
    for i in range(top_k):
        p_missed *= max(num_experts - block - i, 0) / (num_experts - i)
    return ranks * (1.0 - p_missed)


def _totals(forward: float, backward: float) -> dict[str, float]:
    return {"forward": forward, "backward": backward, "total": forward + backward}


def rows_bytes(
    *, tokens: float, d: int, k: int, ranks: int, dtype_bytes: int, weight_bytes: int = 4
) -> dict[str, float]:
    """Bytes of the rows (gather / scatter-sum) dispatch for ``tokens`` tokens on each rank."""
    peers_rows = (ranks - 1) * tokens
    forward = peers_rows * (d * dtype_bytes + k * (_ID_BYTES + weight_bytes))
    forward += peers_rows * d * dtype_bytes
    backward = peers_rows * d * dtype_bytes + peers_rows * (d * dtype_bytes + k * weight_bytes)
    return _totals(forward, backward)


def rows_a2a_bytes(
    *,
    d: int,
    remote_rows: float,
    remote_pairs: float,
    ranks: int,
    dtype_bytes: int,
    weight_bytes: int = 4,
) -> dict[str, float]:
    """Bytes of a variable-split all-to-all rows dispatch (reference, not implemented)."""
    activations = 2 * remote_rows * d * dtype_bytes
    forward = activations + remote_pairs * (8 + weight_bytes) + 24 * (ranks - 1)
    return _totals(forward, activations + remote_pairs * weight_bytes)


def dim_bytes(
    *,
    tokens: float,
    d: int,
    k: int,
    ranks: int,
    dtype_bytes: int,
    weight_bytes: int = 4,
    score_bytes: int = 4,
) -> dict[str, float]:
    """Bytes of the dim-sharded layer for ``tokens`` tokens on each rank."""
    peers = ranks - 1
    activations = 2 * tokens * peers * (d / ranks) * dtype_bytes
    forward = activations + tokens * k * peers * (_ID_BYTES + weight_bytes + 2 * score_bytes)
    backward = activations + 2 * tokens * k * peers * score_bytes
    return _totals(forward, backward)


def table_gather_bytes(
    *, d: int, num_experts: int, ranks: int, dtype_bytes: int
) -> dict[str, float]:
    """Bytes of all-gathering U and V shards (forward) and reduce-scattering dU, dV (backward)."""
    per_direction = 2 * num_experts * d * dtype_bytes * (ranks - 1) / ranks
    return _totals(per_direction, per_direction)


def predict_bytes(
    mode: str,
    *,
    tokens: int,
    d: int,
    k: int,
    num_experts: int,
    ranks: int,
    dtype_bytes: int,
    weight_bytes: int = 4,
    score_bytes: int = 4,
    dest_ranks_per_token: float | None = None,
) -> dict[str, float]:
    """Predicted bytes one rank sends per layer: ``forward``, ``backward``, ``total``, and
    ``dest_ranks_per_token`` (ranks a token's rows reach). Raises ``ValueError`` for an unknown
    mode. ``dest_ranks_per_token`` replaces the uniform-routing expectation for ``rows_a2a``
    (e.g. by the measured ``dispatch_dest_ranks``)."""
    if mode == "rows":
        predicted = rows_bytes(
            tokens=tokens, d=d, k=k, ranks=ranks, dtype_bytes=dtype_bytes,
            weight_bytes=weight_bytes,
        )  # fmt: skip
        return {**predicted, "dest_ranks_per_token": float(ranks)}
    if mode == "rows_a2a":
        dest = dest_ranks_per_token
        if dest is None:
            dest = expected_dest_ranks(num_experts=num_experts, top_k=k, ranks=ranks)
        predicted = rows_a2a_bytes(
            d=d,
            remote_rows=tokens * dest * (ranks - 1) / ranks,  # every rank equally likely
            remote_pairs=tokens * k * (ranks - 1) / ranks,
            ranks=ranks,
            dtype_bytes=dtype_bytes,
            weight_bytes=weight_bytes,
        )
        return {**predicted, "dest_ranks_per_token": dest}
    if mode == "dim":
        predicted = dim_bytes(
            tokens=tokens, d=d, k=k, ranks=ranks, dtype_bytes=dtype_bytes,
            weight_bytes=weight_bytes, score_bytes=score_bytes,
        )  # fmt: skip
        return {**predicted, "dest_ranks_per_token": float(ranks)}
    if mode == "gather":
        predicted = table_gather_bytes(
            d=d, num_experts=num_experts, ranks=ranks, dtype_bytes=dtype_bytes
        )
        return {**predicted, "dest_ranks_per_token": 0.0}
    raise ValueError(f"mode={mode!r} must be one of {PREDICTED_MODES}")


def choose_sharding(
    *,
    tokens: int,
    d: int,
    k: int,
    num_experts: int,
    ranks: int,
    dtype_bytes: int,
    allowed: tuple[str, ...] = SHARDING_MODES,
) -> tuple[str, dict[str, dict[str, float]]]:
    """``auto``: the allowed mode with the fewest forward+backward bytes (ties go to rows).

    Returns the choice and the predictions of every allowed mode, for the start-up log line.
    Raises ``ValueError`` when ``allowed`` is empty or names an unknown mode.
    """
    if not allowed or set(allowed) - set(SHARDING_MODES):
        raise ValueError(f"allowed={allowed!r} must be a non-empty subset of {SHARDING_MODES}")
    predicted = {
        mode: predict_bytes(
            mode,
            tokens=tokens,
            d=d,
            k=k,
            num_experts=num_experts,
            ranks=ranks,
            dtype_bytes=dtype_bytes,
        )
        for mode in SHARDING_MODES
        if mode in allowed
    }
    choice = min(predicted, key=lambda mode: (predicted[mode]["total"], mode != "rows"))
    return choice, predicted


def describe_choice(choice: str, predicted: dict[str, dict[str, float]]) -> str:
    """One log line: the chosen mode and the predicted MB per layer per rank of each option."""
    options = ", ".join(
        f"{mode}: fwd {p['forward'] / 1e6:.2f} MB + bwd {p['backward'] / 1e6:.2f} MB"
        for mode, p in predicted.items()
    )
    return f"expert_table_sharding=auto -> {choice} (per layer per rank: {options})"
