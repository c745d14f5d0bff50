"""The docs say what the code does (datasette's tests/test_docs.py: checked against the code, not trusted).

- Every `tbpw ...` command line in README.md and docs/*.md (code blocks and inline code) names a command
  that exists and shows only options that command's real `--help` lists.
- The README's plugin table lists exactly the built-in plugins `tbpw plugins --json` reports; the plugin
  tables of docs/quantize.md, docs/measure.md and docs/datasets.md list exactly the built-in allocators,
  metrics and datasets.
- Every tbpw module and name the docs cite resolves, every repository path they cite exists, and so does
  every entry of the README's layout.
- The README's custom allocator imports only `tbpw`, is about 20 lines, and works as shown.
- docs/ is the manual and docs/results/ the benchmarks' dated output: every results page names, near its top, a
  `python -m benchmarks.X` (or `scripts.X`) command that regenerates it, and no manual page holds a benchmark's
  generated sections.
"""

from __future__ import annotations

import ast
import functools
import importlib
import json
import re
import shlex
import tomllib
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from tbpw.cli import main

REPO = Path(__file__).resolve().parent.parent
MANUAL = sorted((REPO / "docs").glob("*.md"))
RESULTS = sorted((REPO / "docs" / "results").glob("*.md"))  # dated benchmark output, each naming its command
DOCS = [REPO / "README.md", *MANUAL, *RESULTS]
FENCE = re.compile(r"^\s*```(\w*)\s*$")
COMMAND_START = re.compile(r"(?:^|[|;]\s*|&&\s*)tbpw\s+(?=-|[a-z])")
OPTION = re.compile(r"(?<![\w.=/<-])(--?[A-Za-z][\w-]*)")
TOP_LEVEL = ("tbpw/", "plugins/", "vendor/", "scripts/", "benchmarks/", "testmodels/", "tests/", "recipes/", "examples/",
             "docs/", ".ci/")


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


# ------------------------------------------------------------------------------------- reading Markdown


@dataclass(frozen=True)
class Block:
    line: int  # the line number of its first line
    lang: str  # a fence's language ("text" when it names none), or "indented"
    lines: tuple[str, ...]


def _blocks(text: str) -> tuple[list[Block], list[tuple[int, str]]]:
    """The code blocks (fenced or indented) and the prose lines (line number, text) of a Markdown file."""
    blocks: list[Block] = []
    prose: list[tuple[int, str]] = []
    current: list[str] = []
    start, lang, previous = 0, "", ""
    for n, line in enumerate(text.splitlines(), 1):
        fence = FENCE.match(line)
        if lang not in ("", "indented"):  # inside a fenced block
            if fence:
                blocks.append(Block(start, lang, tuple(current)))
                lang = ""
            else:
                current.append(line)
        elif fence:
            if lang == "indented":
                blocks.append(Block(start, lang, tuple(current)))
            start, lang, current = n + 1, fence.group(1) or "text", []
        elif line.startswith("    ") and (lang == "indented" or not previous.strip()):
            if lang != "indented":
                start, lang, current = n, "indented", []
            current.append(line)
        else:
            if lang == "indented" and line.strip():
                blocks.append(Block(start, lang, tuple(current)))
                lang = ""
            if lang != "indented":
                prose.append((n, line))
        previous = line
    if lang:
        blocks.append(Block(start, lang, tuple(current)))
    return blocks, prose


