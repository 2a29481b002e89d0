"""Typed Envoy messages -> commented YAML that reads like a hand-written bootstrap.

Envoy's YAML is proto JSON, so a message's ``to_dict`` (snake_case field names, durations
as ``"1s"``, enums by name) is already valid config. What it cannot carry is the reason
behind each setting, which is most of what an operator reads in ``envoy/envoy.yaml``: so
comments are kept apart, keyed by a dotted path (list items by their ``name``, else by
index: ``static_resources.clusters[authz].connect_timeout``), and written above the key
they explain. A path ending in ``.$end`` writes its comment after the last entry of that
mapping: the place for optional blocks shown commented out.

Proto3 drops fields at their default value; a few defaults are worth stating anyway
(``failure_mode_allow: false``), so :func:`message_tree` puts back the names it is given.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import betterproto2
import yaml

__all__ = ["Notes", "commented_out", "dump", "message_tree", "prefixed"]

Notes = dict[str, str]
WIDTH = 100  # the project's line length; a collection that fits goes on one line
END = "$end"


# Worth stating in the YAML although proto3 drops them at their default (false):
# (message type, field), the type as the end of its "@type" URL.
KEEP_DEFAULTS = frozenset({("ExtAuthz", "failure_mode_allow"), ("ExtAuthz", "clear_route_cache")})


def message_tree(
    message: betterproto2.Message, keep_defaults: frozenset[tuple[str, str]] = KEEP_DEFAULTS
) -> Any:
    """``message`` as plain dicts and lists; the fields named in ``keep_defaults`` stay
    even at their default value (proto3 would drop them)."""
    sparse = message.to_dict(casing=betterproto2.Casing.SNAKE)
    if not keep_defaults:
        return sparse
    full = message.to_dict(casing=betterproto2.Casing.SNAKE, include_default_values=True)
    return _restore(sparse, full, keep_defaults)


def _restore(sparse: Any, full: Any, keep: frozenset[tuple[str, str]]) -> Any:
    if isinstance(sparse, dict) and isinstance(full, dict):
        kind = str(sparse.get("@type", "")).rsplit(".", 1)[-1]
        here = {field for name, field in keep if name == kind}
        out = {}
        for key, value in full.items():  # full's order is the proto's field order
            if key in sparse:
                out[key] = _restore(sparse[key], value, keep)
            elif key in here:
                out[key] = value
        return out
    if isinstance(sparse, list) and isinstance(full, list) and len(sparse) == len(full):
        return [_restore(s, f, keep) for s, f in zip(sparse, full, strict=True)]
    return sparse


def prefixed(prefix: str, notes: Mapping[str, str]) -> Notes:
    """``notes`` of a part placed at ``prefix`` in a bigger tree."""
    return {f"{prefix}.{path}" if path else prefix: text for path, text in notes.items()}


def commented_out(tree: Any, notes: Mapping[str, str] | None = None) -> str:
    """``tree`` as YAML text, for a comment that shows an optional block to uncomment."""
    return "\n".join(_lines(tree, notes or {}, 0, "")).rstrip("\n")


def dump(tree: Any, notes: Mapping[str, str], header: str = "") -> str:
    lines = [_comment(header, 0)] if header else []
    lines += _lines(tree, notes, 0, "")
    return "\n".join(lines).rstrip("\n") + "\n"


def _comment(text: str, indent: int) -> str:
    pad = " " * indent
    return "\n".join(f"{pad}# {line}".rstrip() if line else f"{pad}#" for line in text.split("\n"))


def _scalar(value: Any) -> str:
    text: str = yaml.safe_dump(value, default_flow_style=True, width=10**6, sort_keys=False)
    return text.removesuffix("\n...\n").strip()


def _child(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _item_path(path: str, index: int, item: Any) -> str:
    label = item["name"] if isinstance(item, dict) and "name" in item else index
    return f"{path}[{label}]"


def _has_notes(notes: Mapping[str, str], path: str) -> bool:
    """Whether anything inside ``path`` has a comment (its own goes above it anyway)."""
    return any(p.startswith((path + ".", path + "[")) for p in notes)


def _flow(value: Any, notes: Mapping[str, str], path: str, used: int) -> str | None:
    """One-line form of a collection, if it fits and nothing in it has a comment."""
    if _has_notes(notes, path) or (isinstance(value, dict) and "@type" in value):
        return None
    text = _scalar(value)
    return text if used + len(text) <= WIDTH else None


def _lines(tree: Any, notes: Mapping[str, str], indent: int, path: str) -> list[str]:
    if isinstance(tree, dict):
        return _mapping(tree, notes, indent, path, first_prefix="")
    if isinstance(tree, list):
        return _sequence(tree, notes, indent, path)
    return [" " * indent + _scalar(tree)]


def _mapping(
    tree: dict[str, Any], notes: Mapping[str, str], indent: int, path: str, first_prefix: str
) -> list[str]:
    out: list[str] = []
    pad = " " * indent
    for n, (key, value) in enumerate(tree.items()):
        # In a list item the first key follows "- " on the item's own line.
        lead = first_prefix if n == 0 and first_prefix else pad
        here = _child(path, key)
        if here in notes and not (n == 0 and first_prefix):
            out.append(_comment(notes[here], indent))
        head = f"{lead}{_scalar(key)}:"
        if not isinstance(value, dict | list):
            out.append(f"{head} {_scalar(value)}")
            continue
        flow = _flow(value, notes, here, len(head) + 1)
        if flow is not None:
            out.append(f"{head} {flow}")
        elif isinstance(value, dict):
            out.append(head)
            out += _mapping(value, notes, indent + 2, here, first_prefix="")
        else:
            out.append(head)
            out += _sequence(value, notes, indent, here)  # "- " level with the key
    end = _child(path, END)
    if end in notes:
        out.append(_comment(notes[end], indent))
    return out


def _sequence(items: list[Any], notes: Mapping[str, str], indent: int, path: str) -> list[str]:
    out: list[str] = []
    pad = " " * indent
    for i, item in enumerate(items):
        here = _item_path(path, i, item)
        first_key = _child(here, next(iter(item))) if isinstance(item, dict) and item else ""
        for note_path in (here, first_key):
            if note_path in notes:
                out.append(_comment(notes[note_path], indent))
        if not isinstance(item, dict | list):
            out.append(f"{pad}- {_scalar(item)}")
            continue
        flow = _flow(item, notes, here, indent + 2)
        if flow is not None:
            out.append(f"{pad}- {flow}")
        elif isinstance(item, dict):
            out += _mapping(item, notes, indent + 2, here, first_prefix=f"{pad}- ")
        else:
            out.append(f"{pad}-")
            out += _sequence(item, notes, indent + 2, here)
    end = _child(path, END)
    if end in notes:
        out.append(_comment(notes[end], indent))
    return out
