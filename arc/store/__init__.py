"""The certificate store: where bundles live between uploads and handshakes.

Public: ``open_store(settings)`` gives a ``Store``; ``lookup(store, name)``
finds the certificate for a name (exact, then the wildcard one label up);
``Store``, ``StoredCertificate`` and ``Backend`` describe the shapes.

How a store is put together: a ``Backend`` keeps rows (``arc.store.sqlite``,
or ``arc.store.postgres`` for a cluster) and never sees a plaintext private
key; ``SealedStore`` seals keys with the ``MasterKey`` read from
``master_key_file`` before they reach the backend. ``open_store`` also makes
sure the key file belongs to the store: it is created only for a store that
has never held a key, and a key that does not match the store's check value
is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from arc.errors import ConfigError
from arc.store.base import Backend, CertificateRecord, Store, StoredCertificate
from arc.store.keys import MasterKey, load_master_key
from arc.store.sealed import MASTER_KEY_CHECK, SealedStore, lookup

__all__ = [
    "Backend",
    "CertificateRecord",
    "MasterKey",
    "SealedStore",
    "Store",
    "StoredCertificate",
    "lookup",
    "open_backend",
    "open_store",
]


class StoreSettings(Protocol):
    """The settings a store needs (``arc.config.Settings`` has them)."""

    @property
    def data_dir(self) -> Path: ...
    @property
    def store(self) -> str: ...
    @property
    def master_key_file(self) -> Path: ...


def open_backend(settings: StoreSettings, *, check: bool = True) -> Backend:
    """The backend that ``settings.store`` names, opened.

    ``check=False`` skips SQLite's integrity check of the whole file, for a
    second connection to a store this process has opened (and checked).
    """
    kind = settings.store
    if kind == "sqlite":
        from arc.store.sqlite import FILE_NAME, SqliteBackend

        settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        return SqliteBackend(settings.data_dir / FILE_NAME, check=check)
    if kind.startswith(("postgresql://", "postgres://")):
        from arc.store.postgres import PostgresBackend

        return PostgresBackend(kind)
    raise ConfigError(f'store: expected "sqlite" or "postgresql://..." (got {kind!r})')


def open_store(settings: StoreSettings) -> Store:
    """Open the configured store with its master key.

    Raises:
        ConfigError: unknown store kind, or a master key file that is
            missing, malformed, or not the one the store was sealed with.
        Internal: the store's file is damaged.
    """
    backend = open_backend(settings)
    try:
        check = backend.get_meta(MASTER_KEY_CHECK)
        key = load_master_key(settings.master_key_file, may_create=check is None)
        if check is None:
            backend.set_meta(MASTER_KEY_CHECK, key.check_value())
        elif not key.matches(check):
            raise ConfigError(
                f"master key file {settings.master_key_file} does not open this "
                "certificate store (it was sealed with another key); restore the "
                "right key file"
            )
    except BaseException:
        backend.close()
        raise
    return SealedStore(backend, key)
