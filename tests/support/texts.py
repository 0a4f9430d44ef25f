"""Sample texts for embedding models: `narthex.testing.texts`, under its old name."""

from __future__ import annotations

from narthex.testing.texts import *  # noqa: F403 - the module, under the name tests import
