"""Run the real authz service as a subprocess, the way an operator runs it.

Contract with the CLI (``python -m authz serve``)::

    --config FILE            the policy/settings file
    --grpc-address H:P       ext_authz Check + ext_proc Process (what Envoy's `authz` cluster hits)
    --http-address H:P       admin HTTP: GET /readyz -> 200 once it takes checks, GET /metrics
    --check-http-address H:P the HTTP check API (/check/<path>, POST /settle); a free port
    --manage-address H:P     the management API (/v1/...); a free port
    SIGTERM                  graceful stop: stop taking checks, flush pending usage, exit 0
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

from tests.support.ports import free_port
from tests.support.procs import HarnessError, tail, terminate

__all__ = ["AuthzService"]

REPO_ROOT = Path(__file__).resolve().parents[2]
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class AuthzService:
    """``with AuthzService(config, grpc_port=authz_port) as svc:`` (or ``async with``).

    Ports default to free ones; pass ``grpc_port`` to match the Envoy fixture's
    ``authz_port``. Logs go to ``<workdir>/authz.stdout.log`` / ``authz.stderr.log``.
    """

    def __init__(
        self,
        config: Path | str,
        *,
        grpc_port: int | None = None,
        http_port: int | None = None,
        check_http_port: int | None = None,
        manage_port: int | None = None,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        workdir: Path | None = None,
        # Only a failure waits this long (start() returns as soon as /readyz answers, or
        # raises as soon as the process exits). Start-up on a busy 2-core machine
        # (imports, grpc, policy) took over 20 s: generous, so slowness is not failure.
        ready_timeout: float = 90.0,
    ) -> None:
        self.config = Path(config)
        self.grpc_port = grpc_port or free_port()
        self.http_port = http_port or free_port()
        # Always a port of its own: the default (9193) would collide between services.
        self.check_http_port = check_http_port or free_port()
        self.manage_port = manage_port or free_port()  # the default 9194 would collide too
        self.extra_args = list(extra_args)
        self.env = dict(env or {})
        self.workdir = Path(workdir) if workdir else self.config.parent
        self.ready_timeout = ready_timeout
        self.stdout_path = self.workdir / "authz.stdout.log"
        self.stderr_path = self.workdir / "authz.stderr.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def check_http_url(self) -> str:
        return f"http://127.0.0.1:{self.check_http_port}"

    @property
    def manage_url(self) -> str:
        return f"http://127.0.0.1:{self.manage_port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc else None

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "authz", "serve",
            "--config", str(self.config),
            "--grpc-address", self.grpc_address,
            "--http-address", f"127.0.0.1:{self.http_port}",
            *(() if "--check-http-address" in self.extra_args else
              ("--check-http-address", f"127.0.0.1:{self.check_http_port}")),
            *(() if "--manage-address" in self.extra_args else
              ("--manage-address", f"127.0.0.1:{self.manage_port}")),
            *self.extra_args,
        ]  # fmt: skip

    # lifecycle ---------------------------------------------------------------------
    def start(self) -> AuthzService:
        env = {**os.environ, **self.env}
        # The tree under test, not some installed copy; logs unbuffered so tails are current.
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p
        )
        env.setdefault("PYTHONUNBUFFERED", "1")
        # Each service keeps its journal in its own workdir, never in the shared checkout.
        env.setdefault("AUTHZ_STATE_DIR", str(self.workdir))
        self.workdir.mkdir(parents=True, exist_ok=True)
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self._proc = subprocess.Popen(
                self.command(),
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                cwd=REPO_ROOT,
                env=env,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop(grace=2.0)
            raise
        return self

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.ready_timeout
        while True:
            if self._proc.poll() is not None:
                raise HarnessError(
                    f"authz exited with {self._proc.returncode} before /readyz"
                    f" ({' '.join(self.command())}):\n{self.stderr_tail()}"
                )
            try:
                if self._get("/readyz", timeout=1.0)[0] == 200:
                    return
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                # It may be exiting already (its error written, the interpreter still
                # tearing down on a starved machine): report the exit it is, not a timeout.
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._proc.wait(5.0)
                if self._proc.poll() is not None:
                    continue
                raise HarnessError(
                    f"authz not ready after {self.ready_timeout}s:\n{self.stderr_tail()}"
                )
            time.sleep(0.05)

    def send_signal(self, sig: int) -> None:
        if self._proc is None:
            raise HarnessError("authz service was never started")
        self._proc.send_signal(sig)

    def wait(self, timeout: float = 10.0) -> int:
        """Wait for the process to exit on its own (e.g. after ``send_signal(SIGTERM)``)."""
        if self._proc is None:
            raise HarnessError("authz service was never started")
        return self._proc.wait(timeout)

    def stop(self, grace: float = 30.0) -> int | None:
        """SIGTERM, wait ``grace`` s, then SIGKILL. The exit code (None if never started).

        ``grace`` is longer than the service's own drain (``--drain-timeout``, 10 s): a
        stream Envoy still holds when the test stops the service is waited for up to 10 s
        before the rest of the shutdown runs, so a 10 s grace here could SIGKILL a clean
        stop on a loaded machine."""
        if self._proc is None:
            return None
        return terminate(self._proc, grace)

    async def astart(self) -> AuthzService:
        return await asyncio.to_thread(self.start)

    async def astop(self, grace: float = 30.0) -> int | None:
        return await asyncio.to_thread(self.stop, grace)

    def __enter__(self) -> AuthzService:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> AuthzService:
        return await self.astart()

    async def __aexit__(self, *exc: object) -> None:
        await self.astop()

    # observation -------------------------------------------------------------------
    def _get(self, path: str, timeout: float = 5.0) -> tuple[int, str]:
        try:
            with _OPENER.open(self.http_url + path, timeout=timeout) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, exc.read().decode(errors="replace")

    def http_get(self, path: str, timeout: float = 5.0) -> tuple[int, str]:
        """(status, body) of an admin HTTP GET; a 4xx/5xx is returned, not raised."""
        return self._get(path, timeout)

    def metrics_text(self) -> str:
        status, body = self._get("/metrics")
        if status != 200:
            raise HarnessError(f"GET /metrics -> {status}: {body[:500]}")
        return body

    def stderr_tail(self, lines: int = 40) -> str:
        return tail(self.stderr_path, lines)

    def stdout_text(self) -> str:
        return self.stdout_path.read_text(errors="replace") if self.stdout_path.exists() else ""

    def stderr_text(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""
