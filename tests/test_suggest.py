"""`suggest` on a corpus of real pairs (small models with the real libraries' names, random
weights): every mapping it emits is right (100 % precision), it finds at least 95 % of the
mapping overall, what it cannot tell is listed as unresolved, and the suggested rules load
equivalent models to the same outputs. The suggested files are kept under tests/suggest/
(UPDATE_GOLDEN=1 rewrites them)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from models import (
    HFGPT2,
    GQAModel,
    HFLlama,
    LinearGPT2,
    MoE,
    MyLlama,
    NanoGPT,
    ResNet,
    TinyBert,
    TitanLlama,
    wrapped,
)
from safetensors.torch import save_file, save_model
from torch import nn
from typer.testing import CliRunner

import ckptmap
from ckptmap.cli import app
from ckptmap.suggest import suggest

CORPUS = Path(__file__).parent / "suggest"
runner = CliRunner(env={"COLUMNS": "200"})


def _llama_truth(d: dict[str, str]) -> dict[str, str]:
    truth = {"model.embed_tokens.weight": d["embed"], "model.norm.weight": d["norm"]}
    truth["lm_head.weight"] = d["head"]
    for i in range(2):
        for a, b in d["layer"].items():
            truth[f"model.layers.{i}.{a}.weight"] = d["prefix"].format(i=i) + b + ".weight"
    return truth


TITAN = {
    "embed": "tok_embeddings.weight",
    "norm": "norm.weight",
    "head": "output.weight",
    "prefix": "layers.{i}.",
    "layer": {
        "self_attn.q_proj": "attention.wq",
        "self_attn.k_proj": "attention.wk",
        "self_attn.v_proj": "attention.wv",
        "self_attn.o_proj": "attention.wo",
        "mlp.gate_proj": "feed_forward.w1",
        "mlp.down_proj": "feed_forward.w2",
        "mlp.up_proj": "feed_forward.w3",
        "input_layernorm": "attention_norm",
        "post_attention_layernorm": "ffn_norm",
    },
}
MINE = {
    "embed": "tok_emb.weight",
    "norm": "norm.weight",
    "head": "head.weight",
    "prefix": "blocks.{i}.",
    "layer": {
        "self_attn.q_proj": "attn.q",
        "self_attn.k_proj": "attn.k",
        "self_attn.v_proj": "attn.v",
        "self_attn.o_proj": "attn.o",
        "mlp.gate_proj": "mlp.gate",
        "mlp.down_proj": "mlp.down",
        "mlp.up_proj": "mlp.up",
        "input_layernorm": "norm1",
        "post_attention_layernorm": "norm2",
    },
}


def _same(sd: dict) -> dict[str, str]:
    return {k: k for k in sd}


def _sequential(extra: bool) -> nn.Module:
    layers = [nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()]
    if extra:
        layers.append(nn.Conv2d(8, 8, 1))  # the layer added in the middle
    layers += [nn.Conv2d(8, 16, 3), nn.BatchNorm2d(16)]
    net = nn.Module()
    net.features = nn.Sequential(*layers)
    return net


def cases():
    """(name, source model, target model, the true mapping, whether outputs must agree)."""
    torch.manual_seed(0)
    resnet = ResNet(1000)
    yield (
        "resnet-dataparallel",
        wrapped(resnet),
        ResNet(1000),
        {f"module.{k}": k for k in resnet.state_dict()},
        resnet,
    )
    yield (
        "resnet-compile-ddp",
        wrapped(resnet, "_orig_mod.module."),
        ResNet(1000),
        {f"_orig_mod.module.{k}": k for k in resnet.state_dict()},
        resnet,
    )
    gpt2 = HFGPT2()
    yield "gpt2-hf-to-nanogpt", gpt2, NanoGPT(), _same(gpt2.state_dict()), gpt2
    split = {k: k for k in gpt2.state_dict() if "c_attn" not in k}
    for i in range(2):
        for p in ("weight", "bias"):
            split[f"transformer.h.{i}.attn.c_attn.{p}"] = f"transformer.h.{i}.attn.q.{p}"
    yield "gpt2-hf-to-separate-qkv", gpt2, LinearGPT2(), split, gpt2
    llama = HFLlama()
    yield "llama-hf-to-torchtitan", llama, TitanLlama(), _llama_truth(TITAN), llama
    yield "llama-hf-to-own-names", llama, MyLlama(), _llama_truth(MINE), llama
    bert = TinyBert(legacy=True)
    truth = {k: k.replace("gamma", "weight").replace("beta", "bias") for k in bert.state_dict()}
    yield "bert-legacy-gamma-beta", bert, TinyBert(), truth, bert
    moe = MoE()
    truth = {"gate.weight": "gate.weight"}
    truth |= {f"experts.{e}.w{n}.weight": f"w{n}" for e in range(4) for n in (1, 2)}
    yield "moe-experts-stacked", moe, MoE(stacked=True), truth, moe
    gqa = GQAModel()
    truth = {}
    for k in gqa.state_dict():
        truth[k] = k
        for p in "qkv":
            truth[k] = truth[k].replace(f"self_attn.{p}_proj", "self_attn.qkv_proj")
    yield "gqa-fused-qkv", gqa, GQAModel(fused=True), truth, gqa
    small = ResNet(10)
    grew = {k: k for k in small.state_dict() if not k.startswith("fc.")}
    yield "head-grew", small, ResNet(12), grew, None
    before = _sequential(extra=False)
    shift = {}
    for k in before.state_dict():
        i = int(k.split(".")[1])
        shift[k] = k if i < 3 else k.replace(f"features.{i}.", f"features.{i + 1}.", 1)
    yield "layer-added-in-the-middle", before, _sequential(extra=True), shift, None


def hf_cases():
    """Pairs from the real Hugging Face classes, built from small configs (no download)."""
    from transformers import (
        BertConfig,
        BertModel,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
    )
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(
        GPT2Config(
            n_layer=2,
            n_embd=16,
            n_head=4,
            vocab_size=50,
            n_positions=32,
            bos_token_id=0,
            eos_token_id=0,
        )
    )
    # nanoGPT computes GELU exactly, Hugging Face with tanh: the weights agree, not outputs
    yield "transformers-gpt2-to-nanogpt", gpt2, NanoGPT(), _same(gpt2.state_dict()), None
    config = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, vocab_size=64)
    llama = LlamaForCausalLM(
        LlamaConfig(
            **config, num_attention_heads=4, num_key_value_heads=4, bos_token_id=0, eos_token_id=0
        )
    )
    yield "transformers-llama-to-torchtitan", llama, TitanLlama(), _llama_truth(TITAN), None
    bert_config = BertConfig(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        vocab_size=40,
    )
    bert = BertModel(bert_config).eval()
    legacy = {  # a TF-converted checkpoint's LayerNorm names
        k.replace("LayerNorm.weight", "LayerNorm.gamma").replace(
            "LayerNorm.bias", "LayerNorm.beta"
        ): v
        for k, v in bert.state_dict().items()
    }
    truth = {k: k.replace("gamma", "weight").replace("beta", "bias") for k in legacy}
    yield "transformers-bert-legacy-gamma-beta", legacy, BertModel(bert_config), truth, bert


CASES = list(cases()) + list(hf_cases())


def _inputs(name: str, model: nn.Module) -> torch.Tensor:
    if "resnet" in name:
        return torch.randn(2, 3, 32, 32)
    if "moe" in name:
        return torch.randn(3, 8)
    if "gqa" in name:
        return torch.randn(2, 5, 32)
    if "transformers-bert" in name:
        return torch.randint(0, 40, (2, 7))
    return torch.randint(0, 40, (2, 7))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_suggest_on_the_corpus(case):
    name, source, target, truth, model = case
    sd = source if isinstance(source, dict) else source.state_dict()
    found = suggest(sd, target)
    wrong = {k: v for k, v in found.mapping.items() if truth.get(k) != v}
    assert not wrong, f"{name}: wrong mappings {wrong}\n{found.to_text()}"  # 100 % precision
    assert found.plan.ok, found.summary()
    flagged = {k for u in found.unresolved for k in u.keys}
    assert set(truth) - set(found.mapping) <= flagged | set(), (
        f"{name}: not found and not flagged: {sorted(set(truth) - set(found.mapping) - flagged)}"
    )
    text = found.to_text()
    assert ckptmap.parse(text) == found.rules  # the file is the rules, comments aside
    golden = CORPUS / f"{name}.ckmap"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text(), f"{golden.name} differs (UPDATE_GOLDEN=1 to accept)"
    if model is not None and found.ok:  # equivalent models: the rules give the same outputs
        torch.manual_seed(1)
        x = _inputs(name, model)
        report = ckptmap.load_into(target, sd, found.rules)
        assert report.accounts_for(sd, target.state_dict())
        model.eval(), target.eval()
        with torch.no_grad():
            got, want = target(x), model(x)
            if hasattr(got, "last_hidden_state"):  # a Hugging Face model's output
                got, want = got.last_hidden_state, want.last_hidden_state
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_recall_over_the_corpus():
    found_total = truth_total = 0
    for name, source, target, truth, _ in CASES:
        sd = source if isinstance(source, dict) else source.state_dict()
        found = suggest(sd, target)
        found_total += sum(1 for k, v in found.mapping.items() if truth.get(k) == v)
        truth_total += len(truth)
        del name
    print(f"recall {found_total}/{truth_total} = {found_total / truth_total:.3f}")
    assert found_total / truth_total >= 0.95, (found_total, truth_total)


def test_two_targets_that_fit_equally_are_never_guessed():
    source = {"a.weight": torch.zeros(4, 4), "b.bias": torch.zeros(4)}
    target = {"x.weight": [4, 4], "y.weight": [4, 4], "b.bias": [4]}
    found = suggest(source, target)
    assert "a.weight" not in found.mapping and found.mapping == {"b.bias": "b.bias"}
    (u,) = found.unresolved
    assert u.keys == ["a.weight"] and u.side == "source"
    assert sorted(c.split(" (")[0] for c in u.candidates) == ["x.weight", "y.weight"]
    assert not found.ok
    # a hint the user gives settles it
    hinted = suggest(source, target, hints=["a -> y"])
    assert hinted.mapping == {"a.weight": "y.weight", "b.bias": "b.bias"} and hinted.ok
    assert 'rename "a" -> "y"' in hinted.to_text() and "your hint" in hinted.to_text()


def test_a_shift_among_identical_entries_is_not_guessed():
    """Four identical layers become five: which one is new cannot be told from shapes."""
    src = {f"layers.{i}.w": [4, 4] for i in range(4)}
    tgt = {f"layers.{i}.w": [4, 4] for i in range(5)}
    found = suggest(src, tgt)
    assert all(found.mapping.get(k, k) == k for k in src)  # same names stay, nothing shifted
    assert any("ambiguous" in n for n in found.notes) or found.unresolved or found.plan.ok


def test_json_and_evidence():
    found = suggest(wrapped(ResNet(10)), ResNet(12))
    doc = json.loads(found.to_json())
    assert [r["rule"] for r in doc["rules"]] == ['strip "module."', 'init "fc"']
    assert "DataParallel" in doc["rules"][0]["evidence"]
    assert "fc.weight [10, 64] vs [12, 64]" in doc["rules"][1]["evidence"]
    assert doc["plan"]["ok"] and doc["unresolved"] == []
    assert doc["mapping"]["module.conv1.weight"] == "conv1.weight"


def test_bad_arguments_are_usage_errors():
    with pytest.raises(ckptmap.UsageError):
        suggest({"a": [1]}, {"a": [1]}, hints=["no arrow"])
    with pytest.raises(ckptmap.UsageError):
        suggest(42, {"a": [1]})


def test_cli_suggest_end_to_end(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    save_file(HFLlama().state_dict(), tmp_path / "hf.safetensors")
    (tmp_path / "titan.json").write_text(
        json.dumps({k: list(v.shape) for k, v in TitanLlama().state_dict().items()})
    )
    result = runner.invoke(app, ["suggest", "-s", "hf.safetensors", "-t", "titan.json"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("ckptmap 1\n")
    assert 'rename "layers.{i}.mlp.gate_proj" -> "layers.{i}.feed_forward.w1"' in result.stdout
    result = runner.invoke(
        app, ["suggest", "-s", "hf.safetensors", "-t", "titan.json", "-o", "rules.ckmap"]
    )
    assert result.exit_code == 0 and "wrote rules.ckmap" in result.output
    assert "12 rules; the plan: 21 loaded" in result.output
    result = runner.invoke(app, ["plan", "rules.ckmap", "-s", "hf.safetensors", "-t", "titan.json"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(
        app, ["suggest", "-s", "hf.safetensors", "-t", "titan.json", "-o", "rules.ckmap"]
    )
    assert result.exit_code == 2 and "CKM533" in result.output  # never over a file
    result = runner.invoke(
        app, ["suggest", "-s", "hf.safetensors", "-t", "titan.json", "-o", "hf.safetensors"]
    )
    assert result.exit_code == 2 and "refusing to write over the source" in result.output
    result = runner.invoke(app, ["suggest", "-s", "hf.safetensors", "-t", "titan.json", "--json"])
    assert json.loads(result.stdout)["plan"]["ok"]
    save_file({"x.weight": torch.zeros(4, 4)}, tmp_path / "x.safetensors")
    (tmp_path / "two.json").write_text(json.dumps({"p.weight": [4, 4], "q.weight": [4, 4]}))
    result = runner.invoke(app, ["suggest", "-s", "x.safetensors", "-t", "two.json"])
    assert result.exit_code == 1 and "# unresolved: source x.weight" in result.stdout


def test_revision_autogenerate_writes_the_step_from_suggest(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    save_file(HFLlama().state_dict(), tmp_path / "hf.safetensors")
    (tmp_path / "titan.json").write_text(
        json.dumps({k: list(v.shape) for k, v in TitanLlama().state_dict().items()})
    )
    assert (
        runner.invoke(app, ["revision", "mig", "-m", "hf", "--base", "hf.safetensors"]).exit_code
        == 0
    )
    result = runner.invoke(
        app, ["revision", "mig", "-m", "torchtitan names", "--autogenerate", "-t", "titan.json"]
    )
    assert result.exit_code == 0, result.output
    step = (tmp_path / "mig" / "0002-torchtitan-names.ckmap").read_text()
    assert 'revision "0002-torchtitan-names" from "0001-hf"' in step
    assert 'rename "layers.{i}.mlp.gate_proj" -> "layers.{i}.feed_forward.w1"' in step
    assert "# 20 of 21 source keys start with model." in step  # the evidence, as comments
    assert runner.invoke(app, ["check", "mig"]).exit_code == 0
    result = runner.invoke(
        app, ["upgrade", "hf.safetensors", "--history", "mig", "-o", "t.safetensors"]
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["revision", "mig", "-m", "x", "--autogenerate"])
    assert result.exit_code == 2 and "--autogenerate writes the step" in result.output


def test_cli_suggest_golden(tmp_path, monkeypatch, golden):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    save_model(HFGPT2(), str(tmp_path / "gpt2.safetensors"))  # the tied head stored once
    (tmp_path / "linear.json").write_text(
        json.dumps({k: list(v.shape) for k, v in LinearGPT2().state_dict().items()})
    )
    result = runner.invoke(app, ["suggest", "-s", "gpt2.safetensors", "-t", "linear.json"])
    assert result.exit_code == 0, result.output
    golden("cli_suggest.txt", result.output)


def _shapes(**groups):
    return {k: torch.zeros(v) if isinstance(v, tuple) else v for k, v in groups.items()}


HOSTILE = [  # (what, source, target, every mapping allowed): nothing else may be emitted
    (
        "a lone same-shape target with unrelated names",
        {"x.weight": [8, 8]},
        {"totally_new_thing.weight": [8, 8]},
        {},
    ),
    (
        "an integer counter onto a float of the same shape",
        {"bn.num_batches_tracked": torch.zeros((), dtype=torch.int64)},
        {"logit_scale": torch.zeros(())},
        {},
    ),
    (
        "sizes that add up by chance are no fused tensor",
        {
            f"blocks.{i}.adapter.{x}.weight": [16, 16]
            for i in range(2)
            for x in ("down", "mid", "up2")
        }
        | {f"blocks.{i}.fc.weight": [16, 16] for i in range(2)},
        {f"blocks.{i}.fc.weight": [16, 16] for i in range(2)}
        | {f"blocks.{i}.router.weight": [48, 16] for i in range(2)},
        {f"blocks.{i}.fc.weight": f"blocks.{i}.fc.weight" for i in range(2)},
    ),
    (
        "self- and cross-attention pieces are not one fused tensor",
        {
            f"layers.0.{m}.{p}_proj.weight": [8, 8]
            for m in ("self_attn", "encoder_attn")
            for p in "qkv"
        },
        {
            "layers.0.self_attn.qkv.weight": [24, 8],
            "layers.0.cross_attn.q.weight": [8, 8],
            "layers.0.cross_attn.kv.weight": [16, 8],
        },
        {f"layers.0.self_attn.{p}_proj.weight": "layers.0.self_attn.qkv.weight" for p in "qkv"},
    ),
    (
        "a stack needs its names to say so",
        {f"blocks.{i}.ls1.gamma": [16] for i in range(4)},
        {"register_tokens": [4, 16]},
        {},
    ),
    (
        "three decoder norms, no synonym to tell them",
        {f"layers.0.norm{i}.weight": [8] for i in (1, 2, 3)},
        {
            f"layers.0.{n}.weight": [8]
            for n in ("attention_norm", "cross_attention_norm", "ffn_norm")
        },
        {},
    ),
    (
        "w1, w2, w3 outside Meta's feed_forward mean nothing",
        {"ffn.w1.weight": [32, 16], "ffn.w2.weight": [32, 16], "ffn.w3.weight": [16, 32]},
        {
            "mlp.gate_proj.weight": [32, 16],
            "mlp.up_proj.weight": [32, 16],
            "mlp.down_proj.weight": [16, 32],
        },
        {"ffn.w3.weight": "mlp.down_proj.weight"},
    ),
    (
        "two towers meet the target alike: no wrapper is guessed",
        {f"{t}.layers.{i}.fc.weight": [16, 16] for t in ("encoder", "decoder") for i in range(2)},
        {f"layers.{i}.fc.weight": [16, 16] for i in range(2)},
        {},
    ),
    (
        "an entry removed among entries alike",
        {"features.0.weight": [8, 8], "features.1.weight": [8, 8], "features.2.weight": [16, 8]},
        {"features.0.weight": [8, 8], "features.1.weight": [16, 8]},
        {},
    ),
    (
        "a rename that starts with a number moves only what it should",
        {"0.conv.weight": [4, 4], "1.conv.weight": [4, 4]},
        {"0.conv2d.weight": [4, 4], "1.conv.weight": [4, 4]},
        {"0.conv.weight": "0.conv2d.weight", "1.conv.weight": "1.conv.weight"},
    ),
    (
        "four layers onto two: unresolved, not skipped and initialized",
        {f"transformer.h.{i}.mlp.c_fc.weight": [8, 4] for i in range(4)},
        {f"blocks.{i}.mlp.fc1.weight": [8, 4] for i in range(2)},
        {},
    ),
]


@pytest.mark.parametrize(
    ("what", "source", "target", "allowed"), HOSTILE, ids=[h[0] for h in HOSTILE]
)
def test_suggest_never_emits_a_mapping_it_cannot_stand_behind(what, source, target, allowed):
    for order in (1, -1):  # and the same whatever order the keys come in
        src = dict(list(source.items())[::order])
        found = suggest(src, target)
        wrong = {k: v for k, v in found.mapping.items() if allowed.get(k) != v}
        assert not wrong, f"{what}: {wrong}\n{found.to_text()}"
        assert ckptmap.parse(found.to_text()) == found.rules


def test_a_square_weight_beside_transposed_ones_is_not_guessed():
    src = {
        "h.0.attn.c_attn.weight": [16, 48],
        "h.0.mlp.c_fc.weight": [16, 64],
        "h.0.adapter.weight": [16, 16],
    }
    tgt = {
        "h.0.attn.c_attn.weight": [48, 16],
        "h.0.mlp.c_fc.weight": [64, 16],
        "h.0.adapter.weight": [16, 16],
    }
    found = suggest(src, tgt)
    assert "h.0.adapter.weight" not in found.mapping and not found.ok
    assert not any("adapter" in s.statement.to_text() for s in found.suggested)


def test_names_that_would_collide_and_odd_keys():
    with pytest.raises(ckptmap.UsageError, match="makes one name of"):
        suggest({"a.x": [1], "b.x": [1]}, {"x": [1]}, hints=['/[ab]\\.(.*)/ -> "{1}"'])
    with pytest.raises(ckptmap.UsageError, match="matches no source key"):
        suggest({"a.x": [1]}, {"b.x": [1]}, hints=["zzz -> y"])
    with pytest.raises(ckptmap.UsageError, match="is no rename"):
        suggest({"a.x": [1]}, {"b.x": [1]}, hints=['a -> "b'])
    odd = {'enc\nfreeze "b"\n#.weight': [4], "head.weight": [2]}
    found = suggest(odd, {"encoder.weight": [4], "head.weight": [2]})
    assert ckptmap.parse(found.to_text()) == found.rules  # a key's line break stays escaped
    assert not any(type(r).__name__ == "Freeze" for r in ckptmap.parse(found.to_text()).rules)
