"""Tests for hft.py: the paper's per-category rule, exactly; freezing that really freezes under
AdamW with weight decay; nothing frozen == full fine-tuning bitwise; strategies; bad input."""

import copy
import io
import math
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hft


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
    """For each block: {category: number of trained modules}; asserts a module's tensors move together.
    model: an nn.Module or a {name: shape} dict."""
    chosen = set(selection)
    names = [n for n, _ in model.named_parameters()] if isinstance(model, nn.Module) else list(model)
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


# ---- the encoder-decoder and OPT layouts, as Hugging Face names them ------------------------------
# (name, shape) as model.named_parameters() lists them: a tied copy (lm_head.weight, T5's and BART's
# embed_tokens = shared) appears once. Real sizes; `stack` repeats one block's list for N blocks.

def stack(prefix, n, block):
    return [(f"{prefix}.{i}.{name}", shape) for i in range(n) for name, shape in block]


def bart_layers(C, F, k_bias=True):
    """Bart{Encoder,Decoder}Layer; OPTDecoderLayer is the encoder layer; Whisper's k_proj has no bias."""
    def attn(m):
        return [(f"{m}.k_proj.weight", (C, C)), *([(f"{m}.k_proj.bias", (C,))] if k_bias else []),
                (f"{m}.v_proj.weight", (C, C)), (f"{m}.v_proj.bias", (C,)),
                (f"{m}.q_proj.weight", (C, C)), (f"{m}.q_proj.bias", (C,)),
                (f"{m}.out_proj.weight", (C, C)), (f"{m}.out_proj.bias", (C,))]
    norm = lambda m: [(f"{m}.weight", (C,)), (f"{m}.bias", (C,))]
    mlp = [("fc1.weight", (F, C)), ("fc1.bias", (F,)), ("fc2.weight", (C, F)), ("fc2.bias", (C,))]
    encoder = [*attn("self_attn"), *norm("self_attn_layer_norm"), *mlp, *norm("final_layer_norm")]
    decoder = [*attn("self_attn"), *norm("self_attn_layer_norm"), *attn("encoder_attn"),
               *norm("encoder_attn_layer_norm"), *mlp, *norm("final_layer_norm")]
    return encoder, decoder


def t5_blocks(C, F, inner, gated):
    """T5Block: layer.0 self-attention, [decoder: layer.1 cross-attention], then the MLP (DenseReluDense,
    gated in T5 v1.1); each sub-layer has its layer_norm (a weight only); no biases anywhere."""
    def attn(m, k):
        return [(f"layer.{k}.{m}.q.weight", (inner, C)), (f"layer.{k}.{m}.k.weight", (inner, C)),
                (f"layer.{k}.{m}.v.weight", (inner, C)), (f"layer.{k}.{m}.o.weight", (C, inner)),
                (f"layer.{k}.layer_norm.weight", (C,))]

    def mlp(k):
        wi = ["wi_0", "wi_1"] if gated else ["wi"]
        return [*((f"layer.{k}.DenseReluDense.{w}.weight", (F, C)) for w in wi),
                (f"layer.{k}.DenseReluDense.wo.weight", (C, F)), (f"layer.{k}.layer_norm.weight", (C,))]
    encoder = [*attn("SelfAttention", 0), *mlp(1)]
    decoder = [*attn("SelfAttention", 0), *attn("EncDecAttention", 1), *mlp(2)]
    return encoder, decoder


OPT_LAYER, _ = bart_layers(768, 3072)
OPT_125M = dict([  # facebook/opt-125m (OPTForCausalLM; lm_head tied to embed_tokens)
    ("model.decoder.embed_tokens.weight", (50272, 768)), ("model.decoder.embed_positions.weight", (2050, 768)),
    *stack("model.decoder.layers", 12, OPT_LAYER),
    ("model.decoder.final_layer_norm.weight", (768,)), ("model.decoder.final_layer_norm.bias", (768,))])

BART_ENCODER_LAYER, BART_DECODER_LAYER = bart_layers(768, 3072)
BART_BASE = dict([  # facebook/bart-base (BartForConditionalGeneration; lm_head tied to shared)
    ("model.shared.weight", (50265, 768)),
    ("model.encoder.embed_positions.weight", (1026, 768)), *stack("model.encoder.layers", 6, BART_ENCODER_LAYER),
    ("model.encoder.layernorm_embedding.weight", (768,)), ("model.encoder.layernorm_embedding.bias", (768,)),
    ("model.decoder.embed_positions.weight", (1026, 768)), *stack("model.decoder.layers", 6, BART_DECODER_LAYER),
    ("model.decoder.layernorm_embedding.weight", (768,)), ("model.decoder.layernorm_embedding.bias", (768,))])

