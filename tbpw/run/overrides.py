"""KEY=VALUE on the command line: recipe overrides (`--set a.b=1`) and plugin options (`-O key=value`).

One parser for all of them: the value is read as YAML, so numbers, booleans and lists come out typed
(`8`, `true`, `[Q4_K, Q6_K]`) and anything else stays a string.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import yaml

from tbpw.errors import TbpwError


def parse_value(raw: str) -> Any:
    if not raw.strip():
        return ""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def parse_assignment(text: str, *, flag: str, example: str, shape: str = "KEY=VALUE") -> tuple[str, Any]:
    """`key=value` -> (key, typed value); a missing `=` or key is a one-line error showing `example`."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise TbpwError(f"{flag} {text!r} is not {shape}: write e.g. {flag} {example}")
    return key.strip(), parse_value(raw)


def key_values(pairs: Iterable[str], *, flag: str, example: str) -> dict[str, Any]:
    """Repeated `--flag key=value` options as a dict (a later key wins)."""
    return dict(parse_assignment(pair, flag=flag, example=example) for pair in pairs)
