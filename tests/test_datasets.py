"""Dataset plugins: each source, the transforms, the presets, and the clear errors."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import shutil
import sys
import threading
from pathlib import Path

import pytest

from tbpw.data import assets, taskformats
from tbpw.data.files import DatasetContext
from tbpw.errors import TbpwError
from tbpw.files import paths, pinned
from tbpw.plugin.manager import get_manager
from tbpw_plugins.datasets import sources as ds

ARTICLES = [f"Article {i}\nIt says {i} things, in {i % 7 + 2} sentences about topic {i}." for i in range(40)]


@pytest.fixture
def context(tmp_path: Path) -> DatasetContext:
    return DatasetContext(tmp_path / "cache", resolve=get_manager().datasets().create)


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(ARTICLES) + "\n", encoding="utf-8")
    return path


def make(plugin_manager, name: str, **options):
    return plugin_manager.datasets().create(name, options)


def articles_in(path: Path) -> list[str]:
    return [block for block in path.read_text(encoding="utf-8").split("\n\n") if block.strip()]


# ---------------------------------------------------------------------------------------------- file


def test_file_text_whole_and_split_into_disjoint_sides(plugin_manager, context, text_file) -> None:
    whole = make(plugin_manager, "file", path=str(text_file)).materialize(context)
    assert whole.kind == "text" and articles_in(whole.path) == ARTICLES
    cal = make(plugin_manager, "file", path=str(text_file), split="calibration").materialize(context)
    ev = make(plugin_manager, "file", path=str(text_file), split="evaluation").materialize(context)
    cal_docs, ev_docs = articles_in(cal.path), articles_in(ev.path)
    assert not set(cal_docs) & set(ev_docs) and sorted(cal_docs + ev_docs) == sorted(ARTICLES)
    assert 2 <= len(ev_docs) <= 16  # about 20 % of 40
    other = make(plugin_manager, "file", path=str(text_file), split="evaluation", split_seed="x").materialize(context)
    assert articles_in(other.path) != ev_docs
    again = make(plugin_manager, "file", path=str(text_file), split="evaluation").materialize(context)
    assert again.path == ev.path and again.path.read_text() == ev.path.read_text()


def test_take_articles_and_tokens(plugin_manager, context, text_file) -> None:
    three = make(plugin_manager, "file", path=str(text_file), take_articles=3).materialize(context)
    assert articles_in(three.path) == ARTICLES[:3]
    some = make(plugin_manager, "file", path=str(text_file), take_tokens=40).materialize(context)
    size = len(some.path.read_bytes())
    assert 40 * ds.TOKEN_BYTES - 20 <= size <= 40 * ds.TOKEN_BYTES
    assert some.path.read_text().startswith(ARTICLES[0]) and not some.path.read_text().rstrip().endswith(" ")


def test_jsonl_field_and_its_errors(plugin_manager, context, tmp_path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"id": i, "body": a}) + "\n" for i, a in enumerate(ARTICLES[:5])))
    got = make(plugin_manager, "file", path=str(path), field="body").materialize(context)
    assert got.path.read_text() == "".join(a + "\n" for a in ARTICLES[:5])
    with pytest.raises(TbpwError, match=r"line 1 has no field 'text' \(it has: id, body\): set the `field` option"):
        make(plugin_manager, "file", path=str(path)).materialize(context)
    path.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(TbpwError, match="line 2 is not JSON"):
        make(plugin_manager, "file", path=str(path)).materialize(context)


def test_parquet(plugin_manager, context, tmp_path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"text": ARTICLES[:4], "n": list(range(4))}), path)
    got = make(plugin_manager, "file", path=str(path)).materialize(context)
    assert got.path.read_text() == "".join(a + "\n" for a in ARTICLES[:4])
    with pytest.raises(TbpwError, match=r"has no column 'body' \(it has: text, n\)"):
        make(plugin_manager, "file", path=str(path), field="body").materialize(context)


def test_parquet_without_pyarrow_is_a_clear_error(plugin_manager, context, tmp_path, monkeypatch) -> None:
    path = tmp_path / "rows.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # import fails as if not installed
    with pytest.raises(TbpwError, match="needs pyarrow: pip install pyarrow"):
        make(plugin_manager, "file", path=str(path)).materialize(context)


def test_task_files_are_checked_not_converted(plugin_manager, context, tmp_path) -> None:
    tasks = [taskformats.WinoGrandeTask("A _ b c d.", "x", "y", 1)] * 3
    path = taskformats.write_winogrande(tasks, tmp_path / "w.csv")
    got = make(plugin_manager, "file", path=str(path), kind="winogrande").materialize(context)
    assert got.path == path and got.kind == "winogrande" and "(3 tasks)" in got.description
    with pytest.raises(TbpwError, match="option 'take_articles' applies to text, not to a winogrande task file"):
        make(plugin_manager, "file", path=str(path), kind="winogrande", take_articles=2).materialize(context)
    with pytest.raises(TbpwError, match="not a multiple of 6"):
        make(plugin_manager, "file", path=str(path), kind="hellaswag").materialize(context)


def test_missing_file_and_bad_options(plugin_manager, context, tmp_path) -> None:
    with pytest.raises(TbpwError, match=f"dataset file {tmp_path}/nope.txt does not exist: fix the `path` option"):
        make(plugin_manager, "file", path=str(tmp_path / "nope.txt")).materialize(context)
    with pytest.raises(TbpwError, match="has no option 'take_article' \\(did you mean 'take_articles'\\?\\)"):
        make(plugin_manager, "file", path="x", take_article=3)
    with pytest.raises(TbpwError, match="option 'article_start': Value error, not a valid regular expression"):
        make(plugin_manager, "file", path="x", article_start="(")


def test_article_start_groups_lines_into_articles(tmp_path) -> None:
    text = " = A = \n line a1 \n = = sub = = \n line a2 \n = B = \n line b1 \n"
    docs = ds.to_documents([text], False, r"^ = [^=].* = $")
    assert docs == [" = A = \n line a1 \n = = sub = = \n line a2 \n", " = B = \n line b1 \n"]
    assert "".join(docs) == text  # nothing lost or added


# ----------------------------------------------------------------------------------------------- url


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_url_downloads_verifies_and_caches(plugin_manager, context, server) -> None:
    root, base = server
    (root / "corpus.txt").write_text("\n\n".join(ARTICLES[:6]) + "\n")
    sha = hashlib.sha256((root / "corpus.txt").read_bytes()).hexdigest()
    got = make(plugin_manager, "url", url=f"{base}/corpus.txt", sha256=sha, take_articles=2).materialize(context)
    assert articles_in(got.path) == ARTICLES[:2]
    (root / "corpus.txt").unlink()  # cached: the server is no longer asked
    again = make(plugin_manager, "url", url=f"{base}/corpus.txt", sha256=sha).materialize(context)
    assert articles_in(again.path) == ARTICLES[:6]


def test_url_errors(plugin_manager, context, server) -> None:
    root, base = server
    (root / "f.txt").write_text("hello\n")
    with pytest.raises(TbpwError, match="has sha256 .* not the 0000.* the dataset options pin"):
        make(plugin_manager, "url", url=f"{base}/f.txt", sha256="0" * 64).materialize(context)
    assert not list((context.cache_dir / "url").rglob("f.txt"))  # a bad download is not kept
    with pytest.raises(TbpwError, match=r"could not download .*/missing.txt \(HTTP 404 File not found\)"):
        make(plugin_manager, "url", url=f"{base}/missing.txt", sha256="0" * 64).materialize(context)
    offline = DatasetContext(context.cache_dir, offline=True, resolve=context.resolve)
    with pytest.raises(TbpwError, match="not in the cache and tbpw runs offline: download it to"):
        make(plugin_manager, "url", url=f"{base}/f.txt", sha256="1" * 64).materialize(offline)
    with pytest.raises(TbpwError, match="option 'sha256'"):
        make(plugin_manager, "url", url=f"{base}/f.txt")


# ------------------------------------------------------------------------------------------- package


@pytest.fixture
def exllamav2_pin() -> dict:
    pin = assets.pinned_file("wiki").archive
    pinned.fetch_pinned(pin)  # into the real cache once
    return {"package": pin.name, "version": pin.version, "sha256": pin.sha256}


def test_package_reads_a_file_inside_a_pinned_wheel(plugin_manager, context, exllamav2_pin) -> None:
    got = make(plugin_manager, "package", path="exllamav2/conversion/standard_cal_data/tiny.utf8",
               take_articles=5, **exllamav2_pin).materialize(context)
    assert len(articles_in(got.path)) == 5
    assert "tiny.utf8 from exllamav2==0.3.2" in got.description


def test_package_errors(plugin_manager, context, exllamav2_pin, tmp_path, monkeypatch) -> None:
    with pytest.raises(TbpwError, match="option 'path': .*relative path inside the archive"):
        make(plugin_manager, "package", path="../../etc/passwd", **exllamav2_pin)
    with pytest.raises(TbpwError, match="has no file 'exllamav2/nothing.txt'"):
        make(plugin_manager, "package", path="exllamav2/nothing.txt", **exllamav2_pin).materialize(context)
    # a wrong pin: pip (here from a local index holding the real wheel) refuses the download
    index = tmp_path / "index"
    index.mkdir()
    shutil.copy(pinned.fetch_pinned(assets.pinned_file("wiki").archive), index)
    monkeypatch.setenv("TBPW_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    wrong = {**exllamav2_pin, "sha256": "ab" * 32}
    with pytest.raises(TbpwError, match="does not match the pinned sha256 abab.* \\(the dataset options\\)"):
        make(plugin_manager, "package", path="exllamav2/conversion/standard_cal_data/tiny.utf8", **wrong).materialize(context)
    assert not list(paths.downloads().glob("*.whl"))


INJECTED = "0.3.2\n-r /etc/passwd"  # pip would read /etc/passwd as a requirements file


def test_a_package_option_cannot_add_lines_to_pips_requirements(plugin_manager, context, monkeypatch) -> None:
    def no_pip(*args, **kwargs):
        raise AssertionError(f"pip ran: {args}")

    monkeypatch.setattr(pinned.subprocess, "run", no_pip)
    sha = "7cd61ae4bf1d8d12034595ab9731f0f43bac415d6394fbb273d4383293d6079e"
    with pytest.raises(TbpwError, match="option 'version'"):
        make(plugin_manager, "package", package="exllamav2", version=INJECTED, sha256=sha, path="a.txt")
    with pytest.raises(TbpwError, match="option 'package'"):
        make(plugin_manager, "package", package="exllamav2 --index-url http://x", version="0.3.2", sha256=sha, path="a.txt")
    # and whatever builds a pin without the options' checks meets the pin's own
    with pytest.raises(TbpwError, match=r"version '0\.3\.2\\n-r /etc/passwd' of exllamav2 in the dataset options is not a "
                                        r"version number"):
        pinned.PinnedArchive("exllamav2", INJECTED, sha, pinned_in="the dataset options")
    bypass = plugin_manager.datasets().get("package")(ds.PackageDataset.Options.model_construct(
        package="exllamav2", version=INJECTED, sha256=sha, archive="wheel", path="a.txt"))
    with pytest.raises(TbpwError, match="is not a version number"):
        bypass.materialize(context)


# What each dataset plugin is asked for offline, with nothing cached: every one must say so, never reach out.
OFFLINE = {
    "url": {"url": "https://example.com/a.txt", "sha256": "ab" * 32},
    "package": {"package": "exllamav2", "version": "0.3.2", "path": "exllamav2/conversion/standard_cal_data/tiny.utf8",
                "sha256": "7cd61ae4bf1d8d12034595ab9731f0f43bac415d6394fbb273d4383293d6079e"},
    "hub": {"repo": "a/b", "file": "x.txt"},
    "hub-split": {"repo": "a/b", "config": "c", "hub_split": "test"},
    "mix": {"parts": [{"dataset": "demo-wiki", "options": {"split": "calibration"}}]},
    "demo-wiki": {"split": "calibration"},
}


def test_offline_is_honoured_by_every_dataset_plugin(plugin_manager, tmp_path, text_file, monkeypatch) -> None:
    pytest.importorskip("huggingface_hub")
    hub = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TBPW_HOME", str(tmp_path / "home"))  # nothing downloaded, nothing built

    def no_network(*args, **kwargs):
        raise AssertionError(f"the network was used offline: {args}")

    import socket

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(pinned.subprocess, "run", no_network)  # pip
    offline = DatasetContext(tmp_path / "cache", offline=True, resolve=plugin_manager.datasets().create)
    local = make(plugin_manager, "file", path=str(text_file)).materialize(offline)  # a local file needs no network
    assert local.path.is_file()
    asked = [(name, OFFLINE.get(name, {})) for name in plugin_manager.datasets().names() if name != "file"]
    asked.append(("hub", OFFLINE["hub-split"]))
    for name, options in asked:
        with pytest.raises(TbpwError) as err:
            make(plugin_manager, name, **options).materialize(offline)
        message = str(err.value)
        assert "offline" in message or "not in the cache" in message, (name, message)
        assert "\n" not in message


# ----------------------------------------------------------------------------------------------- hub


def test_hub_without_huggingface_hub_names_the_extra(plugin_manager, context, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(TbpwError, match=r"needs huggingface_hub: pip install 'tbpw\[hub\]'"):
        make(plugin_manager, "wikitext-2").materialize(context)


def test_hub_offline_names_the_cache_to_fill(plugin_manager, context, tmp_path, monkeypatch) -> None:
    hub = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hf"))
    offline = DatasetContext(context.cache_dir, offline=True, resolve=context.resolve)
    with pytest.raises(TbpwError) as err:
        make(plugin_manager, "winogrande").materialize(offline)
    message = str(err.value)
    assert "winogrande-debiased-eval.csv of the hub dataset ikawrakow/winogrande-eval-for-llama.cpp@main is not in the cache" in message
    assert f"fill {tmp_path}/hf/datasets--ikawrakow--winogrande-eval-for-llama.cpp" in message
    assert "hf download ikawrakow/winogrande-eval-for-llama.cpp winogrande-debiased-eval.csv --repo-type dataset" in message
    assert "\n" not in message


@pytest.mark.slow
def test_hub_without_network_fails_cleanly(plugin_manager, context, tmp_path, monkeypatch) -> None:
    # The hub is unreachable from the machines that run these tests: this is the real failure.
    hub = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(TbpwError, match="is not in the cache and the hub cannot be reached: connect to the network, or fill"):
        make(plugin_manager, "hub", repo="ikawrakow/validation-datasets-for-llama.cpp", file="mmlu-validation.bin",
             kind="multiple-choice").materialize(context)


def test_hub_reads_a_filled_cache(plugin_manager, context, tmp_path, monkeypatch) -> None:
    """The cache layout the error message asks for is the one the plugin then reads (wikitext-2 preset)."""
    hub = pytest.importorskip("huggingface_hub.constants")
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    cache = tmp_path / "hf"
    repo = cache / "datasets--Salesforce--wikitext"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shard = repo / "snapshots" / commit / "wikitext-2-raw-v1" / "test-00000-of-00001.parquet"
    shard.parent.mkdir(parents=True)
    rows = ["", " = Robert Boulter = \n", "", " Robert Boulter is an actor . \n", "", " = = Career = = \n",
            " He acted . \n", " = Du Fu = \n", "", " Du Fu was a poet . \n"]
    pq.write_table(pa.table({"text": rows}), shard)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(cache))
    offline = DatasetContext(context.cache_dir, offline=True, resolve=context.resolve)
    whole = make(plugin_manager, "wikitext-2").materialize(offline)
    # rows are lines; an empty row is a blank line; the blank line before the first heading is no article
    assert whole.path.read_text() == "".join(r if r.endswith("\n") else r + "\n" for r in rows)[1:]
    assert "Salesforce/wikitext@main" in whole.description and "CC BY-SA" in whole.attribution
    first = make(plugin_manager, "wikitext-2", take_articles=1).materialize(offline)
    assert first.path.read_text() == " = Robert Boulter = \n\n Robert Boulter is an actor . \n\n = = Career = = \n He acted . \n"


def test_hub_options(plugin_manager) -> None:
    calib = make(plugin_manager, "imatrix-calibration", subset="text_en", size="medium")
    assert calib.options.repo == "eaddario/imatrix-calibration" and calib.options.file == "text_en_medium.parquet"
    with pytest.raises(TbpwError, match="option 'size'"):
        make(plugin_manager, "imatrix-calibration", size="enormous")
    with pytest.raises(TbpwError, match="option 'repo'"):
        make(plugin_manager, "hub", repo="no-owner")
    with pytest.raises(TbpwError, match="needs `file`, or both `config` and `hub_split`"):
        make(plugin_manager, "hub", repo="a/b").materialize(DatasetContext(Path("/tmp")))
    assert make(plugin_manager, "mmlu").options.kind == "multiple-choice"
    assert make(plugin_manager, "winogrande", revision="abc").options.revision == "abc"


# --------------------------------------------------------------------------------------- demo presets


def test_demo_presets(plugin_manager, context) -> None:
    wiki = assets.wiki_split()
    cal = make(plugin_manager, "demo-wiki", split="calibration").materialize(context)
    assert cal.path == wiki.calibration and "CC BY-SA" in cal.attribution and "disjoint" in cal.description
    some = make(plugin_manager, "demo-wiki", split="evaluation", take_articles=2).materialize(context)
    assert some.path.read_text(encoding="utf-8").rstrip() == assets.articles_text(wiki.articles("evaluation")[:2]).rstrip()
    mmlu = make(plugin_manager, "demo-mmlu").materialize(context)
    assert mmlu.kind == "multiple-choice" and taskformats.check_task_file(mmlu.path, "multiple-choice") > 200
    for name in ("substitute-hellaswag", "substitute-winogrande", "substitute-arc", "substitute-truthfulqa"):
        cls = plugin_manager.datasets().get(name)
        assert "SUBSTITUTE" in cls.description
        produced = make(plugin_manager, name).materialize(context)
        assert "SUBSTITUTE" in produced.description and "substitute" in produced.path.name


# ----------------------------------------------------------------------------------------------- mix


def test_mix_weights_and_interleaves(plugin_manager, context, tmp_path, text_file) -> None:
    other = tmp_path / "other.txt"
    other.write_text("\n\n".join(f"Other {i}\n" + "word " * 30 for i in range(20)) + "\n")
    parts = [{"dataset": "file", "options": {"path": str(text_file)}, "weight": 3},
             {"dataset": "file", "options": {"path": str(other)}, "weight": 1}]
    mixed = make(plugin_manager, "mix", parts=parts, take_tokens=200).materialize(context)
    docs = articles_in(mixed.path)
    first = sum(len(d.encode()) + 2 for d in docs if d.startswith("Article"))
    second = sum(len(d.encode()) + 2 for d in docs if d.startswith("Other"))
    assert 500 <= first <= 600 and 100 <= second <= 200  # 3:1 of 800 bytes
    assert [d.split("\n")[0] for d in docs] != sorted(d.split("\n")[0] for d in docs)  # interleaved
    assert make(plugin_manager, "mix", parts=parts, take_tokens=200).materialize(context).path == mixed.path
    plain = make(plugin_manager, "mix", parts=parts, interleave=False).materialize(context)
    assert articles_in(plain.path)[:40] == ARTICLES


def test_mix_refuses_task_files(plugin_manager, context) -> None:
    with pytest.raises(TbpwError, match="mix part 'demo-mmlu' is a multiple-choice task file"):
        make(plugin_manager, "mix", parts=[{"dataset": "demo-mmlu"}]).materialize(context)
    with pytest.raises(TbpwError, match="unknown dataset 'demo-wik': did you mean 'demo-wiki'"):
        make(plugin_manager, "mix", parts=[{"dataset": "demo-wik"}]).materialize(context)


# ----------------------------------------------------------------------------------------------- CLI


def test_cli_data_list_get_and_errors(plugin_manager, tmp_path, text_file) -> None:
    from click.testing import CliRunner

    from tbpw.cli import main

    runner = CliRunner()
    listed = runner.invoke(main, ["data", "list", "--json"])
    assert listed.exit_code == 0, listed.output
    rows = {row["name"]: row for row in json.loads(listed.stdout)}
    assert {"file", "url", "package", "hub", "mix", "demo-wiki", "wikitext-2", "substitute-hellaswag"} <= set(rows)
    assert "take_tokens" in rows["file"]["options"] and rows["demo-wiki"]["plugin"] == "datasets"
    got = runner.invoke(main, ["data", "get", "file", "-o", f"path={text_file}", "-o", "take_articles=2",
                               "--cache-dir", str(tmp_path / "c")])
    assert got.exit_code == 0, got.output
    path = Path(got.stdout.splitlines()[0])
    assert path.parent == tmp_path / "c" and articles_in(path) == ARTICLES[:2] and "kind: text" in got.stdout
    same = runner.invoke(main, ["data", "get", "file", "--options-json", json.dumps({"path": str(text_file), "take_articles": 2}),
                                "--cache-dir", str(tmp_path / "c")])
    assert same.stdout.splitlines()[0] == str(path)
    bad = runner.invoke(main, ["data", "get", "file", "-o", "take_articles"])
    assert bad.exit_code == 2 and "is not KEY=VALUE" in bad.stderr
    unknown = runner.invoke(main, ["data", "get", "wikitext2"])
    assert unknown.exit_code == 2 and "did you mean 'wikitext-2'" in unknown.stderr
