"""fork-native: the target-bpw fork's own `llama-quantize --target-bpw`, its choices read back from its output.

Needs a build of the fork as the active build (`tbpw build --source PATH` on a checkout of it); on any other
build it says so before a run starts (`check_ready`).
"""

from __future__ import annotations

from pydantic import Field

from tbpw import AllocationProblem, Allocator, PluginOptions, TbpwError, ensure_tool_features, fork_target_types


class ForkNativeOptions(PluginOptions):
    threads: int | None = Field(None, ge=1, description="threads for llama-quantize")
    state_file: str | None = Field(None, description="the fork's --state-file, to reuse its measurements")
    reuse_state: bool = Field(True, description="without state_file: keep the fork's state file in tbpw's cache, "
                                                "keyed by model, imatrix and build, so later targets skip its measurement")


class ForkNative(Allocator):
    name = "fork-native"
    description = "the fork's own llama-quantize --target-bpw (needs a build of the fork as the active build)"
    Options = ForkNativeOptions

    def check_ready(self) -> None:
        ensure_tool_features("--target-bpw", "--imatrix", purpose="the fork-native allocator")

    def allocate(self, problem: AllocationProblem) -> dict[str, str]:
        context = problem.context
        if context.model is None or context.imatrix is None:
            raise TbpwError("fork-native needs the model and imatrix paths the problem was made from: plan it through "
                            "tbpw's Planner (tbpw quantize, tbpw run) rather than a bare problem")
        if any(u.is_group for u in problem.tensors):
            raise TbpwError("fork-native cannot honour share_type constraints: drop them or pick another allocator")
        types = fork_target_types(context.model, context.imatrix, problem.target, pins=problem.pinned,
                                  threads=self.options.threads or context.threads, state_file=self.options.state_file,
                                  reuse_state=self.options.reuse_state, log_dir=context.log_dir)
        missing = [u.name for u in problem.tensors if u.name not in types]
        if missing:
            raise TbpwError(f"the fork's output has no {missing[0]}: is the active build really the fork?")
        return {u.name: types[u.name] for u in problem.tensors}
