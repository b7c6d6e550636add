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
    "NanoGPT",
    "ResNet",
    "StagedResNet",
    "TinyBert",
    "TitanLlama",
    "WithBuffers",
    "wrapped",
]


def wrapped(model_or_state: nn.Module | dict, prefix: str = "module.") -> dict[str, torch.Tensor]:
    """A state_dict as DataParallel / DDP (`module.`) or torch.compile (`_orig_mod.`) saves it."""
    sd = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    return {f"{prefix}{k}": v for k, v in sd.items()}


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


# --- models for the conversion recipes (tensor transforms) -----------------------------------


class Conv1D(nn.Module):
    """Hugging Face GPT-2's Conv1D: a linear layer whose weight is stored [in, out]."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.02)
        self.bias = nn.Parameter(torch.randn(nf) * 0.02)

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(
            *x.shape[:-1], -1
        )


def _gpt2_forward(model, ids, attn, mlp):
    t = ids.shape[1]
    x = model.transformer.wte(ids) + model.transformer.wpe(torch.arange(t))
    for block in model.transformer.h:
        x = x + attn(block, block.ln_1(x))
        x = x + mlp(block, block.ln_2(x))
    return model.lm_head(model.transformer.ln_f(x))


def _causal(q, k, v, heads):
    b, t, d = q.shape

    def split(z):
        return z.view(b, t, heads, d // heads).transpose(1, 2)

    out = nn.functional.scaled_dot_product_attention(split(q), split(k), split(v), is_causal=True)
    return out.transpose(1, 2).reshape(b, t, d)


def _gpt2_skeleton(model, vocab, d, layers, positions, heads, make_block):
    """Embeddings, blocks with ln_1/ln_2 (attention and MLP from make_block), ln_f, tied head."""
    model.heads = heads
    model.transformer = nn.Module()
    model.transformer.wte = nn.Embedding(vocab, d)
    model.transformer.wpe = nn.Embedding(positions, d)
    model.transformer.h = nn.ModuleList()
    for _ in range(layers):
        block = nn.Module()
        block.ln_1, block.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        block.attn, block.mlp = nn.Module(), nn.Module()
        make_block(block, d)
        model.transformer.h.append(block)
    model.transformer.ln_f = nn.LayerNorm(d)
    model.lm_head = nn.Linear(d, vocab, bias=False)
    model.lm_head.weight = model.transformer.wte.weight


class HFGPT2(nn.Module):
    """Hugging Face GPT2LMHeadModel layout: Conv1D c_attn (q, k, v fused), c_proj, c_fc."""

    def __init__(self, vocab=50, d=16, layers=2, heads=4, positions=32):
        super().__init__()

        def block(b, d):
            b.attn.c_attn, b.attn.c_proj = Conv1D(3 * d, d), Conv1D(d, d)
            b.mlp.c_fc, b.mlp.c_proj = Conv1D(4 * d, d), Conv1D(d, 4 * d)

        _gpt2_skeleton(self, vocab, d, layers, positions, heads, block)

    def forward(self, ids):
        def attn(block, h):
            q, k, v = block.attn.c_attn(h).split(h.shape[-1], -1)
            return block.attn.c_proj(_causal(q, k, v, self.heads))

        def mlp(block, h):
            return block.mlp.c_proj(nn.functional.gelu(block.mlp.c_fc(h)))

        return _gpt2_forward(self, ids, attn, mlp)


class LinearGPT2(nn.Module):
    """The same network with nn.Linear everywhere and separate q, k, v projections."""

    def __init__(self, vocab=50, d=16, layers=2, heads=4, positions=32):
        super().__init__()

        def block(b, d):
            b.attn.q, b.attn.k, b.attn.v = (nn.Linear(d, d) for _ in range(3))
            b.attn.c_proj = nn.Linear(d, d)
            b.mlp.c_fc, b.mlp.c_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

        _gpt2_skeleton(self, vocab, d, layers, positions, heads, block)

    def forward(self, ids):
        def attn(block, h):
            a = block.attn
            return a.c_proj(_causal(a.q(h), a.k(h), a.v(h), self.heads))

        def mlp(block, h):
            return block.mlp.c_proj(nn.functional.gelu(block.mlp.c_fc(h)))

        return _gpt2_forward(self, ids, attn, mlp)


class GQAAttention(nn.Module):
    """Grouped-query attention with Hugging Face names, q/k/v separate or fused into qkv_proj."""

    def __init__(self, d=32, heads=4, kv_heads=2, fused=False):
        super().__init__()
        self.heads, self.kv_heads, self.fused = heads, kv_heads, fused
        self.kv = d // heads * kv_heads
        if fused:
            self.qkv_proj = nn.Linear(d, d + 2 * self.kv, bias=False)
        else:
            self.q_proj = nn.Linear(d, d, bias=False)
            self.k_proj = nn.Linear(d, self.kv, bias=False)
            self.v_proj = nn.Linear(d, self.kv, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x):
        b, t, d = x.shape
        if self.fused:
            q, k, v = self.qkv_proj(x).split([d, self.kv, self.kv], -1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        hd = d // self.heads
        q = q.view(b, t, self.heads, hd).transpose(1, 2)
        k = (
            k.view(b, t, self.kv_heads, hd)
            .transpose(1, 2)
            .repeat_interleave(self.heads // self.kv_heads, 1)
        )
        v = (
            v.view(b, t, self.kv_heads, hd)
            .transpose(1, 2)
            .repeat_interleave(self.heads // self.kv_heads, 1)
        )
        out = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, d))


class GQAModel(nn.Module):
    def __init__(self, layers=2, fused=False):
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList()
        for _ in range(layers):
            layer = nn.Module()
            layer.self_attn = GQAAttention(fused=fused)
            self.model.layers.append(layer)

    def forward(self, x):
        for layer in self.model.layers:
            x = x + layer.self_attn(x)
        return x


class MoE(nn.Module):
    """Mixture of experts, per-expert Linear layers or one stacked 3-D weight."""

    def __init__(self, d=8, hidden=12, experts=4, stacked=False):
        super().__init__()
        self.gate = nn.Linear(d, experts, bias=False)
        self.stacked = stacked
        if stacked:
            self.w1 = nn.Parameter(torch.randn(experts, hidden, d))
            self.w2 = nn.Parameter(torch.randn(experts, d, hidden))
        else:
            self.experts = nn.ModuleList()
            for _ in range(experts):
                e = nn.Module()
                e.w1, e.w2 = nn.Linear(d, hidden, bias=False), nn.Linear(hidden, d, bias=False)
                self.experts.append(e)

    def forward(self, x):
        weights = self.gate(x).softmax(-1)
        if self.stacked:
            outs = [
                nn.functional.relu(x @ w1.T) @ w2.T for w1, w2 in zip(self.w1, self.w2, strict=True)
            ]
        else:
            outs = [e.w2(nn.functional.relu(e.w1(x))) for e in self.experts]
        return sum(weights[..., i : i + 1] * o for i, o in enumerate(outs))


class TinyViT(nn.Module):
    """Patch embedding, cls token, absolute position embeddings (timm names), linear head."""

    def __init__(self, grid=14, d=8, classes=10, patch=2):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, d, patch, patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, d))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + grid * grid, d))
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        p = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(len(x), -1, -1), p], 1) + self.pos_embed
        return self.head(tokens.mean(1))


# --- pairs for `suggest` (tests/test_suggest.py) -----------------------------------------------


class NanoGPT(HFGPT2):
    """nanoGPT's GPT: the Hugging Face names, nn.Linear everywhere (weights [out, in]), one
    fused c_attn, the head tied to wte; the same forward as HFGPT2's."""

    def __init__(self, vocab=50, d=16, layers=2, heads=4, positions=32):
        nn.Module.__init__(self)

        def block(b, d):
            b.attn.c_attn, b.attn.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
            b.mlp.c_fc, b.mlp.c_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

        _gpt2_skeleton(self, vocab, d, layers, positions, heads, block)


