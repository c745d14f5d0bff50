"""The shape every options model of tbpw shares: unknown keys are mistakes, and a plugin is named with its options.

A leaf module: each stage's options model (tbpw.measure.options, tbpw.select.options, ...) builds on `Strict`,
the recipe composes those models (tbpw.run.recipe), and `PluginRef` names a plugin wherever an options model
needs one (the measurement's metric, the recipe's allocators and evaluators).
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

M = TypeVar("M", bound=BaseModel)
# The largest count llama.cpp's tools read from their command line (std::stoi, a 32-bit int): any option that
# becomes a tool's argument is at most this, so that a typo fails in the recipe, not in the tool.
TOOL_INT = 2**31 - 1


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PluginRef(Strict):
    """A plugin by name with its options, validated by the plugin's own Options model."""

    name: str
    options: dict[str, Any] = Field(default_factory=dict)


def build(model: type[M], where: str, *, flag_names: bool = False, **fields: Any) -> M:
    """`model` made from `fields` (a command's flags, a caller's arguments); a mistake is one line naming the field
    (as the flag `--name-like-this`, with `flag_names`) and `where` it came from, as the recipe's own messages do."""
    from tbpw.errors import TbpwError

    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        if flag_names and first["loc"]:
            field = "--" + str(first["loc"][0]).replace("_", "-")
        what = first["msg"].removeprefix("Value error, ")
        raise TbpwError(f"{where}: {field + ': ' if field else ''}{what}") from None
