"""Node names: claim values made safe to sit inside paths, ledger keys and ids.

A claim value becomes a node name, and node names are glued into strings that other
code splits again:

- a subject path ``org:acme/department:research/user:alice`` (``:`` and ``/``);
- a ledger key ``<budget>|<path>|<window start>`` (``|``);
- a reservation id ``<hex>@<org>`` (``@``), which settlement and the Redis ledger read
  back to find the org, and the Redis hash tag ``{<org>}`` (``{`` ``}``), which picks
  the cluster slot;
- log lines, metric labels, Envoy metadata and headers (whitespace, control characters).

A value such as ``research/user:bob`` or ``acme}|x`` would otherwise name another node,
another counter or another org's slot. So every name is escaped once, where it is made
(:func:`authz.policy.subject.map_subject` for claims and fallbacks, the policy loader for
the names a ``match:`` pattern compares with), and never unescaped: percent-encoding, as
in URLs, of ``%`` itself, of every separator above, of ``*`` (the wildcard of ``match``
patterns), and of every whitespace or non-printable character (its UTF-8 bytes; a lone
surrogate from a JSON ``\\ud800`` escape is encoded as such, ``surrogatepass``). The
encoding is injective, so two different values never share a name, and readable: the
common names (``acme``, ``team-nlp``, ``alice@example.com`` excepted, which shows as
``alice%40example.com``) are unchanged.

What is refused instead of escaped: a value longer than :data:`MAX_NAME_CHARS`
characters (a 403 ``subject_unmapped`` naming the claim). No IdP issues such names; a
bound keeps one key, one metric label and one log line small whatever a token says.
"""

from __future__ import annotations

import re

__all__ = ["MAX_NAME_CHARS", "RESERVED", "escape_name"]

MAX_NAME_CHARS = 256
# Separators of paths, keys, ids and hash tags; the escape character; the wildcard.
RESERVED = frozenset("%/:|@{}*")
# The ASCII fast path: anything outside "!".."~", or a reserved character.
_UNSAFE_ASCII = re.compile(r"[^\x21-\x7e]|[%/:|@{}*]")


def _escape_char(ch: str) -> str:
    data = ch.encode("utf-8", "surrogatepass")
    return "".join(f"%{b:02X}" for b in data)


def _unsafe(ch: str) -> bool:
    return ch in RESERVED or ch.isspace() or not ch.isprintable()


def escape_name(value: str) -> str:
    """``value`` with every reserved, whitespace or non-printable character
    percent-encoded; unchanged (the same object) when there is none."""
    if value.isascii():
        if _UNSAFE_ASCII.search(value) is None:
            return value
    elif not any(_unsafe(ch) for ch in value):
        return value
    return "".join(_escape_char(ch) if _unsafe(ch) else ch for ch in value)
