"""The built-in models for tests: `narthex.testing.models`, under its old name."""

from __future__ import annotations

from narthex.testing.models import *  # noqa: F403 - the module, under the name tests import
