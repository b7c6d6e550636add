"""Small models with the real ecosystems' key names, built in tests (no downloads)."""

from __future__ import annotations

import torch
from torch import nn

from ckptmap.demo import BasicBlock, ResNet

__all__ = ["BasicBlock", "GPT2LMHead", "ResNet", "StagedResNet", "WithBuffers"]


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
