"""Tests for hft.py: the paper's per-category rule, exactly; freezing that really freezes under
AdamW with weight decay; nothing frozen == full fine-tuning bitwise; strategies; bad input."""

import copy
import io
import math
import random
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import hft  # noqa: E402


# ---- tiny models carrying Hugging Face names -------------------------------------------------

class LlamaBlock(nn.Module):
    def __init__(self, C, H, qkv_bias):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(C)
        self.self_attn = nn.ModuleDict(
            {n: nn.Linear(C, C, bias=qkv_bias and n != "o_proj") for n in ("q_proj", "k_proj", "v_proj", "o_proj")})
        self.post_attention_layernorm = nn.RMSNorm(C)
        self.mlp = nn.ModuleDict(dict(
            gate_proj=nn.Linear(C, H, bias=False), up_proj=nn.Linear(C, H, bias=False), down_proj=nn.Linear(H, C, bias=False)))

    def forward(self, x):  # (B, T, C), one head is enough to exercise every matrix
        a, m = self.self_attn, self.mlp
        h = self.input_layernorm(x)
        x = x + a.o_proj(F.scaled_dot_product_attention(a.q_proj(h), a.k_proj(h), a.v_proj(h), is_causal=True))
        h = self.post_attention_layernorm(x)
        return x + m.down_proj(F.silu(m.gate_proj(h)) * m.up_proj(h))


class Llama(nn.Module):
    """model.embed_tokens, model.layers.N.{self_attn,mlp,*_layernorm}, model.norm, lm_head."""

    def __init__(self, n_layer=8, C=8, H=12, V=11, qkv_bias=False):
        super().__init__()
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(V, C),
            layers=nn.ModuleList([LlamaBlock(C, H, qkv_bias) for _ in range(n_layer)]),
            norm=nn.RMSNorm(C)))
        self.lm_head = nn.Linear(C, V, bias=False)

    def forward(self, idx, targets):
        x = self.model.embed_tokens(idx)
        for block in self.model.layers:
            x = block(x)
        logits = self.lm_head(self.model.norm(x))
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def gpt2(n_layer=6, C=8, V=11, T=5):
    """transformer.{wte,wpe,h.N.{ln_1,attn.{c_attn,c_proj},ln_2,mlp.{c_fc,c_proj}},ln_f}, lm_head."""
    block = lambda: nn.ModuleDict(dict(
        ln_1=nn.LayerNorm(C), attn=nn.ModuleDict(dict(c_attn=nn.Linear(C, 3 * C), c_proj=nn.Linear(C, C))),
        ln_2=nn.LayerNorm(C), mlp=nn.ModuleDict(dict(c_fc=nn.Linear(C, 4 * C), c_proj=nn.Linear(4 * C, C)))))
    return nn.ModuleDict(dict(
        transformer=nn.ModuleDict(dict(wte=nn.Embedding(V, C), wpe=nn.Embedding(T, C),
                                       h=nn.ModuleList([block() for _ in range(n_layer)]), ln_f=nn.LayerNorm(C))),
        lm_head=nn.Linear(C, V, bias=False)))


def per_block(model, selection, prefix, categories):
    """For each block: {category: number of trained modules}; asserts a module's tensors move together."""
    chosen = set(selection)
    names = [n for n, _ in model.named_parameters()]
    counts, i = [], 0
    while any(n.startswith(f"{prefix}.{i}.") for n in names):
        count = dict.fromkeys(categories, 0)
        for cat, modules in categories.items():
            for m in modules:
                flags = {n in chosen for n in names if n.rsplit(".", 1)[0] == f"{prefix}.{i}.{m}"}
                assert len(flags) == 1, f"{prefix}.{i}.{m}: tensors of one module split or missing"
                count[cat] += flags.pop()
        counts.append(count)
        i += 1
    return counts


LLAMA = {"attn": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"],
         "mlp": ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
         "norm": ["input_layernorm", "post_attention_layernorm"]}
GPT2 = {"attn": ["attn.c_attn", "attn.c_proj"], "mlp": ["mlp.c_fc", "mlp.c_proj"], "norm": ["ln_1", "ln_2"]}


