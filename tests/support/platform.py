"""The edge as real processes and the load that measures its limits: `narthex.testing.platform`,
under its old name."""

from __future__ import annotations

from narthex.testing.platform import *  # noqa: F403 - the module, under the name tests import
