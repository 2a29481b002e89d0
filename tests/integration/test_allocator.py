"""``authz serve`` runs on glibc's malloc however it is started (authz/allocator.py).

With pymalloc, 200k callers once each and an idle left RSS +14-17% (1 MiB arenas pinned
by a few survivors: docs/performance.md "Memory"). The variable must be in the
interpreter's environment when it starts, so the command re-executes itself once with
it; these tests read the running service's environment from /proc, as the kernel has it
since the last exec.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from authz import allocator
from authz.reclaim import can_trim
from tests.support.service import AuthzService

pytestmark = [pytest.mark.integration]

POLICY = """version: 1
timezone: UTC
identity:
  api_keys: [{name: it, sha256: "%s", claims: {org_id: acme, sub: ann}}]
subject: {org: {claim: org_id}, leaf: [{level: user, claim: sub}]}
budgets: [{name: org-day, match: {org: "*"}, tokens: 1000, period: day}]
models: {rules: [{match: "gpt-*", max_output_tokens: 10}]}
""" % ("0" * 64)
CONSOLE_SCRIPT = Path(sys.executable).parent / "authz"


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().partition("=")[::2] for item in raw if item)


class _ConsoleScript(AuthzService):
    """The service started as the installed ``authz`` command, as Docker and k8s do."""

    def command(self) -> list[str]:
        return [str(CONSOLE_SCRIPT), *super().command()[3:]]


def _service(tmp_path: Path, cls: type[AuthzService] = AuthzService, **env: str) -> AuthzService:
    (tmp_path / "policy.yaml").write_text(POLICY)
    return cls(tmp_path / "policy.yaml", workdir=tmp_path, extra_args=["--ledger", "memory://"],
               env=env)  # fmt: skip


@pytest.fixture(autouse=True)
def _no_allocator_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(allocator.VARIABLE, raising=False)  # as a deployment starts it
    assert can_trim(), "these tests need glibc (malloc_trim)"


@pytest.mark.parametrize("cls", [AuthzService, _ConsoleScript], ids=["python-m", "console"])
def test_serve_restarts_itself_on_malloc(tmp_path: Path, cls: type[AuthzService]) -> None:
    assert cls is AuthzService or CONSOLE_SCRIPT.exists(), CONSOLE_SCRIPT
    with _service(tmp_path, cls) as svc:
        assert svc.pid is not None
        # Same process (execve keeps the pid the supervisor watches), new environment.
        assert _environ(svc.pid).get(allocator.VARIABLE) == "malloc"
        assert svc.http_get("/readyz")[0] == 200


def test_a_chosen_allocator_is_kept(tmp_path: Path) -> None:
    """The opt-out: whoever starts the service may choose pymalloc (or anything)."""
    with _service(tmp_path, PYTHONMALLOC="pymalloc") as svc:
        assert svc.pid is not None
        assert _environ(svc.pid).get(allocator.VARIABLE) == "pymalloc"


def test_no_restart_when_set_or_without_trim(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, list[str], dict[str, str]]] = []
    monkeypatch.setattr(os, "execve", lambda *a: calls.append(a))
    monkeypatch.setattr(allocator, "can_trim", lambda: False)
    allocator.reexec_with_malloc()
    assert calls == []
    monkeypatch.setattr(allocator, "can_trim", lambda: True)
    monkeypatch.setenv(allocator.VARIABLE, "debug")
    allocator.reexec_with_malloc()
    assert calls == []
    monkeypatch.delenv(allocator.VARIABLE)
    allocator.reexec_with_malloc()
    [(program, argv, env)] = calls
    assert program == argv[0] == sys.executable and argv[1:] == sys.orig_argv[1:]
    assert env[allocator.VARIABLE] == "malloc"


# A steady state, then a burst of small objects of which one in 400 lives on (a counter's
# new value, a metric's): then freed, collected and trimmed as authz.reclaim does.
BURST = """
import gc
from authz.reclaim import _malloc_trim

def rss():
    return next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmRSS:"))

steady = [("s%07d" % i, float(i)) for i in range(100_000)]
gc.collect(); _malloc_trim()(0)
base = rss()
burst = [("u%07d" % i, float(i), [i]) for i in range(300_000)]
peak = rss()
survivors = burst[::400]
del burst
gc.collect(); _malloc_trim()(0)
print((rss() - base) / (peak - base))
"""


@pytest.mark.parametrize("name", ["malloc", "pymalloc"])
def test_what_a_burst_leaves_depends_on_the_allocator(name: str) -> None:
    """Why the service runs on malloc: the same survivors pin a 1 MiB arena each under
    pymalloc (nearly all the burst stays), a 4 KiB page each under glibc malloc."""
    env = {**os.environ, allocator.VARIABLE: name}
    out = subprocess.run([sys.executable, "-c", BURST], env=env, capture_output=True,
                         text=True, check=True, timeout=60)  # fmt: skip
    kept = float(out.stdout)
    if name == allocator.ALLOCATOR:
        assert kept < 0.25, f"{name} kept {kept:.0%} of the burst"
    else:  # the premise of allocator.py; if a new CPython gives arenas back, say so
        assert kept > 0.5, f"{name} kept only {kept:.0%}: is the restart still needed?"


def test_the_image_and_the_script_set_it_before_start() -> None:
    """So the container and scripts/serve start once, not twice (the restart is the net)."""
    root = Path(__file__).resolve().parents[2]
    assert "\nENV PYTHONMALLOC=malloc\n" in (root / "Dockerfile").read_text()
    assert 'export PYTHONMALLOC="${PYTHONMALLOC:-malloc}"' in (root / "scripts/serve").read_text()
