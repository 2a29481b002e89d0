"""The Kong plugin's own checks, run from pytest: luacheck and the busted specs
(kong/spec/token-budget/, a stubbed global ``kong``), under LuaJIT as Kong runs them.

Needs the Debian packages ``scripts/apt-deps`` installs; without them these fail.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.support.kong_nginx import lua_tools
from tests.support.procs import HarnessError

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
KONG = REPO / "kong"


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_luacheck_plugin_and_specs_clean() -> None:
    done = run([lua_tools()["luacheck"], "--no-color", "."], KONG)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 warnings / 0 errors" in done.stdout


def test_luacheck_kong_stand_in_clean() -> None:
    stub = REPO / "tests" / "support" / "kong_stub"
    done = run([lua_tools()["luacheck"], "--no-color", "."], stub)
    assert done.returncode == 0, done.stdout + done.stderr


def test_busted_specs_pass_under_luajit() -> None:
    done = run([lua_tools()["busted"], "--lua=luajit", "-o", "TAP"], KONG)
    assert done.returncode == 0, done.stdout + done.stderr
    passed = re.findall(r"^ok \d+", done.stdout, re.M)
    assert len(passed) >= 20, done.stdout  # the specs ran, not an empty directory


def test_plugin_version_is_the_rock_version() -> None:
    handler = (KONG / "plugins" / "token-budget" / "handler.lua").read_text()
    version = re.search(r'VERSION = "([^"]+)"', handler)
    assert version is not None
    rocks = sorted(p.name for p in KONG.glob("kong-plugin-token-budget-*.rockspec"))
    assert rocks == [f"kong-plugin-token-budget-{version.group(1)}-1.rockspec"]
    spec = (KONG / rocks[0]).read_text()
    assert f'version = "{version.group(1)}-1"' in spec
    modules = set(re.findall(r'"(plugins/token-budget/[\w-]+\.lua)"', spec))
    on_disk = {
        f"plugins/token-budget/{p.name}" for p in (KONG / "plugins/token-budget").glob("*.lua")
    }
    assert modules == on_disk, "the rockspec lists every module of the plugin"


def test_rockspec_installs_every_module(tmp_path: Path) -> None:
    luarocks = shutil.which("luarocks")
    if luarocks is None:
        raise HarnessError("luarocks is missing: run scripts/apt-deps as root")
    rock = next(KONG.glob("kong-plugin-token-budget-*.rockspec")).name
    lint = run([luarocks, "lint", rock], KONG)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    made = run([luarocks, "make", "--tree", str(tmp_path), rock], KONG)
    assert made.returncode == 0, made.stdout + made.stderr
    installed = {p.name for p in tmp_path.glob("share/lua/5.1/kong/plugins/token-budget/*.lua")}
    assert installed == {p.name for p in (KONG / "plugins/token-budget").glob("*.lua")}


def schema_fields() -> set[str]:
    schema = (KONG / "plugins" / "token-budget" / "schema.lua").read_text()
    return set(re.findall(r"^\s*(?:fields\[#fields \+ 1\] = )?\{ (\w+) = ", schema, re.M))


def test_kong_yml_is_valid_for_deck_and_the_plugin_schema() -> None:
    deck = shutil.which("deck")
    if deck is None:
        raise HarnessError("deck is missing: run scripts/apt-deps as root")
    done = run([deck, "validate", "-s", "kong.yml"], KONG)
    assert done.returncode == 0, done.stdout + done.stderr
    # decK checks the file's structure, not a plugin's config: hold that to schema.lua.
    doc = yaml.safe_load((KONG / "kong.yml").read_text())
    (plugin,) = [p for s in doc["services"] for p in s["plugins"] if p["name"] == "token-budget"]
    fields = schema_fields()
    assert {"service_url", "fail_open", "max_settle_body", "client_cert", "queue"} <= fields
    assert set(plugin["config"]) <= fields, set(plugin["config"]) - fields
    assert all(r["response_buffering"] is False for s in doc["services"] for r in s["routes"])
