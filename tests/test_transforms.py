"""Tensor transforms: real conversions checked numerically, plan-time validation, reversal."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from models import HFGPT2, GQAModel, LinearGPT2, MoE, ResNet, TinyViT

import ckptmap
from ckptmap.plan import TensorMeta

RULES = Path(__file__).resolve().parents[1] / "rules"


def rules(name: str) -> Path:
    return RULES / name


# --- real conversions ------------------------------------------------------------------------


def test_gpt2_conv1d_into_linear_with_separate_qkv():
    torch.manual_seed(0)
    hf = HFGPT2().eval()
    sd = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}  # as HF ships it
    mine = LinearGPT2().eval()
    report = ckptmap.load_into(mine, sd, rules("gpt2-conv1d-to-linear.ckmap"))
    assert not report.missing and not report.unexpected
    ids = torch.randint(0, 50, (2, 12))
    torch.testing.assert_close(mine(ids), hf(ids))
    assert torch.equal(
        mine.transformer.h[1].attn.k.weight, hf.transformer.h[1].attn.c_attn.weight[:, 16:32].T
    )


def test_gqa_separate_qkv_fuse_and_back():
    torch.manual_seed(0)
    separate = GQAModel(fused=False).eval()
    fused = GQAModel(fused=True).eval()
    sd = separate.state_dict()
    ckptmap.load_into(fused, sd, rules("qkv-fuse.ckmap"))
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(fused(x), separate(x))
    assert fused.model.layers[0].self_attn.qkv_proj.weight.shape == (32 + 2 * 16, 32)

    plan = ckptmap.compile(rules("qkv-fuse.ckmap")).plan(sd, fused)
    back = plan.inverse().apply(fused.state_dict())
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_gqa_fuse_loaded_from_a_file(tmp_path):
    """From a safetensors file, q, k and v are read straight into the fused weight."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    separate = GQAModel(fused=False).eval()
    path = tmp_path / "separate.safetensors"
    save_file(separate.state_dict(), path)
    fused = GQAModel(fused=True).eval()
    report = ckptmap.load_into(fused, path, rules("qkv-fuse.ckmap"))
    assert not report.missing and not report.unexpected
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(fused(x), separate(x))


def test_moe_experts_stacked_and_unstacked():
    torch.manual_seed(0)
    per_expert = MoE(stacked=False).eval()
    sd = {f"moe.{k}": v for k, v in per_expert.state_dict().items()}
    plan = ckptmap.compile(rules("moe-stack-experts.ckmap")).plan(sd)
    stacked_sd = {k.removeprefix("moe."): v for k, v in plan.apply(sd).items()}
    stacked = MoE(stacked=True).eval()
    stacked.load_state_dict(stacked_sd)
    x = torch.randn(3, 8)
    torch.testing.assert_close(stacked(x), per_expert(x))

    unstack = ckptmap.compile(
        'split "moe.w{n}" -> "moe.experts.{e}.w{n}.weight" | unstack(0)'
    ).plan({f"moe.{k}": v for k, v in stacked_sd.items()})
    again = unstack.apply({f"moe.{k}": v for k, v in stacked_sd.items()})
    assert again.keys() == sd.keys()  # moe.gate.weight passes through
    assert all(torch.equal(again[k], sd[k]) for k in again)


def reference_resize(posemb: torch.Tensor, new: int, prefix: int = 1) -> torch.Tensor:
    """timm's resample_abs_pos_embed, written out for the comparison."""
    head, body = posemb[:, :prefix], posemb[:, prefix:]
    old = int(math.sqrt(body.shape[1]))
    dim = body.shape[-1]
    img = body.reshape(1, old, old, dim).permute(0, 3, 1, 2)
    img = F.interpolate(img, size=(new, new), mode="bicubic", antialias=True, align_corners=False)
    return torch.cat([head, img.permute(0, 2, 3, 1).reshape(1, -1, dim)], 1)


