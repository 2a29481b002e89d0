"""``authz --version`` and every ``authz serve`` setting from the environment.

Precedence: a flag on the command line, then its ``AUTHZ_*`` variable, then the default.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re

import pytest

from authz import cli
from authz.cli_env import apply_env

pytestmark = pytest.mark.unit


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[argparse.Namespace]:
    """``authz serve`` parsed but not run: the arguments it would have served with."""
    calls: list[argparse.Namespace] = []

    def fake_serve(args: argparse.Namespace) -> int:
        calls.append(args)
        return 0

    monkeypatch.setattr(cli, "_serve", fake_serve)
    for name in list(__import__("os").environ):
        if name.startswith("AUTHZ_"):
            monkeypatch.delenv(name)
    return calls


def test_version_is_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"authz {importlib.metadata.version('authz')}"


def test_config_from_the_environment(
    served: list[argparse.Namespace], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AUTHZ_CONFIG", "/etc/authz/policy.yaml")
    assert cli.main(["serve"]) == 0
    assert served[0].config == "/etc/authz/policy.yaml"


def test_flag_beats_environment_beats_default(
    served: list[argparse.Namespace], monkeypatch: pytest.MonkeyPatch
) -> None:
    cli.main(["serve", "--config", "p.yaml"])
    assert served[-1].grpc_address == "127.0.0.1:9191" and served[-1].workers == 1
    monkeypatch.setenv("AUTHZ_GRPC_ADDRESS", "0.0.0.0:7000")
    monkeypatch.setenv("AUTHZ_WORKERS", "3")
    monkeypatch.setenv("AUTHZ_CONFIG", "env.yaml")
    cli.main(["serve"])
    assert (served[-1].grpc_address, served[-1].workers, served[-1].config) == ("0.0.0.0:7000", 3, "env.yaml")
    cli.main(["serve", "--config", "flag.yaml", "--grpc-address", "127.0.0.1:7001", "--workers", "2"])
    assert (served[-1].grpc_address, served[-1].workers, served[-1].config) == ("127.0.0.1:7001", 2, "flag.yaml")


@pytest.mark.parametrize(
    ("value", "expected"), [("1", True), ("true", True), ("ON", True), ("0", False), ("no", False)]
)
def test_boolean_flags_from_the_environment(
    served: list[argparse.Namespace], monkeypatch: pytest.MonkeyPatch, value: str, expected: bool
) -> None:
    monkeypatch.setenv("AUTHZ_SPLIT_MEMORY_LEDGER", value)
    monkeypatch.setenv("AUTHZ_INSECURE_PLAINTEXT", value)
    cli.main(["serve", "--config", "p.yaml"])
    assert served[-1].split_memory_ledger is expected
    assert served[-1].insecure_plaintext is expected


def test_ledger_keeps_its_documented_variable(
    served: list[argparse.Namespace], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AUTHZ_LEDGER_URL", "redis://r:6379/0")
    cli.main(["serve", "--config", "p.yaml"])
    assert served[-1].ledger == "redis://r:6379/0"


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("AUTHZ_WORKERS", "many", "AUTHZ_WORKERS: an integer (got 'many')"),
        ("AUTHZ_INSECURE_PLAINTEXT", "maybe", "AUTHZ_INSECURE_PLAINTEXT: one of 1, true, yes, on or 0, false, no, off (got 'maybe')"),
    ],
)
def test_a_bad_value_is_an_error_naming_the_variable(
    served: list[argparse.Namespace],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    name: str,
    value: str,
    message: str,
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["serve", "--config", "p.yaml"])
    assert exit_.value.code == 2 and not served
    assert message in capsys.readouterr().err


def test_every_serve_flag_names_its_variable_in_help(
    served: list[argparse.Namespace], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # help wraps lines
    flags = set(re.findall(r"(?<![\w-])--([a-z][a-z-]+)", text)) - {"help"}
    assert {"config", "grpc-address", "workers", "split-memory-ledger"} <= flags
    for flag in flags:
        name = "AUTHZ_LEDGER_URL" if flag == "ledger" else "AUTHZ_" + flag.upper().replace("-", "_")
        assert name in text, flag
    assert "flag given on the command line wins over the environment" in text


def test_a_flag_added_later_gets_its_variable() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--check-http-address", default="127.0.0.1:9193", help="HTTP check API")
    apply_env(parser, {"AUTHZ_CHECK_HTTP_ADDRESS": ""})
    assert parser.parse_args([]).check_http_address == ""  # empty disables it: still a value
    assert "[AUTHZ_CHECK_HTTP_ADDRESS]" in parser.format_help()
