"""The plugin system: an inline plugin used through the CLI, helpful registry errors, blocking, and a
guard that every hook in tbpw/plugin/hookspecs.py is documented and exercised by some test."""

from __future__ import annotations

import importlib.metadata
import inspect
import json
import re
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner
from pydantic import Field

from tbpw import (
    Allocator,
    ColumnStats,
    Dataset,
    DatasetContext,
    DatasetFile,
    ErrorMetric,
    Evaluator,
    Executor,
    JobEvent,
    MetricContext,
    NoOptions,
    PluginOptions,
    TbpwError,
    hookimpl,
)
from tbpw.plugin import hookspecs
from tbpw.plugin.manager import BLOCK_ENV, ENTRY_POINT_GROUP, PluginManager

TESTS = Path(__file__).resolve().parent


class CheapestOptions(PluginOptions):
    bucket_bytes: int = Field(4096, description="unused; gives the validation tests a field to misspell")
    label: str = "cheap"


class Cheapest(Allocator):
    name = "inline-cheapest"
    description = "the smallest candidate of every tensor"
    Options = CheapestOptions

    def allocate(self, problem):
        return {t.name: min(t.candidates, key=lambda c: (c.bytes, c.error)).type for t in problem.tensors}


class MaxAbs(ErrorMetric):
    name = "inline-maxabs"
    description = "largest absolute difference"
    Options = NoOptions

    def slice_error(self, original, reconstructed, stats, context):
        return float(np.abs(reconstructed - original).max())


class InlineTextOptions(PluginOptions):
    text: str


class InlineText(Dataset):
    name = "inline-text"
    description = "text given in the options"
    Options = InlineTextOptions

    def materialize(self, context: DatasetContext) -> DatasetFile:
        path = context.cache_dir / "inline.txt"
        path.write_text(self.options.text)
        return DatasetFile(path, "text", description="inline text")


class WordCount(Evaluator):
    name = "inline-words"
    description = "counts the words of the model's name"
    Options = NoOptions

    def evaluate(self, context) -> dict[str, float]:
        return {"words": float(len(str(context).split()))}


class SerialOptions(PluginOptions):
    reverse: bool = False


class Serial(Executor):
    name = "inline-serial"
    description = "every job when polled, one after another, in the calling thread"
    Options = SerialOptions

    def __init__(self, options=None):
        super().__init__(options)
        self.queue: list = []
        self.ran: list[str] = []

    def submit(self, job) -> None:
        self.queue.append(job)

    def poll(self, timeout: float) -> list[JobEvent]:
        jobs, self.queue = (self.queue[::-1] if self.options.reverse else self.queue), []
        self.ran += [job.name for job in jobs]
        return [JobEvent(job.name, "done", job.execute(lambda line: None)) for job in jobs]


class InlinePlugin:
    """Implements every hook of tbpw/plugin/hookspecs.py."""

    @hookimpl
    def tbpw_register_allocators(self, register):
        register(Cheapest)

    @hookimpl
    def tbpw_register_metrics(self, register):
        register(MaxAbs)

    @hookimpl
    def tbpw_register_datasets(self, register):
        register(InlineText)

    @hookimpl
    def tbpw_register_evaluators(self, register):
        register(WordCount)

    @hookimpl
    def tbpw_register_executors(self, register):
        register(Serial)

    @hookimpl
    def tbpw_register_commands(self, cli: click.Group):
        @cli.command("inline-hello")
        @click.argument("who")
        def hello(who):
            """Greets from the inline plugin."""
            if who == "nobody":
                raise TbpwError("nobody to greet: name someone")
            click.echo(f"hello {who} from the inline plugin")


@pytest.fixture
def inline(plugin_manager):
    """The inline plugin registered with a fresh manager (so `tbpw` has its command too); undone after."""
    name = plugin_manager.register(InlinePlugin(), name="inline")
    try:
        yield plugin_manager
    finally:
        plugin_manager.unregister(name)


