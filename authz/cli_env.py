"""Every ``authz serve`` flag from the environment too, as twelve-factor deployments expect.

``--grpc-address`` is ``AUTHZ_GRPC_ADDRESS``, ``--config`` is ``AUTHZ_CONFIG``: the flag's
name, upper-cased, ``-`` as ``_``, prefixed ``AUTHZ_``. A flag on the command line wins
over the environment, which wins over the built-in default. Applied to the parser's
actions rather than flag by flag, so a flag added later gets its variable, its ``--help``
line and the same value checks without anyone remembering to. A value that does not
parse is an error naming the variable, never silently the default.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping

__all__ = ["ENV_EPILOG", "apply_env", "env_name"]

PREFIX = "AUTHZ_"
# Names that predate the rule and are documented; kept so no deployment breaks.
_ALIASES = {"ledger": "AUTHZ_LEDGER_URL"}
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")

ENV_EPILOG = (
    "Every flag can also be set in the environment: AUTHZ_ and the flag's name in"
    " capitals, e.g. AUTHZ_CONFIG, AUTHZ_GRPC_ADDRESS, AUTHZ_INSECURE_PLAINTEXT=1"
    " (--ledger is AUTHZ_LEDGER_URL). A flag given on the command line wins over the"
    " environment, which wins over the default."
)


def env_name(action: argparse.Action) -> str:
    return _ALIASES.get(action.dest, PREFIX + action.dest.upper())


def _flag_value(name: str, raw: str) -> bool:
    text = raw.strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"{name}: one of {', '.join(_TRUE)} or {', '.join(_FALSE[:-1])} (got {raw!r})")


def _typed(action: argparse.Action, name: str, raw: str) -> object:
    if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
        value = _flag_value(name, raw)
        return value if isinstance(action, argparse._StoreTrueAction) else not value
    if action.type is None:
        return raw
    try:
        return action.type(raw)  # type: ignore[operator]
    except (TypeError, ValueError):
        kind = getattr(action.type, "__name__", "value")
        kind = "an integer" if kind == "int" else kind
        raise ValueError(f"{name}: {kind} (got {raw!r})") from None


def apply_env(parser: argparse.ArgumentParser, environ: Mapping[str, str] | None = None) -> None:
    """Take each option's default from its ``AUTHZ_*`` variable when set, and name the
    variable in its help. Exits (status 2, like a bad flag) on a value that does not parse."""
    env = os.environ if environ is None else environ
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS:
            continue
        if isinstance(action, argparse._HelpAction | argparse._VersionAction):
            continue
        name = env_name(action)
        if action.help is not None and name not in action.help:
            action.help = f"{action.help} [{name}]"
        raw = env.get(name)
        if raw is None:
            continue
        try:
            action.default = _typed(action, name, raw)
        except ValueError as exc:
            parser.error(str(exc))
        action.required = False
