"""Fixtures that start the fake LLM upstream and the real Envoy for e2e tests.

    fake_llm_server  session  FakeLLMThread serving in its own loop thread
    fake_llm         function the same server, its records cleared for this test
    authz_port       module   the port Envoy's `authz` cluster targets; start the service
                              (or a stub) there. Override it in a module to pick the port.
    envoy_mutate     module   None, or a function(cfg) applied to the rendered envoy.yaml;
                              override it in a module, e.g. to turn on jwt_authn.
    envoy            module   EnvoyProcess on envoy/envoy.yaml, listener/admin on ports
                              Envoy picks, upstream = fake_llm_server, authz = authz_port.

Servers run in threads, not on pytest-asyncio's loop, so sync tests (the simplest way to
drive the openai/anthropic SDKs) and async tests can both use them.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.envoy_proc import EnvoyProcess, Mutator, render_envoy_config
from tests.support.fake_llm import FakeLLM, FakeLLMThread
from tests.support.ports import free_port


@pytest.fixture(scope="session")
def fake_llm_server() -> Iterator[FakeLLMThread]:
    with FakeLLM.run_in_thread() as fake:
        yield fake


@pytest.fixture
def fake_llm(fake_llm_server: FakeLLMThread) -> FakeLLMThread:
    fake_llm_server.reset()
    return fake_llm_server


@pytest.fixture(scope="module")
def authz_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def envoy_mutate() -> Mutator | None:
    return None


@pytest.fixture(scope="module")
def envoy(
    tmp_path_factory: pytest.TempPathFactory,
    fake_llm_server: FakeLLMThread,
    authz_port: int,
    envoy_mutate: Mutator | None,
) -> Iterator[EnvoyProcess]:
    workdir = tmp_path_factory.mktemp("envoy")
    config = render_envoy_config(
        listen_port=0,
        admin_port=0,
        authz_port=authz_port,
        upstream_port=fake_llm_server.port,
        out_path=workdir / "envoy.yaml",
        mutate=envoy_mutate,
    )
    with EnvoyProcess(config) as proc:
        yield proc
