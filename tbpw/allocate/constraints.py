"""Constraints every allocator obeys: pins, allowed types, bpw bounds, shared types.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tbpw.errors import TbpwError
from tbpw.model.ggml_types import type_name

if TYPE_CHECKING:
    from tbpw.model.inventory import ModelInventory


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

    # The two checks below are the recipe's (tbpw.run.preflight) and the command line's alike, so that a mistake
    # reads the same from both and is found before anything is measured.

    def problems(self, where: str = "constraints") -> list[str]:
        """Patterns that do not compile, types that do not exist, a role in two `share_type` groups: what is
        wrong without looking at a model, one line each, located as `<where>.<field>[<pattern>]`."""
        problems = []
        for pattern, t in self.pins.items():
            problems += _pattern_problem(f"{where}.pins[{pattern!r}]", pattern)
            problems += _type_problem(f"{where}.pins[{pattern!r}]", t)
        for field, rules in (("allowed_types", self.allowed_types), ("min_bpw", self.min_bpw),
                             ("max_bpw", self.max_bpw)):
            for pattern in rules:
                problems += _pattern_problem(f"{where}.{field}[{pattern!r}]", pattern)
        for pattern, types in self.allowed_types.items():
            for t in types:
                problems += _type_problem(f"{where}.allowed_types[{pattern!r}]", t)
        seen: set[str] = set()
        for group in self.share_type:
            for role in group:
                if role in seen:
                    problems.append(f"{where}.share_type: role {role!r} is listed more than once: list each role "
                                    "once, in one group")
                seen.add(role)
        return problems

    def model_problems(self, inventory: ModelInventory, where: str = "constraints") -> list[str]:
        """Pin patterns that match no tensor of the model, role patterns and `share_type` roles that match no
        role of it: a rule that silently does nothing is a typo. Needs `problems()` to be empty."""
        problems = []
        names = [t.name for t in inventory.tensors]
        roles = {t.role for t in inventory.tensors if t.quantizable}
        for pattern in self.pins:
            if not any(re.search(pattern, n) for n in names):
                problems.append(f"{where}.pins[{pattern!r}] matches no tensor of {inventory.path.name}: check the "
                                "pattern")
        for field, rules in (("allowed_types", self.allowed_types), ("min_bpw", self.min_bpw),
                             ("max_bpw", self.max_bpw)):
            for pattern in rules:
                if not any(re.fullmatch(pattern, r) for r in roles):
                    problems.append(f"{where}.{field}[{pattern!r}] matches no role of {inventory.path.name} "
                                    f"(its roles: {', '.join(sorted(roles))}): check the pattern")
        for group in self.share_type:
            for role in group:
                if role not in roles:
                    problems.append(f"{where}.share_type: {role!r} is no role of {inventory.path.name}: check the "
                                    "name")
        return problems


def _pattern_problem(where: str, pattern: str) -> list[str]:
    try:
        re.compile(pattern)
    except re.error as exc:
        return [f"{where}: {pattern!r} is not a regular expression ({exc}): fix the pattern"]
    return []


def _type_problem(where: str, t: str) -> list[str]:
    try:
        checked_type(t, where)
    except TbpwError as exc:
        return [str(exc)]
    return []


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

