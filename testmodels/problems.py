"""Allocation problems with the shapes of real models, for the allocator tests and benchmarks/speed.py."""

from __future__ import annotations

import random

from tbpw import AllocationProblem, Candidate, DecidableTensor, Member, Target
from tbpw.model.ggml_types import FORK_TYPES, effective_type, nominal_bpw, row_bytes


def moe_like_problem(bpw: float) -> AllocationProblem:
    """~300 tensors x 20 types with the shapes of a 26B MoE (30 layers, 128 experts), seeded errors."""
    rng = random.Random(3)
    shapes = [("token_embd.weight", 2816, 262144)]
    for layer in range(30):
        for role, ne0, rows in (("ffn_gate_exps", 2816, 704 * 128), ("ffn_up_exps", 2816, 704 * 128),
                                ("ffn_down_exps", 768, 2816 * 128), ("attn_q", 2816, 4096), ("attn_k", 2816, 1024),
                                ("attn_v", 2816, 1024), ("attn_output", 4096, 2816), ("ffn_gate", 2816, 2112),
                                ("ffn_up", 2816, 2112), ("ffn_down", 2112, 2816)):
            shapes.append((f"blk.{layer}.{role}.weight", ne0, rows))
    tensors = []
    for name, ne0, rows in shapes:
        cands: dict[str, Candidate] = {}
        for t in FORK_TYPES:
            t = effective_type(t, ne0)
            nbytes = rows * row_bytes(t, ne0)
            error = rows * 2.0 ** (-2.0 * nominal_bpw(t)) * (0.7 + 0.6 * rng.random())
            if t not in cands or error < cands[t].error:
                cands[t] = Candidate(t, nbytes, error, 8.0 * nbytes / (ne0 * rows))
        member = Member(name, ne0, rows, {c.type: c.error for c in cands.values()})
        tensors.append(DecidableTensor(name, ne0 * rows, tuple(sorted(cands.values(), key=lambda c: c.bytes)), None,
                                       name.split(".")[-2], 1, (member,)))
    elements = sum(t.n_elements for t in tensors)
    return AllocationProblem(tuple(tensors), int(bpw * elements / 8), elements, 0, False, Target(bpw=bpw))
