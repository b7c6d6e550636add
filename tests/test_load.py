"""load_into / migrate / Plan.apply on models with the ecosystems' real key names."""

from __future__ import annotations

import pytest
import torch
from models import GPT2LMHead, ResNet, StagedResNet, WithBuffers, wrapped
from torch import nn

import ckptmap
from ckptmap.rules import Freeze, Init, Rename, Ruleset, Strip, Unfreeze


def snapshot(model: nn.Module):
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        {n: p.requires_grad for n, p in model.named_parameters()},
    )


def assert_untouched(model: nn.Module, snap) -> None:
    tensors, grads = snap
    now = model.state_dict()
    assert tensors.keys() == now.keys()
    for k, v in tensors.items():
        assert torch.equal(v, now[k]), k
    assert grads == {n: p.requires_grad for n, p in model.named_parameters()}


@pytest.fixture
def pretrained():
    torch.manual_seed(0)
    return ResNet(1000).eval()


def test_new_head_and_frozen_backbone(pretrained):
    model = ResNet(5).eval()
    fresh_fc = model.fc.weight.detach().clone()
    rules = 'strip "module."\ninit "fc"\nfreeze "**"\nunfreeze "fc"\n'
    report = ckptmap.load_into(model, wrapped(pretrained), rules)

    for k, v in pretrained.state_dict().items():
        if not k.startswith("fc."):
            assert torch.equal(model.state_dict()[k], v), k
    assert torch.equal(model.fc.weight, fresh_fc)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["fc.weight", "fc.bias"]
    assert report.accounts_for(wrapped(pretrained), model.state_dict())
    assert {e.source for e in report.skipped} == {"module.fc.weight", "module.fc.bias"}
    assert {e.target for e in report.initialized} == {"fc.weight", "fc.bias"}
    assert len(report.frozen) == len(list(model.parameters())) - 2
    # num_batches_tracked buffers are loaded like any other tensor
    assert model.bn1.num_batches_tracked.item() == pretrained.bn1.num_batches_tracked.item()


def test_shape_filter_recipe(pretrained):
    """The classic `{k: v for k, v in sd.items() if v.shape == model_sd[k].shape}`, reported."""
    model = ResNet(5)
    report = ckptmap.load_into(model, pretrained.state_dict(), "on mismatch skip")
    assert [m.target for m in report.mismatched] == ["fc.bias", "fc.weight"]
    assert report.mismatched[1].source_shape == [1000, 64]
    assert report.mismatched[1].target_shape == [5, 64]
    assert not report.missing


def test_failed_validation_leaves_the_model_untouched(pretrained):
    model = ResNet(5)
    for p in model.layer1.parameters():
        p.requires_grad_(False)
    snap = snapshot(model)
    with pytest.raises(ckptmap.PlanError) as info:
        ckptmap.load_into(model, wrapped(pretrained), 'strip "module."\nfreeze "**"')
    assert info.value.code == "CKM302"
    assert "fc.weight" in info.value.render()
    assert "[1000, 64]" in info.value.render()
    assert_untouched(model, snap)


def test_every_problem_reported_at_once(pretrained):
    sd = wrapped(pretrained)
    sd["module.extra.weight"] = torch.zeros(1)
    del sd["module.layer2.0.conv1.weight"]
    model = ResNet(5)
    with pytest.raises(ckptmap.PlanError) as info:
        ckptmap.load_into(model, sd, 'strip "module."')
    kinds = sorted({p.kind for p in info.value.problems})
    assert kinds == ["mismatch", "missing", "unexpected"]


def test_renamed_layers_between_revisions(pretrained):
    model = StagedResNet(1000)
    rules = Ruleset(
        [
            Rename("conv1", "stem.0"),
            Rename("bn1", "stem.1"),
            Rename("layer{i}", "stages.{i}.blocks"),
            Rename("fc", "head"),
        ]
    )
    report = ckptmap.load_into(model, pretrained.state_dict(), rules)
    assert not report.missing and not report.unexpected
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), pretrained(x), rtol=0, atol=0)


