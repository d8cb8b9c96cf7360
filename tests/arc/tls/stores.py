"""The real Cryptosaur as the certificate source of data-plane tests.

``cryptosaur_source(tmp_path)`` runs Cryptosaur in a real runtime (SQLite
store in ``tmp_path``). ``CryptosaurSource.fetch`` is the coroutine the
context cache awaits on a miss: ``getCertificate`` through
``runtime.ask_async``, exactly as Esper asks, with an optional delay after
the answer arrives (a slow store, or a reply in transit).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from actors.cryptosaur import Cryptosaur
from arc.config import Config
from arc.runtime import Runtime
from arc.testing import running
from tests.certs import Chain, make_chain

ASK_TIMEOUT_S = 10.0


class CryptosaurSource:
    """Uploads to, and fetches from, a running Cryptosaur."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.calls: list[str] = []
        self.delay_s = 0.0

    def add(self, *domains: str, key_type: str = "EC P-256") -> Chain:
        """Make one chain covering ``domains`` and upload it."""
        chain = make_chain(*domains, key_type=key_type)
        self.runtime.ask(
            "Cryptosaur", "setCertificate", {"bundle": chain.bundle()}, ASK_TIMEOUT_S
        )
        return chain

    def delete(self, domain: str) -> None:
        """Delete the certificate stored for exactly ``domain``."""
        self.runtime.ask(
            "Cryptosaur", "deleteCertificate", {"domain": domain}, ASK_TIMEOUT_S
        )

    async def fetch(self, name: str) -> Mapping[str, Any]:
        """Ask Cryptosaur for ``name`` as Esper does; answer after the delay."""
        self.calls.append(name)
        try:
            answer: Mapping[str, Any] = await self.runtime.ask_async(
                "Cryptosaur", "getCertificate", {"domain": name}, ASK_TIMEOUT_S
            )
        finally:
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
        return answer


@contextmanager
def cryptosaur_source(tmp_path: Path) -> Iterator[CryptosaurSource]:
    """A running Cryptosaur with an empty store in ``tmp_path``."""
    config = Config.embedded(data_dir=tmp_path / "data").with_settings(local_ca=False)
    with running([Cryptosaur], config) as runtime:
        yield CryptosaurSource(runtime)
