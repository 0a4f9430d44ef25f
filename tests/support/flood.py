"""One tenant floods inference while another sends a little: `narthex.testing.flood`, under its
old name."""

from __future__ import annotations

from narthex.testing.flood import *  # noqa: F403 - the module, under the name tests import