class TitanLlama(nn.Module):
    """torchtitan's Llama names: tok_embeddings, layers.{i}.attention.wq, feed_forward.w1/w2/w3,
    attention_norm, ffn_norm, norm, output."""

    def __init__(self, vocab=64, d=32, layers=2, heads=4, hidden=48):
        super().__init__()
        self.heads = heads
        self.tok_embeddings = nn.Embedding(vocab, d)
        self.layers = nn.ModuleDict()
        for i in range(layers):
            layer = nn.Module()
            layer.attention = nn.Module()
            for p in "qkvo":
                setattr(layer.attention, f"w{p}", nn.Linear(d, d, bias=False))
            layer.feed_forward = nn.Module()
            layer.feed_forward.w1 = nn.Linear(d, hidden, bias=False)
            layer.feed_forward.w2 = nn.Linear(hidden, d, bias=False)
            layer.feed_forward.w3 = nn.Linear(d, hidden, bias=False)
            layer.attention_norm = nn.RMSNorm(d)
            layer.ffn_norm = nn.RMSNorm(d)
            self.layers[str(i)] = layer
        self.norm = nn.RMSNorm(d)
        self.output = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        x = self.tok_embeddings(ids)
        for L in self.layers.values():
            a, f = L.attention, L.feed_forward
            x = _llama_layer(
                x,
                L.attention_norm,
                a.wq,
                a.wk,
                a.wv,
                a.wo,
                L.ffn_norm,
                f.w1,
                f.w3,
                f.w2,
                self.heads,
            )
        return self.output(self.norm(x))


