"""Hostile or broken YAML in a recipe or a sweep file ends in one line naming the file, the line and the limit:
an alias bomb and a deep nesting are refused while the YAML is composed (by a node and a depth bound, before any
expansion), and a key written twice is refused with both of its lines."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from tbpw.cli import main
from tbpw.errors import TbpwError
from tbpw.run import recipe as recipes
from tbpw.run import sweep as sweeps


def _alias_bomb(levels: int = 9) -> str:
    """The "billion laughs": each level repeats the one before nine times (9^9 strings in ten lines)."""
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    names = "abcdefghijklmnopqrstuvwxyz"
    for before, name in zip(names[:levels - 1], names[1:levels]):
        lines.append(f"{name}: &{name} [{', '.join([f'*{before}'] * 9)}]")
    return "\n".join(lines) + "\n"


def _nested(levels: int) -> list:
    value: list = []
    for _ in range(levels - 1):
        value = [value]
    return value


def _validate(path: Path) -> str:
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert result.stderr.count("\n") == 1, result.stderr
    return result.stderr.removeprefix("error: ").rstrip("\n")


def test_an_alias_bomb_is_refused_by_the_node_limit(tmp_path):
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text("name: bomb\n" + _alias_bomb())
    # the sixth level (*e: 9^5 strings and their lists) is the first past the bound
    assert _validate(recipe) == (f"{recipe}:7: over the limit of 200,000 YAML nodes (alias *e repeats 66,430 of "
                                 "them): write the values out instead of repeating them through aliases")


def test_a_deep_list_is_refused_by_the_depth_limit(tmp_path):
    recipe = tmp_path / "deep.yaml"
    recipe.write_text("name: deep\ntargets: " + "[" * 20_000 + "]" * 20_000 + "\n")
    assert _validate(recipe) == (f"{recipe}:2: over the limit of 100 nested levels of lists and mappings: flatten "
                                 "the structure")


def test_the_depth_limit_counts_levels_that_aliases_add(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("a: &a " + "[" * 60 + "]" * 60 + "\nb: " + "[" * 50 + "*a" + "]" * 50 + "\n")
    with pytest.raises(TbpwError, match=rf"^{re.escape(str(path))}:2: over the limit of 100 nested levels"):
        recipes._read_yaml(path)
    # the mapping and 99 lists: 100 levels, the most there may be
    path.write_text("a: " + "[" * 99 + "]" * 99 + "\n")
    assert recipes._strip_lines(recipes._read_yaml(path))["a"] == _nested(99)
    path.write_text("a: " + "[" * 100 + "]" * 100 + "\n")
    with pytest.raises(TbpwError, match=rf"^{re.escape(str(path))}:1: over the limit of 100 nested levels"):
        recipes._read_yaml(path)


def test_an_alias_inside_the_node_it_names_is_refused(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: r\nloop: &a [1, *a]\n")
    with pytest.raises(TbpwError) as info:
        recipes.load(path)
    assert str(info.value) == (f"{path}:2: alias *a sits inside the node it names (a structure without end): "
                               "remove the alias")


def test_a_duplicate_key_is_refused_with_both_lines(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    lines = ["name: tiny", "", "model: {gguf: a.gguf}", *[f"# {i}" for i in range(8)], "model: {gguf: b.gguf}"]
    recipe.write_text("\n".join(lines) + "\n")
    assert _validate(recipe) == f"{recipe}:12: key 'model' appears twice (lines 3 and 12): keep one"
    recipe.write_text("name: tiny\nimatrix: {chunks: 4, chunks: 8}\n")  # nested, on one line
    assert _validate(recipe) == f"{recipe}:2: key 'chunks' appears twice (lines 2 and 2): keep one"


def test_a_key_merged_in_and_written_again_is_an_override(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("base: &base {chunks: 4, ctx: 512}\nimatrix:\n  <<: *base\n  chunks: 8\n")
    data = recipes._strip_lines(recipes._read_yaml(path))
    assert data["imatrix"] == {"chunks": 8, "ctx": 512}


def test_includes_share_one_node_budget(tmp_path):
    # the part alone is 10,205 nodes; included twenty times over, the recipe passes the bound
    (tmp_path / "part.yaml").write_text("x: &x [" + ", ".join(["Q4_K_M"] * 100) + "]\ny: [" + ", ".join(["*x"] * 100)
                                        + "]\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("include: [" + ", ".join(["part.yaml"] * 20) + "]\nname: r\n")
    assert _validate(recipe) == (f"{tmp_path / 'part.yaml'}:2: over the limit of 200,000 YAML nodes in one recipe "
                                 "with its includes (alias *x repeats 101 of them): repeat fewer values through "
                                 "aliases and fewer files through includes")


def test_a_fan_of_includes_is_refused_by_the_file_limit(tmp_path):
    (tmp_path / "leaf.yaml").write_text("name: leaf\n")
    (tmp_path / "mid.yaml").write_text("include: [" + ", ".join(["leaf.yaml"] * 20) + "]\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("include: [" + ", ".join(["mid.yaml"] * 20) + "]\nname: r\n")  # 421 reads
    assert _validate(recipe) == (f"{tmp_path / 'leaf.yaml'}: over the limit of 100 files read for one recipe with "
                                 "its includes (a file included twice counts twice): include fewer files, or each "
                                 "file fewer times")


def test_a_sweep_file_gets_the_same_protection(tmp_path):
    sweep_file = tmp_path / "s.yaml"
    sweep_file.write_text("name: s\nrecipe: r.yaml\nmodels: {m: {gguf: x.gguf}}\n" + _alias_bomb())
    runner = CliRunner()
    result = runner.invoke(main, ["sweep", str(sweep_file)])
    assert result.exit_code == 2 and result.stderr == (
        f"error: {sweep_file}:9: over the limit of 200,000 YAML nodes (alias *e repeats 66,430 of them): write the "
        "values out instead of repeating them through aliases\n")
    sweep_file.write_text("name: s\nrecipe: r.yaml\nmodels:\n  m: {gguf: x.gguf}\n  m: {gguf: y.gguf}\n")
    with pytest.raises(TbpwError) as info:
        sweeps.load(sweep_file)
    assert str(info.value) == f"{sweep_file}:5: key 'm' appears twice (lines 4 and 5): keep one"
    sweep_file.write_text("name: s\nrecipe: r.yaml\nmodels: " + "[" * 20_000 + "]" * 20_000 + "\n")
    result = runner.invoke(main, ["sweep", str(sweep_file)])
    assert result.exit_code == 2 and result.stderr == (
        f"error: {sweep_file}:3: over the limit of 100 nested levels of lists and mappings: flatten the structure\n")
