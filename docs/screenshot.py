"""Regenerate docs/images/plan-page.png: a real plan page, opened in headless Chromium.

    python docs/screenshot.py

The plan is the one docs/plan-page.md builds: Hugging Face Llama names onto a model of
one's own, with a classifier head that is new and a layer the model does not have.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import ckptmap  # noqa: E402
from ckptmap.page import plan_page  # noqa: E402


def example_plan() -> ckptmap.Plan:
    source, target = {}, {}
    for i in range(4):
        for p in "qkvo":
            source[f"model.layers.{i}.self_attn.{p}_proj.weight"] = (64, 64)
            target[f"blocks.{i}.attn.{p}.weight"] = (64, 64)
        for p, shape in (("gate", (172, 64)), ("up", (172, 64)), ("down", (64, 172))):
            source[f"model.layers.{i}.mlp.{p}_proj.weight"] = shape
            target[f"blocks.{i}.mlp.{p}.weight"] = shape
        source[f"model.layers.{i}.input_layernorm.weight"] = (64,)
        source[f"model.layers.{i}.post_attention_layernorm.weight"] = (64,)
        target[f"blocks.{i}.norm1.weight"] = (64,)
        target[f"blocks.{i}.norm2.weight"] = (64,)
    source |= {"model.embed_tokens.weight": (1000, 64), "model.norm.weight": (64,)}
    source["lm_head.weight"] = (1000, 64)
    target |= {"tok_emb.weight": (1000, 64), "norm.weight": (64,), "head.weight": (10, 64)}
    rules = [Path(ROOT / "rules" / "hf-llama-to-blocks.ckmap"), "on mismatch skip"]
    return ckptmap.compile(rules).plan(source, target)


def main() -> None:
    from browser import Browser, find_browser

    executable = find_browser()
    if executable is None:
        raise SystemExit("no Chromium here: apt-get install chromium")
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "plan.html"
        page.write_text(plan_page(example_plan(), "hf-llama-to-blocks.ckmap: Llama -> blocks"))
        browser = Browser(executable, width=1280, height=900)
        try:
            browser.open(page)
            for side, names in (
                ("source", ["model", "layers", "{0..3}", "0"]),
                ("target", ["blocks", "{0..3}", "0", "head"]),
            ):
                for name in names:  # open the rows on the way to one layer, as a reader does
                    browser.js(
                        f"[...document.querySelectorAll('#{side} .row.branch')].find(r =>"
                        f" r.children[1].textContent === {name!r}).click()"
                    )
            browser.click('.rule[data-rule="1"]')  # the attention rename, highlighted
            browser.js("window.scrollTo(0, 0)")
            browser.screenshot(ROOT / "docs" / "images" / "plan-page.png")
        finally:
            browser.close()
    print("wrote docs/images/plan-page.png")


if __name__ == "__main__":
    main()
