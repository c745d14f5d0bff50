"""Built-in allocators, registered through the `tbpw` entry-point group like any third-party plugin.

Each one turns a `tbpw.allocate.AllocationProblem` into a type per decidable tensor whose bytes fit the
budget. They are pure functions of the problem (fork-native aside, which asks the fork's llama-quantize).

- ``lagrangian``: the target-bpw fork's solver, rule for rule, with its boosts and caps as options
  (tbpw_plugins/lagrangian.py);
- ``knapsack``: an exact multiple-choice knapsack: the least total error any choice within the budget
  can have (tbpw_plugins/knapsack.py);
- ``greedy``: from the cheapest mix, repeatedly buys the upgrade with the most error saved per byte;
- ``fork-native``: runs the fork's own ``llama-quantize --target-bpw`` and reads its choices back.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from tbpw.allocate import AllocationProblem
from tbpw.contracts import NoOptions, PluginOptions
from tbpw.errors import TbpwError
from tbpw.hookspecs import hookimpl

from .knapsack import Knapsack, greedy_fill
from .lagrangian import Lagrangian, lower_hull, monotone

__all__ = ["ForkNative", "Greedy", "Knapsack", "Lagrangian", "greedy_fill", "lower_hull", "monotone"]


class Greedy:
    name = "greedy"
    description = "from the cheapest mix, buy the upgrade with the most error saved per byte until the budget is spent"
    Options = NoOptions

    def __init__(self, options: NoOptions):
        self.options = options

    def allocate(self, problem: AllocationProblem) -> dict[str, str]:
        units = [monotone(u.candidates) for u in problem.tensors]
        start = np.zeros(len(units), dtype=np.int64)
        choice = greedy_fill(units, start, problem.budget - sum(c[0].bytes for c in units))
        return {u.name: cands[int(j)].type for u, cands, j in zip(problem.tensors, units, choice)}


class ForkNative:
    name = "fork-native"
    description = "the fork's own llama-quantize --target-bpw (needs a build of the fork as the active build)"

    class Options(PluginOptions):
        threads: int | None = Field(None, ge=1, description="threads for llama-quantize")
        state_file: str | None = Field(None, description="the fork's --state-file, to reuse its measurements")

    def __init__(self, options: "ForkNative.Options"):
        self.options = options

    def allocate(self, problem: AllocationProblem) -> dict[str, str]:
        from tbpw.llamacpp.quantize import fork_target_types

        model, imatrix = problem.context.get("model"), problem.context.get("imatrix")
        if not model or not imatrix:
            raise TbpwError("fork-native needs the model and imatrix paths in the problem's context: run it through `tbpw quantize`")
        if any(u.is_group for u in problem.tensors):
            raise TbpwError("fork-native cannot honour share_type constraints: drop them or pick another allocator")
        types = fork_target_types(model, imatrix, problem.target, pins=problem.pinned,
                                  threads=self.options.threads, state_file=self.options.state_file,
                                  log_dir=problem.context.get("log_dir"))
        out = {}
        for u in problem.tensors:
            if u.name not in types:
                raise TbpwError(f"the fork's output has no {u.name}: is the active build really the fork?")
            out[u.name] = types[u.name]
        return out


@hookimpl
def tbpw_register_allocators(register):
    register(Lagrangian)
    register(Knapsack)
    register(Greedy)
    register(ForkNative)
