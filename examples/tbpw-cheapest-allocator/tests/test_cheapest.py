"""The cheapest allocator against the real llama.cpp tools, through tbpw's pytest plugin: installing tbpw gives
the fixtures (tbpw_register, tbpw_run, tbpw_model, tbpw_text), no conftest needed."""

import pytest
import tbpw_cheapest_allocator

from tbpw import TbpwError


def test_a_run_gives_the_named_roles_the_leftover_and_everything_else_the_cheapest_type(tbpw_register, tbpw_run):
    tbpw_register(tbpw_cheapest_allocator)
    run = tbpw_run(targets=[{"bpw": 5.0}],
                   allocators=[{"name": "cheapest", "options": {"spend_on": ["attn_v"]}}, {"name": "knapsack"}])
    cheapest, knapsack = run.quant("5bpw", "cheapest"), run.quant("5bpw", "knapsack")
    for quant in (cheapest, knapsack):  # written, verified against the plan and evaluated
        assert quant["bpw"] <= 5.0 and quant["metrics"]["kld_mean"] > 0
    assert cheapest["bpw"] < knapsack["bpw"]  # the knapsack spends the whole budget, cheapest only on attn_v
    types = cheapest["types"]
    # the run measures Q3_K .. Q8_0: every tensor not spent on keeps the cheapest, attn_v gets the rest
    assert {t for name, t in types.items() if name.endswith(".weight") and "attn_v" not in name
            and "norm" not in name} == {"Q3_K"}
    assert all(t != "Q3_K" for name, t in types.items() if "attn_v" in name)
    assert "quant-5bpw-cheapest" in {e["name"] for e in run.report["entries"]}


def test_a_misspelt_option_names_the_real_one(tbpw_register, tbpw_run):
    tbpw_register(tbpw_cheapest_allocator)
    with pytest.raises(TbpwError, match=r"has no option 'spend_onn' \(did you mean 'spend_on'\?\)"):
        tbpw_run(allocators=[{"name": "cheapest", "options": {"spend_onn": ["attn_v"]}}])