def run_cli(*args: str, env: dict | None = None):
    from tbpw.cli import main

    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


def _quantize_args(fork_tiny_dir: Path, *extra: str) -> list[str]:
    return ["quantize", str(fork_tiny_dir / "tiny-f16.gguf"), "--imatrix", str(fork_tiny_dir / "tiny.fork-imatrix.gguf"),
            "--fork-state", str(fork_tiny_dir / "tiny.bpw_state"), "--target-bpw", "4.0", "--dry-run", "--json", *extra]


# ---------------------------------------------------------------- the inline plugin through the CLI


def test_inline_plugin_is_listed_with_its_hooks_and_registrations(inline):
    result = run_cli("plugins", "--json")
    assert result.exit_code == 0
    rows = {row["name"]: row for row in json.loads(result.output)["plugins"]}
    row = rows["inline"]
    assert row["hooks"] == sorted(n for n in _hookspec_names())
    assert row["provides"] == {"allocator": ["inline-cheapest"], "metric": ["inline-maxabs"],
                               "dataset": ["inline-text"], "evaluator": ["inline-words"], "executor": ["inline-serial"]}
    assert row["registers"]["allocator"][0]["description"] == Cheapest.description
    # Built-ins come in through the same entry-point group as the inline plugin's peers would.
    built_in = {ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
    assert built_in <= set(rows)
    text = run_cli("plugins").output
    assert "inline" in text and "allocator inline-cheapest: the smallest candidate of every tensor" in text


def test_inline_allocator_runs_through_the_cli(inline, fork_tiny_dir):
    result = run_cli(*_quantize_args(fork_tiny_dir, "--allocator", "inline-cheapest", "-O", "label=x"))
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert plan["allocator"] == "inline-cheapest"
    assert plan["allocator_options"] == {"bucket_bytes": 4096, "label": "x"}
    # The cheapest mix is at or under any target's mix; a real allocator would spend the budget.
    chosen = {t["name"]: t["bytes"] for t in plan["tensors"] if t["source"] == "allocator"}
    assert chosen and plan["achieved_bpw"] < 4.0
    greedy = json.loads(run_cli(*_quantize_args(fork_tiny_dir, "--allocator", "greedy")).output)
    assert sum(chosen.values()) < sum(t["bytes"] for t in greedy["tensors"] if t["name"] in chosen)


def test_inline_command_runs_through_the_cli(inline):
    result = run_cli("inline-hello", "world")
    assert result.exit_code == 0
    assert result.output == "hello world from the inline plugin\n"


def test_inline_metric_dataset_and_evaluator_are_created_by_the_registries(inline, tmp_path):
    metric = inline.metrics().create("inline-maxabs", {})
    original = np.arange(8, dtype=np.float32).reshape(2, 4)
    context = MetricContext(tensor="blk.0.attn_q.weight", role="attn_q", type="Q4_K", nominal_bpw=4.5, slice_rows=2)
    assert metric.prepare_rows(original, context) is original
    assert metric.slice_error(original, original + 0.25, ColumnStats(), context) == 0.25
    dataset = inline.datasets().create("inline-text", {"text": "some words"})
    made = dataset.materialize(DatasetContext(cache_dir=tmp_path))
    assert made.kind == "text" and made.path.read_text() == "some words"
    assert inline.evaluators().create("inline-words", {}).evaluate("a b c") == {"words": 3.0}


def _add(a: int, b: int, *, log) -> int:
    return a + b


def test_inline_executor_runs_a_task_graph(inline):
    from tbpw.run.execute import execute
    from tbpw.run.graph import TaskGraph

    graph = TaskGraph()
    one = graph.add("one", _add, 0, 1)
    two = graph.add("two", _add, one, 1)
    graph.add("three", _add, one, two)
    graph.add("ten", _add, 4, 6)
    executor = inline.executors().create("inline-serial", {"reverse": True})
    lines: list[str] = []
    assert execute(graph, executor, log=lines.append) == {"one": 1, "two": 2, "three": 3, "ten": 10}
    assert executor.ran == ["ten", "one", "two", "three"]  # each batch of ready jobs, reversed
    assert lines[0] == "executor: inline-serial; 4 tasks" and lines[-1] == "[4/4 done] running: nothing; waiting: 0"
    with pytest.raises(TbpwError, match="executor 'inline-serial' has no option 'revers' .did you mean 'reverse'"):
        inline.executors().create("inline-serial", {"revers": True})


def test_unregistering_removes_everything(plugin_manager):
    name = plugin_manager.register(InlinePlugin(), name="inline")
    assert "inline-cheapest" in plugin_manager.allocators()
    plugin_manager.unregister(name)
    for registry in plugin_manager.registries.values():
        assert not any(n.startswith("inline-") for n in registry.names())


# ---------------------------------------------------------------- helpful errors


def test_unknown_name_suggests_the_closest(inline, fork_tiny_dir):
    result = run_cli(*_quantize_args(fork_tiny_dir, "--allocator", "inline-cheapst"))
    assert result.exit_code == 2
    assert "unknown allocator 'inline-cheapst': did you mean 'inline-cheapest'?" in result.output
    assert "knapsack" in result.output  # the known names are listed
    with pytest.raises(TbpwError, match="did you mean 'inline-maxabs'"):
        inline.metrics().get("inline-maxab")
    with pytest.raises(TbpwError, match=r"unknown dataset 'zzz': known datasets: .*inline-text"):
        inline.datasets().get("zzz")


def test_option_errors_list_the_plugins_fields(inline, fork_tiny_dir):
    typo = run_cli(*_quantize_args(fork_tiny_dir, "--allocator", "inline-cheapest", "-O", "bucket_byts=5"))
    assert typo.exit_code == 2
    assert ("allocator 'inline-cheapest' has no option 'bucket_byts' (did you mean 'bucket_bytes'?); "
            "its options are: bucket_bytes, label") in typo.output
    wrong = run_cli(*_quantize_args(fork_tiny_dir, "--allocator", "inline-cheapest", "-O", "bucket_bytes=lots"))
    assert wrong.exit_code == 2
    assert "allocator 'inline-cheapest' option 'bucket_bytes'" in wrong.output
    assert wrong.output.rstrip().endswith("its options are: bucket_bytes, label")
    with pytest.raises(TbpwError, match="dataset 'inline-text' option 'text': Field required; its options are: text"):
        inline.datasets().create("inline-text", {})


def test_a_class_without_name_or_options_is_refused(plugin_manager):
    class Nameless(Allocator):
        Options = NoOptions

    class NoModel(Allocator):
        name = "no-model"
        Options = dict  # type: ignore[assignment]

    class NoBase:
        name = "no-base"
        Options = NoOptions

    for bad, message in ((Nameless, "without a `name`"), (NoModel, "no pydantic `Options`"),
                         (NoBase, "does not subclass tbpw.Allocator")):
        class Bad:
            @hookimpl
            def tbpw_register_allocators(self, register, _cls=bad):
                register(_cls)

        with pytest.raises(TbpwError, match=message):
            plugin_manager.register(Bad(), name="bad")
        plugin_manager.pm.unregister(name="bad")


def test_a_plugin_commands_user_error_is_one_line(inline):
    result = run_cli("inline-hello", "nobody")
    assert result.exit_code == 2
    assert result.output == "error: nobody to greet: name someone\n"


def test_a_misspelled_hook_is_an_error_not_silence(plugin_manager):
    class Misspelled:
        @hookimpl
        def tbpw_register_allocator(self, register):  # the hook is tbpw_register_allocators
            register(Cheapest)

    with pytest.raises(TbpwError, match=r"implements 'tbpw_register_allocator', which is not a tbpw hook "
                                        r"\(did you mean 'tbpw_register_allocators'\?\)"):
        plugin_manager.register(Misspelled(), name="misspelled")
    plugin_manager.pm.unregister(name="misspelled")


def test_duplicate_names_are_refused(plugin_manager):
    plugin_manager.register(InlinePlugin(), name="inline")
    with pytest.raises(TbpwError, match="registered twice.*TBPW_BLOCK_PLUGINS"):
        plugin_manager.register(InlinePlugin(), name="inline-again")
    plugin_manager.pm.unregister(name="inline-again")


# ---------------------------------------------------------------- entry points and blocking


def test_block_env_skips_an_entry_point(monkeypatch):
    names = {ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
    assert "evaluators" in names
    monkeypatch.setenv(BLOCK_ENV, "evaluators, metrics")
    manager = PluginManager()
    loaded = {row["name"] for row in manager.describe()}
    assert loaded == names - {"evaluators", "metrics"}
    assert manager.evaluators().names() == [] and manager.metrics().names() == []
    from tbpw.plugin import manager

    manager.reset_manager()  # the CLI builds the global manager with these plugins blocked...
    try:
        result = run_cli("plugins", "--json", env={BLOCK_ENV: "evaluators, metrics"})
    finally:
        manager.reset_manager()  # ...which later tests must not inherit
    data = json.loads(result.output)
    assert data["blocked"] == ["evaluators", "metrics"]
    assert {row["name"] for row in data["plugins"]} == names - {"evaluators", "metrics"}


def test_a_broken_entry_point_names_itself_and_can_be_blocked(monkeypatch):
    real = importlib.metadata.entry_points
    broken = importlib.metadata.EntryPoint(name="broken", value="tbpw_no_such_module_xyz", group=ENTRY_POINT_GROUP)

    def entry_points(**kwargs):
        found = list(real(**kwargs))
        return found + [broken] if kwargs.get("group") == ENTRY_POINT_GROUP else found

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    with pytest.raises(TbpwError, match=r"plugin 'broken' \(tbpw_no_such_module_xyz\) failed to load: .*TBPW_BLOCK_PLUGINS=broken"):
        PluginManager()
    monkeypatch.setenv(BLOCK_ENV, "broken")
    assert "broken" not in {row["name"] for row in PluginManager().describe()}


# ---------------------------------------------------------------- guards on the contract


def _hookspec_names() -> list[str]:
    marker = f"{hookspecs.PROJECT}_spec"
    return sorted(name for name, fn in vars(hookspecs).items() if callable(fn) and hasattr(fn, marker))


def test_hookspecs_are_found():
    assert {"tbpw_register_allocators", "tbpw_register_metrics", "tbpw_register_datasets"} <= set(_hookspec_names())


@pytest.mark.parametrize("hook", _hookspec_names())
def test_every_hookspec_is_documented(hook):
    fn = getattr(hookspecs, hook)
    doc = inspect.getdoc(fn) or ""
    assert len(doc.splitlines()) >= 3, f"{hook} needs a docstring: when it is called, what it gets, an example"
    assert "Example" in doc and "Called" in doc
    hints = inspect.signature(fn).parameters
    assert hints and all(p.annotation is not inspect.Parameter.empty for p in hints.values()), f"{hook} needs typed parameters"


@pytest.mark.parametrize("hook", _hookspec_names())
def test_every_hookspec_is_exercised_by_a_test(hook):
    """datasette's guard: a new hook without a test implementing it fails here."""
    implemented = re.compile(rf"def {hook}\(")
    sources = [p for p in TESTS.rglob("test_*.py")]
    assert any(implemented.search(p.read_text(encoding="utf-8")) for p in sources), (
        f"no test implements {hook}: add it to the inline plugin in tests/test_plugins.py and use it")
    assert hasattr(InlinePlugin, hook), f"the inline plugin of tests/test_plugins.py does not implement {hook}"
