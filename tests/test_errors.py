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