WHISPER_ENCODER_LAYER, WHISPER_DECODER_LAYER = bart_layers(384, 1536, k_bias=False)
WHISPER_TINY = dict([  # openai/whisper-tiny (WhisperForConditionalGeneration; proj_out tied to embed_tokens)
    ("model.encoder.conv1.weight", (384, 80, 3)), ("model.encoder.conv1.bias", (384,)),
    ("model.encoder.conv2.weight", (384, 384, 3)), ("model.encoder.conv2.bias", (384,)),
    ("model.encoder.embed_positions.weight", (1500, 384)), *stack("model.encoder.layers", 4, WHISPER_ENCODER_LAYER),
    ("model.encoder.layer_norm.weight", (384,)), ("model.encoder.layer_norm.bias", (384,)),
    ("model.decoder.embed_tokens.weight", (51865, 384)), ("model.decoder.embed_positions.weight", (448, 384)),
    *stack("model.decoder.layers", 4, WHISPER_DECODER_LAYER),
    ("model.decoder.layer_norm.weight", (384,)), ("model.decoder.layer_norm.bias", (384,))])

T5_ENCODER_BLOCK, T5_DECODER_BLOCK = t5_blocks(512, 2048, 512, gated=False)
T5_SMALL = dict([  # t5-small (T5ForConditionalGeneration; lm_head tied to shared), 8 heads
    ("shared.weight", (32128, 512)), *stack("encoder.block", 6, T5_ENCODER_BLOCK),
    ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", (32, 8)),
    ("encoder.final_layer_norm.weight", (512,)), *stack("decoder.block", 6, T5_DECODER_BLOCK),
    ("decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", (32, 8)),
    ("decoder.final_layer_norm.weight", (512,))])

FLAN_ENCODER_BLOCK, FLAN_DECODER_BLOCK = t5_blocks(512, 1024, 384, gated=True)
FLAN_T5_SMALL = dict([  # google/flan-t5-small (T5 v1.1: gated MLP, untied lm_head), 6 heads of 64
    ("shared.weight", (32128, 512)), *stack("encoder.block", 8, FLAN_ENCODER_BLOCK),
    ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", (32, 6)),
    ("encoder.final_layer_norm.weight", (512,)), *stack("decoder.block", 8, FLAN_DECODER_BLOCK),
    ("decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", (32, 6)),
    ("decoder.final_layer_norm.weight", (512,)), ("lm_head.weight", (32128, 512))])


LLAMA = {"attn": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"],
         "mlp": ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
         "norm": ["input_layernorm", "post_attention_layernorm"]}
GPT2 = {"attn": ["attn.c_attn", "attn.c_proj"], "mlp": ["mlp.c_fc", "mlp.c_proj"], "norm": ["ln_1", "ln_2"]}
OPT = {"attn": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"],
       "mlp": ["fc1", "fc2"], "norm": ["self_attn_layer_norm", "final_layer_norm"]}  # = BART's encoder layer
BART_DECODER = {**OPT, "cross_attn": [f"encoder_attn.{m}_proj" for m in ("q", "k", "v", "out")],
                "norm": ["self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"]}
T5_SELF, T5_CROSS = ([f"layer.{k}.{m}.{p}" for p in "qkvo"] for k, m in ((0, "SelfAttention"), (1, "EncDecAttention")))
T5_ENCODER = {"attn": T5_SELF, "mlp": ["layer.1.DenseReluDense.wi", "layer.1.DenseReluDense.wo"],
              "norm": ["layer.0.layer_norm", "layer.1.layer_norm"]}
T5_DECODER = {"attn": T5_SELF, "cross_attn": T5_CROSS,
              "mlp": ["layer.2.DenseReluDense.wi", "layer.2.DenseReluDense.wo"],
              "norm": ["layer.0.layer_norm", "layer.1.layer_norm", "layer.2.layer_norm"]}
