"""The examples in docs/directory.md are policies the loader accepts."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from authz.policy.loader import parse_policy

pytestmark = pytest.mark.unit
DOC = Path(__file__).parent.parent.parent / "docs" / "directory.md"
BASE: dict[str, Any] = {
    "version": 1,
    "identity": {"api_keys": [{"name": "k", "sha256": "0" * 64, "claims": {"sub": "x"}}]},
    "subject": {
        "org": {"claim": "org_id", "missing": {"fallback": "acme"}},
        "leaf": [{"level": "user", "claim": "sub"}],
    },
    "budgets": [{"name": "b", "match": {"org": "*"}, "tokens": 10, "period": "day"}],
}


def examples() -> list[dict[str, Any]]:
    blocks = re.findall(r"```yaml\n(.*?)```", DOC.read_text(), re.S)
    return [yaml.safe_load(b) for b in blocks]


@pytest.mark.parametrize("index", range(3))
def test_documented_directory_sections_load(tmp_path: Path, index: int) -> None:
    doc = examples()[index]
    assert "directory" in doc
    for name in ("ldap-password", "ad-password", "ldap-ca.pem"):
        (tmp_path / name).write_text("x")
    policy = parse_policy({**BASE, **doc}, str(tmp_path / "policy.yaml"))
    assert policy.directory is not None and policy.directory.levels
