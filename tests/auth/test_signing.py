"""The signing key ring: generated 0600 in dev, required elsewhere, rotated publish-first."""

from __future__ import annotations

import stat
import time
from pathlib import Path

import pytest

from narthex.auth.signing import SigningKeyRing
from narthex.common.tokens import SigningKey


def kids(ring: SigningKeyRing) -> list[str]:
    return [key["kid"] for key in ring.jwks()["keys"]]


def test_dev_generates_a_private_key_readable_only_by_its_owner(tmp_path: Path) -> None:
    ring = SigningKeyRing(tmp_path / "keys", generate=True)
    pem = tmp_path / "keys" / "current.pem"
    assert stat.S_IMODE(pem.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "keys").stat().st_mode) == 0o700
    assert kids(ring) == [ring.signing_key().kid]


def test_the_same_key_is_loaded_on_the_next_start(tmp_path: Path) -> None:
    first = SigningKeyRing(tmp_path, generate=True).signing_key().kid
    assert SigningKeyRing(tmp_path, generate=True).signing_key().kid == first


def test_outside_dev_a_missing_key_is_an_error_not_a_new_key(tmp_path: Path) -> None:
    from narthex.auth.signing import KeyRingError

    with pytest.raises(KeyRingError, match="no signing key"):
        SigningKeyRing(tmp_path / "mounted-secret", generate=False)
    assert not (tmp_path / "mounted-secret").exists()


def test_a_provided_key_is_used_as_is(tmp_path: Path) -> None:
    provided = SigningKey.generate()
    (tmp_path / "current.pem").write_bytes(provided.to_pem())
    assert SigningKeyRing(tmp_path, generate=False).signing_key().kid == provided.kid


def test_rotation_publishes_the_new_key_before_it_signs(tmp_path: Path) -> None:
    ring = SigningKeyRing(tmp_path, generate=True)
    old = ring.signing_key().kid
    new = ring.rotate(publish_for=60.0).kid
    assert new != old
    assert set(kids(ring)) == {old, new}  # published at once...
    assert ring.signing_key().kid == old  # ...but the old key still signs
    assert stat.S_IMODE((tmp_path / "next.pem").stat().st_mode) == 0o600
    # A restart in the middle of a rotation keeps its schedule.
    again = SigningKeyRing(tmp_path, generate=True)
    assert again.signing_key().kid == old
    assert set(kids(again)) == {old, new}


def test_after_the_publish_period_the_new_key_signs_and_the_old_stays_published(
    tmp_path: Path,
) -> None:
    ring = SigningKeyRing(tmp_path, generate=True)
    old = ring.signing_key().kid
    new = ring.rotate(publish_for=0.05).kid
    time.sleep(0.1)
    assert ring.signing_key().kid == new
    assert set(kids(ring)) == {new, old}  # tokens the old key signed still verify
    assert SigningKeyRing(tmp_path, generate=True).signing_key().kid == new


def test_a_second_rotation_during_one_under_way_changes_nothing(tmp_path: Path) -> None:
    ring = SigningKeyRing(tmp_path, generate=True)
    first = ring.rotate(publish_for=60.0).kid
    assert ring.rotate(publish_for=60.0).kid == first
    assert len(kids(ring)) == 2
