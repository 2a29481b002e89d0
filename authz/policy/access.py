"""Which models a node of the hierarchy may use (issue 16): ``models: {allow, deny}``.

An ``access`` entry puts allow and deny lists of shell-style patterns on the nodes its
``match`` names, as a budget's match does (``{department: research}``, ``{user: "*"}``).
Every entry on a caller's path applies, from the org down: a model is permitted only if
each entry's ``allow`` (when it has one) matches it and no entry's ``deny`` does. So a
node inherits its ancestors' lists and can only narrow them: a child's ``allow`` that
reaches past its parent's is intersected with it, never a widening (the loader cannot
tell in general whether two glob patterns overlap, so this is not an error; the
refusal names the entry that refused).

Checked before anything is reserved; a refusal is a 403 in the API's error format.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING

from authz.policy.admission import Match, matches

if TYPE_CHECKING:  # model imports this module: no runtime import back
    from authz.policy.model import SubjectPath

__all__ = ["AccessRule", "ModelAccess"]

_MEMO_MAX = 4096  # clients choose the model strings: bounded


@dataclass(frozen=True, slots=True)
class AccessRule:
    where: str  # "access[2]": how a refusal names the entry
    match: Match
    level: str  # the deepest level named: the node the lists sit on
    allow: tuple[str, ...] = ()  # empty: any model not denied
    deny: tuple[str, ...] = ()

    def refuses(self, model: str) -> bool:
        if any(fnmatchcase(model, pattern) for pattern in self.deny):
            return True
        return bool(self.allow) and not any(fnmatchcase(model, p) for p in self.allow)


@dataclass(frozen=True, slots=True)
class ModelAccess:
    rules: tuple[AccessRule, ...] = ()
    _memo: dict[tuple[object, str | None], str | None] = field(
        default_factory=dict, compare=False, hash=False, repr=False
    )

    def refusal(self, path: SubjectPath, model: str | None) -> str | None:
        """None if ``model`` may be used at ``path``; else the reason, for the client.

        A request whose model is unknown (a body the service could not read, admitted
        by ``requests.bad_body: reserve``) is refused wherever a list applies: nothing
        proves the model is allowed."""
        if not self.rules:
            return None
        key = (path.nodes, model)
        try:
            return self._memo[key]
        except KeyError:
            pass
        found = None
        for rule in self.rules:
            if not matches(rule.match, path):
                continue
            if model is None or rule.refuses(model):
                node = path.prefix_key(rule.level) or str(path)
                what = "a request whose model is unknown" if model is None else f"model {model!r}"
                found = (
                    f"{what} is not allowed for {path}: the model list of {node} "
                    f"({rule.where}.models) does not permit it"
                )
                break
        if len(self._memo) >= _MEMO_MAX:
            self._memo.clear()
        self._memo[key] = found
        return found
