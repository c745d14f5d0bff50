"""What every subcommand shares: the stderr console, and flags whose defaults are an options model's.
(User errors become one line in `tbpw.cli.TbpwGroup`.)"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from rich.console import Console

console = Console(stderr=True)


def default(model: type[BaseModel], field: str) -> Any:
    """A field's default in an options model: the flag that sets the field shows and uses it, so a command line and
    a recipe share one set of defaults (a list becomes the tuple a repeatable flag takes)."""
    value = model.model_fields[field].get_default(call_default_factory=True)
    return tuple(value) if isinstance(value, list) else value


def options_from_flags(model: type[BaseModel], command: str, **flags: Any) -> Any:
    """`model` made from a command's flags (named as the model's fields); a mistake is one line naming the flag."""
    from tbpw.options import build

    return build(model, f"tbpw {command}", flag_names=True, **flags)
