"""The plan page (`plan --html`) and the history page (`history --html`): one
self-contained file, checked as text and in a real browser (headless Chromium over the
DevTools protocol: the DOM read, a rule clicked with the mouse, a screenshot taken)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from browser import Browser, find_browser
from typer.testing import CliRunner

import ckptmap
from ckptmap.cli import app
from ckptmap.page import plan_data, plan_page

runner = CliRunner()

RULES = """\
strip "module."
rename "h.{i}.attn" -> "blocks.{i}.attention"
transform "blocks.{i}.attention.proj.weight" | transpose(0, 1)
merge "blocks.{i}.attention.q", "blocks.{i}.attention.k" -> "blocks.{i}.attention.qk" | cat(0)
skip "**.num_batches_tracked"
init "head"
on unexpected warn
on missing warn
on mismatch skip
on unused warn
rename "nothing.{i}" -> "never"
"""
SOURCE = {
    **{f"module.h.{i}.attn.proj.weight": (4, 8) for i in range(3)},
    **{f"module.h.{i}.attn.{x}": (4, 4) for i in range(3) for x in "qk"},
    "module.bn.num_batches_tracked": (),
    "module.norm.weight": (4,),
    "module.extra.weight": (2,),
    "module.emb.weight": (10, 4),
}
TARGET = {
    **{f"blocks.{i}.attention.proj.weight": (8, 4) for i in range(3)},
    **{f"blocks.{i}.attention.qk": (8, 4) for i in range(3)},
    "norm.weight": (5,),  # mismatched
    "head.weight": (3, 4),  # initialized
    "lost.weight": (1,),  # missing
    "emb.weight": (10, 4),
}


@pytest.fixture(scope="module")
def plan():
    return ckptmap.compile(RULES).plan(SOURCE, TARGET)


@pytest.fixture(scope="module")
def browser():
    executable = find_browser()
    if executable is None:
        pytest.skip("no Chromium here: .ci/run installs Debian's chromium package")
    b = Browser(executable)
    yield b
    b.close()


def _moved(plan, rule: int) -> set[str]:
    """Every key a rule moved, as the page names them: s:SOURCE and t:TARGET."""
    keys = set()
    for e in plan_data(plan, "")["edges"]:
        if rule in e["rs"]:
            keys |= {f"s:{s}" for s in e["s"]}
            keys |= {f"t:{e['t']}"} if e["t"] is not None else set()
    return keys


def test_the_page_is_one_file_that_needs_no_network(plan, tmp_path):
    page = plan_page(plan, "a plan")
    fetched = page.replace('"http://www.w3.org/2000/svg"', "")  # SVG's namespace: no fetch
    assert not re.search(r"(src|href)=|https?://|@import|url\(", fetched)
    data = json.loads(page.split('type="application/json">', 1)[1].split("</script>", 1)[0])
    assert data["fingerprint"] == plan.fingerprint
    assert len(data["edges"]) == len(plan.outputs) + 1  # the skipped one too
    assert data["unused"] == plan.unused_rules and data["unused"]


def test_no_key_can_end_the_script():
    plan = ckptmap.compile("").plan({"a</script><script>alert(1)</script>": (1,)})
    page = plan_page(plan)
    assert page.count("</script>") == 2  # the data's and the code's own


def test_plan_html_writes_the_page_and_refuses_to_overwrite(tmp_path):
    import torch
    from safetensors.torch import save_file

    src = tmp_path / "src.safetensors"
    save_file({k: torch.zeros(v) for k, v in SOURCE.items()}, src)
    rules = tmp_path / "rules.ckmap"
    rules.write_text(RULES)
    out = tmp_path / "plan.html"
    result = runner.invoke(app, ["plan", str(rules), "-s", str(src), "--html", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_text().startswith("<!doctype html>")
    again = runner.invoke(app, ["plan", str(rules), "-s", str(src), "--html", str(out)])
    assert (again.exit_code == 2 and "CKM533" in again.output) or "exists" in again.output
    over = runner.invoke(app, ["plan", str(rules), "-s", str(src), "--html", str(rules)])
    assert over.exit_code == 2 and "CKM530" in over.output
    assert rules.read_text() == RULES


def test_the_page_draws_every_entry_and_a_click_highlights_exactly_its_rules_keys(
    plan, browser, tmp_path
):
    path = tmp_path / "plan.html"
    path.write_text(plan_page(plan, "a plan"))
    browser.open(path)
    assert browser.errors() == []
    # collapsed at first: the numbered layers fold into one row each side
    assert browser.js("document.querySelectorAll('.row').length") < 20
    browser.click("#expand")
    drawn = set(browser.js("window.ckptmap.keys()"))
    expected = {f"s:{k}" for k in SOURCE} | {f"t:{k}" for k in TARGET}
    expected |= {f"t:{o.target}" for o in plan.outputs}  # the unexpected one too
    assert drawn == expected
    # one line per source to its target (and a stub for the skipped one)
    pairs = {(s, e["t"]) for e in plan_data(plan, "")["edges"] for s in e["s"]}
    assert browser.js("window.ckptmap.lines()") == len(pairs)
    marks = browser.js(
        "Object.fromEntries([...document.querySelectorAll('.row[data-key] .m')]"
        ".map(m => [m.parentNode.dataset.side + ':' + m.parentNode.dataset.key, m.textContent]))"
    )
    assert marks["s:module.bn.num_batches_tracked"] == "skipped"
    assert marks["t:lost.weight"] == "missing"
    assert marks["t:head.weight"] == "init"
    assert marks["t:norm.weight"] == "mismatch"
    assert marks["s:module.extra.weight"] == "unexpected"
    for rule in (1, 3, 4):  # the rename, the merge, the skip
        browser.click(f'.rule[data-rule="{rule}"]')
        assert set(browser.js("window.ckptmap.highlighted()")) == _moved(plan, rule)
        lit = browser.js("document.querySelectorAll('svg path.hl').length")
        edges = [e for e in plan_data(plan, "")["edges"] if rule in e["rs"]]
        assert lit == len({(s, e["t"]) for e in edges for s in e["s"]}) > 0
        browser.click(f'.rule[data-rule="{rule}"]')  # a second click lets go
        assert browser.js("window.ckptmap.highlighted()") == []
    problems = browser.js("document.querySelector('.problems').textContent")
    assert "CKM304" in problems and "CKM303" in problems
    browser.screenshot(tmp_path / "plan.png")
    assert (tmp_path / "plan.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_search_box_opens_the_keys_it_finds(plan, browser, tmp_path):
    path = tmp_path / "plan.html"
    path.write_text(plan_page(plan, "a plan"))
    browser.open(path)
    browser.js(
        "(() => { const s = document.getElementById('search'); s.value = 'attention.qk';"
        " s.dispatchEvent(new Event('input')); })()"
    )
    browser.js("new Promise(r => setTimeout(r, 300))")
    found = browser.js("[...document.querySelectorAll('.row.found')].map(r => r.dataset.key)")
    assert sorted(found) == [f"blocks.{i}.attention.qk" for i in range(3)]


def test_the_history_page_draws_every_revision(browser, tmp_path):
    from test_history import four_steps

    folder = tmp_path / "migrations"
    four_steps(folder)
    out = tmp_path / "history.html"
    result = runner.invoke(app, ["history", str(folder), "--html", str(out)])
    assert result.exit_code == 0, result.output
    browser.open(out)
    assert browser.errors() == []
    drawn = browser.js("[...document.querySelectorAll('.rev')].map(r => r.dataset.revision)")
    assert sorted(drawn) == sorted(p.stem for p in folder.glob("*.ckmap"))
    edges = browser.js(
        "[...document.querySelectorAll('svg path.edge')].map(e => [e.dataset.from, e.dataset.to])"
    )
    assert sorted(map(tuple, edges)) == [
        ("0001-base", "0002-rename"),
        ("0002-rename", "0003-add-layer"),
        ("0003-add-layer", "0004-grow-head"),
        ("0004-grow-head", "0005-fuse-qkv"),
    ]
    browser.screenshot(tmp_path / "history.png")


def test_the_history_page_draws_branches_and_merges(browser, tmp_path):
    from test_history import write_history

    from ckptmap.meta import TensorMeta

    folder = write_history(  # the merge of tests/test_history.py's branchy history
        tmp_path / "m",
        [
            ("a", (), ""),
            ("b", ("a",), 'rename "w" -> "weight"\n'),
            ("c", ("a",), 'rename "b" -> "bias"\n'),
            ("d", ("b", "c"), 'rename "w" -> "weight"\nrename "b" -> "bias"\n'),
        ],
        {"a": {"w": TensorMeta((2, 3), "float32"), "b": TensorMeta((3,), "float32")}},
    )
    from ckptmap.history import History
    from ckptmap.page import history_page

    out = tmp_path / "h.html"
    out.write_text(history_page(History(folder)))
    browser.open(out)
    assert browser.errors() == []
    edges = browser.js(
        "[...document.querySelectorAll('svg path.edge')].map(e => [e.dataset.from, e.dataset.to])"
    )
    assert sorted(map(tuple, edges)) == [("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")]
    lanes = browser.js(
        "[...document.querySelectorAll('svg circle')].map(c => +c.getAttribute('cx'))"
    )
    assert len(set(lanes)) == 2  # the branch drawn beside its sibling
    text = browser.js("document.querySelector('.rev').textContent")
    assert text.startswith("@ d") and "merge of b, c" in text


@pytest.mark.slow
def test_a_100k_key_plan_opens_collapsed(browser, tmp_path):
    keys = {
        f"model.layers.{i}.mlp.experts.{e}.{w}.weight": (2, 2)
        for i in range(40)
        for e in range(256)
        for w in ("gate_proj", "up_proj", "down_proj")
    }
    rules = 'rename "model.layers.{i}.mlp.experts.{j}" -> "layers.{i}.moe.experts.{j}"'
    path = tmp_path / "moe.html"
    path.write_text(plan_page(ckptmap.compile(rules).plan(keys)))
    browser.open(path)
    assert browser.errors() == []
    assert browser.js("document.querySelectorAll('.row').length") < 10
    assert browser.js("window.ckptmap.lines()") >= 1
    browser.click("#source .row.branch")  # opening a level draws its rows, not the tree
    assert browser.js("document.querySelectorAll('.row').length") < 20


def test_the_docs_screenshot_is_of_a_real_plan():
    """docs/images/plan-page.png is made by docs/screenshot.py from a plan it builds."""
    import sys

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "docs"))
    from screenshot import example_plan

    plan = example_plan()
    assert plan.ok and len(plan.sources) == 39
    assert (root / "docs" / "images" / "plan-page.png").read_bytes()[:4] == b"\x89PNG"
    assert "images/plan-page.png" in (root / "docs" / "plan-page.md").read_text()


def test_odd_keys_draw_and_mark_as_any_other(browser, tmp_path):
    """A key that would open a script in HTML, keys named like JavaScript's own
    properties, a key that is also a prefix, and a number past JavaScript's exact ones
    (found by an adversarial pass)."""
    source = {
        "<!--<script>": (1,),
        "__proto__": (1,),
        "constructor": (1,),
        "a": (1,),
        "a.b": (1,),
        **{f"l.{n}": (1,) for n in (3, 12345678901234567, 12345678901234568)},
    }
    target = {k: v for k, v in source.items() if k != "constructor"} | {"toString": (1,)}
    plan = ckptmap.compile('rename "a.b" -> "z.b"\non unexpected warn\non missing warn').plan(
        source, target
    )
    path = tmp_path / "odd.html"
    path.write_text(plan_page(plan, "<!--<script> in the title"))
    browser.open(path)
    assert browser.errors() == []
    assert browser.js("typeof window.ckptmap") == "object"
    browser.click('.rule[data-rule="0"]')
    shaded = browser.js(
        "[...document.querySelectorAll('#source .row.part')].map(r => r.dataset.key)"
    )
    assert "a" in shaded  # folded, it holds the key the rule moved
    browser.click("#expand")
    assert set(browser.js("window.ckptmap.keys()")) >= {f"s:{k}" for k in source}
    marks = browser.js(
        "Object.fromEntries([...document.querySelectorAll('.row[data-key] .m')]"
        ".map(m => [m.parentNode.dataset.side + ':' + m.parentNode.dataset.key, m.textContent]))"
    )
    assert "s:__proto__" not in marks and marks["s:constructor"] == "unexpected"
    assert marks["t:toString"] == "missing"
    labels = browser.js(
        "[...document.querySelectorAll('.row.branch')].map(r => r.children[1].textContent)"
    )
    assert not any("12345678901234568}" in x for x in labels)  # long numbers are names


def test_a_target_whose_provider_failed_is_marked_failed_not_missing():
    plan = ckptmap.compile('rename "a" -> "x"\nrename "b" -> "x"').plan(
        {"a": (1,), "b": (1,)}, {"x": (1,)}
    )
    assert plan_data(plan, "")["marks"] == {"x": "failed"}


def test_the_page_is_never_written_over_an_included_rule_file_or_a_device(tmp_path):
    import os

    import torch
    from safetensors.torch import save_file

    src = tmp_path / "src.safetensors"
    save_file({"a": torch.zeros(1)}, src)
    (tmp_path / "sub.ckmap").write_text('rename "a" -> "b"\n')
    main = tmp_path / "main.ckmap"
    main.write_text('include "sub.ckmap"\n')
    args = ["plan", str(main), "-s", str(src), "--overwrite", "--html"]
    result = runner.invoke(app, [*args, str(tmp_path / "sub.ckmap")])
    assert result.exit_code == 2 and "CKM530" in result.output
    assert (tmp_path / "sub.ckmap").read_text() == 'rename "a" -> "b"\n'
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    result = runner.invoke(app, [*args, str(fifo)])
    assert result.exit_code == 2 and "not a regular file" in result.output
    assert fifo.is_fifo()


def test_siblings_that_differ_in_a_trailing_number_fold(browser, tmp_path):
    keys = {f"layer{i}.0.conv.weight": (1,) for i in range(1, 5)} | {"w_7": (1,), "fc.weight": (1,)}
    keys |= {f"w_{i}": (1,) for i in range(10, 13)}
    path = tmp_path / "fold.html"
    path.write_text(plan_page(ckptmap.compile("").plan(keys)))
    browser.open(path)
    rows = browser.js(
        "[...document.querySelectorAll('#source .row')].map(r => r.children[1].textContent)"
    )
    assert rows == ["layer{1..4}", "w_{7,10..12}", "fc"]
    browser.click("#expand")
    assert set(browser.js("window.ckptmap.keys()")) >= {f"s:{k}" for k in keys}
