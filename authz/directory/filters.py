"""LDAP search filters with hostile values in them, and entries -> level names.

A subject claim is whatever the token says; a user DN is whatever the directory holds.
Both are put into a filter template only after RFC 4515 escaping: ``*`` ``(`` ``)``
``\\`` and NUL become ``\\2a`` ``\\28`` ``\\29`` ``\\5c`` ``\\00``, so no value can add a
wildcard, close the filter early or open another clause (``alice)(uid=*`` stays one
literal value). Every other character, UTF-8 included, is legal in a filter value and
stays as it is. The template is filled by plain replacement, once: text inside the
value is never read as a slot.

Level names read from an entry are returned raw; :func:`authz.policy.subject.map_subject`
escapes them exactly as it escapes claim values (a directory value must never name
another node either).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from authz.policy.directory import LevelSource

__all__ = ["escape_filter_value", "fill", "level_names"]

_ESCAPES = {"*": "\\2a", "(": "\\28", ")": "\\29", "\\": "\\5c", "\0": "\\00"}


def escape_filter_value(value: str) -> str:
    """``value`` safe as an assertion value inside an LDAP filter (RFC 4515)."""
    if not any(ch in _ESCAPES for ch in value):
        return value
    return "".join(_ESCAPES.get(ch, ch) for ch in value)


def fill(template: str, slot: str, value: str) -> str:
    """``template`` with every ``slot`` replaced by the escaped ``value``."""
    return template.replace(slot, escape_filter_value(value))


def _first(values: Sequence[str], source: LevelSource) -> str | None:
    for text in values:
        if source.pattern is None:
            name: str | None = text
        else:
            m = source.pattern.search(text)
            if m is None:
                continue
            if "name" in m.groupdict():
                name = m.group("name")
            else:
                name = m.group(1) if m.groups() else m.group(0)
        if name:
            return name
    return None


def level_names(
    sources: Sequence[LevelSource],
    attributes: Mapping[str, Sequence[str]],
    groups: Sequence[str],
) -> dict[str, str]:
    """The name of each level the entry gives, raw (unescaped); a level it does not
    give is absent. Group DNs are compared in sorted order, so a user in two matching
    groups always lands in the same one, whatever order the server lists them in."""
    lowered = {k.lower(): v for k, v in attributes.items()}
    ordered = sorted(groups, key=str.lower)
    found: dict[str, str] = {}
    for source in sources:
        if source.group:
            values: Sequence[str] = ordered
        else:
            assert source.attribute is not None
            values = lowered.get(source.attribute.lower(), ())
        name = _first(values, source)
        if name is not None:
            found[source.level] = name
    return found
