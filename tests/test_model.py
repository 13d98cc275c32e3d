"""model.py's fast paths (RMSNorm's hand-written backward, rotary on q, k and v at once, one matmul
for q, k, v) against model_reference.py's plain model on the same weights: logits, loss and every
parameter's gradient, in float64 (to rounding) and float32, with HFT's partial freezing, under
bfloat16 autocast and torch.compile."""

import pytest
import torch

import model_reference
from model import ModelConfig, RMSNorm, TinyLlama


def pair(config, dtype=torch.float32, freeze=()):
    """model.TinyLlama and model_reference.TinyLlama with the same weights and the same frozen
    parameters (HFT's way: requires_grad, per matrix; model.py joins q, k, v only when their
    requires_grad agree)."""
    torch.manual_seed(0)
    fast = TinyLlama(config).to(dtype)
    with torch.no_grad():  # norms away from their init of ones, so dw is tested
        for m in fast.modules():
            if isinstance(m, RMSNorm):
                m.weight.normal_(1, 0.3)
    ref = model_reference.TinyLlama(config).to(dtype)
    ref.load_state_dict(fast.state_dict())
    for model in (fast, ref):
        for name, p in model.named_parameters():
            p.requires_grad_(not any(f in name for f in freeze))
    return fast, ref


def grads(model, idx, targets, forward=None):  # forward: model itself, or a compiled model
    model.zero_grad(set_to_none=True)
    logits, loss = (model if forward is None else forward)(idx, targets)
    (loss + logits.float().square().mean()).backward()  # the logits' gradient too, not just loss's
    return logits.detach(), loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def batch(config, B=3, T=12):
    idx = torch.randint(0, config.vocab_size, (B, T))
    targets = torch.randint(0, config.vocab_size, (B, T))
    targets[0, :5] = -1  # a row with fewer targets: the per-row mean is tested too
    return idx, targets


CONFIGS = [ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16),
           ModelConfig(n_layer=3, n_head=4, n_embd=64, block_size=12, vocab_size=50)]
FREEZE = [(), ("q_proj",), ("layers.1.self_attn.k_proj", "v_proj", "up_proj"), ("input_layernorm",),
          ("self_attn",), ("embed_tokens", "lm_head", "model.norm")]


@pytest.mark.parametrize("dtype,rtol,atol", [(torch.float64, 1e-12, 1e-14),
                                             (torch.float32, 1e-5, 1e-6)])
@pytest.mark.parametrize("config", CONFIGS, ids=["2x32", "3x64"])
@pytest.mark.parametrize("freeze", FREEZE)
def test_matches_reference(dtype, rtol, atol, config, freeze):
    fast, ref = pair(config, dtype, freeze)
    idx, targets = batch(config)
    got, want = grads(fast, idx, targets), grads(ref, idx, targets)
    assert got[0].dtype == dtype
    assert torch.allclose(got[0], want[0], rtol=rtol, atol=atol), (got[0] - want[0]).abs().max()
    assert torch.allclose(got[1], want[1], rtol=rtol, atol=atol), (got[1], want[1])
    for name, p in fast.named_parameters():
        if not p.requires_grad:
            assert got[2][name] is None and want[2][name] is None, name  # frozen: no gradient
        else:
            assert torch.allclose(got[2][name], want[2][name], rtol=rtol, atol=atol), name


def test_bfloat16_autocast():
    fast, ref = pair(CONFIGS[0])
    idx, targets = batch(CONFIGS[0])
    with torch.autocast("cpu", torch.bfloat16):
        logits, loss = fast(idx, targets)
        ref_logits, ref_loss = ref(idx, targets)
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref_loss, rtol=2e-2, atol=2e-2)
    loss.backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in fast.parameters())


def test_state_dict_names_and_norms():
    model = TinyLlama(ModelConfig(n_layer=1))
    names = list(model.state_dict())
    assert names[:2] == ["model.embed_tokens.weight", "model.layers.0.input_layernorm.weight"]
    assert "model.layers.0.self_attn.q_proj.weight" in names and len(names) == 12
    assert isinstance(model.model.norm, torch.nn.RMSNorm) and model.model.norm.eps == 1e-6
    torch.manual_seed(0)
    fast = TinyLlama(CONFIGS[1]).state_dict()
    torch.manual_seed(0)  # the same modules built in the same order: the same initial weights
    ref = model_reference.TinyLlama(CONFIGS[1]).state_dict()
    assert list(ref) == list(fast) and all(torch.equal(ref[n], fast[n]) for n in fast)


def test_compile():
    config = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16)
    fast, ref = pair(config, freeze=("layers.0.self_attn.q_proj",))
    idx, targets = batch(config, B=2, T=8)
    want = grads(ref, idx, targets)
    got = grads(fast, idx, targets, torch.compile(fast))
    torch.testing.assert_close(got[1], want[1])
    for name, p in fast.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(got[2][name], want[2][name], msg=name)
        else:
            assert got[2][name] is None