def _spans(prose: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """The inline code spans of the prose (one may go on over a line break), with the line each starts on."""
    text = "\n".join(line for _, line in prose)
    numbers = [n for n, _ in prose]
    return [(numbers[text.count("\n", 0, m.start())], m.group(1).replace("\n", " "))
            for m in re.finditer(r"`([^`]+)`", text)]


# ---------------------------------------------------------------------------------- command lines


@dataclass(frozen=True)
class Usage:
    where: str  # file:line
    text: str  # the command line as the docs show it, after `tbpw`


def _commands_in(line: str) -> list[str]:
    """The `tbpw ...` commands of one line (several when joined by `|`, `;` or `&&`), a comment cut off."""
    line = re.split(r"\s#\s", f"{line} ", maxsplit=1)[0]
    starts = list(COMMAND_START.finditer(line))
    ends = [m.start() for m in starts[1:]] + [len(line)]
    return [line[m.end():end].strip(" |;&") for m, end in zip(starts, ends)]


def _usages() -> list[Usage]:
    usages = []
    for doc in DOCS:
        blocks, prose = _blocks(doc.read_text(encoding="utf-8"))
        lines: list[tuple[int, str]] = []
        for block in blocks:
            if block.lang in ("python", "toml", "yaml"):
                continue
            for n, line in enumerate(block.lines, block.line):
                if lines and lines[-1][1].endswith("\\"):  # a continued shell line
                    lines[-1] = (lines[-1][0], lines[-1][1][:-1] + " " + line.strip())
                else:
                    lines.append((n, line.strip().removeprefix("$ ")))
        for n, line in lines + _spans(prose):
            usages += [Usage(f"{_rel(doc)}:{n}", command) for command in _commands_in(line)]
    return usages


USAGES = _usages()


@functools.cache
def _help(words: tuple[str, ...]) -> tuple[str, frozenset[str]]:
    """The command `tbpw WORDS ...` runs (as its --help's usage line names it) and the options that help lists;
    ("", {}) when there is no such command."""
    result = CliRunner().invoke(main, [*words, "--help"], prog_name="tbpw", terminal_width=200,
                                max_content_width=200)
    if result.exit_code != 0:
        return "", frozenset()
    out = result.stdout
    usage = re.search(r"^Usage: tbpw(.*?)(?: \[OPTIONS\]|$)", out, re.M)
    assert usage, out
    section = out.split("\nOptions:\n", 1)[1].split("\n\n", 1)[0] if "\nOptions:\n" in out else ""
    options: set[str] = set()
    for line in section.splitlines():
        if line.strip().startswith("-"):  # the option column only, not the descriptions
            column = re.split(r"\s{2,}", line.strip(), maxsplit=1)[0]
            options.update(re.findall(r"(?<![\w-])--?[A-Za-z][\w-]*", column))
    return usage.group(1).strip(), frozenset(options)


def _words(text: str) -> tuple[str, ...]:
    """The leading words of a command line, up to its first option: the command, and what may name a
    subcommand (a group such as `imatrix` may take an argument in its place)."""
    try:
        tokens = shlex.split(text)
    except ValueError:
        tokens = text.split()
    words = []
    for token in tokens[:3]:
        if token.startswith(("-", "[", "(", "|")):
            break
        words.append(token)
    return tuple(words)


def test_the_docs_show_every_command():
    assert len(USAGES) > 30, USAGES
    assert {"build", "doctor", "plugins", "run", "validate", "schema", "imatrix", "measure", "quantize", "calibrate",
            "choose", "data", "inspect"} <= {u.text.split()[0] for u in USAGES}


@pytest.mark.parametrize("usage", USAGES, ids=[f"{u.where} {u.text[:40]}" for u in USAGES])
def test_command_lines_match_help(usage: Usage):
    words = _words(usage.text)
    path, options = _help(words)
    assert path or not words, f"{usage.where}: `tbpw {usage.text}` names no tbpw command"
    unknown = sorted({o for o in OPTION.findall(usage.text) if o not in options})
    assert not unknown, (f"{usage.where}: `tbpw {usage.text}`: {', '.join(unknown)}: no such option of "
                         f"`tbpw {path}` (it has {', '.join(sorted(options))})")


def test_help_parsing_finds_real_commands_and_options():
    assert _help(("imatrix", "MODEL.gguf")) == _help(("imatrix", "make"))  # the shorthand for `imatrix make`
    assert _help(("imatrix", "MODEL.gguf"))[0] == "imatrix make"
    assert _words("imatrix MODEL.gguf -f TEXT.txt") == ("imatrix", "MODEL.gguf")
    path, options = _help(("quantize",))
    assert path == "quantize" and {"--target-bpw", "-O", "--option", "-o", "--output", "-h"} <= options
    assert "--out" not in options  # named in a description only (`tbpw measure --out`)
    assert _help(("no-such-command",)) == ("", frozenset())
    assert _help(("data", "no-such-subcommand")) == ("", frozenset())
    assert _commands_in("tbpw data list | tbpw data get NAME -o k=v  # a comment --nope") == \
        ["data list", "data get NAME -o k=v"]
    assert OPTION.findall("MODEL-F16.gguf [-O KEY=VALUE] (--target-bpw X | --target-size=N)") == \
        ["-O", "--target-bpw", "--target-size"]


# ----------------------------------------------------------------------------------------- plugins


@functools.cache
def _built_in_plugins() -> dict[str, set[str]]:
    """kind -> names, from `tbpw plugins --json`, of the entry points that load tbpw's own plugins."""
    entry_points = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]["tbpw"]
    built_in = {name for name, module in entry_points.items() if module.split(".")[0] == "tbpw_plugins"}
    result = CliRunner().invoke(main, ["plugins", "--json"], prog_name="tbpw")
    assert result.exit_code == 0, result.output
    rows = [row for row in json.loads(result.stdout)["plugins"] if row["name"] in built_in]
    assert {row["name"] for row in rows} == built_in
    kinds: dict[str, set[str]] = {}
    for row in rows:
        for kind, names in row["provides"].items():
            kinds.setdefault(kind, set()).update(names)
    return kinds


