"""The shape of every step of the request flow, and how steps are put together.

A policy is ``async def policy(ex, call_next) -> Reply``: it may answer early, change the
exchange, or wrap what comes back (Starlette's middleware, Go's ``http.Handler`` wrappers).
``compose`` binds a list of them, outermost first, around an innermost ``Handler``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from gateway.flow.exchange import Exchange, Reply

Handler = Callable[["Exchange"], Awaitable["Reply"]]


class Policy(Protocol):
    """An ``async def``, or a plain function that returns ``call_next(ex)`` itself when it has nothing
    to do (no coroutine frame of its own on the common path)."""

    def __call__(self, ex: Exchange, call_next: Handler) -> Awaitable[Reply]: ...


def compose(policies: Sequence[Policy | None], innermost: Handler) -> Handler:
    """``policies`` (outermost first; a None is left out) around ``innermost``."""
    handler = innermost
    for policy in reversed(policies):
        if policy is not None:
            handler = _bind(policy, handler)
    return handler


def _bind(policy: Policy, call_next: Handler) -> Handler:
    """``policy`` with its ``call_next``: a closure, cheaper per call than a keyword ``partial``."""
    def step(ex: Exchange) -> Awaitable[Reply]:
        return policy(ex, call_next)
    return step
