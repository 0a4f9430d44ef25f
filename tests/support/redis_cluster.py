"""A local three-node Redis Cluster from Debian's redis-server, for the Redis contract suites.

Each node is a `PrivateRedis` in cluster mode on free 127.0.0.1 ports (its cluster bus on
another free port), without persistence, under a temporary directory; `redis-cli
--cluster create` assigns the slots (no replicas). Started once per test module that
imports `redis_cluster_fixture`, and stopped with it. A missing `redis-server` or
`redis-cli` skips, and fails under CI=true.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from redis import Redis as SyncRedis
from redis.asyncio import RedisCluster
from redis.exceptions import RedisError

from narthex.testing.redis import private_prefix
from tests.support.databases import service_unavailable
from tests.support.platform import HOST, PrivateRedis
from tests.support.services import free_port

__all__ = [
    "ClusterScratch",
    "LocalCluster",
    "cluster_scratch",
    "local_redis_cluster",
    "redis_cluster_fixture",
]

_NODES = 3
_CONNECT_TIMEOUT_S = 3.0
# Per node. redis-py's cluster client refuses a call beyond it rather than wait (and then
# tears down connections other calls are using): above any test's concurrency (200).
_MAX_CONNECTIONS = 256


@dataclass(frozen=True)
class LocalCluster:
    nodes: list[PrivateRedis]

    @property
    def url(self) -> str:
        """A node's URL: a cluster client finds the others from it."""
        return self.nodes[0].url


def _state(port: int) -> dict[str, str]:
    client = SyncRedis(host=HOST, port=port, socket_connect_timeout=1.0, socket_timeout=1.0)
    try:
        info = client.cluster("INFO")
    finally:
        client.close()
    if isinstance(info, dict):  # redis-py parses the reply
        return {str(k): str(v) for k, v in info.items()}
    text = info.decode() if isinstance(info, bytes) else str(info)
    return dict(line.split(":", 1) for line in text.split() if ":" in line)


def _wait_ok(nodes: list[PrivateRedis], timeout: float) -> None:
    """Until every node reports the cluster ok and knows every other node."""
    deadline = time.monotonic() + timeout
    last: dict[str, str] = {}
    while time.monotonic() < deadline:
        try:
            states = [_state(node.port) for node in nodes]
        except (RedisError, OSError):
            states = []
        if states and all(
            s.get("cluster_state") == "ok" and s.get("cluster_known_nodes") == str(len(nodes))
            for s in states
        ):
            return
        last = states[0] if states else last
        time.sleep(0.1)
    raise TimeoutError(f"Redis Cluster not ok after {timeout} s: {last}")


@contextmanager
def local_redis_cluster(
    directory: Path, nodes: int = _NODES, timeout: float = 30.0
) -> Iterator[LocalCluster]:
    for binary in ("redis-server", "redis-cli"):
        if shutil.which(binary) is None:
            service_unavailable(f"{binary} is not installed: no local Redis Cluster to test on")
    with ExitStack() as stack:
        servers: list[PrivateRedis] = []
        for _ in range(nodes):
            server = PrivateRedis(
                directory,
                [
                    "--cluster-enabled", "yes",
                    "--cluster-config-file", "nodes-{port}.conf",
                    "--cluster-port", str(free_port()),
                    "--cluster-node-timeout", "5000",
                ],
            )  # fmt: skip
            stack.callback(server.stop)
            server.start()
            servers.append(server)
        created = subprocess.run(
            [
                "redis-cli", "--cluster", "create",
                *(f"{HOST}:{server.port}" for server in servers),
                "--cluster-replicas", "0", "--cluster-yes",
            ],
            cwd=directory,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )  # fmt: skip
        if created.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{created.stdout}")
        _wait_ok(servers, timeout)
        yield LocalCluster(servers)


@pytest.fixture(scope="session", name="redis_cluster")
def redis_cluster_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """Import into a test module (`# noqa: F401`) to use the `redis_cluster` fixture."""
    with local_redis_cluster(tmp_path_factory.mktemp("redis-cluster")) as cluster:
        yield cluster


@dataclass(frozen=True, slots=True)
class ClusterScratch:
    """A cluster client and the prefix (`narthex-test:<uuid>`) this test owns."""

    client: RedisCluster
    prefix: str


@asynccontextmanager
async def cluster_scratch(cluster: LocalCluster) -> AsyncIterator[ClusterScratch]:
    """A client of `cluster` and a fresh prefix; every key under it is deleted afterwards."""
    client = RedisCluster.from_url(
        cluster.url,
        max_connections=_MAX_CONNECTIONS,
        socket_connect_timeout=_CONNECT_TIMEOUT_S,
        socket_timeout=_CONNECT_TIMEOUT_S,
    )
    try:
        await client.initialize()
        async with private_prefix(client) as prefix:
            yield ClusterScratch(client, prefix)
    finally:
        await client.aclose()
