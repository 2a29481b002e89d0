"""The ``ledger.breaker`` section: what the service does when the quota store is unreachable.

Values and their validation together (the section is small); the reader ``r`` is
:class:`authz.policy.loader._Reader`, passed in, so errors name ``file:path`` and the bad
value like every other policy error.

    ledger:
      url: redis://redis:6379/0
      breaker:
        failures: 5            # failed or timed-out calls in a row (within window_s) ...
        window_s: 10           # ... that open the breaker
        open_s: 5              # open this long, then one probe call (half-open)
        call_timeout_s: 0.15   # a reserve slower than this is a failure (request path)
        mode: fail_closed      # while open: fail_closed | fail_open | local_allowance
        local_allowance_units: 20000   # local_allowance: units per budget counter per replica
        journal_path: ./authz-state/journal.jsonl
        journal_max_bytes: 67108864
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, NoReturn, Protocol, cast

__all__ = ["BREAKER_MODES", "BreakerMode", "BreakerSettings", "parse_breaker"]

BreakerMode = Literal["fail_closed", "fail_open", "local_allowance"]
BREAKER_MODES: tuple[str, ...] = ("fail_closed", "fail_open", "local_allowance")


@dataclass(frozen=True, slots=True)
class BreakerSettings:
    failures: int = 5
    window_s: float = 10.0
    open_s: float = 5.0
    # Well inside Envoy's 1 s ext_authz timeout, but long enough for a batched lease
    # sync under load: at 50 ms the benchmark's saturated Redis runs tripped it.
    call_timeout_s: float = 0.15
    # fail_closed by default, as for the service being unreachable (Envoy's
    # status_on_error 503, docs/design.md "Failure modes"): budgets are money, and an
    # outage of the store must not become an unmetered window. Operators who would
    # rather keep AI traffic flowing choose local_allowance (bounded overspend per
    # replica) or fail_open (unbounded, but every token still journaled and replayed).
    mode: BreakerMode = "fail_closed"
    local_allowance_units: int = 0
    # Relative paths resolve against the working directory, not the policy file's
    # directory: the policy often lives on a read-only config map.
    journal_path: str = "./authz-state/journal.jsonl"
    journal_max_bytes: int = 64 * 1024 * 1024


class _Reader(Protocol):
    def fail(self, path: str, message: str, value: Any = ...) -> NoReturn: ...
    def mapping(
        self, value: Any, path: str, allowed: set[str], required: set[str] = ...
    ) -> Any: ...
    def string(self, value: Any, path: str, pattern: str | None = None) -> str: ...
    def choice(self, value: Any, path: str, choices: tuple[str, ...]) -> str: ...
    def integer(self, value: Any, path: str, minimum: int = 0) -> int: ...
    def number(self, value: Any, path: str, minimum: float = 0.0) -> float: ...


def parse_breaker(r: _Reader, raw: Any) -> BreakerSettings:
    p = "ledger.breaker"
    d = BreakerSettings()
    m = r.mapping(raw, p, {f for f in BreakerSettings.__dataclass_fields__})
    mode = r.choice(m.get("mode", d.mode), f"{p}.mode", BREAKER_MODES)
    allowance = d.local_allowance_units
    if "local_allowance_units" in m:
        allowance = r.integer(m["local_allowance_units"], f"{p}.local_allowance_units", 1)
    elif mode == "local_allowance":
        r.fail(f"{p}.local_allowance_units", "is required when mode is local_allowance")
    return BreakerSettings(
        failures=r.integer(m.get("failures", d.failures), f"{p}.failures", 1),
        window_s=r.number(m.get("window_s", d.window_s), f"{p}.window_s", 0.001),
        open_s=r.number(m.get("open_s", d.open_s), f"{p}.open_s", 0.001),
        call_timeout_s=r.number(
            m.get("call_timeout_s", d.call_timeout_s), f"{p}.call_timeout_s", 0.001
        ),
        mode=cast(BreakerMode, mode),
        local_allowance_units=allowance,
        journal_path=r.string(m.get("journal_path", d.journal_path), f"{p}.journal_path"),
        journal_max_bytes=r.integer(
            m.get("journal_max_bytes", d.journal_max_bytes), f"{p}.journal_max_bytes", 65536
        ),
    )
