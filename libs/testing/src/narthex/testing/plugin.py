"""The pytest plugin (`-p narthex.testing.plugin`, in pyproject's addopts) that gives a test
session its Redis and PostgreSQL (`backing`) before any conftest or test module reads their
URLs, says which in the header, and stops the private ones at the end."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from contextlib import ExitStack
from pathlib import Path

import pytest

from narthex.testing.backing import POSTGRES, REDIS, Unavailable, provided

__all__ = ["pytest_load_initial_conftests", "pytest_report_header"]

_LINES = pytest.StashKey[list[str]]()


# tryfirst: before pytest's own implementation, which imports the conftests (and with them
# the modules that read NARTHEX_TEST_REDIS_URL and NARTHEX_TEST_POSTGRES_URL once).
@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config) -> None:
    options = early_config.known_args_namespace
    if options.help or options.version:
        return
    stack = ExitStack()
    # Cleanups run at the session's end; atexit also covers a start-up that fails later
    # (a conftest that does not import), which never reaches them. Closing twice is a no-op.
    early_config.add_cleanup(stack.close)
    atexit.register(stack.close)
    directory = Path(tempfile.mkdtemp(prefix="narthex-test-servers-"))
    stack.callback(shutil.rmtree, directory, ignore_errors=True)
    try:
        lines = [
            stack.enter_context(provided(backing, directory, os.environ)).line()
            for backing in (REDIS, POSTGRES)
        ]
    except Unavailable as exc:
        stack.close()
        raise pytest.UsageError(str(exc)) from None
    except BaseException:
        stack.close()
        raise
    early_config.stash[_LINES] = lines


def pytest_report_header(config: pytest.Config) -> list[str]:
    return config.stash.get(_LINES, [])
