"""A standalone Mesh whose identity tokens come from the tests' issuer instead of a registry.

Without a registry a Mesh sends no identity token, and the sample apps' upstreams are strict:
they answer 401 to a caller without one. Here the tokens are minted by a real
:class:`~mesh_middleware.TokenIssuer` (the registry's own issuer class) and verified by the
upstreams against its JWKS (``MESH_JWKS``), so every policy is enforced as it is written.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from mesh_middleware import Mesh, TokenIssuer


class MintingMesh(Mesh):
    """A :class:`Mesh` that mints its outbound identity tokens with ``issuer``."""

    def __init__(self, policy: str | Path, *, issuer: TokenIssuer, **options: Any) -> None:
        super().__init__(policy, **options)
        self._issuer = issuer
        self._tokens: dict[str, str] = {}
        self._tokens_lock = threading.Lock()

    def identity_token(self, audience: str, *, wait: float = 1.0) -> str | None:
        """A token saying this service calls ``audience``, minted once per audience."""
        with self._tokens_lock:
            token = self._tokens.get(audience)
            if token is None:
                token = self._tokens[audience] = self._issuer.mint(self.service, audience)
            return token

    def cached_identity_token(self, audience: str) -> str | None:
        """As :meth:`identity_token`: minting never blocks for long."""
        return self.identity_token(audience)


def mesh_from_env() -> MintingMesh:
    """A :class:`MintingMesh` for a server process: ``MESH_POLICY``, ``MESH_JWKS`` and
    ``SHOP_TEST_ISSUER_KEY`` (the issuer's private key, written by ``save_private_key``)."""
    issuer = TokenIssuer.from_private_key_file(os.environ["SHOP_TEST_ISSUER_KEY"])
    return MintingMesh(os.environ["MESH_POLICY"], issuer=issuer, jwks=os.environ["MESH_JWKS"])
