"""Keyed references to private items (source paths, original UIDs).

Object names, task-run names, logs and artifacts that must point at a private item (a source
file's path, a PACS study's UID, a batch of paths) use :meth:`RefKey.ref`: HMAC-SHA256 under a
key only the site holds, never a plain hash, which anyone could recompute from a guessed path
or UID to confirm it. The key is derived (HKDF-SHA256) from the site secret
(:func:`tasks.deid.secret.load_site_secret`). A site that has not configured its secret yet
(ingest and PACS pulls may run before the first de-identification) gets a random key created
once and kept in its own store (``keys/reference.key``, never published); references then
change once when the secret is configured.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass, field

from tasks.deid.pseudonyms import hkdf_sha256
from tasks.deid.secret import load_site_secret
from tasks.errors import OncoflowError
from tasks.store import Existing, SiteStore

#: Store key of the random reference key of a site without a configured secret.
REFERENCE_KEY = "keys/reference.key"


@dataclass(frozen=True)
class RefKey:
    """An HMAC key for references (``repr`` hides the key)."""

    key: bytes = field(repr=False)

    def ref(self, item: str, length: int = 12) -> str:
        """Return the keyed reference of ``item``: ``length`` hex digits of HMAC-SHA256."""
        data = item.encode("utf-8", "surrogateescape")
        return hmac.new(self.key, data, hashlib.sha256).hexdigest()[:length]


_KEYS: dict[tuple[str, str], RefKey] = {}


def site_ref_key(store: SiteStore) -> RefKey:
    """Return the reference key of the store's site (cached per process).

    Parameters
    ----------
    store
        The site store (its site selects the secret; it holds the fallback key).
    """
    cached = _KEYS.get((store.url, store.site))
    if cached is not None:
        return cached
    try:
        secret = load_site_secret(store.site)
        key = hkdf_sha256(secret, f"oncoflow/reference/{store.site}".encode())
    except OncoflowError:
        if not store.exists(REFERENCE_KEY):
            store.write_bytes(REFERENCE_KEY, secrets.token_bytes(32), mode=Existing.SKIP)
        key = store.read_bytes(REFERENCE_KEY)
    ref = RefKey(key)
    _KEYS[(store.url, store.site)] = ref
    return ref
