"""Redis and PostgreSQL servers of a test's own, from Debian's binaries, on free loopback
ports: started by the one launcher (`processes`), stopped, their data thrown away."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from redis import Redis as SyncRedis
from redis.exceptions import RedisError

from narthex.testing import processes
from narthex.testing.processes import HOST, Spec, free_port

__all__ = [
    "MissingBinary",
    "PrivatePostgres",
    "PrivateRedis",
    "postgres_bindir",
    "private_redis",
    "redis_binary",
]

_DEBIAN_POSTGRES = Path("/usr/lib/postgresql")
_TAIL_CHARS = 2000


class MissingBinary(RuntimeError):
    """A server's binary is not installed (or cannot run here); the message says which."""


def redis_binary() -> str:
    if (found := shutil.which("redis-server")) is None:
        raise MissingBinary("redis-server is not installed")
    return found


def postgres_bindir() -> Path:
    """The directory of `initdb` and `postgres`: where the one on PATH really lives, else
    the newest of Debian's /usr/lib/postgresql/<version>/bin (not on PATH there)."""
    if (on_path := shutil.which("initdb")) is not None:
        return Path(on_path).resolve().parent
    versions = [
        path.parent
        for path in _DEBIAN_POSTGRES.glob("*/bin/initdb")
        if path.parent.parent.name.isdigit()
    ]
    if not versions:
        raise MissingBinary("PostgreSQL is not installed")
    return max(versions, key=lambda bindir: int(bindir.parent.name))


# -- Redis --------------------------------------------------------------------------------------


class PrivateRedis:
    """`redis-server` on a free loopback port, no persistence; `kill()` is SIGKILL.

    `args` go to redis-server after the defaults (`{port}` is replaced by the port)."""

    def __init__(self, directory: Path, args: Sequence[str] = ()) -> None:
        self.port = free_port()
        self.url = f"redis://{HOST}:{self.port}/0"
        self.directory = directory
        self.args = [arg.replace("{port}", str(self.port)) for arg in args]
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, timeout: float = 10.0) -> None:
        assert self.process is None or self.process.poll() is not None
        self.starts += 1
        argv: tuple[str, ...] = ("redis-server", "--port", "{port}", "--bind", HOST)
        argv += ("--save", "", "--appendonly", "no", "--daemonize", "no", *self.args)
        server = processes.start(
            Spec("redis-server", argv),
            self.directory,
            port=self.port,
            log_name=f"redis-{self.port}-{self.starts}",
            cwd=self.directory,
        )
        self.process = server.process
        try:
            processes.wait_answers(server, self._probe, timeout, "to PING")
        except BaseException:
            self.stop()  # never leave a half-started server behind
            raise

    def ping(self) -> bool:
        return self._probe() is None

    def _probe(self) -> str | None:
        client = SyncRedis(
            host=HOST, port=self.port, socket_connect_timeout=0.5, socket_timeout=0.5
        )
        try:
            return None if client.ping() else "no PONG"
        except (RedisError, OSError) as exc:
            return repr(exc)
        finally:
            client.close()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None:
            processes.stop(self.process)


@contextmanager
def private_redis(directory: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(directory)
    try:
        server.start()
        yield server
    finally:
        server.stop()


# -- PostgreSQL ---------------------------------------------------------------------------------


class PrivatePostgres:
    """`postgres` on a free loopback port over a fresh cluster: trust authentication,
    superuser `postgres`, database `test` (the shape of the shared test server), no fsync
    (its data is thrown away). Logs go to `directory`; the cluster to a temporary directory
    of its own, deleted by `stop()`.

    PostgreSQL refuses to run as root, so as root the cluster belongs to, and the server
    runs as, Debian's `postgres` user (`nobody` without one)."""

    def __init__(self, directory: Path, bindir: Path | None = None) -> None:
        self.bindir = bindir or postgres_bindir()
        self.port = free_port()
        self.url = f"postgresql://postgres@{HOST}:{self.port}/test"
        self.directory = directory
        self.data: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> None:
        assert self.process is None
        as_user = _unprivileged()
        # Its own directory under the system temp dir: pytest's are 0700, closed to `postgres`.
        self.data = Path(tempfile.mkdtemp(prefix="narthex-postgres-"))
        try:
            if as_user:
                os.chown(self.data, *_ids(as_user))
            data = str(self.data)
            initdb = [*_as(as_user), str(self.bindir / "initdb"), "--pgdata", data, "--no-sync"]
            initdb += ["--username", "postgres", "--auth", "trust", "--no-locale", "-E", "UTF8"]
            self._run(initdb)
            postgres = [*_as(as_user), str(self.bindir / "postgres"), "-D", data, "-h", HOST]
            postgres += ["-p", "{port}", "-k", data, "-c", "fsync=off"]
            postgres += ["-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
            server = processes.start(
                Spec("postgres", tuple(postgres)),
                self.directory,
                port=self.port,
                log_name=f"postgres-{self.port}",
                cwd=self.data,
            )
            self.process = server.process
            processes.wait_answers(server, self._probe, timeout, "to pg_isready")
            self._run([str(self.bindir / "createdb"), *self._where(), "test"])
        except BaseException:
            self.stop()  # never leave a half-started server behind
            raise

    def _where(self) -> tuple[str, ...]:
        return ("--host", HOST, "--port", str(self.port), "--username", "postgres")

    def _probe(self) -> str | None:
        argv = (str(self.bindir / "pg_isready"), *self._where(), "--timeout", "1")
        result = subprocess.run(argv, capture_output=True, text=True, check=False)
        return None if result.returncode == 0 else result.stdout.strip() or "no answer"

    def _run(self, argv: Sequence[str]) -> None:
        result = subprocess.run(
            argv,
            cwd=self.data,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            output = (result.stdout + result.stderr).strip()[-_TAIL_CHARS:]
            raise RuntimeError(f"{' '.join(argv)} exited with {result.returncode}:\n{output}")

    def stop(self) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                # Fast shutdown: SIGTERM's smart one waits for every client to disconnect.
                self.process.send_signal(signal.SIGINT)
            processes.stop(self.process)
        if self.data is not None:
            shutil.rmtree(self.data, ignore_errors=True)


def _unprivileged() -> str | None:
    """The user to run PostgreSQL as when this process is root, else None (run as is)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return name
    raise MissingBinary("PostgreSQL will not run as root, and there is no postgres user")


def _ids(user: str) -> tuple[int, int]:
    entry = pwd.getpwnam(user)
    return entry.pw_uid, entry.pw_gid


def _as(user: str | None) -> tuple[str, ...]:
    """An argv prefix that runs the rest as `user` (setpriv execs: the pid is the server's)."""
    if user is None:
        return ()
    uid, gid = _ids(user)
    return ("setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--")
