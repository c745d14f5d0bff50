"""Role interactions on top of a per-tensor calibration (tbpw.select.interactions): pure arithmetic."""

from __future__ import annotations

import pytest

from tbpw.errors import TbpwError
from tbpw.measure.table import CandidateError, ErrorTable, TensorErrors
from tbpw.select.calibrate import Sensitivity, calibrated_table
from tbpw.select.interactions import MAX_FACTOR, role_factors, with_role_interactions

NAMES = ["blk.0.ffn_down.weight", "blk.1.ffn_down.weight", "blk.0.attn_v.weight", "blk.1.attn_v.weight"]


def _sens(grouping: str, groups: dict[str, list[str]], measured: dict[str, dict[str, float]]) -> Sensitivity:
    proxy = {g: {"Q3_K": 1.0} for g in groups}
    probe_bpw = {n: {"Q3_K": 3.4375} for n in NAMES}
    return Sensitivity(("Q3_K",), grouping, groups, measured, proxy, probe_bpw, 0.0, {"key": grouping})


def _pair(down_joint: float, v_joint: float, v1_alone: float = 0.002):
    per_tensor = _sens("tensor", {n: [n] for n in NAMES},
                       {NAMES[0]: {"Q3_K": 0.010}, NAMES[1]: {"Q3_K": 0.030}, NAMES[2]: {"Q3_K": 0.004},
                        NAMES[3]: {"Q3_K": v1_alone}})
    per_role = _sens("role", {"ffn_down": NAMES[:2], "attn_v": NAMES[2:]},
                     {"ffn_down": {"Q3_K": down_joint}, "attn_v": {"Q3_K": v_joint}})
    return per_tensor, per_role


def test_each_role_is_scaled_to_its_joint_kld_keeping_the_tensor_ratios():
    per_tensor, per_role = _pair(down_joint=0.080, v_joint=0.003)
    assert role_factors(per_tensor, per_role) == {"ffn_down": {"Q3_K": pytest.approx(2.0)},
                                                  "attn_v": {"Q3_K": pytest.approx(0.5)}}
    joint = with_role_interactions(per_tensor, per_role)
    assert joint.measured[NAMES[0]]["Q3_K"] == pytest.approx(0.020)
    assert joint.measured[NAMES[1]]["Q3_K"] == pytest.approx(0.060)
    assert joint.measured[NAMES[3]]["Q3_K"] == pytest.approx(0.001)
    assert per_tensor.measured[NAMES[0]]["Q3_K"] == 0.010  # the input is left alone
    # the calibrated table follows: ffn_down twice as costly, attn_v half
    table = ErrorTable([TensorErrors(n, 1024, [CandidateError("Q3_K", 440, 1.0)]) for n in NAMES])
    before, after = calibrated_table(table, per_tensor).by_name(), calibrated_table(table, joint).by_name()
    for name, factor in zip(NAMES, (2.0, 2.0, 0.5, 0.5)):
        assert after[name].candidates[0].error == pytest.approx(before[name].candidates[0].error * factor)


def test_factors_are_clamped_and_unmeasurable_roles_left_alone():
    per_tensor, per_role = _pair(down_joint=4.0, v_joint=0.003, v1_alone=-0.004)  # v1 below the noise floor
    factors = role_factors(per_tensor, per_role)
    assert factors["ffn_down"]["Q3_K"] == MAX_FACTOR
    assert factors["attn_v"]["Q3_K"] == pytest.approx(0.75)  # 0.003 / 0.004: the negative one counts as 0
    joint = with_role_interactions(per_tensor, per_role)
    assert joint.measured[NAMES[3]]["Q3_K"] == -0.004  # stays below the floor (calibrate floors its scale)
    per_tensor, per_role = _pair(down_joint=-0.001, v_joint=0.003)
    assert role_factors(per_tensor, per_role)["ffn_down"]["Q3_K"] == 1.0


def test_mismatched_calibrations_are_refused():
    per_tensor, per_role = _pair(0.08, 0.003)
    with pytest.raises(TbpwError, match="per-tensor and a per-role"):
        role_factors(per_role, per_tensor)
    other = Sensitivity(("Q4_K",), "role", per_role.groups, {g: {"Q4_K": 0.1} for g in per_role.groups},
                        {g: {"Q4_K": 1.0} for g in per_role.groups}, per_role.probe_bpw, 0.0)
    with pytest.raises(TbpwError, match="different probes"):
        role_factors(per_tensor, other)
