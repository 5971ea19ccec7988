"""The HTTP edge: where an aiohttp request becomes an ``Exchange`` and a ``Reply`` becomes bytes.

``surfaces`` is the table of proxied paths (which parser, which error dialect, which
finisher); ``serve`` is the one aiohttp handler for all of them — the outermost step, which
names the request, renders every error in the surface's dialect, writes the reply and the
access record; ``steps`` are the edge's own steps (the HTTP version, authentication, parsing)
before the request flow (``gateway.flow``) takes over.
"""