FLAN_ENCODER = {**T5_ENCODER, "mlp": [f"layer.1.DenseReluDense.{m}" for m in ("wi_0", "wi_1", "wo")]}
FLAN_DECODER = {**T5_DECODER, "mlp": [f"layer.2.DenseReluDense.{m}" for m in ("wi_0", "wi_1", "wo")]}
# layout: (shapes, encoder blocks, decoder blocks, their categories, blocks per stack, MLP matrices)
ENC_DEC = {
    "bart-base": (BART_BASE, "model.encoder.layers", "model.decoder.layers", OPT, BART_DECODER, 6, 2),
    "whisper-tiny": (WHISPER_TINY, "model.encoder.layers", "model.decoder.layers", OPT, BART_DECODER, 4, 2),
    "t5-small": (T5_SMALL, "encoder.block", "decoder.block", T5_ENCODER, T5_DECODER, 6, 2),
    "flan-t5-small": (FLAN_T5_SMALL, "encoder.block", "decoder.block", FLAN_ENCODER, FLAN_DECODER, 8, 3),
}


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
        r = hft.summary(model, sel)
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


@pytest.mark.parametrize("shapes,n_params", [  # sum(p.numel() for p in model.parameters()) of each
    (OPT_125M, 125_239_296), (BART_BASE, 139_420_416), (WHISPER_TINY, 37_760_640),
    (T5_SMALL, 60_506_624), (FLAN_T5_SMALL, 76_961_152)])
