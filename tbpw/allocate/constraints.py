"""Constraints every allocator obeys: pins, allowed types, bpw bounds, shared types.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tbpw.errors import TbpwError
from tbpw.model.ggml_types import type_name


class Constraints(BaseModel):
    """Rules every allocator obeys (they rewrite the problem before the allocator sees it).

    Role keys are regular expressions matched against the whole role (``attn_v``, ``ffn_.*_exps``);
    pin keys are regular expressions searched in the tensor name, like llama-quantize's ``--tensor-type``.
    """

    model_config = ConfigDict(extra="forbid")

    pins: dict[str, str] = Field(default_factory=dict, description="tensor-name regex -> type; first match wins")
    allowed_types: dict[str, list[str]] = Field(default_factory=dict, description="role regex -> allowed types")
    min_bpw: dict[str, float] = Field(default_factory=dict, description="role regex -> lowest bpw allowed")
    max_bpw: dict[str, float] = Field(default_factory=dict, description="role regex -> highest bpw allowed")
    share_type: list[list[str]] = Field(default_factory=list,
                                        description="sets of roles whose tensors in one layer take one type, "
                                                    "e.g. [[ffn_gate_exps, ffn_up_exps]]")

    @classmethod
    def parse(cls, data: Mapping[str, Any] | None) -> Constraints:
        try:
            return cls.model_validate(dict(data or {}))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "constraints"
            raise TbpwError(f"constraint {where!r}: {first['msg']}; constraints are: "
                            f"{', '.join(cls.model_fields)}") from exc


def compile_pattern(pattern: str, what: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise TbpwError(f"{what} {pattern!r} is not a regular expression ({exc}): fix the pattern") from exc


def role_rules(rules: Mapping[str, Any], what: str) -> list[tuple[re.Pattern[str], Any]]:
    return [(compile_pattern(k, what), v) for k, v in rules.items()]


def first_rule(rules: list[tuple[re.Pattern[str], Any]], role: str) -> Any:
    return next((v for pattern, v in rules if pattern.fullmatch(role)), None)


def checked_type(t: str, where: str) -> str:
    try:
        return type_name(str(t))
    except (KeyError, ValueError):
        raise TbpwError(f"{where}: {t!r} is not a ggml type; use names such as Q4_K, IQ3_S, Q8_0, BF16") from None

