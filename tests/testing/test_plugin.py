"""The plugin end to end, in a pytest of its own with nothing answering at the configured
URLs: private servers whose URLs even conftests read, named in the header, gone after; and
without redis-server, one line saying what to install."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from narthex.testing.backing import POSTGRES, REDIS, postgres_answers, redis_answers
from narthex.testing.processes import free_port

pytestmark = pytest.mark.slow  # a pytest that starts real servers

# Imported by the conftest, so before any test module: the URLs must already be the private ones.
CONFTEST = """
from narthex.testing.databases import POSTGRES_ADMIN_URL
from narthex.testing.redis import REDIS_URL
"""
PROBE = """
import os
from pathlib import Path

from conftest import POSTGRES_ADMIN_URL, REDIS_URL
from narthex.testing.backing import postgres_answers, redis_answers


def test_private_servers_answer_at_the_urls_tests_read():
    assert REDIS_URL == os.environ["NARTHEX_TEST_REDIS_URL"]
    assert POSTGRES_ADMIN_URL == os.environ["NARTHEX_TEST_POSTGRES_URL"]
    assert redis_answers(REDIS_URL) and postgres_answers(POSTGRES_ADMIN_URL)
    Path("urls").write_text(REDIS_URL + " " + POSTGRES_ADMIN_URL)
"""


def session(directory: Path, **env: str) -> subprocess.CompletedProcess[str]:
    (directory / "pytest.ini").write_text("[pytest]\n")
    (directory / "conftest.py").write_text(CONFTEST)
    (directory / "test_probe.py").write_text(PROBE)
    closed = free_port()
    environ = {
        **os.environ,
        REDIS.env: f"redis://127.0.0.1:{closed}/0",
        POSTGRES.env: f"postgresql://postgres@127.0.0.1:{closed}/test",
        **env,
    }
    argv = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "narthex.testing.plugin",
        "-p",
        "no:cacheprovider",
    ]
    return subprocess.run(
        [*argv, "--rootdir", str(directory), "-c", str(directory / "pytest.ini"), "test_probe.py"],
        cwd=directory,
        env=environ,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


def test_nothing_answering_gets_private_servers_stopped_after(tmp_path: Path) -> None:
    result = session(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    redis_url, postgres_url = (tmp_path / "urls").read_text().split()
    redis_port, postgres_port = (urlsplit(url).port for url in (redis_url, postgres_url))
    assert f"Redis: private redis-server on 127.0.0.1:{redis_port}\n" in result.stdout
    assert f"PostgreSQL: private postgres on 127.0.0.1:{postgres_port}\n" in result.stdout
    assert not redis_answers(redis_url)
    assert not postgres_answers(postgres_url)


def test_a_missing_redis_server_stops_the_session_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    result = session(tmp_path, PATH=str(tmp_path / "bin"))  # no redis-server on it
    assert result.returncode == pytest.ExitCode.USAGE_ERROR
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("ERROR: Redis: nothing answers at 127.0.0.1:")
    assert "`apt-get install redis-server`" in lines[0]
    assert not (tmp_path / "urls").exists()
