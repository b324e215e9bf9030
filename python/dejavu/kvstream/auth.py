"""The cluster token as DéjàVuLib's peers use it: keys derived from it, and the checks every
listener makes before it reads more than a HELLO or allocates anything.

The token is a shared secret: whoever presents it is a full member of the deployment.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets

TOKEN_ENV = "DEJAVU_CLUSTER_TOKEN"
HELLO_MAX = 4096          # bytes of a HELLO frame (read before the token is checked)
AUTH_DEADLINE = 10.0      # seconds a new connection has to present a valid HELLO


def new_cluster_token() -> str:
    return secrets.token_hex(16)


def derive_key(token: str, purpose: str) -> bytes:
    """A 32-byte key for `purpose`, derived from the token (HMAC-SHA256 as a KDF)."""
    return hmac.new(token.encode(), b"dejavu/" + purpose.encode(), hashlib.sha256).digest()


def cluster_tag(token: str) -> str:
    """A deployment's name in files and shared-memory objects (which others may list): derived from
    the token, so it reveals nothing of it."""
    return derive_key(token, "names").hex()[:12]


def token_matches(presented, token: str) -> bool:
    """Whether a peer's `presented` token (any type, from the wire) is `token`; constant time."""
    return isinstance(presented, str) and hmac.compare_digest(presented.encode(), token.encode())
