"""Redis key names. Every key of one org carries the hash tag ``{<org>}``.

An org's whole hierarchy (its counters, reservations, deadlines, leases and rollups)
therefore lives in one Redis Cluster slot, and every script touches one slot only. The
org is read from the reservation id (``<hex>@<org>``, made by the enforcer) and from a
limit's node, which always starts at ``org:<name>``: the policy loader refuses a subject
without an org, so no budget path can leave its org's slot. Names in nodes and ids are
escaped where they are made (:mod:`authz.policy.names`): no claim value can carry a
``/``, ``|``, ``@`` or brace into them, so none can name another org's tag; ``_tag``
still copes with such names, for limits built by hand (tests, tools).

Nodes that do not start at an org share one fallback tag (still correct, only not
spread over the cluster). Ids without ``@`` are found through a small index key.

    <prefix>:orgs                     SET of tags with reservations (for the sweeper)
    <prefix>:rid:<reservation id>     STRING tag of an id without "@<org>" (rare)
    <prefix>:{org}:c:<limit key>      HASH counter: a amount, u used, r reserved,
                                      l leased (all replicas), L:<replica>/E:<replica>
                                      one replica's lease and its epoch, S:<replica>
                                      its unused part (si: their sum), d drain time
    <prefix>:{org}:r:<reservation id> STRING msgpack reservation record
    <prefix>:{org}:p:<reservation id> STRING settlement waiting for a lease flush
    <prefix>:{org}:ch:<charge id>     STRING marker: a replayed charge was applied
    <prefix>:{org}:dl                 ZSET reservation id -> deadline
    <prefix>:{org}:ls                 ZSET "<limit key>\\n<replica>" -> lease expiry
    <prefix>:{org}:u:<h|d>:<start>:<node>  HASH rollup "<model>|<i|c|o|u|n>" -> count
"""

from __future__ import annotations

import hashlib

from authz.ledger.base import Limit

__all__ = ["FALLBACK_TAG", "Keys", "org_of_node", "org_of_reservation"]

FALLBACK_TAG = "-"


def org_of_reservation(reservation_id: str) -> str | None:
    _, at, org = reservation_id.partition("@")
    return org if at else None


def org_of_node(node: str) -> str | None:
    if not node.startswith("org:"):
        return None
    return node[4:].split("/", 1)[0]


def _tag(org: str | None) -> str:
    # Only the org name up to a "/" counts: a node path cannot tell an org named "a/b"
    # from org "a" + a child, so both sides must agree on the part they can both see.
    head = (org or "").split("/", 1)[0]
    if not head:
        return FALLBACK_TAG
    if "{" in head or "}" in head or len(head) > 64:
        # A brace would end the hash tag early; long names only cost memory per key.
        return "#" + hashlib.sha1(head.encode()).hexdigest()[:16]
    return head


class Keys:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.orgs = f"{prefix}:orgs"

    def tag_for_limit(self, limit: Limit) -> str:
        return _tag(org_of_node(limit.node))

    def tag_for_node(self, node: str) -> str:
        return _tag(org_of_node(node))

    def tag_for(self, reservation_id: str, limits: tuple[Limit, ...]) -> str:
        """The one tag of a reservation; ``ValueError`` if its limits span several orgs.

        Production ids (``<hex>@<org>``) name the tag themselves, so a settle that knows
        only the id (on another replica) finds the record. Other ids take their limits'
        tag and are found through :meth:`rid_index` (one more write and read).
        """
        rid_org = org_of_reservation(reservation_id)
        tags = {self.tag_for_limit(limit) for limit in limits}
        if rid_org is not None:
            tags.add(_tag(rid_org))
        if len(tags) > 1:
            raise ValueError(
                f"reservation {reservation_id!r} spans orgs {sorted(tags)}: one reservation"
                " must stay in one org's slot"
            )
        return tags.pop() if tags else self.tag_for_id(reservation_id)

    def needs_index(self, reservation_id: str, tag: str) -> bool:
        return org_of_reservation(reservation_id) is None and tag != FALLBACK_TAG

    def rid_index(self, reservation_id: str) -> str:
        """``<prefix>:rid:<id>`` -> tag, for ids that do not name their org."""
        return f"{self.prefix}:rid:{reservation_id}"

    def tag_for_id(self, reservation_id: str) -> str:
        return _tag(org_of_reservation(reservation_id))

    def base(self, tag: str) -> str:
        """``<prefix>:{<tag>}:``, the start of every key of that org."""
        return f"{self.prefix}:{{{tag}}}:"

    def counter(self, tag: str, limit_key: str) -> str:
        return f"{self.base(tag)}c:{limit_key}"

    def record(self, tag: str, reservation_id: str) -> str:
        return f"{self.base(tag)}r:{reservation_id}"

    def pending(self, tag: str, reservation_id: str) -> str:
        return f"{self.base(tag)}p:{reservation_id}"

    def charge(self, tag: str, charge_id: str) -> str:
        return f"{self.base(tag)}ch:{charge_id}"

    def deadlines(self, tag: str) -> str:
        return f"{self.base(tag)}dl"

    def leases(self, tag: str) -> str:
        return f"{self.base(tag)}ls"

    def rollup(self, tag: str, granularity: str, start: int, node: str) -> str:
        return f"{self.base(tag)}u:{granularity[0]}:{start}:{node}"
