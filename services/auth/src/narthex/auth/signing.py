"""The auth service's signing keys: current, previous and next, on disk, rotated safely."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from narthex.common.tokens import SigningKey

CURRENT, PREVIOUS, NEXT = "current.pem", "previous.pem", "next.pem"
SCHEDULE = "next.json"


class KeyRingError(Exception):
    """The key directory is missing or unreadable where keys must be provided."""


@dataclass(frozen=True)
class KeySet:
    current: SigningKey
    previous: SigningKey | None
    next: SigningKey | None
    promote_at: float | None


def _write_private(path: Path, data: bytes) -> None:
    # Created 0600 from the start (never world-readable for an instant), then renamed
    # into place so a reader never sees half a key.
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
    os.replace(tmp, path)


class SigningKeyRing:
    """Signs with `current`; publishes current, previous and next in the JWKS.

    Rotation adds a `next` key that is published at once but signs nothing until
    `promote_at`, so every verifier has fetched it before the first token it signs
    arrives. At that time `current` becomes `previous` (still published, so tokens it
    signed stay valid until they expire) and `next` becomes `current`.
    """

    def __init__(self, directory: Path, *, generate: bool) -> None:
        self.directory = directory
        self.generate = generate
        self._keys = self._load()

    def _load(self) -> KeySet:
        current_path = self.directory / CURRENT
        if not current_path.exists():
            if not self.generate:
                raise KeyRingError(f"no signing key at {current_path}")
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            _write_private(current_path, SigningKey.generate().to_pem())
        schedule = self.directory / SCHEDULE
        promote_at = json.loads(schedule.read_text())["promote_at"] if schedule.exists() else None
        return KeySet(
            current=SigningKey.from_pem(current_path.read_bytes()),
            previous=self._optional(PREVIOUS),
            next=self._optional(NEXT),
            promote_at=promote_at,
        )

    def _optional(self, name: str) -> SigningKey | None:
        path = self.directory / name
        return SigningKey.from_pem(path.read_bytes()) if path.exists() else None

    def _promote_if_due(self) -> None:
        keys = self._keys
        if keys.next is None or keys.promote_at is None or time.time() < keys.promote_at:
            return
        os.replace(self.directory / CURRENT, self.directory / PREVIOUS)
        os.replace(self.directory / NEXT, self.directory / CURRENT)
        (self.directory / SCHEDULE).unlink(missing_ok=True)
        self._keys = KeySet(current=keys.next, previous=keys.current, next=None, promote_at=None)

    @property
    def promote_at(self) -> float | None:
        """When the published `next` key starts signing (None: no rotation under way)."""
        return self._keys.promote_at

    def signing_key(self) -> SigningKey:
        self._promote_if_due()
        return self._keys.current

    def jwks(self) -> dict[str, Any]:
        self._promote_if_due()
        keys = self._keys
        published = [k for k in (keys.current, keys.next, keys.previous) if k is not None]
        return {"keys": [key.public_jwk() for key in published]}

    def rotate(self, publish_for: float) -> SigningKey:
        """Publish a new key now; it starts signing after `publish_for` seconds."""
        self._promote_if_due()
        if self._keys.next is not None:
            return self._keys.next  # a rotation is already under way
        key = SigningKey.generate()
        promote_at = time.time() + publish_for
        _write_private(self.directory / NEXT, key.to_pem())
        (self.directory / SCHEDULE).write_text(json.dumps({"promote_at": promote_at}))
        self._keys = KeySet(self._keys.current, self._keys.previous, key, promote_at)
        return key
