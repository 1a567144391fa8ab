"""Bytes each rank sends per OmniMoE layer for the two table-sharding modes, and ``auto``.

Counts only bytes that leave a rank (the self chunk of an all-to-all stays on the device), per
layer, per rank, for one forward and one backward, with ``tokens`` tokens on the rank. The
formulas mirror, exchange by exchange, what ``rows_dispatch`` and ``dim_sharding`` send; the
test-suite checks them against the byte counts of real runs.

rows (b = dtype_bytes, w = weight_bytes, R = remote destination rows, Q = remote pairs):
    forward  = 2*R*D*b + Q*(8 + w) + 24*(P-1)      x out, y back, (id, slot) + weight per pair
    backward = 2*R*D*b + Q*w                       dy out, dx back, dweights back
    R = T * E[remote destination ranks per token], Q = T*K*(P-1)/P under uniform routing.
dim (s = score bytes, 4 = int32 expert id):
    forward  = 2*T*(P-1)*D/P*b + T*K*(P-1)*(4 + 2*s) + 8*(P-1)
    backward = 2*T*(P-1)*D/P*b + 2*T*K*(P-1)*s

gather (NOT implemented; the reference point for ZeRO-3-style table sharding: all-gather the U/V
shards before the layer, reduce-scatter their gradients after):
    forward = backward = 2*N*D*b*(P-1)/P           independent of T and K

Uniform routing is the pessimistic case for rows: the Cartesian router picks top rows x top
columns, and blocks of whole router rows per rank make a token's K experts cluster on few ranks,
so real destination counts are lower. The realised value is logged by the dispatch.
"""

from __future__ import annotations

SHARDING_MODES = ("rows", "dim")  # implemented, chosen between by ``auto``
PREDICTED_MODES = (*SHARDING_MODES, "gather")
_COUNTS_BYTES_PER_PEER = {"rows": 3 * 8, "dim": 8}
_META_BYTES_PER_PAIR = 8
_INDEX_BYTES = 4


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


def rows_bytes(
    *,
    d: int,
    remote_rows: float,
    remote_pairs: float,
    ranks: int,
    dtype_bytes: int,
    weight_bytes: int = 4,
) -> dict[str, float]:
    """Bytes of the rows dispatch for given remote (token, rank) rows and (token, expert) pairs."""
    activations = 2 * remote_rows * d * dtype_bytes
    forward = (
        activations
        + remote_pairs * (_META_BYTES_PER_PAIR + weight_bytes)
        + _COUNTS_BYTES_PER_PEER["rows"] * (ranks - 1)
    )
    backward = activations + remote_pairs * weight_bytes
    return {"forward": forward, "backward": backward, "total": forward + backward}


def dim_bytes(
    *, tokens: float, d: int, k: int, ranks: int, dtype_bytes: int, score_bytes: int = 4
) -> dict[str, float]:
    """Bytes of the dim-sharded layer for ``tokens`` tokens on each rank."""
    peers = ranks - 1
    activations = 2 * tokens * peers * (d / ranks) * dtype_bytes
    forward = (
        activations
        + tokens * k * peers * (_INDEX_BYTES + 2 * score_bytes)
        + _COUNTS_BYTES_PER_PEER["dim"] * peers
    )
    backward = activations + 2 * tokens * k * peers * score_bytes
    return {"forward": forward, "backward": backward, "total": forward + backward}


def table_gather_bytes(
    *, d: int, num_experts: int, ranks: int, dtype_bytes: int
) -> dict[str, float]:
    """Bytes of all-gathering U and V shards (forward) and reduce-scattering dU, dV (backward)."""
    per_direction = 2 * num_experts * d * dtype_bytes * (ranks - 1) / ranks
    return {"forward": per_direction, "backward": per_direction, "total": 2 * per_direction}


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
    """Predicted bytes one rank sends per layer: ``forward``, ``backward``, ``total`` (+ detail).

    ``dest_ranks_per_token`` replaces the uniform-routing expectation for ``rows`` (e.g. by the
    average the dispatch logged), since the Cartesian router clusters a token's experts.
    """
    if mode == "rows":
        dest = dest_ranks_per_token
        if dest is None:
            dest = expected_dest_ranks(num_experts=num_experts, top_k=k, ranks=ranks)
        remote_dest = dest * (ranks - 1) / ranks  # by symmetry every rank is equally likely
        predicted = rows_bytes(
            d=d,
            remote_rows=tokens * remote_dest,
            remote_pairs=tokens * k * (ranks - 1) / ranks,
            ranks=ranks,
            dtype_bytes=dtype_bytes,
            weight_bytes=weight_bytes,
        )
        return {**predicted, "dest_ranks_per_token": dest}
    if mode == "dim":
        predicted = dim_bytes(
            tokens=tokens, d=d, k=k, ranks=ranks, dtype_bytes=dtype_bytes, score_bytes=score_bytes
        )
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
