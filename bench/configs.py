"""The configurations of the benchmark, (a) to (f) and the multi-process variants."""

from __future__ import annotations

from bench.scenario import EnvoyShape
from bench.stack import Config

__all__ = ["SPREAD_STREAMS", "fixed_rate", "main_configs", "worker_configs"]

# max_concurrent_streams on the authz cluster for multi-worker runs: with 32 requests in
# flight Envoy then keeps about 8 HTTP/2 connections to authz, which SO_REUSEPORT
# hashes over the workers.
SPREAD_STREAMS = 4


def main_configs() -> list[Config]:
    return [
        Config("a", "Envoy alone (direct_response)", "none", EnvoyShape(ext_authz=False)),
        Config("b", "Envoy + no-op Python ext_authz (grpc.aio, uvloop)", "noop"),
        Config("c", "Envoy + authz, memory ledger, JWTs", "authz"),
        # The shipped default: memory written behind to SQLite; its cost against c.
        Config("c/sqlite", "as c, sqlite ledger (the default)", "authz", ledger="sqlite"),
        Config("d", "as c, Redis ledger", "authz", ledger="redis"),
        Config("e", "as c + ext_proc settles the JSON usage", "authz", EnvoyShape(ext_proc=True)),
        Config(
            "e/sqlite",
            "as e, sqlite ledger (the default)",
            "authz",
            EnvoyShape(ext_proc=True),
            ledger="sqlite",
        ),
        Config(
            "f",
            "as e, ext_proc in observability mode",
            "authz",
            EnvoyShape(ext_proc=True, ext_proc_observability=True),
        ),
    ]


def worker_configs() -> list[Config]:
    spread = EnvoyShape(authz_max_streams=SPREAD_STREAMS)
    return [
        Config("b/2w", "as b, 2 no-op processes, spread", "noop", spread, workers=2),
        Config("c/1w", "as c, 1 worker, spread", "authz", spread),
        Config("c/2w", "as c, 2 workers (SO_REUSEPORT), spread", "authz", spread, workers=2),
    ]


def fixed_rate() -> list[Config]:
    """Paced runs: the access log is on, so Envoy's own authz_us can be read."""
    log = EnvoyShape(access_log=True)
    return [
        Config("b@rate", "b at half of b's saturation rate", "noop", log),
        Config("c@rate", "c at the same rate", "authz", log),
        Config(
            "e@rate",
            "e at the same rate",
            "authz",
            EnvoyShape(access_log=True, ext_proc=True),
        ),
    ]
