"""Runs every data case in tests/compliance/*.yaml: rules + keys in, plan or error out.

A case:
    name: what it pins
    rules: rule text (DSL), or rules_yaml: the YAML form
    files: {relative path: text}       # optional, written beside the main rule file
    source: {key: shape}
    target: {key: shape}               # optional
    policies: {on_missing: warn, ...}  # optional per-call overrides
    expect:                            # every field optional
      mapping: {source: target}        # exactly the loaded tensors
      outputs: {target: shape}         # the loaded tensors the plan produces, and their shapes
      skipped: {source: reason}
      unexpected: [source]
      missing: [target]
      initialized: {target: reason}
      mismatched: [source]
      frozen: [target]
      unfrozen: [target]
      unused: [rule text]
      message: text                    # a problem's message contains it
      errors: [code]                   # plan errors, in order; absent means the plan is clean
      warnings: [code]
    error: {code: CKM202, line: 1, column: 40}   # instead of expect: parse/compile fails
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import ckptmap
from ckptmap.plan import TensorMeta

CASES_DIR = Path(__file__).parent / "compliance"


def _cases():
    for file in sorted(CASES_DIR.glob("*.yaml")):
        doc = yaml.safe_load(file.read_text())
        for case in doc["cases"]:
            yield pytest.param(case, id=f"{file.stem}: {case['name']}")


def _shapes(mapping):
    return {k: TensorMeta(tuple(v)) for k, v in (mapping or {}).items()}


@pytest.mark.parametrize("case", list(_cases()))
def test_case(case, tmp_path):
    for rel, text in (case.get("files") or {}).items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    if "rules_yaml" in case:
        main = tmp_path / "main.yaml"
        main.write_text(case["rules_yaml"])
    else:
        main = tmp_path / "main.ckmap"
        main.write_text(case["rules"])

    if "error" in case:
        with pytest.raises(ckptmap.CkptmapError) as info:
            program = ckptmap.compile(main)
            program.plan(_shapes(case.get("source")), _shapes(case.get("target")) or None)
        err = info.value
        want = case["error"]
        assert err.code == want["code"], err.render()
        if "line" in want:
            assert err.span is not None and err.span.line == want["line"], err.render()
        if "column" in want:
            assert err.span.column == want["column"], err.render()
        if "message" in want:
            assert want["message"] in err.message, err.render()
        return

    program = ckptmap.compile(main)
    source = _shapes(case["source"])
    target = _shapes(case["target"]) if "target" in case else None
    plan = program.plan(source, target, **(case.get("policies") or {}))
    expect = case.get("expect") or {}
    report = plan.report()

    assert report.accounts_for(source, target or ()), str(report)
    assert [p.code for p in plan.errors] == expect.get("errors", []), str(plan)
    if "warnings" in expect:
        assert [p.code for p in plan.warnings] == expect["warnings"], str(plan)
    if "mapping" in expect:
        assert plan.mapping == expect["mapping"], str(plan)
    if "outputs" in expect:
        got = {o.target: o.shape for o in plan.outputs if o.status == "loaded"}
        assert got == expect["outputs"], str(plan)
    if "skipped" in expect:
        assert {e.source: e.reason for e in report.skipped} == expect["skipped"], str(plan)
    if "unexpected" in expect:
        assert [e.source for e in report.unexpected] == expect["unexpected"], str(plan)
    if "missing" in expect:
        assert [e.target for e in report.missing] == expect["missing"], str(plan)
    if "initialized" in expect:
        got = {e.target: e.reason for e in report.initialized}
        assert got == expect["initialized"], str(plan)
    if "mismatched" in expect:
        assert [e.source for e in report.mismatched] == expect["mismatched"], str(plan)
    if "frozen" in expect:
        assert [t.target for t in plan.trainable if t.frozen] == expect["frozen"], str(plan)
    if "unfrozen" in expect:
        assert [t.target for t in plan.trainable if not t.frozen] == expect["unfrozen"]
    if "unused" in expect:
        assert [plan.rules[i].text for i in plan.unused_rules] == expect["unused"], str(plan)
    if "message" in expect:
        assert any(expect["message"] in p.message for p in plan.problems), str(plan)