def test_written_out_layouts_add_up_to_the_real_models(shapes, n_params):
    assert sum(math.prod(shape) for shape in shapes.values()) == n_params


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_opt_category_rule_exact_counts(seed):
    sel = hft.select(OPT_125M, seed=seed)
    counts = per_block(OPT_125M, sel, "model.decoder.layers", OPT)  # also: each bias moves with its weight
    assert counts == [{"attn": 2, "mlp": 1, "norm": 1}] * 12  # fc1, fc2 sit in the block, no "mlp." prefix
    outside = ["model.decoder.embed_tokens.weight", "model.decoder.embed_positions.weight",
               "model.decoder.final_layer_norm.weight", "model.decoder.final_layer_norm.bias"]
    assert set(outside) <= set(sel)
    assert len(sel) == len(outside) + 12 * (2 + 1 + 1) * 2  # per block: 2 attn, 1 fc, 1 norm; weight + bias
    r = hft.summary(OPT_125M, sel)
    # the model's final_layer_norm is outside the blocks; each block's own final_layer_norm is a norm in it
    assert r["by_category"]["other"]["total"] == 50272 * 768 + 2050 * 768 + 2 * 768
    assert r["by_category"]["attn"]["fraction"] == r["by_category"]["norm"]["fraction"] == 0.5
    assert "cross_attn" not in r["by_category"] and r["n_blocks"] == 12


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("layout", list(ENC_DEC))
def test_encoder_decoder_category_rule_exact_counts(layout, seed):
    shapes, enc, dec, enc_cats, dec_cats, n, n_mlp = ENC_DEC[layout]
    sel = hft.select(shapes, seed=seed)
    encoder, decoder = per_block(shapes, sel, enc, enc_cats), per_block(shapes, sel, dec, dec_cats)
    assert len(encoder) == len(decoder) == n and hft.summary(shapes, sel)["n_blocks"] == 2 * n
    assert all(c["attn"] == 2 and c["norm"] == 1 for c in encoder)
    # self- and cross-attention each train 2 of their 4, never 1 + 3 or 0 + 4 as one pool of 8 could
    assert all(c["attn"] == 2 and c["cross_attn"] == 2 for c in decoder)
    assert sorted(c["norm"] for c in decoder) == [1] * (n // 2) + [2] * (n // 2)  # 3 norms: 1.5 on average
    mlp = sorted(c["mlp"] for c in encoder + decoder)
    assert mlp == ([1] * 2 * n if n_mlp == 2 else [1] * n + [2] * n)  # 1 of 2; or 2 of 3 in half the blocks
    outside = [name for name in shapes if not any(name.startswith(p + ".") for p in (enc, dec))]
    assert set(outside) <= set(sel)


def test_cross_attention_drawn_apart_from_self_attention():
    pairs = []  # (trained self-attention projections, trained cross-attention projections) of a block
    for seed in range(8):
        sel = set(hft.select(BART_BASE, seed=seed))
        trained = lambda i, m: frozenset(p for p in ("q", "k", "v", "out")
                                         if f"model.decoder.layers.{i}.{m}.{p}_proj.weight" in sel)
        pairs += [(trained(i, "self_attn"), trained(i, "encoder_attn")) for i in range(6)]
    assert all(len(a) == 2 and len(c) == 2 for a, c in pairs)
    # a cross-attention half that copied (or mirrored) the self-attention half would give at most
    # C(4, 2) = 6 different pairs; independent draws give about 27 of the 36 in 48 blocks
    assert len(set(pairs)) > 12


def test_t5_relative_attention_bias_counts_outside_the_blocks():
    sel = hft.select(T5_SMALL, seed=0)
    bias = [name for name in T5_SMALL if "relative_attention_bias" in name]
    assert len(bias) == 2 and set(bias) <= set(sel)  # trained, like the other position embeddings
    r = hft.summary(T5_SMALL, sel)
    assert r["by_category"]["other"]["total"] == 32128 * 512 + 2 * 512 + 2 * 32 * 8
    # then every block's attention is four equal matrices, and exactly half of each kind trains
    assert all(r["by_category"][c]["fraction"] == 0.5 for c in ("attn", "cross_attn", "mlp", "norm"))


@pytest.mark.parametrize("layout", ["opt-125m", *ENC_DEC])
def test_new_layouts_same_seed_same_selection_other_seed_or_stage_differs(layout):
    shapes = OPT_125M if layout == "opt-125m" else ENC_DEC[layout][0]
    sel = hft.select(shapes, seed=3)
    assert hft.select(dict(reversed(shapes.items())), seed=3) == sel
    assert hft.select(shapes, seed=4) != sel
    assert len({tuple(hft.select(shapes, seed=3, stage=k)) for k in range(4)}) == 4
    if layout != "opt-125m":  # the cross-attention half too is drawn anew
        cross = lambda s: [name for name in s if "encoder_attn." in name or "EncDecAttention" in name]
        assert len({tuple(cross(hft.select(shapes, seed=3, stage=k))) for k in range(4)}) > 1


def test_layer_and_model_strategies_on_encoder_decoder():
    per = lambda sel: (per_block(BART_BASE, sel, "model.encoder.layers", OPT)
                       + per_block(BART_BASE, sel, "model.decoder.layers", BART_DECODER))
    sizes = [len(OPT[c]) for c in OPT], [len(BART_DECODER[c]) for c in BART_DECODER]
    blocks = per(hft.select(BART_BASE, seed=1, strategy="layer"))
    assert all(list(c.values()) in (*sizes, [0] * len(c)) for c in blocks)  # whole blocks, cross-attention too
    assert sum(any(c.values()) for c in blocks) == 6  # 6 of the 12 blocks
    r = hft.summary(BART_BASE, hft.select(BART_BASE, seed=1, strategy="model"))
    block_total = sum(r["by_category"][c]["total"] for c in (*hft.CATEGORIES, *hft.CROSS))
    assert abs(r["block_fraction"] - 0.5) <= (3072 * 768 + 3072) / 2 / block_total


@pytest.mark.parametrize("layout,seed,stage,blocks", [  # drawn by hft.py before it knew OPT, BART, T5
    ("llama", 0, 0, ["input_layernorm mlp.down_proj mlp.gate_proj self_attn.k_proj self_attn.v_proj",
                     "input_layernorm mlp.down_proj self_attn.k_proj self_attn.v_proj",
                     "input_layernorm mlp.down_proj mlp.up_proj self_attn.k_proj self_attn.o_proj",
                     "mlp.up_proj post_attention_layernorm self_attn.q_proj self_attn.v_proj"]),
    ("llama", 1, 1, ["mlp.gate_proj post_attention_layernorm self_attn.k_proj self_attn.q_proj",
                     "input_layernorm mlp.gate_proj self_attn.k_proj self_attn.o_proj",
                     "input_layernorm mlp.down_proj mlp.gate_proj self_attn.q_proj self_attn.v_proj",
                     "mlp.gate_proj mlp.up_proj post_attention_layernorm self_attn.o_proj self_attn.q_proj"]),
    ("gpt2", 0, 0, ["attn.c_proj ln_1 mlp.c_fc", "attn.c_attn ln_1 mlp.c_fc"]),
    ("gpt2", 1, 1, ["attn.c_proj ln_2 mlp.c_fc", "attn.c_attn ln_1 mlp.c_proj"])])
def test_selection_pinned_for_decoder_only_layouts(layout, seed, stage, blocks):
    """Cached experiment results depend on which half a seed picks: supporting a new layout must not
    change the draw for the old ones."""
    model, prefix = (Llama(n_layer=4), "model.layers") if layout == "llama" else (gpt2(n_layer=2), "transformer.h")
    sel = hft.select(model, seed=seed, stage=stage)
    trained = [" ".join(sorted({n.removeprefix(f"{prefix}.{i}.").rsplit(".", 1)[0]
                                for n in sel if n.startswith(f"{prefix}.{i}.")})) for i in range(len(blocks))]
    assert trained == blocks


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


def test_interrupted_hft_training_resumes_bitwise_from_its_checkpoint():
    """Train 3 AdamW steps on the HFT half, checkpoint (weights, optimizer, selection), resume on a
    fresh model from the checkpoint alone, 3 more steps: bitwise the 6 uninterrupted steps."""
    def steps(model, opt, start, n):
        for i in range(start, start + n):
            gen = torch.Generator().manual_seed(i)
            idx = torch.randint(11, (4, 6), generator=gen)
            opt.zero_grad()
            model(idx, torch.roll(idx, -1, 1)).backward()
            opt.step()

    def fresh():
        torch.manual_seed(0)
        return Llama(n_layer=4)

    whole = fresh()
    opt = torch.optim.AdamW(hft.apply(whole, hft.select(whole, seed=5, stage=2)), lr=1e-2)
    steps(whole, opt, 0, 6)

    cut = fresh()
    sel = hft.select(cut, seed=5, stage=2)
    opt = torch.optim.AdamW(hft.apply(cut, sel), lr=1e-2)
    steps(cut, opt, 0, 3)
    buf = io.BytesIO()
    torch.save({"model": cut.state_dict(), "optimizer": opt.state_dict(), "hft": sel}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed = Llama(n_layer=4)  # another init: everything must come from the checkpoint
    resumed.load_state_dict(ckpt["model"])
    opt = torch.optim.AdamW(hft.apply(resumed, ckpt["hft"]), lr=1e-2)
    opt.load_state_dict(ckpt["optimizer"])
    steps(resumed, opt, 3, 3)
    for (name, p), q in zip(whole.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name
    theta = fresh().state_dict()
    assert any(not torch.equal(p, theta[n]) for n, p in resumed.named_parameters() if n in sel)  # it trained
    assert all(torch.equal(p, theta[n]) for n, p in resumed.named_parameters() if n not in sel)  # frozen half


# ---- the ablation strategies -------------------------------------------------------------------

@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
@pytest.mark.parametrize("seed", [0, 1])
def test_model_strategy_about_requested_fraction(ratio, seed):
    model = Llama(n_layer=16, C=8, H=24)  # modules of different sizes
    sel = hft.select(model, seed=seed, ratio=ratio, strategy="model")
    r = hft.summary(model, sel)
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
    assert hft.summary(model, sel)["block_fraction"] == n_trained / 8


def test_summary_counts():
    model = gpt2(n_layer=2)
    sel = hft.select(model)
    r = hft.summary(model, sel)
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


def test_unplaceable_parameter_in_encoder_decoder_block_is_named():
    shapes = {**BART_BASE, "model.decoder.layers.2.adapter.down.weight": (8, 768),
              "model.encoder.layers.0.weight": (768,)}  # not in any module of the block
    with pytest.raises(ValueError, match=r"adapter\.down\.weight'.*encoder\.layers\.0\.weight'"):
        hft.select(shapes)
    with pytest.raises(ValueError, match=r"encoder\.block\.3\.layer\.1\.weight"):  # T5's sub-layer wrapper itself
        hft.select({**T5_SMALL, "encoder.block.3.layer.1.weight": (512,)})


@pytest.mark.parametrize("module,category", [
    ("self_attn.q_proj", "attn"), ("attn.c_attn", "attn"), ("mlp.down_proj", "mlp"), ("ln_2", "norm"),
    ("self_attn.q_norm", "norm"), ("post_attention_layernorm", "norm"),                      # Llama, GPT-2, Qwen3
    ("self_attn.out_proj", "attn"), ("fc1", "mlp"), ("fc2", "mlp"),                           # OPT, BART, Whisper
    ("self_attn_layer_norm", "norm"), ("final_layer_norm", "norm"),
    ("encoder_attn.k_proj", "cross_attn"), ("encoder_attn_layer_norm", "norm"),
    ("layer.0.SelfAttention.q", "attn"), ("layer.1.EncDecAttention.o", "cross_attn"),          # T5
    ("layer.2.DenseReluDense.wi_1", "mlp"), ("layer.1.layer_norm", "norm"),
    ("layer.0.SelfAttention.relative_attention_bias", "other"),
    ("crossattention.q_attn", "cross_attn"), ("ln_cross_attn", "norm"),                     # GPT-2 as a decoder
    ("adapter", None), ("fc3", None), ("layer.0", None), ("layer", None)])
def test_category_of_table(module, category):
    assert hft.category_of(module) == category


def test_apply_and_summary_reject_unknown_names():
    model = Llama(n_layer=2)
    with pytest.raises(ValueError, match="no_such.weight"):
        hft.apply(model, ["lm_head.weight", "no_such.weight"])
    with pytest.raises(ValueError, match="no_such.weight"):
        hft.summary(model, ["no_such.weight"])
    with pytest.raises(ValueError, match="iterable"):
        hft.apply(model, "lm_head.weight")


# ---- tied, frozen, unnamed: what the API does at its edges ---------------------------------------

def tied_llama(n_layer=4):
    model = Llama(n_layer=n_layer)
    model.lm_head.weight = model.model.embed_tokens.weight  # (V, C) both: one tensor, two names
    return model


def test_tied_weights_are_one_parameter_under_any_of_their_names():
    model = tied_llama()
    names = [n for n, _ in model.named_parameters()]
    assert "lm_head.weight" not in names  # torch lists a tied tensor once, under its first name
    sel = hft.select(model, seed=2)
    # a state_dict holds both names of the one tensor: the same selection, the same counts
    assert hft.select(model.state_dict(), seed=2) == sel
    assert hft.summary(model.state_dict(), sel) == hft.summary(model, sel)
    # apply and summary take either name; the tensor trains if one of its names is selected
    params = hft.apply(model, sel + ["lm_head.weight"])
    alias_only = [n for n in sel if n != "model.embed_tokens.weight"] + ["lm_head.weight"]
    assert hft.apply(model, alias_only) == params and model.lm_head.weight.requires_grad
    assert hft.summary(model, alias_only) == hft.summary(model, sel)
    before = model.lm_head.weight.detach().clone()
    train(model, params)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not torch.equal(model.lm_head.weight, before)


def test_shapes_without_tensors_name_every_parameter_apart():
    # a {name: shape} mapping cannot show a tie: two names are two parameters, as given
    shapes = {"embed.weight": (11, 8), "lm_head.weight": (11, 8), "h.0.attn.q.weight": (8, 8)}
    assert hft.select(shapes) == ["embed.weight", "h.0.attn.q.weight", "lm_head.weight"]
    assert hft.summary(shapes, ["embed.weight"])["total"] == 2 * 88 + 64


def test_a_parameter_frozen_before_hft_trains_again_if_selected_unless_left_out():
    # apply decides requires_grad for every parameter (a new stage must unfreeze the last one's
    # frozen half): a parameter you froze trains if selected; leaving its name out keeps it frozen
    model = Llama(n_layer=4)
    model.model.embed_tokens.weight.requires_grad_(False)
    sel = hft.select(model, seed=0)
    assert "model.embed_tokens.weight" in sel  # outside the blocks: always selected
    hft.apply(model, sel)
    assert model.model.embed_tokens.weight.requires_grad
    kept_frozen = [n for n in sel if n != "model.embed_tokens.weight"]
    params = hft.apply(model, kept_frozen)
    assert not model.model.embed_tokens.weight.requires_grad
    assert all(p is not model.model.embed_tokens.weight for p in params)
    r = hft.summary(model, kept_frozen)
    assert "model.embed_tokens.weight" in r["frozen"]
    assert r["trainable"] == sum(p.numel() for p in params)


def test_names_outside_the_blocks_train_whatever_they_are_called():
    model = Llama(n_layer=2)
    model.score = nn.Linear(8, 2)  # a classification head: no rule names it, it is outside
    sel = hft.select(model)
    assert {"score.weight", "score.bias"} <= set(sel)
    outside = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("model.layers."))
    assert hft.summary(model, sel)["by_category"]["other"]["trainable"] == outside
    # a numbered module list outside a transformer (several heads) looks like blocks: named
    model.heads = nn.ModuleList([nn.Linear(8, 2), nn.Linear(8, 2)])
    with pytest.raises(ValueError, match=r"heads\.0\.weight"):
        hft.select(model)


def test_blocks_of_zero_size_matrices_report_zero_fractions():
    # every matrix of the blocks empty: nothing to count, fractions 0, not a division by zero
    shapes = {"layers.0.attn.q.weight": (0, 4), "layers.0.mlp.fc.weight": (4, 0)}
    sel = hft.select(shapes)
    r = hft.summary(shapes, sel)
    assert (r["total"], r["fraction"], r["block_fraction"]) == (0, 0.0, 0.0)
