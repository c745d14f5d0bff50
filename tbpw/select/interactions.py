"""Interactions within a role, on top of a per-tensor calibration.

A per-tensor calibration (tbpw.select.calibrate, grouping "tensor") measures each tensor ALONE at a probe type,
and the allocator then treats the KL divergence of a plan as the sum of those. It is not: quantizing every
`ffn_down` of the model at once costs more (or less) than the sum of quantizing each one alone, because their
errors travel through the same residual stream. A role calibration (grouping "role") measures exactly those
joint costs, but only one number per role.

`with_role_interactions` keeps the per-tensor differences and corrects each role's total: every tensor's
measured KLD at a probe type is multiplied by

    factor(role, probe) = KLD(the whole role at the probe) / sum over the role's tensors of KLD(tensor alone),

clamped to [1/MAX_FACTOR, MAX_FACTOR] (a sum near the noise floor must not blow it up). The result is a
Sensitivity like the inputs, so `calibrated_table` turns it into a table.
"""

from __future__ import annotations

from dataclasses import replace

from tbpw.errors import TbpwError
from tbpw.select.calibrate import Sensitivity

MAX_FACTOR = 4.0


def role_factors(tensor_sens: Sensitivity, role_sens: Sensitivity) -> dict[str, dict[str, float]]:
    """role -> probe type -> the correction factor (1 where the per-tensor sum is not positive)."""
    if tensor_sens.grouping != "tensor" or role_sens.grouping != "role":
        raise TbpwError("role interactions need a per-tensor and a per-role calibration (grouping tensor, role)")
    if set(tensor_sens.probe_types) != set(role_sens.probe_types):
        raise TbpwError(f"the two calibrations used different probes ({', '.join(tensor_sens.probe_types)} vs "
                        f"{', '.join(role_sens.probe_types)}): calibrate both with the same probe types")
    factors: dict[str, dict[str, float]] = {}
    for role, names in role_sens.groups.items():
        missing = [n for n in names if n not in tensor_sens.measured]
        if missing:
            raise TbpwError(f"the per-tensor calibration has no {missing[0]}: calibrate both on the same model")
        factors[role] = {}
        for t in role_sens.probe_types:
            alone = sum(max(tensor_sens.measured[n][t], 0.0) for n in names)
            joint = role_sens.measured[role][t]
            factor = joint / alone if alone > 0 and joint > 0 else 1.0
            factors[role][t] = min(max(factor, 1.0 / MAX_FACTOR), MAX_FACTOR)
    return factors


def with_role_interactions(tensor_sens: Sensitivity, role_sens: Sensitivity) -> Sensitivity:
    """`tensor_sens` with each tensor's measured KLD scaled by its role's interaction factor (module doc)."""
    factors = role_factors(tensor_sens, role_sens)
    role_of = {name: role for role, names in role_sens.groups.items() for name in names}
    measured = {group: {t: (v * factors[role_of[group]][t] if v > 0 else v) for t, v in by_type.items()}
                for group, by_type in tensor_sens.measured.items()}
    meta = dict(tensor_sens.meta, interactions=role_sens.meta.get("key"), role_factors=factors)
    return replace(tensor_sens, measured=measured, meta=meta)