def test_vit_position_embedding_14_to_16():
    torch.manual_seed(0)
    vit14 = TinyViT(grid=14)
    vit16 = TinyViT(grid=16)
    report = ckptmap.load_into(vit16, vit14.state_dict(), rules("vit-pos-embed-224-to-256.ckmap"))
    assert not report.mismatched
    assert vit16.pos_embed.shape == (1, 257, 8)
    assert torch.equal(vit16.pos_embed[:, :1], vit14.pos_embed[:, :1])  # cls token kept
    torch.testing.assert_close(vit16.pos_embed, reference_resize(vit14.pos_embed.detach(), 16))
    vit16(torch.randn(1, 3, 32, 32))  # the model runs at the new resolution


def test_rgb_stem_to_grayscale():
    torch.manual_seed(0)
    rgb = ResNet(10).eval()
    gray = ResNet(10).eval()
    gray.conv1 = torch.nn.Conv2d(1, 8, 7, 2, 3, bias=False)
    ckptmap.load_into(gray, rgb.state_dict(), rules("stem-grayscale.ckmap"))
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(gray(x), rgb(x.repeat(1, 3, 1, 1)), rtol=1e-4, atol=1e-5)


def test_head_1000_to_10_selected_classes():
    torch.manual_seed(0)
    big = ResNet(1000).eval()
    small = ResNet(10).eval()
    ckptmap.load_into(small, big.state_dict(), rules("head-select-classes.ckmap"))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(small(x), big(x)[:, :10])
    # any classes, in any order
    chosen = [999, 0, 512, 7]
    small4 = ResNet(4).eval()
    ckptmap.load_into(small4, big.state_dict(), f'transform "fc" | select(0, {chosen})')
    torch.testing.assert_close(small4(x), big(x)[:, chosen])


