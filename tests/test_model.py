"""model.py's fast paths (RMSNorm's hand-written backward, rotary on q and k at once, one matmul
for q, k, v) against the plain formulas, forward and backward, in float32 and float64, with HFT's
partial freezing, under bfloat16 autocast and torch.compile."""
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from model import ModelConfig, RMSNorm, TinyLlama  # noqa: E402


def rms_norm(x, norm):  # y = x · rsqrt(mean(x²) + eps) · w
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight


def rotate_half(x):  # HF Llama's pairing (i, i + hs/2)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def reference(model, idx, targets):
    """The plain formulas on model's parameters: what model.forward must compute."""
    c = model.config
    B, T = idx.shape
    hs = c.n_embd // c.n_head
    angle = torch.outer(torch.arange(T).float(), 1.0 / 10000 ** (torch.arange(0, hs, 2).float() / hs))
    angle = torch.cat((angle, angle), -1)  # float32 tables, as the model's buffers
    cos, sin = (t.to(model.lm_head.weight.dtype) for t in (angle.cos(), angle.sin()))
    x = model.model.embed_tokens(idx)
    for b in model.model.layers:
        a, h = b.self_attn, rms_norm(x, b.input_layernorm)
        q, k, v = (p(h).view(B, T, c.n_head, hs).transpose(1, 2) for p in (a.q_proj, a.k_proj, a.v_proj))
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + a.o_proj(y.transpose(1, 2).reshape(B, T, -1))
        m, h = b.mlp, rms_norm(x, b.post_attention_layernorm)
        x = x + m.down_proj(F.silu(m.gate_proj(h)) * m.up_proj(h))
    logits = model.lm_head(rms_norm(x, model.model.norm))
    nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1,
                          reduction="none").view_as(targets)
    return logits, (nll.sum(1) / (targets >= 0).sum(1).clamp(min=1)).mean()


def grads(fn, model, idx, targets):
    model.zero_grad(set_to_none=True)
    logits, loss = fn(model, idx, targets)
    (loss + logits.float().square().mean()).backward()  # the logits' gradient too, not only the loss's
    return logits.detach(), loss.detach(), {n: p.grad for n, p in model.named_parameters()}


FREEZE = [(), ("q_proj",), ("layers.1.self_attn.k_proj", "v_proj", "up_proj"), ("input_layernorm",),
          ("self_attn",)]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("freeze", FREEZE)
def test_matches_plain_formulas(dtype, tol, freeze):
    torch.manual_seed(0)
    model = TinyLlama(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16)).to(dtype)
    for name, p in model.named_parameters():  # HFT's way: requires_grad, per matrix
        p.requires_grad_(not any(f in name for f in freeze))
    with torch.no_grad():  # norms away from their init of ones, so dw is tested
        for m in model.modules():
            if isinstance(m, RMSNorm):
                m.weight.normal_(1, 0.3)
    idx, targets = torch.randint(0, 68, (3, 12)), torch.randint(0, 68, (3, 12))
    targets[0, :5] = -1
    fast = grads(lambda m, i, t: m(i, t), model, idx, targets)
    slow = grads(reference, model, idx, targets)
    assert fast[0].dtype == dtype
    torch.testing.assert_close(fast[0], slow[0], rtol=tol, atol=tol)
    torch.testing.assert_close(fast[1], slow[1], rtol=tol, atol=tol)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert fast[2][name] is None, name  # frozen: no gradient, whichever path ran
        else:
            torch.testing.assert_close(fast[2][name], slow[2][name], rtol=tol, atol=tol, msg=name)


def test_bfloat16_autocast():
    torch.manual_seed(0)
    model = TinyLlama(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16))
    idx, targets = torch.randint(0, 68, (3, 12)), torch.randint(0, 68, (3, 12))
    with torch.autocast("cpu", torch.bfloat16):
        logits, loss = model(idx, targets)
        ref_logits, ref_loss = reference(model, idx, targets)
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref_loss, rtol=2e-2, atol=2e-2)
    loss.backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())


def test_state_dict_names_and_norms():
    model = TinyLlama(ModelConfig(n_layer=1))
    names = list(model.state_dict())
    assert names[:2] == ["model.embed_tokens.weight", "model.layers.0.input_layernorm.weight"]
    assert "model.layers.0.self_attn.q_proj.weight" in names and len(names) == 12
    assert isinstance(model.model.norm, torch.nn.RMSNorm) and model.model.norm.eps == 1e-6


def test_compile():
    torch.manual_seed(0)
    model = TinyLlama(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16))
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(False)
    idx, targets = torch.randint(0, 68, (2, 8)), torch.randint(0, 68, (2, 8))
    slow = grads(reference, model, idx, targets)
    fast = grads(lambda m, i, t: torch.compile(m)(i, t), model, idx, targets)
    torch.testing.assert_close(fast[1], slow[1])
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(fast[2][name], slow[2][name], msg=name)
        else:
            assert fast[2][name] is None