def test_regex_rename_matches_string_rename(pretrained):
    model_a, model_b = StagedResNet(1000), StagedResNet(1000)
    stem = 'rename "conv1" -> "stem.0"\nrename "bn1" -> "stem.1"\nrename "fc" -> "head"\n'
    ckptmap.load_into(
        model_a, pretrained.state_dict(), stem + 'rename "layer{i}" -> "stages.{i}.blocks"'
    )
    ckptmap.load_into(
        model_b,
        pretrained.state_dict(),
        stem + r'rename /layer(\d)\.(.*)/ -> "stages.{1}.blocks.{2}"',
    )
    for (ka, va), (kb, vb) in zip(
        model_a.state_dict().items(), model_b.state_dict().items(), strict=True
    ):
        assert ka == kb and torch.equal(va, vb)


def test_torch_compile_prefix(pretrained):
    compiled_sd = {f"_orig_mod.{k}": v for k, v in pretrained.state_dict().items()}
    model = ResNet(1000)
    report = ckptmap.load_into(model, compiled_sd, 'strip "_orig_mod."\noptional strip "module."')
    assert [r.text for r in report.unused_rules] == ['optional strip "module."']
    assert torch.equal(model.conv1.weight, pretrained.conv1.weight)


def test_tied_embeddings_are_not_missing():
    torch.manual_seed(1)
    source = GPT2LMHead()
    # a Hugging Face GPT-2 file has no lm_head.weight
    sd = {k: v for k, v in source.state_dict().items() if k != "lm_head.weight"}
    model = GPT2LMHead()
    report = ckptmap.load_into(model, sd, "")
    tied = [e for e in report.loaded if e.tied_to]
    assert [(e.target, e.tied_to) for e in tied] == [("lm_head.weight", "transformer.wte.weight")]
    assert not report.missing
    assert report.accounts_for(sd, model.state_dict())
    assert model.lm_head.weight is model.transformer.wte.weight
    assert torch.equal(model.lm_head.weight, source.transformer.wte.weight)


def test_freeze_on_tied_parameter_uses_its_first_name():
    model = GPT2LMHead()
    sd = {k: v for k, v in GPT2LMHead().state_dict().items() if k != "lm_head.weight"}
    ckptmap.load_into(model, sd, 'freeze "transformer.wte"')
    assert not model.lm_head.weight.requires_grad


def test_buffers_persistent_and_not():
    source = WithBuffers()
    source.scale.fill_(3.0)
    sd = source.state_dict()
    assert "cache" not in sd
    model = WithBuffers()
    report = ckptmap.load_into(model, sd, "")
    assert torch.equal(model.scale, torch.full((4,), 3.0))
    assert report.accounts_for(sd, model.state_dict())

    # a source tensor named like a non-persistent buffer is unexpected, as in torch
    with pytest.raises(ckptmap.PlanError) as info:
        ckptmap.load_into(model, {**sd, "cache": torch.ones(4)}, "")
    assert info.value.problems[0].kind == "unexpected"


def test_policy_overrides_per_call(pretrained):
    sd = pretrained.state_dict()
    sd["old_head.weight"] = torch.zeros(3)
    model = ResNet(1000)
    with pytest.warns(UserWarning, match="old_head.weight"):
        report = ckptmap.load_into(model, sd, "", on_unexpected="warn")
    assert [e.source for e in report.unexpected] == ["old_head.weight"]
    with pytest.raises(ValueError):
        ckptmap.load_into(model, sd, "", on_unexpected="skip")


def test_plan_apply_does_not_copy(pretrained):
    sd = wrapped(pretrained)
    plan = ckptmap.compile('strip "module."').plan(sd)
    out = plan.apply(sd)
    assert out.keys() == pretrained.state_dict().keys()
    for k, v in out.items():
        assert v is sd[f"module.{k}"]


def test_apply_refuses_a_source_the_plan_was_not_made_for(pretrained):
    sd = pretrained.state_dict()
    plan = ckptmap.compile("").plan(sd)
    other = dict(sd)
    other["conv1.weight"] = torch.zeros(1)
    with pytest.raises(ckptmap.LoadError) as info:
        plan.apply(other)
    assert "conv1.weight" in info.value.render()


def test_migrate_returns_state_dict_and_report(pretrained):
    sd = wrapped(pretrained)
    new, report = ckptmap.migrate(sd, 'strip "module."\nskip "fc"')
    assert "fc.weight" not in new and "conv1.weight" in new
    assert [e.source for e in report.skipped] == ["module.fc.bias", "module.fc.weight"]
    target_model = ResNet(5)
    new, report = ckptmap.migrate(sd, 'strip "module."\ninit "fc"', target=target_model)
    assert [e.target for e in report.initialized] == ["fc.bias", "fc.weight"]


