"""The tiny transformer: Llama's decoder blocks at a size a laptop trains in minutes.

Each block is RMSNorm -> attention with rotary positions (q, k, v, o projections) -> residual, then
RMSNorm -> gated MLP (gate, up, down) -> residual; no biases, an untied LM head. Parameter names
follow Hugging Face's Llama (model.layers.0.self_attn.q_proj.weight, ...), so that hft.py's rules
and a reader's intuition carry over from real checkpoints unchanged. Shapes are noted as
(B, T, C): batch, time (characters), channels; nh heads of hs = C / nh channels each.

This is the file that runs, with fused paths for speed; model_reference.py is the plain reading
copy (same names and state_dict), tested equal in float64 by tests/test_model.py.
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


class RMSNormFunction(torch.autograd.Function):
    """y = x · r · w with r = 1/sqrt(mean(x², -1) + eps), in x's dtype (float64 stays float64).

    Backward, with x̂ = x·r and ĝ = dy·w:  dx = r·(ĝ − x̂·mean(ĝ·x̂)),  dw = Σ_rows dy·x̂.
    LayerNorm's backward with mean 0 computes r·(ĝ − mean(ĝ) − x̂·mean(ĝ·x̂)) and the same dw in one
    kernel, so dx is that plus r·mean(ĝ). Autograd's RMSNorm backward chains a dozen ops instead,
    each a trip through the thread pool: at these sizes the trips cost more than the arithmetic."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        y, r = torch.ops.aten._fused_rms_norm(x, [x.size(-1)], weight, eps)  # r: (..., 1)
        ctx.save_for_backward(x, r, weight)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, r, w = ctx.saved_tensors
        dy = dy.to(x.dtype)
        mask = [*ctx.needs_input_grad[:2], False]  # dx, dw, no db
        dx, dw, _ = torch.ops.aten.native_layer_norm_backward(
            dy, x, [x.size(-1)], torch.zeros_like(r), r, w, None, mask)
        if dx is not None:
            dx += r * (dy @ w).unsqueeze(-1) / x.size(-1)  # + r·mean(ĝ): (..., 1)-sized till +=
        return dx, dw, None


class RMSNorm(nn.RMSNorm):  # nn.RMSNorm's parameter, init and state_dict; a faster backward
    def forward(self, x):
        if torch.compiler.is_compiling() or x.dtype != self.weight.dtype:
            return super().forward(x)  # the compiler fuses the plain ops; mixed dtypes: plain too
        return RMSNormFunction.apply(x, self.weight, self.eps)


def rotary(qkv, cos, sin):  # qkv (B, T, 3·nh, hs); rotate pairs (i, i + hs/2) by pos·θ_i
    """HF Llama's x·cos + rotate_half(x)·sin, rotate_half(x) = (−x2, x1), on q and k; v rides along
    with cos 1, sin 0 (exactly itself). The sign sits in the sin table, (−sin, sin), so rotate_half
    is a swap of halves: three ops for q, k and v together, and no slicing of qkv, whose backward
    would zero-fill and copy whole qkv-sized gradients. The tables are (T, 3·nh, hs), stored whole
    rather than broadcast over heads: broadcasting over batch alone is the fast elementwise loop."""
    swapped = qkv.roll(qkv.size(-1) // 2, -1)  # (x2, x1): shifting by half a head swaps halves
    return torch.addcmul(qkv * cos, swapped, sin)


class Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.n_head = c.n_head
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (
            nn.Linear(c.n_embd, c.n_embd, bias=False) for _ in range(4))

    def forward(self, x, cos, sin):
        B, T, C = x.shape
        w = [self.q_proj.weight, self.k_proj.weight, self.v_proj.weight]
        if w[0].requires_grad == w[1].requires_grad == w[2].requires_grad:
            qkv = F.linear(x, torch.cat(w))  # one matmul forward, two backward
        else:  # HFT froze some: separate matmuls, so that frozen ones get no weight gradient
            qkv = torch.cat([F.linear(x, wi) for wi in w], -1)
        qkv = rotary(qkv.view(B, T, 3 * self.n_head, C // self.n_head), cos, sin).type_as(qkv)
        q, k, v = (t.transpose(1, 2) for t in qkv.unflatten(2, (3, -1)).unbind(2))  # (B, nh, T, hs)
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
        self.input_layernorm = RMSNorm(c.n_embd, eps=1e-6)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.n_embd, eps=1e-6)
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
            norm=RMSNorm(config.n_embd, eps=1e-6)))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        hs = config.n_embd // config.n_head
        angle = torch.outer(torch.arange(config.block_size).float(),
                            1.0 / 10000 ** (torch.arange(0, hs, 2).float() / hs))  # (T, hs/2)
        cos, sin = torch.cat((angle, angle), -1).cos(), torch.cat((-angle.sin(), angle.sin()), -1)
        def qkv_table(qk, v):  # (T, hs) each -> (T, 3·nh, hs): q's heads, k's, then v's
            return torch.stack((qk, qk, v), 1).repeat_interleave(config.n_head, 1)
        self.register_buffer("cos", qkv_table(cos, torch.ones_like(cos)), persistent=False)
        self.register_buffer("sin", qkv_table(sin, torch.zeros_like(sin)), persistent=False)
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
