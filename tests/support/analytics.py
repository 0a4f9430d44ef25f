"""The analytics service and Redis as test processes: `narthex.testing.analytics`, under its
old name."""

from __future__ import annotations

from narthex.testing.analytics import *  # noqa: F403 - the module, under the name tests import
