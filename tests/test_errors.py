"""How errors look: location, the source line, a caret under the column, a hint."""

from __future__ import annotations

import pytest

import ckptmap
from ckptmap.errors import PlanError, RuleCompileError, RuleSyntaxError


def test_syntax_error_renders_line_and_caret():
    with pytest.raises(RuleSyntaxError) as info:
        ckptmap.parse('strip "module."\nrenme "a" -> "b"\n', "rules/x.ckmap")
    assert info.value.render() == (
        "rules/x.ckmap:2:1: error[CKM104]: unknown statement 'renme'\n"
        "  |\n"
        '2 | renme "a" -> "b"\n'
        "  | ^\n"
        "hint: did you mean 'rename'?"
    )


def test_compile_error_points_inside_the_pattern():
    with pytest.raises(RuleCompileError) as info:
        ckptmap.compile('rename "layer{i}.{j}" -> "stages.{i}.blocks.{k}"')
    assert info.value.render().splitlines()[1:4] == [
        "  |",
        '1 | rename "layer{i}.{j}" -> "stages.{i}.blocks.{k}"',
        "  |                                             ^",
    ]
    assert info.value.hint == "the pattern binds {i}, {j}"


def test_every_error_is_a_ckptmap_error_with_a_phase():
    for cls, phase in [
        (RuleSyntaxError, "syntax"),
        (RuleCompileError, "compile"),
        (PlanError, "plan"),
        (ckptmap.LoadError, "load"),
        (ckptmap.CheckpointError, "file"),
    ]:
        assert issubclass(cls, ckptmap.CkptmapError) and cls.phase == phase


def test_long_problem_lists_end_in_and_n_more():
    source = {f"old.{i}.w": (1,) for i in range(40)}
    plan = ckptmap.compile("").plan(source, {f"new.{i}.w": (1,) for i in range(40)})
    with pytest.raises(PlanError) as info:
        plan.check()
    text = str(info.value)
    assert "unexpected (on unexpected error): 40 source keys the target does not have:" in text
    assert "old.{0..39}.w" in text
    assert "new.{0..39}.w" in text


# --- the registry of codes ----------------------------------------------------------------------

import re  # noqa: E402
from pathlib import Path  # noqa: E402

from ckptmap.errors import CODES, error_table  # noqa: E402

SRC = Path(__file__).resolve().parents[1] / "src" / "ckptmap"
DOCS = Path(__file__).resolve().parents[1] / "docs"


def _codes_in_source() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        if path.name == "errors.py":  # the registry names them all: count only what it raises
            text = text.split("CODES: dict", 1)[0]
        for code in re.findall(r"CKM\d{3}", text):
            found.setdefault(code, []).append(path.name)
    return found


def test_every_code_raised_is_registered():
    unknown = sorted(set(_codes_in_source()) - set(CODES))
    assert not unknown, f"codes raised but not in ckptmap.errors.CODES: {unknown}"


def test_every_registered_code_is_raised_somewhere():
    never = sorted(set(CODES) - set(_codes_in_source()))
    assert not never, f"codes in the registry that nothing raises: {never}"


def test_the_docs_error_table_is_the_registry():
    text = (DOCS / "language.md").read_text()
    assert error_table() in text, "python docs/render_cli.py rewrites docs/language.md's table"
