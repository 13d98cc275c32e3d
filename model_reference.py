"""The tiny transformer written plainly: the reading copy of model.py.

The same Llama decoder as model.TinyLlama, with the same parameter names and state_dict keys (so
`ref.load_state_dict(fast.state_dict())` works), each formula written the direct way: RMSNorm as
its formula, rotary positions with Hugging Face Llama's rotate_half, q, k and v as three matmuls,
attention as an explicit causal softmax, the gated MLP. model.py is the one that runs: its fused
paths (a hand-written RMSNorm backward, the sign of rotate_half folded into the sin table, q, k, v
in one matmul) are tested equal to this file in float64 (logits, loss and every parameter's
gradient, with and without frozen parameters) in tests/test_model.py.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from model import ModelConfig  # noqa: F401  (the same config: n_layer, n_head, n_embd, ...)


class RMSNorm(nn.Module):  # Zhang & Sennrich 2019: y = x / sqrt(mean(x²) + eps) · w, no centring
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotate_half(x):  # HF Llama pairs channel i with i + hs/2: (x1, x2) -> (−x2, x1)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x, cos, sin):  # x (B, nh, T, hs): rotate each pair by the angle pos·θ_i
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.n_head = c.n_head
        self.q_proj = nn.Linear(c.n_embd, c.n_embd, bias=False)
        self.k_proj = nn.Linear(c.n_embd, c.n_embd, bias=False)
        self.v_proj = nn.Linear(c.n_embd, c.n_embd, bias=False)
        self.o_proj = nn.Linear(c.n_embd, c.n_embd, bias=False)

    def forward(self, x, cos, sin):
        B, T, C = x.shape
        q, k, v = (proj(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))  # (B, nh, T, hs)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)  # positions in q and k only
        att = q @ k.transpose(-2, -1) / math.sqrt(k.size(-1))  # (B, nh, T, T)
        future = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        att = att.masked_fill(future, float("-inf")).softmax(-1)  # causal: no peeking ahead
        y = att @ v  # (B, nh, T, hs)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        hidden = 16 * math.ceil(8 * c.n_embd / 3 / 16)  # Llama's width 8/3·C, to a multiple of 16
        self.gate_proj = nn.Linear(c.n_embd, hidden, bias=False)
        self.up_proj = nn.Linear(c.n_embd, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, c.n_embd, bias=False)

    def forward(self, x):  # SwiGLU: silu(gate) · up, back down to C
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.input_layernorm = RMSNorm(c.n_embd)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.n_embd)
        self.mlp = MLP(c)

    def forward(self, x, cos, sin):  # pre-norm residual blocks
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class TinyLlama(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict(dict(  # the "model." prefix of Hugging Face Llama names
            embed_tokens=nn.Embedding(config.vocab_size, config.n_embd),
            layers=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
            norm=RMSNorm(config.n_embd)))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        hs = config.n_embd // config.n_head
        theta = 1.0 / 10000 ** (torch.arange(0, hs, 2).float() / hs)  # (hs/2,) one per pair
        angle = torch.outer(torch.arange(config.block_size).float(), theta)  # (T, hs/2)
        angle = torch.cat((angle, angle), -1)  # (T, hs): pair (i, i + hs/2) shares its angle
        self.register_buffer("cos", angle.cos(), persistent=False)  # not in the state_dict
        self.register_buffer("sin", angle.sin(), persistent=False)
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
        # mean over each row's targets (-1 = none), then over rows: every row counts the same
        nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1,
                              reduction="none").view_as(targets)  # (B, T)
        return logits, (nll.sum(1) / (targets >= 0).sum(1).clamp(min=1)).mean()
