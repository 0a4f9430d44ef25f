"""A service a test needs is missing: skipped on a laptop, a failure in CI (CI=true)."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

__all__ = ["service_unavailable"]


def service_unavailable(reason: str) -> NoReturn:
    """Skip on a laptop without the service; fail in CI, where its absence is a broken setup."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: a missing service fails, it is not skipped)")
    pytest.skip(reason)