class _LegacyLayerNorm(nn.Module):
    """A LayerNorm as TF-converted BERT checkpoints name it: gamma and beta."""

    def __init__(self, d):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(d) + 0.1 * torch.randn(d))
        self.beta = nn.Parameter(0.1 * torch.randn(d))

    def forward(self, x):
        return nn.functional.layer_norm(x, x.shape[-1:], self.gamma, self.beta)


class TinyBert(nn.Module):
    """Hugging Face BERT's names (bert.embeddings…, encoder.layer.{i}.attention.self.query…),
    its LayerNorms as `LayerNorm.weight/bias` or, legacy, `LayerNorm.gamma/beta`."""

    def __init__(self, vocab=40, d=16, layers=2, legacy=False):
        super().__init__()

        def norm():
            return _LegacyLayerNorm(d) if legacy else nn.LayerNorm(d)

        self.bert = nn.Module()
        e = self.bert.embeddings = nn.Module()
        e.word_embeddings = nn.Embedding(vocab, d)
        e.position_embeddings = nn.Embedding(32, d)
        e.LayerNorm = norm()
        self.bert.encoder = nn.Module()
        self.bert.encoder.layer = nn.ModuleList()
        for _ in range(layers):
            L = nn.Module()
            L.attention = nn.Module()
            L.attention.self = nn.Module()
            for p in ("query", "key", "value"):
                setattr(L.attention.self, p, nn.Linear(d, d))
            L.attention.output = nn.Module()
            L.attention.output.dense = nn.Linear(d, d)
            L.attention.output.LayerNorm = norm()
            L.intermediate = nn.Module()
            L.intermediate.dense = nn.Linear(d, 4 * d)
            L.output = nn.Module()
            L.output.dense = nn.Linear(4 * d, d)
            L.output.LayerNorm = norm()
            self.bert.encoder.layer.append(L)

    def forward(self, ids):
        e = self.bert.embeddings
        x = e.LayerNorm(e.word_embeddings(ids) + e.position_embeddings(torch.arange(ids.shape[1])))
        for L in self.bert.encoder.layer:
            s = L.attention.self
            att = nn.functional.scaled_dot_product_attention(s.query(x), s.key(x), s.value(x))
            x = L.attention.output.LayerNorm(x + L.attention.output.dense(att))
            x = L.output.LayerNorm(x + L.output.dense(nn.functional.gelu(L.intermediate.dense(x))))
        return x