# ---- the rule, exactly ------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("qkv_bias", [False, True])  # Qwen-style q/k/v biases go with their weights
def test_llama_category_rule_exact_counts(seed, qkv_bias):
    model = Llama(n_layer=8, qkv_bias=qkv_bias)
    sel = hft.select(model, seed=seed)
    counts = per_block(model, sel, "model.layers", LLAMA)
    assert len(counts) == 8
    assert all(c["attn"] == 2 and c["norm"] == 1 for c in counts)
    assert sorted(c["mlp"] for c in counts) == [1] * 4 + [2] * 4  # 2 of 3 in half the blocks, 1 of 3 in the rest
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= set(sel)
    if not qkv_bias:  # equal-sized matrices: exactly half of every category, as for Llama-2
        r = hft.report(model, sel)
        assert r["block_fraction"] == 0.5
        assert all(r["by_category"][c]["fraction"] == 0.5 for c in hft.CATEGORIES)
        assert r["by_category"]["other"]["fraction"] == 1.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gpt2_category_rule_exact_counts(seed):
    model = gpt2(n_layer=6)
    sel = hft.select(model, seed=seed)
    counts = per_block(model, sel, "transformer.h", GPT2)
    assert counts == [{"attn": 1, "mlp": 1, "norm": 1}] * 6  # fused c_attn is one of two attention modules
    outside = ["transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight",
               "transformer.ln_f.bias", "lm_head.weight"]
    assert set(outside) <= set(sel)
    assert len(sel) == len(outside) + 6 * (2 + 2 + 2)  # per block: one module of each category, weight + bias


def test_ratio_generalises_per_category():
    model = Llama(n_layer=8)
    counts = per_block(model, hft.select(model, ratio=0.25), "model.layers", LLAMA)
    assert all(c["attn"] == 1 for c in counts)                          # 0.25·4 = 1
    assert sorted(c["norm"] for c in counts) == [0] * 4 + [1] * 4       # 0.25·2 = 0.5 on average
    assert sorted(c["mlp"] for c in counts) == [0] * 2 + [1] * 6        # 0.25·3 = 0.75 on average
    assert hft.select(model, ratio=1.0) == sorted(n for n, _ in model.named_parameters())


def test_same_seed_same_selection_other_seed_or_stage_differs():
    model = Llama(n_layer=8)
    sel = hft.select(model, seed=7, stage=0)
    assert sel == sorted(sel)
    shapes = {n: p.shape for n, p in reversed(list(model.named_parameters()))}
    assert hft.select(shapes, seed=7, stage=0) == sel  # from names and shapes, in any order
    assert hft.select(model.state_dict(), seed=7, stage=0) == sel
    assert hft.select(Llama(n_layer=8), seed=7, stage=0) == sel  # structure, not values
    assert hft.select(model, seed=8, stage=0) != sel
    stages = [hft.select(model, seed=7, stage=k) for k in range(4)]
    assert all(stages[k + 1] != stages[k] for k in range(3))


def test_select_touches_no_global_rng():
    model = Llama(n_layer=4)
    torch.manual_seed(0)
    random.seed(0)
    t, r = torch.get_rng_state(), random.getstate()
    for strategy in hft.STRATEGIES:
        hft.select(model, seed=1, stage=2, strategy=strategy)
    assert torch.equal(torch.get_rng_state(), t) and random.getstate() == r


# ---- freezing ---------------------------------------------------------------------------------

