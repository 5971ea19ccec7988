"""The request flow: the chain of policies a request runs through, and what it is built from.

``chain`` is the shape every step has, ``context`` what a policy factory may use, ``build``
puts the chain together (once per config).
"""
