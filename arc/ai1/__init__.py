"""The ``ai1`` admin tool: the client side of Arcology's admin channel.

Public:

- ``AdminClient`` (``arc.ai1.client``): one authenticated connection; ``ask``
  and pipelined ``pipeline`` requests. ``Unreachable`` when it cannot be.
- ``main`` (``arc.ai1.cli``): the ``ai1`` console script.

``arc.ai1.render`` holds the human output and the stable ``--json`` shapes
(documented in docs/ai1.md); ``arc.ai1.repl`` the interactive session.
"""

from arc.ai1.client import AdminClient, Unreachable

__all__ = ["AdminClient", "Unreachable"]