def train(model, params, steps=3, seed=0):
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, 11, (2, 6), generator=g)
        loss = model(idx, torch.roll(idx, -1, dims=1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return opt


def test_frozen_bitwise_unchanged_trainable_change_under_adamw_weight_decay():
    torch.manual_seed(0)
    model = Llama(n_layer=4)
    sel = hft.select(model, seed=3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = hft.apply(model, sel)
    assert [p for n, p in model.named_parameters() if n in set(sel)] == params  # model order
    opt = train(model, params)
    for n, p in model.named_parameters():
        if n in sel:
            assert p.requires_grad and not torch.equal(p, before[n]), n
        else:
            assert not p.requires_grad and p.grad is None and torch.equal(p, before[n]), n
    # no optimizer state for frozen tensors: state only for the trained ones
    assert len(opt.state) == len(sel)


def test_ratio_one_equals_full_fine_tuning_bitwise():
    torch.manual_seed(0)
    full = Llama(n_layer=4)
    half = copy.deepcopy(full)
    train(full, list(full.parameters()))
    train(half, hft.apply(half, hft.select(half, ratio=1.0)))
    for (n, a), (_, b) in zip(full.named_parameters(), half.named_parameters()):
        assert torch.equal(a, b), n


def test_new_stage_unfreezes_and_reselects():
    model = Llama(n_layer=4)
    hft.apply(model, hft.select(model, stage=0))
    sel1 = hft.select(model, stage=1)
    hft.apply(model, sel1)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [n for n, _ in model.named_parameters() if n in sel1]


def test_selection_survives_checkpoint_round_trip():
    model = Llama(n_layer=4)
    sel = hft.select(model, seed=5, stage=2)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "hft": {"seed": 5, "stage": 2, "trainable": sel}}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    assert ckpt["hft"]["trainable"] == sel
    resumed = Llama(n_layer=4)
    resumed.load_state_dict(ckpt["model"])
    hft.apply(resumed, ckpt["hft"]["trainable"])
    assert {n for n, p in resumed.named_parameters() if p.requires_grad} == set(sel)


# ---- the ablation strategies -------------------------------------------------------------------

@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
@pytest.mark.parametrize("seed", [0, 1])
def test_model_strategy_about_requested_fraction(ratio, seed):
    model = Llama(n_layer=16, C=8, H=24)  # modules of different sizes
    sel = hft.select(model, seed=seed, ratio=ratio, strategy="model")
    r = hft.report(model, sel)
    block_total = sum(r["by_category"][c]["total"] for c in hft.CATEGORIES)
    largest = 8 * 24  # the greedy fill ends within half of the largest module of the target
    assert abs(r["block_fraction"] - ratio) <= largest / 2 / block_total
    assert r["by_category"]["other"]["fraction"] == 1.0
    per = per_block(model, sel, "model.layers", LLAMA)
    assert len({tuple(c.values()) for c in per}) > 1  # modules from anywhere, not a fixed pattern


@pytest.mark.parametrize("ratio,n_trained", [(0.25, 2), (0.5, 4), (0.75, 6), (1.0, 8)])
def test_layer_strategy_whole_blocks(ratio, n_trained):
    model = Llama(n_layer=8)
    sel = hft.select(model, seed=1, ratio=ratio, strategy="layer")
    full = {c: len(m) for c, m in LLAMA.items()}
    per = per_block(model, sel, "model.layers", LLAMA)
    assert all(c == full or c == {k: 0 for k in full} for c in per)
    assert sum(c == full for c in per) == n_trained
    assert hft.report(model, sel)["block_fraction"] == n_trained / 8


def test_report_counts():
    model = gpt2(n_layer=2)
    sel = hft.select(model)
    r = hft.report(model, sel)
    total = sum(p.numel() for p in model.parameters())
    assert r["total"] == total
    assert r["trainable"] == sum(p.numel() for n, p in model.named_parameters() if n in sel)
    assert math.isclose(r["fraction"], r["trainable"] / total)
    assert r["frozen"] == sorted(set(n for n, _ in model.named_parameters()) - set(sel))
    assert r["n_frozen_tensors"] + r["n_trainable_tensors"] == len(list(model.parameters()))
    assert r["n_blocks"] == 2


# ---- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("ratio", [0, -0.1, 1.5, float("nan"), True, "0.5"])
def test_bad_ratio(ratio):
    with pytest.raises(ValueError, match="ratio"):
        hft.select(Llama(n_layer=2), ratio=ratio)


def test_bad_strategy_stage_seed():
    with pytest.raises(ValueError, match="strategy"):
        hft.select(Llama(n_layer=2), strategy="random")
    with pytest.raises(ValueError, match="stage"):
        hft.select(Llama(n_layer=2), stage=-1)
    with pytest.raises(ValueError, match="seed"):
        hft.select(Llama(n_layer=2), seed=1.5)


def test_model_without_blocks():
    mlp = nn.ModuleDict(dict(embed=nn.Embedding(4, 3), head=nn.Linear(3, 4)))
    with pytest.raises(ValueError, match="no transformer blocks"):
        hft.select(mlp)


def test_unplaceable_parameter_inside_block_is_named():
    model = Llama(n_layer=2)
    model.model.layers[1].adapter = nn.Linear(8, 8)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.adapter\.weight"):
        hft.select(model)
    with pytest.raises(ValueError, match=r"0\.weight"):
        hft.select(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)))


def test_apply_and_report_reject_unknown_names():
    model = Llama(n_layer=2)
    with pytest.raises(ValueError, match="no_such.weight"):
        hft.apply(model, ["lm_head.weight", "no_such.weight"])
    with pytest.raises(ValueError, match="no_such.weight"):
        hft.report(model, ["no_such.weight"])
    with pytest.raises(ValueError, match="iterable"):
        hft.apply(model, "lm_head.weight")
