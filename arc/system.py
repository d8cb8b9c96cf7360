"""Which actors make up an Arcology process."""

from __future__ import annotations

from arc.actor import Actor


def core_actors() -> list[type[Actor]]:
    """The four core actors, in the order they are usually listed."""
    from actors.ai1 import AI1
    from actors.cryptosaur import Cryptosaur
    from actors.esper import Esper
    from actors.hyperion import Hyperion

    return [Cryptosaur, Esper, Hyperion, AI1]
