"""The quota management API (issue 12): runtime allocations over the YAML policy,
roles scoped to a subtree, the hierarchy and each node's counters. An edge of its own:
it reads the policy store and the ledger, and the enforcer sees only the
:class:`Overlay` it is handed (docs/management-api.md)."""

from authz.manage.model import Allocation, is_within, parse_node
from authz.manage.overlay import Overlay
from authz.manage.store import AllocationStore, MemoryAllocationStore, open_allocation_store

__all__ = [
    "Allocation",
    "AllocationStore",
    "MemoryAllocationStore",
    "Overlay",
    "is_within",
    "open_allocation_store",
    "parse_node",
]
