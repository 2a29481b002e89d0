"""nginx with the Lua module, running the UNCHANGED Kong plugin through a PDK stand-in.

Kong is not packaged for Debian; its engine is nginx + lua-nginx-module, which is
(``apt-get install nginx libnginx-mod-http-lua``). ``tests/support/kong_stub/`` gives
the plugin the parts of Kong it calls (``kong.request/response/ctx/service.request/
log``, ``kong.tools.queue``) and, where lua-resty-http is missing, a small
``resty.http``. Each phase of the plugin runs in nginx's own phase, on real sockets,
so streaming, client aborts and the log phase's ban on cosockets are nginx's.

    with KongNginx(workdir, upstream_port=fake.port, config={...}) as gw:
        openai.OpenAI(base_url=gw.url + "/v1", ...)

A missing nginx or Lua module is a HarnessError: tests fail, never skip
(``scripts/apt-deps`` installs them).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

from tests.support.ports import free_port, wait_port
from tests.support.procs import HarnessError, tail, terminate

__all__ = ["KongNginx", "lua_tools"]

REPO_ROOT = Path(__file__).resolve().parents[2]
STUB = Path(__file__).resolve().parent / "kong_stub"
MODULES = Path("/usr/lib/nginx/modules")
LUA_MODULE = MODULES / "ngx_http_lua_module.so"
NDK_MODULE = MODULES / "ndk_http_module.so"

CONF = """
load_module {ndk};
load_module {lua};
daemon off;
master_process off;
worker_processes 1;
error_log logs/error.log info;
pid logs/nginx.pid;
events {{ worker_connections 512; }}
http {{
    access_log logs/access.log;
    lua_package_path "{repo}/?.lua;{stub}/?.lua;;{stub}/resty_fallback/?.lua";
    lua_socket_log_errors off;
    {trusted}
    init_by_lua_block {{ require("kong_stub").init("{settings}") }}
    upstream llm {{ server 127.0.0.1:{upstream}; keepalive 16; }}
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 16m;
        location / {{
            set $upstream_uri '';
            access_by_lua_block {{ require("kong_stub").phase("access") }}
            header_filter_by_lua_block {{ require("kong_stub").phase("header_filter") }}
            body_filter_by_lua_block {{ require("kong_stub").phase("body_filter") }}
            log_by_lua_block {{ require("kong_stub").phase("log") }}
            # As Kong's route with response_buffering: false (what LLM routes want).
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 60s;
            proxy_pass http://llm$upstream_uri$is_args$args;
        }}
    }}
}}
"""


def lua_tools() -> dict[str, str]:
    """Paths of nginx, busted, luacheck and luajit; HarnessError naming what is missing."""
    found = {name: shutil.which(name) for name in ("nginx", "busted", "luacheck", "luajit")}
    if found["nginx"] is None and Path("/usr/sbin/nginx").exists():
        found["nginx"] = "/usr/sbin/nginx"
    missing = [name for name, path in found.items() if path is None]
    missing += [str(p) for p in (LUA_MODULE, NDK_MODULE) if not p.exists()]
    if missing:
        raise HarnessError(
            f"missing for the Kong plugin tests: {', '.join(missing)} (run scripts/apt-deps"
            " as root, or apt-get install lua-busted luajit2 libnginx-mod-http-lua lua-cjson"
            " nginx lua-check)"
        )
    return {name: str(path) for name, path in found.items()}


class KongNginx:
    """One nginx in its own prefix (``workdir``); ``config`` is the plugin's configuration
    (schema defaults fill the rest). ``queue=False`` hides kong.tools.queue, as on Kong
    before 3.3. ``strip_path`` strips a route prefix as Kong's router would."""

    def __init__(
        self,
        workdir: Path,
        *,
        upstream_port: int,
        config: dict[str, Any],
        queue: bool = True,
        strip_path: str | None = None,
        trusted_ca: Path | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.port = free_port()
        self.upstream_port = upstream_port
        self.settings = {"config": config, "queue": queue, "strip_path": strip_path}
        self.trusted_ca = trusted_ca
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def error_log(self) -> Path:
        return self.workdir / "logs" / "error.log"

    def error_log_text(self) -> str:
        return self.error_log.read_text(errors="replace") if self.error_log.exists() else ""

    def _write_conf(self) -> Path:
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        (self.workdir / "conf").mkdir(exist_ok=True)
        settings = self.workdir / "conf" / "token-budget.json"
        settings.write_text(json.dumps(self.settings))
        trusted = ""
        if self.trusted_ca is not None:
            trusted = f"lua_ssl_trusted_certificate {self.trusted_ca}; lua_ssl_verify_depth 3;"
        conf = self.workdir / "conf" / "nginx.conf"
        text = CONF.format(
            ndk=NDK_MODULE, lua=LUA_MODULE, repo=REPO_ROOT, stub=STUB, settings=settings,
            trusted=trusted, upstream=self.upstream_port, port=self.port,
        )  # fmt: skip
        conf.write_text(text)
        return conf

    def start(self) -> KongNginx:
        nginx = lua_tools()["nginx"]
        conf = self._write_conf()
        cmd = [nginx, "-p", str(self.workdir), "-e", "logs/error.log", "-c", str(conf)]
        with (self.workdir / "logs" / "stderr.log").open("wb") as err:
            self._proc = subprocess.Popen(
                cmd, stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL
            )
        try:
            wait_port("127.0.0.1", self.port, timeout=30)
        except TimeoutError as exc:
            self.stop()
            raise HarnessError(f"nginx did not listen: {exc}\n{tail(self.error_log)}") from exc
        if self._proc.poll() is not None:
            raise HarnessError(f"nginx exited {self._proc.returncode}:\n{tail(self.error_log)}")
        return self

    def stop(self) -> None:
        if self._proc is not None:
            terminate(self._proc, grace=10.0)
            self._proc = None

    def __enter__(self) -> KongNginx:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
