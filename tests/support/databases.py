"""Per-test SQLite and PostgreSQL databases: `narthex.testing.databases`, under its old name."""

from __future__ import annotations

from narthex.testing.databases import *  # noqa: F403 - the module, under the name tests import
