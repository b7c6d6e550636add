"""Every reviewed rule file in rules/ parses, is canonical, and does its job on a model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from models import HFLlama, MyLlama, ResNet, wrapped

import ckptmap
from ckptmap.syntax import format_text

RULES = Path(__file__).resolve().parents[1] / "rules"


@pytest.mark.parametrize("path", sorted(RULES.glob("*.ckmap")), ids=lambda p: p.name)
def test_rule_file_compiles_and_is_formatted(path):
    ckptmap.compile(path)
    assert format_text(path.read_text(), path) == path.read_text(), "run ckptmap fmt"


def test_every_rule_file_has_a_test():
    tested = {  # here, or in test_transforms.py for the conversions
        "ddp.ckmap",
        "torch-compile.ckmap",
        "wrappers.ckmap",
        "resnet-new-head.ckmap",
        "hf-llama-to-blocks.ckmap",
        "gpt2-conv1d-to-linear.ckmap",
        "qkv-fuse.ckmap",
        "moe-stack-experts.ckmap",
        "vit-pos-embed-224-to-256.ckmap",
        "stem-grayscale.ckmap",
        "head-select-classes.ckmap",
        "llama3-8b-meta-to-hf.ckmap",
    }
    assert {p.name for p in RULES.glob("*.ckmap")} == tested


def test_ddp_and_torch_compile():
    sd = ResNet(10).state_dict()
    model = ResNet(10)
    for rules, prefix in (("ddp.ckmap", "module."), ("torch-compile.ckmap", "_orig_mod.")):
        report = ckptmap.load_into(model, {prefix + k: v for k, v in sd.items()}, RULES / rules)
        assert len(report.loaded) == len(sd) and not report.unused_rules
        report = ckptmap.load_into(model, sd, RULES / rules)  # no prefix: keys pass unchanged
        assert [r.text for r in report.unused_rules] == [
            ckptmap.load_rules(RULES / rules).rules[0].to_text()
        ]


@pytest.mark.parametrize(
    "prefix", ["", "module.", "_orig_mod.", "_orig_mod.module.", "module._orig_mod."]
)
def test_wrappers_in_any_order(prefix):
    sd = ResNet(10).state_dict()
    plan = ckptmap.compile(RULES / "wrappers.ckmap").plan(
        {prefix + k: v for k, v in sd.items()}, sd
    )
    assert plan.ok and set(plan.mapping.values()) == set(sd)


def test_resnet_new_head():
    sd = wrapped(ResNet(1000), "_orig_mod.module.")
    model = ResNet(7)
    ckptmap.load_into(model, sd, RULES / "resnet-new-head.ckmap")
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]


def test_hf_llama_onto_own_names_gives_equal_logits():
    torch.manual_seed(0)
    hf = HFLlama().eval()
    mine = MyLlama().eval()
    report = ckptmap.load_into(mine, hf.state_dict(), RULES / "hf-llama-to-blocks.ckmap")
    assert not report.missing and not report.unexpected and not report.unused_rules
    ids = torch.randint(0, 64, (2, 10))
    torch.testing.assert_close(mine(ids), hf(ids), rtol=0, atol=0)
