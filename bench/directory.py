"""``python -m bench.directory``: what the directory costs a check, against a real slapd.

Prints the per-call cost of a cache hit (what nearly every check pays), the latency of
a miss (one LDAP search plus the memberOf read, on a worker thread), and how many
concurrent misses of one subject reach the directory (single flight: 1).
"""

from __future__ import annotations

import asyncio
import re
import statistics
import tempfile
import time
from pathlib import Path

from authz.clock import SystemClock
from authz.directory import Directory
from authz.policy.directory import DirectorySettings, GroupSource, LevelSource
from tests.support.slapd import BASE, READER_DN, READER_PASSWORD, Slapd, group_ldif, person_ldif


async def measure(slapd: Slapd, pw: Path, users: int) -> None:
    settings = DirectorySettings(
        url=slapd.url, bind_dn=READER_DN, password_file=str(pw), base_dn=f"ou=people,{BASE}",
        user_filter="(&(objectClass=inetOrgPerson)(uid={subject}))",
        groups=GroupSource(attribute="memberOf"),
        levels=(LevelSource("department", attribute="departmentNumber"),
                LevelSource("team", group=True, pattern=re.compile(r"^cn=team-([^,]+),"))),
    )  # fmt: skip
    d = Directory(settings, SystemClock())
    try:
        misses = []
        for i in range(users):
            t = time.perf_counter()
            await d.levels(f"u{i}")
            misses.append(time.perf_counter() - t)
        n = 200_000
        t = time.perf_counter()
        for i in range(n):
            await d.levels(f"u{i % users}")
        hit_us = (time.perf_counter() - t) / n * 1e6
        before = sum(d.stats.lookups.values())
        await asyncio.gather(*(d.levels("u-new") for _ in range(100)))
        flights = sum(d.stats.lookups.values()) - before
        misses.sort()
        print(f"cache hit: {hit_us:.2f} us per check ({n} calls)")
        print(f"miss (LDAP search + memberOf, worker thread): p50 "
              f"{statistics.median(misses) * 1e3:.2f} ms, p99 "
              f"{misses[int(len(misses) * 0.99) - 1] * 1e3:.2f} ms ({users} users)")  # fmt: skip
        print(f"100 concurrent misses of one subject -> {flights} directory lookup(s)")
    finally:
        await d.aclose()


def main(users: int = 500) -> None:
    with tempfile.TemporaryDirectory() as tmp, Slapd(Path(tmp) / "slapd") as slapd:
        slapd.add("".join(person_ldif(f"u{i}", f"d{i % 10}") for i in range(users))
                  + group_ldif("team-a", [f"u{i}" for i in range(0, users, 2)]))  # fmt: skip
        pw = Path(tmp) / "pw"
        pw.write_text(READER_PASSWORD)
        asyncio.run(measure(slapd, pw, users))


if __name__ == "__main__":
    main()
