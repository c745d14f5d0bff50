"""An example tbpw allocator: the cheapest candidate of every tensor, then the budget left over goes,
tensor by tensor, to the roles named in `spend_on` (each gets the best type that still fits)."""

from tbpw import AllocationProblem, Allocator, PluginOptions, hookimpl


class CheapestOptions(PluginOptions):  # unknown keys are errors: a typo in a recipe names the real fields
    spend_on: list[str] = []  # roles, e.g. ["attn_v", "ffn_down"]


class Cheapest(Allocator):
    name = "cheapest"
    description = "the cheapest type everywhere, leftover budget to the roles in spend_on"
    Options = CheapestOptions

    def allocate(self, problem: AllocationProblem) -> dict[str, str]:
        chosen = {t.name: min(t.candidates, key=lambda c: c.bytes) for t in problem.tensors}
        left = problem.budget - sum(c.bytes for c in chosen.values())
        for t in problem.tensors:
            if t.role not in self.options.spend_on:
                continue
            now = chosen[t.name]
            fits = [c for c in t.candidates if c.error < now.error and c.bytes - now.bytes <= left]
            if fits:
                best = min(fits, key=lambda c: c.error)
                left -= best.bytes - now.bytes
                chosen[t.name] = best
        return {name: c.type for name, c in chosen.items()}


@hookimpl
def tbpw_register_allocators(register):
    register(Cheapest)
