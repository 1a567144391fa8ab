"""Exchanges of the expert-parallel group issued now and waited for later, with autograd.

With ``parallel.ep_overlap`` the OmniMoE layer starts its token exchange before the router runs
(the tokens do not depend on the routing) and computes the shared SwiGLU while the routed output
travels back; the backward overlaps the mirrored exchanges with the shared branch's and the
router's backward. On NCCL an ``async_op=True`` collective runs on NCCL's own stream and
``Work.wait()`` only makes the current stream wait for it, so compute launched between the issue
and the wait overlaps the transfer without a host sync (gloo: a background thread).

One exchange in flight is two autograd nodes sharing a ``_Link``::

    forward   _Issue(t) -> buffer (being written) ... other work ... _Land(buffer) -> result
    backward  _Land's backward issues the adjoint exchange of the incoming gradient;
              ... the other work's backward ...
              _Issue's backward waits for it and returns its result as t's gradient.

Why the backward overlaps too: the autograd engine runs the ready node with the highest
sequence number first (the one created last in the forward). ``_Land`` is created after the
work done between the two calls and ``_Issue`` before it, so once ``_Land``'s backward has
issued the adjoint, the in-between work's backward (when it is ready by then) runs before
``_Issue``'s backward waits. The ranks build the same graph, so their backward issues the
exchanges in the same order (the collectives cannot deadlock). Values are those of the same
exchanges waited for at once: only the time at which the host waits moves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from omnimoe_train.parallel.collectives import GroupComm, InFlight

Exchange = Callable[[torch.Tensor], InFlight]


class _Link:
    """What an ``_Issue`` and its ``_Land`` share: the adjoint exchange of the backward, and
    each direction's exchange while it is in flight."""

    def __init__(self, backward_exchange: Exchange) -> None:
        self.backward_exchange = backward_exchange
        self.forward: InFlight | None = None
        self.backward: InFlight | None = None


class _Issue(torch.autograd.Function):
    @staticmethod
    def forward(ctx, link: _Link, exchange: Exchange, t: torch.Tensor) -> torch.Tensor:
        ctx.link = link
        ctx.set_materialize_grads(False)  # _Land passes no gradient: the adjoint carries it
        link.forward = exchange(t)
        return link.forward.out

    @staticmethod
    def backward(ctx, _unused: torch.Tensor | None):
        pending, ctx.link.backward = ctx.link.backward, None
        return None, None, pending.wait() if pending is not None else None


class _Land(torch.autograd.Function):
    @staticmethod
    def forward(ctx, link: _Link, buffer: torch.Tensor) -> torch.Tensor:
        del buffer  # the same tensor as link.forward's output: it orders this node after _Issue
        ctx.link = link
        ctx.set_materialize_grads(False)
        return link.forward.wait()

    @staticmethod
    def backward(ctx, grad: torch.Tensor | None):
        if grad is not None:
            # The adjoint exchange keeps ``grad`` alive until _Issue's backward waits for it.
            ctx.link.backward = ctx.link.backward_exchange(grad)
        return None, None


@dataclass
class PendingExchange:
    """A tensor on its way through an exchange; ``finish()`` waits and returns it, with
    ``post`` (ordinary autograd ops, e.g. reassembling column slices) applied."""

    _link: _Link
    _buffer: torch.Tensor
    post: Callable[[torch.Tensor], torch.Tensor] | None = None

    def finish(self) -> torch.Tensor:
        out = _Land.apply(self._link, self._buffer)
        return out if self.post is None else self.post(out)


def start_exchange(t: torch.Tensor, forward: Exchange, backward: Exchange) -> PendingExchange:
    """Issue ``forward(t)`` now; the gradient of the result goes through ``backward`` (its
    adjoint: gather <-> scatter-sum, all-to-all to owners <-> back), overlapped the same way.

    ``forward`` and ``backward`` must issue ``async_op=True`` collectives (``GroupComm``'s
    ``*_async`` methods); every rank of the group must call this in the same order.
    """
    link = _Link(backward)
    return PendingExchange(link, _Issue.apply(link, forward, t))


@dataclass
class TokensInFlight:
    """The token exchange of one sharded-experts call, started before routing.

    ``x_TD``: this rank's tokens (for the byte accounting); ``tokens``: the exchange, landing
    as ``x_GD`` (rows: all-gathered) or ``x_GDp`` (dim: my column slice of every token);
    ``counted``: whether ``comm`` exchanged the token counts (a host sync, tests only).
    """

    mode: str
    comm: GroupComm
    x_TD: torch.Tensor
    tokens: PendingExchange
    counted: bool
