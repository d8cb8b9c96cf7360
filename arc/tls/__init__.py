"""TLS for many domains: the pieces Esper puts together.

- :mod:`arc.tls.clienthello`: the server name and ALPN of a ClientHello,
  from bytes (``parse_client_hello``).
- :mod:`arc.tls.context`: a server context for one domain from PEM bytes in
  memory (``build_context``), Mozilla's intermediate profile.
- :mod:`arc.tls.opensslconf`: the OpenSSL configuration that restricts the
  key-exchange groups; ``ensure_openssl_conf`` runs first in ``arcology run``.
- :mod:`arc.tls.cache`: the per-domain context cache (``ContextCache``).
- :mod:`arc.tls.listener`: listening sockets (``open_sockets``,
  ``raise_fd_limit``).
- :mod:`arc.tls.accept`: the accept path of TLS and plain listeners
  (``TlsListener``, ``PlainListener``).

Nothing is re-exported here: importing this package must not load OpenSSL,
so that ``arc.tls.opensslconf`` can run before it does.
"""
