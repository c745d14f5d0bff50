"""The built-in evaluators run llama-perplexity's modes on a real model and return the parsed numbers."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from tbpw.data.files import DatasetFile
from tbpw.data.taskformats import (
    Choices,
    HellaSwagTask,
    MultipleChoiceTask,
    WinoGrandeTask,
    write_hellaswag,
    write_multiple_choice,
    write_winogrande,
)
from tbpw.errors import TbpwError
from tbpw.evaluate.context import EvalContext
from tbpw.llamacpp import parsers
from tbpw.llamacpp.tools import run_tool

pytestmark = pytest.mark.tools

SENTENCES = [
    "The river flows through the old town and reaches the sea after many miles.",
    "She opened the window because the room was warm and the air outside was fresh.",
    "The committee published its report in the spring after two years of work.",
    "He played the piano every evening while his family listened from the kitchen.",
]


@pytest.fixture(scope="module")
def task_files(tmp_path_factory) -> dict[str, DatasetFile]:
    folder = tmp_path_factory.mktemp("tasks")
    hs = [HellaSwagTask(s.split(" and ")[0].split(" because ")[0], tuple(SENTENCES[(i + k) % 4][-40:] for k in range(4)), 0)
          for i, s in enumerate(SENTENCES)]
    wg = [WinoGrandeTask("The river flows through the _ and reaches the sea.", "town", "piano", 1),
          WinoGrandeTask("He played the _ every evening.", "piano", "river", 1)]
    mc = [MultipleChoiceTask(f"Question {i}: which sentence is about the {w}?",
                             Choices(tuple(SENTENCES), tuple(int(j == i) for j in range(4))))
          for i, w in enumerate(["river", "window", "report", "piano"])]
    return {"hellaswag": DatasetFile(write_hellaswag(hs, folder / "hs.txt"), "hellaswag"),
            "winogrande": DatasetFile(write_winogrande(wg, folder / "wg.csv"), "winogrande"),
            "mmlu": DatasetFile(write_multiple_choice(mc, folder / "mc.bin"), "multiple-choice")}


@pytest.fixture(scope="module")
def base_logits(tmp_path_factory, tiny_model, wiki_text) -> Path:
    folder = tmp_path_factory.mktemp("base")
    logits = folder / "base.logits"
    run_tool("llama-perplexity", ["-m", tiny_model, "-f", wiki_text, "-c", "128", "--chunks", "3",
                                  "--kl-divergence-base", logits], log_path=folder / "base.log")
    return logits


def _ctx(model: Path, log_dir: Path, datasets=None, logits=None) -> EvalContext:
    return EvalContext(model=model, log_dir=log_dir, base_logits=logits, datasets=datasets or {}, ctx=128, chunks=3,
                       task_ctx=128)


def _evaluator(plugin_manager, name: str, **options):
    return plugin_manager.evaluators().create(name, options)


def test_kld_of_the_base_model_against_itself_is_zero(plugin_manager, tiny_model, base_logits, tmp_path):
    result = _evaluator(plugin_manager, "kld").evaluate(_ctx(tiny_model, tmp_path, logits=base_logits))
    logged = parsers.parse_kl_divergence((tmp_path / "kld.log").read_text())
    assert result["kld_mean"] == logged.kld.mean.value and abs(result["kld_mean"]) < 1e-4
    assert result["same_top_p"] == pytest.approx(100.0) and result["ppl"] == pytest.approx(result["ppl_base"], rel=1e-4)


def test_task_evaluators_report_the_tool_scores(plugin_manager, tiny_model, task_files, tmp_path):
    ctx = _ctx(tiny_model, tmp_path, task_files)
    hs = _evaluator(plugin_manager, "hellaswag", tasks=4).evaluate(ctx)
    wg = _evaluator(plugin_manager, "winogrande", tasks=2).evaluate(ctx)
    mc = _evaluator(plugin_manager, "multiple-choice", dataset="mmlu", tasks=4).evaluate(ctx)
    assert hs["hellaswag_tasks"] == 4 and 0 <= hs["hellaswag"] <= 100
    p = hs["hellaswag"] / 100  # no ± from the tool for HellaSwag: the binomial standard error it uses elsewhere
    assert hs["hellaswag_error"] == pytest.approx(100 * math.sqrt(p * (1 - p) / 3), abs=1e-12)
    assert math.isfinite(wg["winogrande_error"]) and math.isfinite(mc["mmlu_error"])
    assert hs["hellaswag"] == parsers.parse_hellaswag((tmp_path / "hellaswag.log").read_text()).acc_norm_pct
    assert wg["winogrande_tasks"] == 2 and wg["winogrande"] in (0.0, 50.0, 100.0)
    assert mc["mmlu_tasks"] == 4 and mc["mmlu"] == parsers.parse_multiple_choice((tmp_path / "mmlu.log").read_text()).accuracy_pct
    assert re.search(r"-bf \S+mc\.bin", (tmp_path / "mmlu.log").read_text().splitlines()[0])


def test_evaluators_name_a_missing_or_wrong_dataset(plugin_manager, tiny_model, task_files, tmp_path):
    with pytest.raises(TbpwError, match="needs datasets.winogrande"):
        _evaluator(plugin_manager, "winogrande").evaluate(_ctx(tiny_model, tmp_path, {}))
    wrong = {"arc": task_files["hellaswag"]}
    with pytest.raises(TbpwError, match="datasets.arc gives a hellaswag file"):
        _evaluator(plugin_manager, "multiple-choice", dataset="arc").evaluate(_ctx(tiny_model, tmp_path, wrong))
    with pytest.raises(TbpwError, match="needs the baseline logits"):
        _evaluator(plugin_manager, "kld").evaluate(_ctx(tiny_model, tmp_path))