def _table(text: str, header: str) -> list[list[str]]:
    """The cells of the body rows of the first Markdown table whose header row starts with `header`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def _names(cell: str) -> set[str]:
    return set(re.findall(r"`([^`]+)`", cell))


def test_readme_plugin_table_lists_exactly_the_built_in_plugins():
    rows = _table((REPO / "README.md").read_text(encoding="utf-8"), "| kind | built-in |")
    assert {row[0]: _names(row[1]) for row in rows} == _built_in_plugins()


@pytest.mark.parametrize(("doc", "kind"), [("quantize.md", "allocator"), ("measure.md", "metric"),
                                           ("datasets.md", "dataset"), ("distributed.md", "executor")])
def test_doc_plugin_tables_list_exactly_the_built_in_plugins(doc: str, kind: str):
    rows = _table((REPO / "docs" / doc).read_text(encoding="utf-8"), "| name |")
    assert set().union(*(_names(row[0]) for row in rows)) == _built_in_plugins()[kind]


# ---------------------------------------------------------------------- modules, names and files


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            if hasattr(obj, attr):
                obj = getattr(obj, attr)
                continue
            try:  # a submodule nothing imported yet
                obj = importlib.import_module(f"{obj.__name__}.{attr}")
            except (ImportError, AttributeError):
                return False
        return True
    return False


def _citations() -> list[tuple[str, str, str]]:
    """(where, "name" or "path", what): every tbpw name and repository path the docs cite."""
    cited = []
    for doc in DOCS:
        blocks, prose = _blocks(doc.read_text(encoding="utf-8"))
        for n, span in _spans(prose):
            span = span.strip()
            if re.fullmatch(r"tbpw(?:_plugins)?(?:\.[A-Za-z_]\w*)+(?:\(.*\))?", span):
                cited.append((f"{_rel(doc)}:{n}", "name", span.split("(")[0]))
            elif re.fullmatch(r"[\w./-]+", span) and span.startswith(TOP_LEVEL):
                cited.append((f"{_rel(doc)}:{n}", "path", span))
        for block in blocks:
            if block.lang != "python":
                continue
            for node in ast.walk(ast.parse("\n".join(block.lines))):
                if isinstance(node, ast.ImportFrom) and re.match(r"tbpw(?:\.|_plugins|$)", node.module or ""):
                    cited += [(f"{_rel(doc)}:{block.line + node.lineno - 1}", "name", f"{node.module}.{a.name}")
                              for a in node.names]
    return cited


def test_every_cited_module_name_and_file_exists():
    missing = [f"{where}: {what}" for where, kind, what in _citations()
               if not (_resolves(what) if kind == "name" else (REPO / what).exists())]
    assert not missing, "the docs cite what does not exist:\n" + "\n".join(missing)


def test_the_citation_finder_sees_the_docs():
    cited = {what for _, _, what in _citations()}
    assert {"tbpw/plugin/hookspecs.py", "tbpw.measure.engine.measure", "tbpw.Allocator"} <= cited
    assert not _resolves("tbpw.contracts.NoOptions") and not _resolves("tbpw.measure.measure")
    assert _resolves("tbpw.allocate.service.Planner") and _resolves("tbpw_plugins.allocators")


def test_every_entry_of_the_readme_layout_exists():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    layout = text.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    block = next(b for b in _blocks(layout)[0] if b.lang == "indented")
    parent, checked = REPO, 0
    for line in block.lines:
        indent = len(line) - len(line.lstrip())
        entry = line.split()[0]
        if not re.fullmatch(r"[\w.-]+/?", entry) or indent not in (4, 6):
            continue  # a description going on
        path = (REPO if indent == 4 else parent) / entry
        assert path.exists(), f"README.md's layout names {path.relative_to(REPO)}, which does not exist"
        if indent == 4:
            parent = path
        checked += 1
    assert checked > 15


# ------------------------------------------------------------------------------- manual and results

REGENERATE = re.compile(r"python3? -m ((?:benchmarks|scripts)\.[A-Za-z_]\w*)")
RESULTS_TOP = 20  # lines: the header that says what a results page measures and how to make it again
GENERATED = ("<!-- quality:", "<!-- cost:")  # the sections benchmarks/quality.py and benchmarks/cost.py write


def test_there_are_results_pages():
    assert {p.name for p in RESULTS} >= {"quality.md", "cost.md", "scale.md", "gpu.md"}


@pytest.mark.parametrize("page", RESULTS, ids=[p.name for p in RESULTS])
def test_every_results_page_names_a_command_that_regenerates_it(page: Path):
    top = "\n".join(page.read_text(encoding="utf-8").splitlines()[:RESULTS_TOP])
    modules = REGENERATE.findall(top)
    assert modules, f"{_rel(page)} names no `python -m benchmarks.X` or `python -m scripts.X` in its first {RESULTS_TOP} lines"
    missing = [m for m in modules if not (REPO / (m.replace(".", "/") + ".py")).is_file()]
    assert not missing, f"{_rel(page)} names modules that do not exist: {missing}"


def test_the_command_finder_finds_module_commands():
    assert REGENERATE.findall("    nice .venv/bin/python -m benchmarks.scale --work DIR") == ["benchmarks.scale"]
    assert REGENERATE.findall("PYTHONPATH=/tmp/site python3 -m scripts.gpu_check run") == ["scripts.gpu_check"]
    assert REGENERATE.findall(".venv/bin/python benchmarks/quality.py --model bench") == []


@pytest.mark.parametrize("page", MANUAL, ids=[p.name for p in MANUAL])
def test_manual_pages_hold_no_generated_sections(page: Path):
    text = page.read_text(encoding="utf-8")
    found = [marker for marker in GENERATED if marker in text]
    assert not found, f"{_rel(page)} holds {found}: benchmark output belongs in docs/results/"


# --------------------------------------------------------------------------- the custom allocator


def _readme_allocator() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```python\n(# my_allocator\.py\n.*?)```", text, re.S)
    assert block, "README.md has no `# my_allocator.py` example"
    return block.group(1)


def test_readme_custom_allocator_is_short_and_imports_only_tbpw():
    source = _readme_allocator()
    tree = ast.parse(source)
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert imported == {"tbpw"}
    assert len([line for line in source.splitlines() if line.strip()]) <= 25


def test_readme_custom_allocator_allocates_within_the_budget(plugin_manager, inventory, fork_table):
    from instances import allocate

    from tbpw import TbpwError
    from tbpw.allocate.problem import build_problem
    from tbpw.model.budget import Target

    module = types.ModuleType("my_allocator")
    exec(compile(_readme_allocator(), "README.md (my_allocator.py)", "exec"), module.__dict__)
    name = plugin_manager.register(module, name="readme-allocator")
    try:
        problem = build_problem(inventory, fork_table, Target(bpw=4.0))
        cheapest = allocate(inventory, problem, "cheapest")
        spent = allocate(inventory, problem, "cheapest", {"spend_on": ["attn_v", "ffn_down"]})
        assert cheapest.achieved_bpw < spent.achieved_bpw <= 4.0
        assert cheapest.allocator == "cheapest" and spent.allocator_options == {"spend_on": ["attn_v", "ffn_down"]}
        with pytest.raises(TbpwError, match=r"no option 'spend_onn' \(did you mean 'spend_on'\?\)"):
            allocate(inventory, problem, "cheapest", {"spend_onn": []})
    finally:
        plugin_manager.unregister(name)
