"""Validation of the issue 16 budget keys: every error names file:path and the value."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from authz.audit.trail import budget_changes
from authz.errors import PolicyError
from authz.policy.loader import parse_policy

pytestmark = pytest.mark.unit

HEAD = """
version: 1
identity:
  api_keys: [{name: a, sha256: "%s", claims: {org_id: acme, sub: ann}}]
subject:
  org: {claim: org_id}
  leaf: [{level: user, claim: sub}]
""" % ("0" * 64)


def load(budgets: str) -> Any:
    return parse_policy(yaml.safe_load(HEAD + "budgets:\n" + budgets), "p.yaml")


def test_the_keys_are_read() -> None:
    policy = load(
        "  - {name: b, match: {org: acme}, tokens: 1000, period: day, renamed_from: old,\n"
        "     enforce: false, rollover: {max: 50%}}\n"
        "  - {name: c, match: {user: '*'}, tokens: 10, period: day, rollover: {max: 4}}\n"
    )
    b, c = policy.budgets
    assert (b.renamed_from, b.enforce, b.rollover) == ("old", False, 500)
    assert (c.renamed_from, c.enforce, c.rollover) == (None, True, 4)


BAD = {
    "  - {name: a, match: {org: acme}, tokens: 1, period: day}\n"
    "  - {name: b, match: {org: acme}, tokens: 1, period: day, renamed_from: a}\n":
    "budgets[1].renamed_from: names a budget still in the policy (budgets[0]) (got 'a')",
    "  - {name: b, match: {org: acme}, tokens: 1, period: day, renamed_from: x}\n"
    "  - {name: c, match: {user: '*'}, tokens: 1, period: day, renamed_from: x}\n":
    "budgets[1].renamed_from: budgets[0] is renamed from it already (got 'x')",
    "  - {name: b, match: {org: acme}, tokens: 1, period: day, renamed_from: b}\n":
    "budgets[0].renamed_from: is the budget's own name (got 'b')",
    "  - {name: b, match: {org: acme}, tokens: 1, period: day, renamed_from: 'a b'}\n":
    "budgets[0].renamed_from: must match [A-Za-z0-9_.:-]+ (got 'a b')",
    "  - {name: b, match: {org: acme}, tokens: 1, period: day, enforce: 'no'}\n":
    "budgets[0].enforce: must be true or false (got 'no')",
    "  - {name: b, match: {org: acme}, tokens: 1, period: day, rollover: 5}\n":
    "budgets[0].rollover: must be a mapping (got 5)",
    "  - {name: b, match: {org: acme}, tokens: 1, period: day, rollover: {}}\n":
    "budgets[0].rollover.max: is required",
    "  - {name: b, match: {org: acme}, tokens: 1, period: day, rollover: {max: half}}\n":
    "budgets[0].rollover.max: must be a percentage like '10%' or a whole number (got 'half')",
    "  - {name: b, match: {org: acme}, tokens: 10, period: day, rollover: {max: 0%}}\n":
    "budgets[0].rollover.max: must be more than 0 (leave rollover out) (got '0%')",
    "  - {name: b, match: {org: acme}, tokens: 10, period: day, rollover: {cap: 1}}\n":
    "budgets[0].rollover.cap: unknown key; allowed: max",
}


@pytest.mark.parametrize("budgets", sorted(BAD))
def test_bad_keys_name_file_path_and_value(budgets: str) -> None:
    with pytest.raises(PolicyError) as err:
        load(budgets)
    assert str(err.value) == f"p.yaml:{BAD[budgets]}"


def test_every_snippet_of_the_budgets_doc_loads() -> None:
    """docs/budgets.md shows the snippet that turns each feature on: each must load."""
    doc = (Path(__file__).parents[2] / "docs" / "budgets.md").read_text()
    snippets = re.findall(r"```yaml\n(.*?)```", doc, re.S)
    assert len(snippets) == 6  # edits, audit-only, rollover, model lists, groups, prices
    for text in snippets:
        if text.startswith("access:"):
            text += "budgets: []\n"
        elif not text.startswith("budgets:"):
            text = "budgets:\n" + text
        assert parse_policy(yaml.safe_load(HEAD + text), "doc").budgets is not None


def test_turning_enforcement_off_is_an_audited_budget_change() -> None:
    before = load("  - {name: b, match: {org: acme}, tokens: 10, period: day}\n")
    after = load("  - {name: b, match: {org: acme}, tokens: 10, period: day, enforce: false}\n")
    (change,) = budget_changes(before, after)
    assert change["change"] == "changed"
    assert (change["before"]["enforce"], change["after"]["enforce"]) == (True, False)
