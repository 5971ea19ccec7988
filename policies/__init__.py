"""Reliability policies: one small module each, one factory returning one middleware.

Each is ``async def __call__(ex, call_next) -> Reply`` over the gateway's own
types (``gateway.flow.exchange``); the order they run in is listed in one place,
``gateway.flow.build``.
"""