def meta_to_hf_reference(w: torch.Tensor, heads: int) -> torch.Tensor:
    """The permutation in Hugging Face's convert_llama_weights_to_hf.py."""
    dim1, dim2 = w.shape
    return w.view(heads, dim1 // heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def test_rope_layout_meta_to_hf_matches_the_reference():
    torch.manual_seed(0)
    dim, heads, kv_heads, hd = 64, 32, 8, 2
    meta = {
        "tok_embeddings.weight": torch.randn(10, dim),
        "layers.0.attention.wq.weight": torch.randn(dim, dim),
        "layers.0.attention.wk.weight": torch.randn(kv_heads * hd, dim),
        "layers.0.attention.wv.weight": torch.randn(kv_heads * hd, dim),
        "layers.0.attention.wo.weight": torch.randn(dim, dim),
        "layers.0.feed_forward.w1.weight": torch.randn(96, dim),
        "layers.0.feed_forward.w2.weight": torch.randn(dim, 96),
        "layers.0.feed_forward.w3.weight": torch.randn(96, dim),
        "layers.0.attention_norm.weight": torch.randn(dim),
        "layers.0.ffn_norm.weight": torch.randn(dim),
        "norm.weight": torch.randn(dim),
        "output.weight": torch.randn(10, dim),
        "rope.freqs": torch.randn(hd // 2),
    }
    plan = ckptmap.compile(rules("llama3-8b-meta-to-hf.ckmap")).plan(meta)
    assert plan.ok and not plan.unused_rules
    hf = plan.apply(meta)
    assert torch.equal(
        hf["model.layers.0.self_attn.q_proj.weight"],
        meta_to_hf_reference(meta["layers.0.attention.wq.weight"], heads),
    )
    assert torch.equal(
        hf["model.layers.0.self_attn.k_proj.weight"],
        meta_to_hf_reference(meta["layers.0.attention.wk.weight"], kv_heads),
    )
    assert torch.equal(
        hf["model.layers.0.self_attn.v_proj.weight"], meta["layers.0.attention.wv.weight"]
    )
    assert "lm_head.weight" in hf and "rope.freqs" not in hf
    with pytest.raises(ckptmap.PlanError, match=r"rope\.freqs cannot be restored"):
        plan.inverse()
    back = plan.inverse(allow_lossy=True).apply(hf)
    assert all(torch.equal(back[k], v) for k, v in meta.items() if k != "rope.freqs")


def test_bf16_cast_and_lossy_reversal():
    torch.manual_seed(0)
    model = LinearGPT2()
    sd = model.state_dict()
    plan = ckptmap.compile('transform "**" | cast(bfloat16)').plan(sd)
    out = plan.apply(sd)
    want = model.to(torch.bfloat16).state_dict()
    assert all(out[k].dtype == torch.bfloat16 and torch.equal(out[k], want[k]) for k in want)
    with pytest.raises(ckptmap.PlanError) as info:
        plan.inverse()
    assert "cast float32 -> bfloat16 narrows" in str(info.value)
    approx = plan.inverse(allow_lossy=True).apply(out)
    assert all(approx[k].dtype == torch.float32 for k in approx)
    # widening is exact, but its way back narrows what the wider values came to hold
    widen = ckptmap.compile('transform "**" | cast(float32)').plan(out)
    with pytest.raises(ckptmap.PlanError, match="the way back narrows to bfloat16"):
        widen.inverse()
    back = widen.inverse(allow_lossy=True).apply(widen.apply(out))
    assert all(torch.equal(back[k], out[k]) and back[k].dtype == torch.bfloat16 for k in out)


# --- plan-time validation ------------------------------------------------------------------------


def test_transform_shape_mismatch_is_found_before_reading_any_tensor(tmp_path):
    from safetensors.torch import save_file

    from ckptmap.io import open_checkpoint

    source = tmp_path / "gpt2.safetensors"
    save_file(
        {k: v.contiguous() for k, v in HFGPT2().state_dict().items() if k != "lm_head.weight"},
        source,
    )
    ckpt = open_checkpoint(source)
    ckpt.get = lambda name: pytest.fail(f"read {name} during planning")
    # forgetting the transpose: c_proj stays [in, out] for mlp, which the target rejects
    wrong = (
        'split "transformer.h.{i}.attn.c_attn.weight" -> "transformer.h.{i}.attn.q.weight", '
        '"transformer.h.{i}.attn.k.weight", "transformer.h.{i}.attn.v.weight" | split(3, 1)\n'
        'split "transformer.h.{i}.attn.c_attn.bias" -> "transformer.h.{i}.attn.q.bias", '
        '"transformer.h.{i}.attn.k.bias", "transformer.h.{i}.attn.v.bias" | split(3, 0)\n'
    )
    plan = ckptmap.compile(wrong).plan(ckpt, LinearGPT2())
    mismatches = [p.message for p in plan.problems if p.kind == "mismatch"]
    assert (
        "transformer.h.0.mlp.c_fc.weight [16, 64] -> transformer.h.0.mlp.c_fc.weight expects [64, 16]"
        in "\n".join(mismatches)
    )
    bad_op = ckptmap.compile('transform "transformer.wte.weight" | reshape([7, -1])').plan(ckpt)
    assert [p.code for p in bad_op.problems] == ["CKM306"]
    assert "[50, 16]" in bad_op.problems[0].message


def test_merge_with_a_missing_member_names_it():
    sd = {"l.0.q": (4, 4), "l.0.k": (2, 4), "l.0.v": (2, 4), "l.1.q": (4, 4), "l.1.k": (2, 4)}
    plan = ckptmap.compile('merge "l.{i}.q", "l.{i}.k", "l.{i}.v" -> "l.{i}.qkv" | cat(0)').plan(
        {k: TensorMeta(v) for k, v in sd.items()}
    )
    (problem,) = plan.problems
    assert problem.code == "CKM307"
    assert 'for {i}=1: nothing matches "l.{i}.v"' in problem.message


# --- the round-trip property -------------------------------------------------------------------


@st.composite
def invertible_case(draw):
    """A source tensor, a shape, and rules made of invertible ops only."""
    rank = draw(st.integers(1, 3))
    shape = [draw(st.integers(1, 4)) * 2 for _ in range(rank)]
    source_dtype = draw(st.sampled_from(["float32", "float16", "bfloat16", "int32"]))
    ops, cur = [], list(shape)
    for _ in range(draw(st.integers(1, 4))):
        choice = draw(
            st.sampled_from(["transpose", "permute", "reshape", "pad", "rope", "select_all"])
        )
        n = len(cur)
        if choice == "transpose":
            a, b = draw(st.integers(0, n - 1)), draw(st.integers(0, n - 1))
            ops.append(f"transpose({a}, {b})")
            cur[a], cur[b] = cur[b], cur[a]
        elif choice == "permute":
            order = draw(st.permutations(range(n)))
            ops.append(f"permute({', '.join(map(str, order))})")
            cur = [cur[i] for i in order]
        elif choice == "reshape":
            ops.append(f"reshape([{math.prod(cur)}])")
            cur = [math.prod(cur)]
        elif choice == "pad":
            d, before, after = (
                draw(st.integers(0, n - 1)),
                0,
                0,
            )  # padding that adds rows is lossy on the way back (a test below)
            ops.append(f"pad({d}, {before}, {after})")
            cur[d] += before + after
        elif choice == "rope" and n <= 2 and cur[0] % 2 == 0:
            ops.append(
                f"rope_permute({draw(st.sampled_from([d for d in (1, 2) if cur[0] % (2 * d) == 0]))})"
            )
        elif choice == "select_all":
            order = draw(st.permutations(range(cur[0])))
            ops.append(f"select(0, [{', '.join(map(str, order))}])")
    return shape, source_dtype, ops


@given(invertible_case(), st.integers(1, 3))
@settings(max_examples=150, deadline=None)
def test_inverse_restores_the_source_bit_for_bit(case, layers):
    shape, dtype, ops = case
    gen = torch.Generator().manual_seed(len(ops) * 7 + layers)
    sd = {}
    for i in range(layers):
        base = torch.randn(*shape, generator=gen) * 100
        sd[f"layers.{i}.w"] = base.to(getattr(torch, dtype))
        sd[f"layers.{i}.q"] = torch.randn(4, shape[-1], generator=gen).to(getattr(torch, dtype))
        sd[f"layers.{i}.k"] = torch.randn(2, shape[-1], generator=gen).to(getattr(torch, dtype))
        sd[f"experts.{i}.w"] = torch.randn(3, 2, generator=gen).to(getattr(torch, dtype))
    text = f'transform "layers.{{i}}.w" | {" | ".join(ops)}\n' if ops else ""
    text += 'merge "layers.{i}.q", "layers.{i}.k" -> "layers.{i}.qk" | cat(0)\n'
    text += 'merge "experts.{e}.w" -> "experts.w" | stack(0) | transpose(0, 1)\n'
    text += 'rename "layers" -> "blocks"\n'
    plan = ckptmap.compile(text).plan(sd)
    assert plan.ok, [p.message for p in plan.problems]
    out = plan.apply(sd)
    back = plan.inverse().apply(out)
    assert back.keys() == sd.keys()
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        raw = back[k].contiguous().view(-1).view(torch.uint8)
        assert torch.equal(raw, v.contiguous().view(-1).view(torch.uint8)), k


def test_a_source_split_into_pieces_some_dropped_cannot_be_restored():
    sd = {"qkv": torch.randn(6, 2), "w": torch.randn(2)}
    plan = ckptmap.compile('split "qkv" -> "q", "k", "v" | split(3, 0)\ninit "v"').plan(sd)
    with pytest.raises(ckptmap.PlanError) as info:
        plan.inverse()
    assert "qkv cannot be restored: not everything made from it is in the output" in str(info.value)
    partial = plan.inverse(allow_lossy=True)
    assert [o.target for o in partial.outputs] == ["w"]


def test_reversing_pad_refuses_to_drop_the_added_rows():
    """The padded rows may have been trained: cutting them off is a loss, said, not silent."""
    sd = {"head.bias": torch.arange(10.0)}
    plan = ckptmap.compile('transform "head.bias" | pad(0, 0, 2)').plan(sd)
    with pytest.raises(ckptmap.PlanError) as e:
        plan.inverse()
    assert e.value.code == "CKM308"
    assert "pad's added rows would be dropped" in str(e.value)
    out = plan.apply(sd)
    out["head.bias"][10:] = 5.0  # fine-tuned rows
    back = plan.inverse(allow_lossy=True)
    assert [p.kind for p in back.problems] == ["lossy"]
    assert torch.equal(back.apply(out)["head.bias"], torch.arange(10.0))
    assert ckptmap.compile('transform "head.bias" | pad(0, 0, 0)').plan(sd).inverse().ok


def test_select_takes_indices_from_the_end_as_infer_allows():
    sd = {"w": torch.arange(6.0).reshape(3, 2)}
    got = ckptmap.migrate(sd, 'transform "w" | select(0, [-1, 0, 2])')[0]["w"]
    assert torch.equal(got, sd["w"][[2, 0, 2]])
