"""HTTP for Arcology: routing, the connection protocol, static files, ASGI.

Public: ``RoutingTable``, ``Route``, ``derive_listeners`` (routing),
``HttpProtocol`` (one connection), ``StaticFiles``, ``load_app`` and
``Lifespan`` (ASGI).
"""

from arc.http.asgi import Lifespan, load_app
from arc.http.routing import Route, RoutingTable, derive_listeners
from arc.http.server import HttpProtocol
from arc.http.static import StaticFiles

__all__ = [
    "HttpProtocol",
    "Lifespan",
    "Route",
    "RoutingTable",
    "StaticFiles",
    "derive_listeners",
    "load_app",
]
