"""What the ledger must hold after a ``bench replicas`` run, and the comparison.

"The usage the upstream reported", per request the fake upstream answered 200:
- a response that ended (JSON, or a stream to its last event): the prompt and output
  tokens in its ``usage``;
- a stream the client left mid-way: the upstream never reports usage for it, so the
  figure is the service's documented rule (authz/settle.py) applied to what the
  upstream *sent* before it noticed the disconnect: the prompt's input tokens (the
  driver makes them equal to the service's estimate) plus the sent text's length at
  :func:`authz.estimate.tokens_for_chars`. The fake records how many words it wrote;
  the words are fixed, so the text is known. This is exact as long as every chunk the
  upstream wrote reached the ext_proc stream, which the driver makes likely (the
  client leaves right after a chunk, the next one is 100 ms away) but not certain.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import redis as redis_py

from authz.apis import Api
from authz.estimate import estimate_request, tokens_for_chars
from tests.support.fake_llm import _WORDS

__all__ = ["Totals", "check_totals", "expected_usage", "prompt_tokens"]


def prompt_tokens(raw: bytes) -> int:
    """The input tokens the service estimates for this body (the fake reports as many)."""
    return estimate_request(Api.OPENAI_CHAT, raw).input_tokens


def expected_usage(record: Any) -> int:
    """Units (default weights) the ledger must charge for one upstream record."""
    if record.status != 200:
        return 0
    if record.completed:
        return int(record.prompt_tokens + record.output_tokens)
    text = " ".join(_WORDS[i % len(_WORDS)] for i in range(record.output_tokens))
    return int(record.prompt_tokens + tokens_for_chars(len(text)))


@dataclass
class Counter:
    amount: int
    used: int
    held: int
    expected: int = 0


@dataclass
class Totals:
    counters: dict[str, Counter] = field(default_factory=dict)
    requests: dict[str, int] = field(default_factory=dict)
    elapsed_s: float = 0.0
    exit_codes: list[int | None] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    envoy: dict[str, int] = field(default_factory=dict)

    @property
    def drift(self) -> list[str]:
        return [k for k, c in self.counters.items() if c.used != c.expected]

    @property
    def held(self) -> int:
        return sum(c.held for c in self.counters.values())

    @property
    def overshoot(self) -> list[str]:
        return [k for k, c in self.counters.items() if c.used > c.amount]

    @property
    def ok(self) -> bool:
        clean = all(code == 0 for code in self.exit_codes)
        return clean and not self.drift and not self.held and not self.overshoot

    def report(self) -> str:
        by_budget: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
        for key, c in self.counters.items():
            row = by_budget[key.split("|", 1)[0]]
            row[0] += c.used
            row[1] += c.expected
            row[2] += c.held
            row[3] += c.used > c.amount
        total = sum(self.requests.values())
        lines = [
            f"  requests {total} in {self.elapsed_s:.0f} s: "
            + ", ".join(f"{k} {v}" for k, v in sorted(self.requests.items())),
            f"  replicas stopped with exit codes {self.exit_codes}",
            "  envoy: "
            + ", ".join(f"{k.split('.', 2)[-1]} {v}" for k, v in sorted(self.envoy.items())),
        ]
        for budget, (used, expected, held, over) in sorted(by_budget.items()):
            lines.append(
                f"  {budget:9} ledger {used:>10} upstream {expected:>10} "
                f"diff {used - expected:>+6} held {held:>5} over budget {over}"
            )
        for key in self.drift[:10]:
            c = self.counters[key]
            lines.append(f"  drift {key}: ledger {c.used} upstream {c.expected}")
        lines += [f"    {n}" for n in self.notes[:40]]
        lines.append(
            f"  {'OK' if self.ok else 'FAILED'}: {len(self.drift)} counters off, "
            f"{self.held} units held, {len(self.overshoot)} budgets overshot"
        )
        return "\n".join(lines)


def held_units(server: Any) -> int:
    """Units still reserved or leased over every counter in Redis."""
    client = redis_py.Redis.from_url(server.url)
    try:
        total = 0
        for key in client.scan_iter(match="authz:*:c:*", count=1000):
            r, lz = client.hmget(key, "r", "l")
            total += int(r or 0) + int(lz or 0)
        return total
    finally:
        client.close()


def check_totals(server: Any, records: list[Any], users: int) -> Totals:
    """Every counter in Redis next to what the upstream's ``records`` say it must hold."""
    per_user: dict[str, int] = defaultdict(int)
    seen: dict[str, list[str]] = defaultdict(list)
    for rec in records:
        user = rec.headers.get("x-bench-user", "?")
        per_user[user] += expected_usage(rec)
        seen[user].append(
            f"{rec.status} done={rec.completed} stream={rec.stream} "
            f"p={rec.prompt_tokens} o={rec.output_tokens} -> {expected_usage(rec)}"
        )
    cap_from = users - max(1, users // 10)
    totals = Totals()
    client = redis_py.Redis.from_url(server.url)
    try:
        for key in client.scan_iter(match="authz:*:c:*", count=1000):
            a, u, r, lz = client.hmget(key, "a", "u", "r", "l")
            limit_key = key.decode().split(":c:", 1)[1]
            node = limit_key.split("|")[1]
            c = Counter(int(a or 0), int(u or 0), int(r or 0) + int(lz or 0))
            if "/user:" in node:
                c.expected = per_user.get(node.rsplit("user:", 1)[1], 0)
            else:
                org = node.removeprefix("org:")
                c.expected = sum(
                    v
                    for k, v in per_user.items()
                    if k.startswith("u") and ("cap" if int(k[1:]) >= cap_from else "load") == org
                )
            totals.counters[limit_key] = c
            if "/user:" in node and c.used != c.expected:
                totals.notes += [f"{node}: {x}" for x in seen[node.rsplit("user:", 1)[1]]]
        for key in client.scan_iter(match="authz:*:dl", count=1000):
            base = key.decode()[: -len("dl")]
            for rid in client.zrange(key, 0, -1):
                raw = client.get(f"{base}r:{rid.decode()}") or b""
                totals.notes.append(f"open: {rid.decode()} {raw[:300]!r}")
    finally:
        client.close()
    return totals