def test_plan_accepts_shapes_modules_and_meta_models():
    with torch.device("meta"):
        big = ResNet(1000, width=64)
    plan = ckptmap.compile("").plan(big, big)
    assert plan.ok
    assert all(e.status == "loaded" for e in plan.sources)
    shapes = {k: tuple(v.shape) for k, v in big.state_dict().items()}
    assert ckptmap.compile("").plan(shapes, big).mapping == plan.mapping


def test_plan_is_json_and_fingerprinted(pretrained):
    plan = ckptmap.compile('strip "module."\ninit "fc"').plan(wrapped(pretrained), ResNet(5))
    again = ckptmap.Plan.from_json(plan.to_json())
    assert again == plan
    assert plan.fingerprint.startswith("sha256:")
    other = ckptmap.compile('strip "module."\ninit "fc"\non missing warn').plan(
        wrapped(pretrained), ResNet(5)
    )
    assert other.fingerprint != plan.fingerprint


def _small_plan() -> ckptmap.Plan:
    return ckptmap.compile('rename "a" -> "b"\non unexpected ignore').plan(
        {"a.w": (2, 3), "c": (1,)}, {"b.w": (2, 3), "c": (1,)}
    )


@pytest.mark.parametrize("fingerprint", [None, "", "sha256:" + "0" * 64])
def test_an_edited_plan_is_refused_whatever_its_fingerprint_says(fingerprint):
    import json

    document = json.loads(_small_plan().to_json())
    document["sources"][0]["target"] = document["outputs"][0]["target"] = "elsewhere"
    if fingerprint is None:
        del document["fingerprint"]
    else:
        document["fingerprint"] = fingerprint
    with pytest.raises(ckptmap.CheckpointError) as info:
        ckptmap.Plan.from_json(json.dumps(document))
    assert info.value.code == "CKM542"


@pytest.mark.parametrize("read_first", [False, True])
def test_a_plans_fingerprint_is_of_the_plan_as_made(read_first):
    """Computed when first asked, but of what the planner made: an edit made before or
    after the first read does not change it (a plan edited in memory and saved is refused
    when read back, as an edited file is)."""
    fresh = _small_plan().fingerprint
    plan = _small_plan()
    if read_first:
        assert plan.fingerprint == fresh
    plan.outputs[0].target = "elsewhere"
    plan.problems.clear()
    assert plan.fingerprint == fresh
    with pytest.raises(ckptmap.CheckpointError):
        ckptmap.Plan.from_json(plan.to_json())


def test_plans_share_no_containers():
    from ckptmap.plan import fingerprint_of

    plan = _small_plan()
    fingerprint = plan.fingerprint
    inverse = plan.inverse()
    inverse.policies["missing"] = "ignore"
    inverse.values.append(inverse.values[0])
    inverse.rules.clear()
    assert plan.policies["missing"] == "error" and plan.rules
    assert len(plan.values) == len(inverse.values) - 1
    assert fingerprint_of(plan) == fingerprint


def test_a_plan_made_by_hand_takes_records_or_their_fields():
    from ckptmap.plan import SourceEntry

    fields = {"source": "a", "value": 0, "target": "a", "shape": [1], "status": "loaded"}
    by_hand = ckptmap.Plan(rules_fingerprint="x", rules=[], policies={}, sources=[fields])
    assert by_hand.sources == [SourceEntry(**fields)]
    assert by_hand.fingerprint == ""  # made by hand: fingerprinted only when asked to be
    assert by_hand == ckptmap.Plan(
        rules_fingerprint="x", rules=[], policies={}, sources=[SourceEntry(**fields)]
    )


def test_plans_compare_without_json():
    plan = ckptmap.compile("").plan({"x\udc00": ()})  # a name JSON cannot hold
    assert plan == ckptmap.compile("").plan({"x\udc00": ()})


def test_python_built_rules_equal_parsed_rules():
    built = Ruleset([Strip("module."), Init("fc"), Freeze("**"), Unfreeze("fc")])
    parsed = ckptmap.parse('strip "module."\ninit "fc"\nfreeze "**"\nunfreeze "fc"\n')
    assert built == parsed
    assert ckptmap.compile(built).fingerprint == ckptmap.compile(parsed).fingerprint
