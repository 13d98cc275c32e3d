"""The tiny transformer: Llama's decoder blocks at a size a laptop trains in minutes.

Each block is RMSNorm -> attention with rotary positions (q, k, v, o projections) -> residual, then
RMSNorm -> gated MLP (gate, up, down) -> residual; no biases, an untied LM head. Parameter names
follow Hugging Face's Llama (model.layers.0.self_attn.q_proj.weight, ...), so that hft.py's rules
and a reader's intuition carry over from real checkpoints unchanged. Shapes are noted as
(B, T, C): batch, time (characters), channels; nh heads of hs = C / nh channels each.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ModelConfig:
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 128  # rotary tables cover this many positions
    vocab_size: int = 68  # data.VOCAB's size; train_tiny passes it


def rotary(x, cos, sin):  # x (B, nh, T, hs): rotate pairs (i, i + hs/2) by pos·θ_i, as HF Llama
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.n_head = c.n_head
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (
            nn.Linear(c.n_embd, c.n_embd, bias=False) for _ in range(4))

    def forward(self, x, cos, sin):
        B, T, C = x.shape
        q, k, v = (proj(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))  # (B, nh, T, hs)
        q, k = rotary(q, cos, sin), rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        hidden = 16 * math.ceil(8 * c.n_embd / 3 / 16)  # Llama's width 8/3·C, to a multiple of 16
        self.gate_proj = nn.Linear(c.n_embd, hidden, bias=False)
        self.up_proj = nn.Linear(c.n_embd, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, c.n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(c.n_embd, eps=1e-6)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = nn.RMSNorm(c.n_embd, eps=1e-6)
        self.mlp = MLP(c)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class TinyLlama(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict(dict(  # the "model." prefix of Hugging Face Llama names
            embed_tokens=nn.Embedding(config.vocab_size, config.n_embd),
            layers=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
            norm=nn.RMSNorm(config.n_embd, eps=1e-6)))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        hs = config.n_embd // config.n_head
        angle = torch.outer(torch.arange(config.block_size).float(),
                            1.0 / 10000 ** (torch.arange(0, hs, 2).float() / hs))  # (T, hs/2)
        self.register_buffer("cos", torch.cat((angle, angle), -1).cos(), persistent=False)
        self.register_buffer("sin", torch.cat((angle, angle), -1).sin(), persistent=False)
        for name, p in self.named_parameters():
            if p.dim() == 2:  # GPT-2's init: residual outputs scaled down with depth
                out = name.endswith(("o_proj.weight", "down_proj.weight"))
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * config.n_layer) if out else 0.02)

    def forward(self, idx, targets=None):  # idx (B, T) -> logits (B, T, V), mean loss or None
        T = idx.size(1)
        x = self.model.embed_tokens(idx)  # (B, T, C)
        for block in self.model.layers:
            x = block(x, self.cos[:T], self.sin[:T])
        logits = self.lm_head(self.model.norm(x))
        if targets is None:
            return logits, None
        # Every row (one problem, or one window of text) counts the same: mean over its targets
        # (-1 = no target), then over rows, so a batch split evenly across ranks averages to it.
        nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1,
                              reduction="none").view_as(targets)  # (B, T)
        return logits, (nll.sum(1) / (targets >= 0).sum(1).clamp(min=1)).mean()
