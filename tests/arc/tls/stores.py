"""A certificate source for data-plane tests that run without actors.

``DictStore.fetch`` is a real coroutine answering like Cryptosaur's
``getCertificate`` (exact name, then the wildcard one label up) from a dict
of chains made with ``tests.certs``; it can be told to answer slowly. The
actor tests use the real Cryptosaur instead.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from arc.errors import NotFound
from arc.names import candidates
from tests.certs import Chain, make_chain


class DictStore:
    """Chains by domain, served by an awaitable fetch."""

    def __init__(self) -> None:
        self.chains: dict[str, Chain] = {}
        self.calls: list[str] = []
        self.delay_s = 0.0

    def add(self, *domains: str, key_type: str = "EC P-256") -> Chain:
        """Make one chain covering ``domains``; store it under each."""
        chain = make_chain(*domains, key_type=key_type)
        for domain in domains:
            self.chains[domain] = chain
        return chain

    async def fetch(self, name: str) -> Mapping[str, Any]:
        """Answer like ``Cryptosaur.getCertificate``."""
        self.calls.append(name)
        answer = self.answer(name)
        # The answer is read first and delivered late, like a reply in transit.
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if answer is None:
            raise NotFound(f"no certificate for {name}")
        return answer

    def answer(self, name: str) -> Mapping[str, Any] | None:
        """What the store holds for ``name`` now (exact, then wildcard)."""
        for candidate in candidates(name):
            chain = self.chains.get(candidate)
            if chain is not None:
                return {
                    "domain": candidate,
                    "chain_pem": chain.chain_pem,
                    "key_pem": chain.key_pem,
                    "fingerprint": chain.fingerprint,
                }
        return None
