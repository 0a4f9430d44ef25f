"""Where a state directory keeps the auth service's database and signing keys, and the
analytics service's database."""

from __future__ import annotations

from pathlib import Path


def auth_database_url(state_dir: Path) -> str:
    # Absolute: the services run with their own working directory in mind, not ours.
    return f"sqlite+aiosqlite:///{state_dir.resolve() / 'auth.db'}"


def signing_keys_dir(state_dir: Path) -> Path:
    return state_dir.resolve() / "keys"


def analytics_database_url(state_dir: Path) -> str:
    return f"sqlite+aiosqlite:///{state_dir.resolve() / 'analytics.db'}"
