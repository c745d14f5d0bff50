"""The offline demo assets: pinned sources, a disjoint split by article, MMLU dev, labelled substitutes, SmolLM2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tbpw.data import assets, taskformats
from tbpw.errors import TbpwError
from tbpw.files import paths, pinned
from tbpw.model.inventory import ModelInventory


@pytest.fixture(scope="module")
def wiki() -> assets.WikiSplit:
    return assets.wiki_split()


@pytest.fixture(scope="module")
def all_articles() -> list[assets.Article]:
    return assets.parse_wiki(assets.read_pinned("wiki").decode("utf-8"))


def test_calibration_and_evaluation_share_no_article(wiki: assets.WikiSplit, all_articles) -> None:
    cal, ev = wiki.articles("calibration"), wiki.articles("evaluation")
    assert not {a.id for a in cal} & {a.id for a in ev}
    assert not {a.text for a in cal} & {a.text for a in ev}
    with_text = [a for a in all_articles if "\n" in a.text]
    assert {a.id for a in cal} | {a.id for a in ev} == {a.id for a in with_text}
    assert len(ev) == round(0.2 * len(with_text))
    # No evaluation article's body is in the calibration file (titles alone may recur in other articles).
    cal_text = wiki.calibration.read_text(encoding="utf-8")
    assert not [a.id for a in ev if a.text.split("\n", 1)[1].strip() in cal_text]
    assert wiki.evaluation.read_text(encoding="utf-8") == assets.articles_text(ev)


def test_the_split_is_by_article_and_deterministic(all_articles) -> None:
    cal, ev = assets.split_articles(all_articles)
    assert assets.split_articles(all_articles) == (cal, ev)
    assert len(ev) == round(0.2 * len(all_articles)) and len(cal) + len(ev) == len(all_articles)
    assert [a.id for a in cal] == [a.id for a in all_articles if a in cal]  # file order kept
    other_cal, _ = assets.split_articles(all_articles, seed="another seed")
    assert other_cal != cal
    with pytest.raises(TbpwError, match="repeats an article id"):
        assets.split_articles(all_articles[:3] + all_articles[:1])


def test_attribution_travels_with_the_text(wiki: assets.WikiSplit) -> None:
    notice = (wiki.folder / "ATTRIBUTION.txt").read_text(encoding="utf-8")
    assert "CC BY-SA" in wiki.attribution and notice.startswith(wiki.attribution)
    first = wiki.articles("evaluation")[0]
    assert f"{first.title} <{first.url}>" in notice


def test_assets_are_fetched_once_then_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pin = assets.pinned_file("wiki")
    real_archive = pinned.fetch_pinned(pin.archive)
    monkeypatch.setenv("TBPW_HOME", str(tmp_path / "home"))
    paths.downloads().mkdir(parents=True)
    shutil.copy(real_archive, paths.downloads() / real_archive.name)
    calls = []
    real_fetch = pinned.fetch_pinned
    monkeypatch.setattr(pinned, "fetch_pinned", lambda p, *a, **kw: calls.append(p.name) or real_fetch(p, *a, **kw))
    first = assets.wiki_split()
    manifest = first.folder / "manifest.json"
    stamp = manifest.stat().st_mtime_ns
    assert calls == ["exllamav2"]
    second = assets.wiki_split()
    assert second == first and calls == ["exllamav2"]  # nothing fetched or rebuilt the second time
    assert manifest.stat().st_mtime_ns == stamp
    # A folder from an older way of deriving the asset is rebuilt.
    data = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**data, "version": 0}))
    assets.wiki_split()
    assert calls == ["exllamav2", "exllamav2"] and json.loads(manifest.read_text())["version"] == assets.WIKI_VERSION


def test_an_unknown_asset_or_package_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(TbpwError, match="no asset 'nope' in .*assets.toml: known: mmlu-cot-prompts, smollm2-q4_1, wiki"):
        assets.pinned_file("nope")
    vendor = tmp_path / "vendor"
    vendor.mkdir()
    (vendor / "assets.toml").write_text('[files.x]\npackage = "ghost"\npath = "a"\n')
    with pytest.raises(TbpwError, match="names package 'ghost'"):
        assets.pinned_file("x", vendor)


def test_mmlu_dev_questions_in_multiple_choice_format() -> None:
    mmlu = assets.mmlu_dev()
    tasks = taskformats.read_multiple_choice(mmlu.path)
    source = json.loads(assets.read_pinned("mmlu-cot-prompts"))
    assert len(source) == 57 and 270 <= len(tasks) <= 285 and f"{len(tasks)} from 57 subjects" in mmlu.description
    assert all(len(t.mc1.answers) == 4 and sorted(t.mc1.labels) == [0, 0, 0, 1] for t in tasks)
    first = tasks[0]  # abstract algebra, question 1: answer (C)
    assert first.question.startswith("Statement 1 | Every element of a group generates a cyclic subgroup")
    assert first.question.endswith("\nAnswer:")
    assert first.mc1.answers == ("True, True", "False, False", "True, False", "False, True") and first.mc1.labels == (0, 0, 1, 0)
    assert "Hendrycks" in mmlu.attribution and "lm-eval 0.4.13" in mmlu.attribution


def test_mmlu_parser_takes_both_option_layouts() -> None:
    prompts = {"x": "Header.\n\nQ: Inline?\n(A) a (B) b (C) c (D) d\nA: Because. The answer is (B).\n\n"
                    "Q: Lines?\n(A) one\n(B) two\n(C) three\n(D) four\nA: Let's think. The answer is (D).\n\n"
                    "Q: Five?\n(A) 1 (B) 2 (C) 3 (D) 4 (E) 5\nA: The answer is (E).\n\n"}
    parsed = assets.parse_mmlu_cot_prompts(prompts)
    assert [(s, t.question, t.mc1.answers, t.mc1.labels) for s, t in parsed] == [
        ("x", "Inline?\nAnswer:", ("a", "b", "c", "d"), (0, 1, 0, 0)),
        ("x", "Lines?\nAnswer:", ("one", "two", "three", "four"), (0, 0, 0, 1))]


def test_substitutes_are_labelled_and_built_from_held_out_text(wiki: assets.WikiSplit) -> None:
    subs = assets.substitutes()
    assert sorted(subs) == ["substitute-arc", "substitute-hellaswag", "substitute-truthfulqa", "substitute-winogrande"]
    for _name, produced in subs.items():
        assert "substitute" in produced.path.name
        assert "SUBSTITUTE" in produced.description and "not " in produced.description
        assert taskformats.check_task_file(produced.path, produced.kind) >= 100
    readme = (subs["substitute-arc"].path.parent / "README.txt").read_text()
    assert readme.startswith(assets.SUBSTITUTE_NOTICE) and "not the real benchmark" in readme
    evaluation_titles = {a.title for a in wiki.articles("evaluation")}
    evaluation = wiki.evaluation.read_text(encoding="utf-8")
    hellaswag = taskformats.read_hellaswag(subs["substitute-hellaswag"].path)
    assert {t.context.split(": ", 1)[0] for t in hellaswag} <= evaluation_titles
    assert all(t.endings[t.gold] in evaluation for t in hellaswag)
    arc = taskformats.read_multiple_choice(subs["substitute-arc"].path)
    assert {t.mc1.answers[t.mc1.labels.index(1)] for t in arc} <= evaluation_titles
    wino = taskformats.read_winogrande(subs["substitute-winogrande"].path)
    assert all(t.sentence.count("_") == 1 for t in wino)
    truthful = taskformats.read_multiple_choice(subs["substitute-truthfulqa"].path)
    assert all(t.mc1.answers[t.mc1.labels.index(1)] in evaluation for t in truthful)


def test_substitutes_are_deterministic(wiki: assets.WikiSplit) -> None:
    held_out = wiki.articles("evaluation")
    for _, _, generate, _ in assets.SUBSTITUTES.values():
        assert generate(held_out) == generate(held_out)


def test_sentence_splitting_keeps_abbreviations() -> None:
    assert assets.split_sentences("He served in the U.S. Army. Then Dr. Smith left. It rained.") == [
        "He served in the U.S. Army.", "Then Dr. Smith left.", "It rained."]


@pytest.mark.tools
@pytest.mark.slow
def test_smollm2_becomes_an_f16_gguf_once() -> None:
    model = assets.demo_model()
    inv = ModelInventory.load(model.f16)
    types = inv.types()
    assert inv.architecture == "llama" and len([t for t in inv.tensors if t.layer is not None and t.role == "attn_q"]) == 30
    assert "output.weight" not in types  # tied embeddings
    assert {types[t.name] for t in inv.tensors if len(t.shape) == 2} == {"F16"}
    assert inv.n_elements == pytest.approx(134.5e6, rel=0.01)
    assert "dequantized Q4_1" in model.note and "dequantized Q4_1" in (model.f16.parent / "NOTE.txt").read_text()
    source = ModelInventory.load(model.q4_1).types()
    assert source["token_embd.weight"] == "Q8_0" and source["blk.0.attn_q.weight"] == "Q4_1"
    stamp = model.f16.stat().st_mtime_ns
    assert assets.demo_model() == model and model.f16.stat().st_mtime_ns == stamp
