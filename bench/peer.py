"""The peer: LiteLLM's proxy in front of the same fake upstream as ours.

LiteLLM is installed into its own venv (bench/.venv-litellm), never into the project's.
It runs with no master key and no database (LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY),
so it authenticates nobody and enforces no budget: its per-key budgets need Postgres,
which this machine cannot install. What is compared is what runs: LiteLLM forwarding a
chat completion to the upstream (parsing the request, calling the upstream with its
OpenAI client, parsing the answer, counting usage/cost) against Envoy + authz + ext_proc
doing the same hop *with* identity, budgets and settlement. The upstream is an Envoy
listener answering with the chat completion (direct_response): it costs nearly nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from bench.scenario import EnvoyShape
from bench.stack import Config, running
from bench.wrk import BenchError, run_wrk
from tests.support.ports import free_port
from tests.support.procs import terminate

__all__ = ["compare", "litellm_venv"]

VENV = Path(__file__).resolve().parent / ".venv-litellm"
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def litellm_venv() -> Path:
    """bench/.venv-litellm with ``litellm[proxy]`` in it; installs it on first use."""
    exe = VENV / "bin" / "litellm"
    if exe.exists():
        return exe
    print("  peer: installing litellm[proxy] into bench/.venv-litellm (once) ...", flush=True)
    steps = [
        [sys.executable, "-m", "venv", str(VENV)],
        [str(VENV / "bin" / "pip"), "install", "-q", "litellm[proxy]"],
    ]
    for cmd in steps:
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
            raise BenchError(f"could not install LiteLLM ({' '.join(cmd)}): " + " | ".join(tail))
    return exe


def _version(exe: Path) -> str:
    out = subprocess.run(
        [str(exe.parent / "python"), "-c", "import importlib.metadata as m;"
         "print(m.version('litellm'))"],
        capture_output=True, text=True,
    )  # fmt: skip
    return out.stdout.strip() or "unknown"


def _wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"LiteLLM exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with _OPENER.open(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise BenchError(f"LiteLLM not ready after {timeout}s: {log.read_text()[-2000:]}")


def _litellm(workdir: Path, upstream_port: int, exe: Path) -> tuple[subprocess.Popen[bytes], int]:
    config = {
        "model_list": [
            {
                "model_name": "gpt-4o-mini",
                "litellm_params": {
                    "model": "openai/gpt-4o-mini",
                    "api_base": f"http://127.0.0.1:{upstream_port}/v1",
                    "api_key": "sk-fake-upstream",
                },
            }
        ],
        "litellm_settings": {"telemetry": False, "drop_params": True},
    }
    path = (workdir / "litellm.yaml").resolve()
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    env = {
        **os.environ,
        "LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY": "true",
        "LITELLM_LOG": "ERROR",
        "LITELLM_TELEMETRY": "False",
        "NO_PROXY": "127.0.0.1,localhost",
    }
    env.pop("LITELLM_MASTER_KEY", None)
    env.pop("DATABASE_URL", None)
    log = workdir / "litellm.log"
    cmd = [str(exe), "--config", str(path), "--host", "127.0.0.1", "--port", str(port),
           "--num_workers", "1"]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=out, env=env, cwd=workdir)
    try:
        _wait_http(f"http://127.0.0.1:{port}/health/liveliness", proc, log)
    except BaseException:
        terminate(proc, 5)
        raise
    return proc, port


def compare(workdir: Path, policy: Path, requests: Path, opts: Any) -> list[dict[str, Any]]:
    from bench.run import measure

    workdir.mkdir(parents=True, exist_ok=True)
    upstream = free_port()
    rows: list[dict[str, Any]] = []
    ours = [
        Config("p/envoy", "Envoy alone -> fake upstream", "none",
               EnvoyShape(ext_authz=False, upstream_port=upstream)),
        Config("p/authz", "Envoy + authz + ext_proc (as e) -> fake upstream", "authz",
               EnvoyShape(ext_proc=True, upstream_port=upstream)),
    ]  # fmt: skip
    try:
        exe = litellm_venv()
    except BenchError as exc:
        exe = None
        reason = str(exc)
    for i, cfg in enumerate(ours):
        with running(cfg, workdir / cfg.key.replace("/", "-"), policy) as run:
            result = measure(run, requests, opts)
            rows.append({"key": cfg.key, "title": cfg.title, **result.as_dict()})
            print(f"  {cfg.key}: {result.rps:,.0f} req/s p99 {result.p99_ms:.2f} ms", flush=True)
            if i < len(ours) - 1:
                continue
            # The last Envoy's fake_llm listener stays up as LiteLLM's upstream.
            title = "LiteLLM proxy (no key, no DB) -> fake upstream"
            if exe is None:
                rows.append({"key": "p/litellm", "title": title, "skipped": reason})
                print(f"  p/litellm: skipped: {reason}", flush=True)
                break
            proc, port = _litellm(workdir, upstream, exe)
            try:
                url = f"http://127.0.0.1:{port}/v1/chat/completions"
                run_wrk(url, requests, duration_s=opts.warmup_s, connections=opts.connections)
                result = run_wrk(
                    url, requests, duration_s=opts.duration_s, connections=opts.connections
                )
            finally:
                terminate(proc, 10)
            title = f"LiteLLM {_version(exe)} (no key, no DB) -> fake upstream"
            rows.append({"key": "p/litellm", "title": title, **result.as_dict()})
            print(f"  p/litellm: {result.rps:,.0f} req/s p99 {result.p99_ms:.2f} ms"
                  f" failed {result.failed}", flush=True)  # fmt: skip
    return rows
