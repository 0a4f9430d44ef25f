"""The local test Redis under a private key prefix: `narthex.testing.redis`, under its old name."""

from __future__ import annotations

from narthex.testing.redis import *  # noqa: F403 - the module, under the name tests import
