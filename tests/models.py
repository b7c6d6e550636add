"""Small models with the real ecosystems' key names, built in tests (no downloads)."""

from __future__ import annotations

import torch
from torch import nn

from ckptmap.demo import BasicBlock, ResNet

__all__ = [
    "BasicBlock",
    "GPT2LMHead",
    "HFLlama",
    "MyLlama",
    "ResNet",
    "StagedResNet",
    "WithBuffers",
]


class StagedResNet(nn.Module):
    """The same network after a refactor: `stem`, `stages.{i}.blocks.{j}`, `head`."""

    def __init__(self, num_classes: int = 1000, width: int = 8):
        super().__init__()
        ref = ResNet(num_classes, width)
        self.stem = nn.Sequential(ref.conv1, ref.bn1, nn.ReLU())
        self.stages = nn.ModuleDict({str(i): nn.Module() for i in range(1, 5)})
        for i in range(1, 5):
            self.stages[str(i)].blocks = getattr(ref, f"layer{i}")
        self.head = ref.fc

    def forward(self, x):
        x = self.stem(x)
        for i in range(1, 5):
            x = self.stages[str(i)].blocks(x)
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class GPT2Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = nn.Module()
        self.attn.c_attn = nn.Linear(d, 3 * d)
        self.attn.c_proj = nn.Linear(d, d)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = nn.Module()
        self.mlp.c_fc = nn.Linear(d, 4 * d)
        self.mlp.c_proj = nn.Linear(4 * d, d)


class GPT2LMHead(nn.Module):
    """Hugging Face GPT-2 names: transformer.wte/wpe/h.{i}/ln_f, and lm_head tied to wte."""

    def __init__(self, vocab: int = 50, d: int = 16, layers: int = 2, positions: int = 32):
        super().__init__()
        self.transformer = nn.Module()
        self.transformer.wte = nn.Embedding(vocab, d)
        self.transformer.wpe = nn.Embedding(positions, d)
        self.transformer.h = nn.ModuleList(GPT2Block(d) for _ in range(layers))
        self.transformer.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied


class WithBuffers(nn.Module):
    """A persistent and a non-persistent buffer beside a parameter."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.register_buffer("scale", torch.ones(4))
        self.register_buffer("cache", torch.zeros(4), persistent=False)


def _rope(x: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in Hugging Face's layout (rotate_half), the same in both models."""
    _, _, t, d = x.shape
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    freqs = torch.outer(torch.arange(t).float(), inv)
    cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def _llama_layer(x, norm1, q, k, v, o, norm2, gate, up, down, heads):
    b, t, d = x.shape
    h = norm1(x)

    def split(z):
        return z.view(b, t, heads, d // heads).transpose(1, 2)

    att = nn.functional.scaled_dot_product_attention(
        _rope(split(q(h))), _rope(split(k(h))), split(v(h)), is_causal=True
    )
    x = x + o(att.transpose(1, 2).reshape(b, t, d))
    h = norm2(x)
    return x + down(nn.functional.silu(gate(h)) * up(h))


class HFLlama(nn.Module):
    """Hugging Face LlamaForCausalLM names: model.embed_tokens, model.layers.{i}.self_attn.q_proj…"""

    def __init__(self, vocab=64, d=32, layers=2, heads=4, hidden=48):
        super().__init__()
        self.heads = heads
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(vocab, d)
        self.model.layers = nn.ModuleList()
        for _ in range(layers):
            layer = nn.Module()
            layer.self_attn = nn.Module()
            for p in "qkvo":
                setattr(layer.self_attn, f"{p}_proj", nn.Linear(d, d, bias=False))
            layer.mlp = nn.Module()
            layer.mlp.gate_proj = nn.Linear(d, hidden, bias=False)
            layer.mlp.up_proj = nn.Linear(d, hidden, bias=False)
            layer.mlp.down_proj = nn.Linear(hidden, d, bias=False)
            layer.input_layernorm = nn.RMSNorm(d)
            layer.post_attention_layernorm = nn.RMSNorm(d)
            self.model.layers.append(layer)
        self.model.norm = nn.RMSNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        x = self.model.embed_tokens(ids)
        for L in self.model.layers:
            a, m = L.self_attn, L.mlp
            x = _llama_layer(
                x,
                L.input_layernorm,
                a.q_proj,
                a.k_proj,
                a.v_proj,
                a.o_proj,
                L.post_attention_layernorm,
                m.gate_proj,
                m.up_proj,
                m.down_proj,
                self.heads,
            )
        return self.lm_head(self.model.norm(x))


class MyLlama(nn.Module):
    """The same network written by someone else: tok_emb, blocks.{i}.attn.q, mlp.gate, head."""

    def __init__(self, vocab=64, d=32, layers=2, heads=4, hidden=48):
        super().__init__()
        self.heads = heads
        self.tok_emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList()
        for _ in range(layers):
            block = nn.Module()
            block.attn = nn.Module()
            for p in "qkvo":
                setattr(block.attn, p, nn.Linear(d, d, bias=False))
            block.mlp = nn.Module()
            block.mlp.gate = nn.Linear(d, hidden, bias=False)
            block.mlp.up = nn.Linear(d, hidden, bias=False)
            block.mlp.down = nn.Linear(hidden, d, bias=False)
            block.norm1 = nn.RMSNorm(d)
            block.norm2 = nn.RMSNorm(d)
            self.blocks.append(block)
        self.norm = nn.RMSNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        x = self.tok_emb(ids)
        for B in self.blocks:
            a, m = B.attn, B.mlp
            x = _llama_layer(
                x, B.norm1, a.q, a.k, a.v, a.o, B.norm2, m.gate, m.up, m.down, self.heads
            )
        return self.head(self.norm(x))
