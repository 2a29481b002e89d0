"""Running Debian's ``wrk`` with bench/wrk.lua and reading its JSON summary."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["BenchError", "WrkResult", "find_wrk", "run_wrk", "wrk_version"]

LUA = Path(__file__).with_name("wrk.lua")


class BenchError(RuntimeError):
    """The benchmark cannot run (a tool is missing, a server would not start)."""


def find_wrk() -> str:
    found = shutil.which("wrk")
    if found is None:
        raise BenchError(
            "wrk not found on PATH. Install it (Debian/Ubuntu: `sudo apt-get install wrk`) "
            "and run the benchmark again."
        )
    return found


def wrk_version() -> str:
    # wrk prints its version in the usage text (exit code 1).
    out = subprocess.run([find_wrk(), "-v"], capture_output=True, text=True, check=False)
    text = (out.stdout + out.stderr).strip().splitlines()
    return text[0] if text else "unknown"


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    errors: dict[str, int]
    rate: float | None = None  # the pacing target (requests/s), None at saturation

    @property
    def failed(self) -> int:
        """Requests answered non-2xx/3xx, or lost: a run with many is not a valid figure."""
        return sum(self.errors.values())

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "failed": self.failed}


def run_wrk(
    url: str,
    requests_file: Path,
    *,
    duration_s: float,
    connections: int = 32,
    threads: int = 1,
    rate: float | None = None,
    timeout_s: float = 5.0,
    once: bool = False,
) -> WrkResult:
    """One wrk run against ``url``; ``rate`` (total requests/s) paces it, else saturation.
    ``once``: each request of the file once, then stop (``duration_s`` is an upper bound)."""
    args = [str(requests_file)]
    if rate or once:
        args.append(f"{(rate or 0) / threads:.3f}")
    if once:
        args.append("once")
    cmd = [
        find_wrk(), "-t", str(threads), "-c", str(connections),
        "-d", f"{max(1, round(duration_s))}s", "--timeout", f"{timeout_s:g}s",
        "-s", str(LUA), url, "--", *args,
    ]  # fmt: skip
    # wrk loads the whole file before its clock starts: 200k ES256 requests are 136 MB,
    # which took over 340 s at a load average of 15 on 2 cores (bench memory --idle).
    loading_s = 60 + 6 * requests_file.stat().st_size / 1e6
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s + loading_s)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise BenchError(f"wrk failed ({proc.returncode}): {proc.stderr.strip()}\n{proc.stdout}")
    doc = json.loads(lines[-1])
    seconds = doc["duration_us"] / 1e6
    return WrkResult(
        requests=doc["requests"],
        seconds=round(seconds, 3),
        rps=round(doc["requests"] / seconds, 1),
        p50_ms=doc["p50_us"] / 1000,
        p90_ms=doc["p90_us"] / 1000,
        p99_ms=doc["p99_us"] / 1000,
        p999_ms=doc["p999_us"] / 1000,
        max_ms=doc["max_us"] / 1000,
        errors=doc["errors"],
        rate=rate,
    )
