"""Built-in allocators, registered through the `tbpw` entry-point group like any third-party plugin.

Each one turns a `tbpw.AllocationProblem` into a type per decidable tensor whose bytes fit the
budget. They are pure functions of the problem (fork-native aside, which asks the fork's llama-quantize).

- ``lagrangian``: the target-bpw fork's solver, rule for rule, with its boosts and caps as options
  (lagrangian.py);
- ``knapsack``: an exact multiple-choice knapsack: the least total error any choice within the budget
  can have (knapsack.py);
- ``greedy``: from the cheapest mix, repeatedly buys the upgrade with the most error saved per byte;
- ``fork-native``: runs the fork's own ``llama-quantize --target-bpw`` and reads its choices back.
"""

from __future__ import annotations

from tbpw import hookimpl


@hookimpl
def tbpw_register_allocators(register) -> None:
    # imported here, so that loading the plugin (e.g. for `tbpw --help`) imports no numpy
    from .fork_native import ForkNative
    from .greedy import Greedy
    from .knapsack import Knapsack
    from .lagrangian import Lagrangian

    for cls in (Lagrangian, Knapsack, Greedy, ForkNative):
        register(cls)
