"""Runtime allocations: changes layered over the YAML policy while they are active.

Three kinds, all on one node (a path such as ``org:acme/department:research``):

- ``adjust``: raise (``tokens`` > 0) or lower (< 0) one budget of the node from
  ``starts_at`` until ``expires_at`` (open-ended without one);
- ``emergency``: a raise granted at once that must expire (``expires_at`` required) and
  is meant to be reviewed after;
- ``freeze``: the node, and every path below it, refuses new checks (403).

The effective amount of a budget's counter is its YAML amount plus every active
allocation's ``tokens`` on that budget and node, never below 0. Allocations are values;
the stores (:mod:`authz.manage.store`) keep them, :mod:`authz.manage.overlay` applies them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, Literal

from authz.policy.model import LEAF_LEVELS, LEVELS, Node, SubjectPath
from authz.policy.names import MAX_NAME_CHARS, RESERVED

__all__ = ["KINDS", "Allocation", "Kind", "NodeError", "is_within", "parse_node"]

Kind = Literal["adjust", "emergency", "freeze"]
KINDS: tuple[str, ...] = ("adjust", "emergency", "freeze")


@dataclass(frozen=True, slots=True)
class Allocation:
    id: str
    kind: Kind
    node: str  # a node key, as SubjectPath.prefix_key spells it
    budget: str | None  # None for a freeze
    tokens: int  # signed; 0 for a freeze
    starts_at: float
    expires_at: float | None
    reason: str
    created_by: str  # the caller: "jwt:<sub>" or "key:<name>"
    created_at: float

    def active(self, now: float) -> bool:
        return self.starts_at <= now and (self.expires_at is None or now < self.expires_at)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> Allocation:
        data: dict[str, Any] = json.loads(text)
        return cls(**data)


class NodeError(ValueError):
    """A node key that is no path of the hierarchy."""


def parse_node(text: str) -> SubjectPath:
    """``org:acme/department:research`` -> SubjectPath; :class:`NodeError` saying why not.

    Names are taken as the service writes them (already escaped, authz.policy.names):
    a reserved character or whitespace in a name cannot come from any claim."""
    if not isinstance(text, str) or not text:
        raise NodeError("must be a node path such as org:acme/department:research")
    nodes: list[Node] = []
    last = -1
    for part in text.split("/"):
        level, sep, name = part.partition(":")
        if not sep or level not in LEVELS:
            raise NodeError(f"{part!r} is not <level>:<name> with a level of {', '.join(LEVELS)}")
        at = LEVELS.index(level)
        if not nodes and level != "org":
            raise NodeError("must start at the org (org:<name>)")
        if at <= last or (nodes and nodes[-1].level in LEAF_LEVELS):
            raise NodeError(f"level {level} is out of order (org, department, team, then a"
                            " user or an app)")  # fmt: skip
        if not name or len(name) > MAX_NAME_CHARS or any(
            (c in RESERVED and c != "%") or not c.isprintable() or c.isspace() for c in name
        ):
            raise NodeError(f"name {name!r} is empty, too long or has a reserved character")
        nodes.append(Node(level, name))
        last = at
    return SubjectPath(tuple(nodes))


def is_within(node: str, scope: str) -> bool:
    """``node`` is ``scope`` or below it (whole path segments: acme2 is not in acme)."""
    return node == scope or node.startswith(scope + "/")
