"""HFT: Half Fine-Tuning (Hui, Zhang, Wang, Xu, Sun, Wu: "HFT: Half Fine-Tuning for Large Language
Models", arXiv 2404.18466, 2024).

Fine-tune half of the model and keep the other half at its pre-trained value. With a 0/1 mask M
over the parameters HFT solves min_Δ L(θ0 + M ⊙ Δ): a fine-tuning loss with a penalty
‖(I − M)(θ − θ0)‖² = 0 that pins the frozen half to the pre-trained weights.

The rule ("category level"), drawn anew for each stage (each task, in continual learning) and
fixed within it, in every transformer block:
  self-attention   2 of the 4 projections (q, k, v, o) are trained;
  feed-forward     2 of the 3 gated-MLP matrices (gate, up, down) in a random half of the blocks,
                   1 of 3 in the other half;
  norms            1 of the block's 2 norms;
  outside blocks   embeddings, final norm, LM head: always trained.
For Llama that is exactly half of the block parameters. Other ratios and the paper's ablations
(strategy 'model': modules from anywhere; 'layer': whole blocks) are options of select.

  trainable = select(model, seed, stage)  sorted names to train: a pure function of the parameter
                                          names, seed and stage (the same on every rank and every
                                          run), to be saved with the checkpoint
  params = apply(model, trainable)        sets requires_grad of every parameter; returns the
                                          trainable ones, for the optimizer
  summary(model, trainable)               counts and fractions trained, by category

Freezing is requires_grad_(False) and an optimizer over the trainable parameters only, never a
zeroed gradient: a zero gradient still moves a parameter under AdamW's weight decay and momentum.
A frozen matrix also gets no weight gradient and no optimizer state, which is where HFT saves
time and memory. Hugging Face layouts other than Llama's (GPT-2, OPT, T5, BART, ...): see RULES.
"""

import math
import random
import re
from collections.abc import Iterable, Mapping

import torch
from torch import nn

STRATEGIES = ("category", "model", "layer")
CATEGORIES = ("attn", "mlp", "norm")  # in every block ("attn": self-attention); outside is "other"
# Cross-attention, only in the decoder blocks of encoder-decoder models (T5, BART, Whisper): a
# category of its own, 2 of its 4 projections trained, drawn apart from self-attention as attention
# and MLP are, since it is a module with its own job.
CROSS = ("cross_attn",)

# Layouts: block N's modules, self-attention | MLP | norms (| cross-attention):
#   Llama, Mistral, Qwen  self_attn.{q,k,v,o}_proj | mlp.{gate,up,down}_proj
#                         | input_layernorm, post_attention_layernorm
#   GPT-2                 attn.{c_attn,c_proj} | mlp.{c_fc,c_proj} | ln_1, ln_2
#   OPT                   self_attn.{q,k,v,out}_proj | fc1, fc2 | self_attn_layer_norm,
#                         final_layer_norm (the block's; model.decoder.final_layer_norm is outside)
#   BART, Whisper         as OPT, in encoder and decoder blocks; a decoder block adds
#                         encoder_attn_layer_norm | encoder_attn.{q,k,v,out}_proj
#   T5                    layer.0.SelfAttention.{q,k,v,o} | layer.K.DenseReluDense.{wi,wo} ({wi_0,
#                         wi_1,wo} in v1.1) | layer.K.layer_norm; a decoder block adds a norm
#                         | layer.1.EncDecAttention.{q,k,v,o}
# Category of a module from its path inside a block: the first rule whose pattern matches the whole
# of one component of the path (0: the first, -1: the leaf) wins, so the order matters.
RULES = (
    # T5 keeps its relative position embedding in the first block's self-attention; it is a
    # position embedding, and those are outside the blocks (a 5th attention "matrix" in one block
    # only would make that block's attention train 3 of 5)
    ("other", -1, r"relative_attention_bias"),
    # norms before attention: a norm may sit inside an attention module (Qwen3's per-head q_norm,
    # k_norm) or be named after its sub-layer (OPT/BART's self_attn_layer_norm)
    ("norm", -1, r".*norm.*|ln(_\w*|\d*)"),  # *norm*, GPT-2's ln_1, ln_2
    # cross before self, whose pattern matches "encoder_attn" too (BART/Whisper, T5, GPT-2 decoder)
    ("cross_attn", 0, r"encoder_attn|encdecattention|crossattention"),
    ("attn", 0, r".*(attn|attention).*"),  # self_attn, attn, SelfAttention, attention
    # fc1, fc2: OPT/BART/Whisper; DenseReluDense: T5
    ("mlp", 0, r".*(mlp|ffn|feed_forward).*|fc[12]|densereludense"),
)


def category_of(module: str) -> str | None:
    """Category of a module from its path inside a block ('self_attn.q_proj', 'ln_1'), or None:
    one of CATEGORIES + CROSS, or 'other' for a module that belongs with those outside the
    blocks."""
    # T5 wraps each sub-layer of block N in block.N.layer.K: look past the wrapper
    parts = re.sub(r"^layer\.\d+\.", "", module.lower()).split(".")
    for category, where, pattern in RULES:
        if re.fullmatch(pattern, parts[where]):
            return category
    return None


Blocks = list[dict[str, dict[str, list[str]]]]  # per block: {category: {module: [names]}}


def find_blocks(shapes: Mapping[str, object]) -> tuple[Blocks, list[str]]:
    """Group parameter names into transformer blocks.

    A block is the module under the first numeric path component of a name (model.layers.3,
    transformer.h.3). Returns (blocks, outside): blocks in order, each {category: {module:
    [names]}}, and the names outside any block (with T5's relative_attention_bias, which RULES
    sends there).
    Raises ValueError for parameters inside a block that fit no category, and for a model without
    blocks.
    """
    blocks: dict[tuple[str, int], dict[str, dict[str, list[str]]]] = {}
    outside, unplaced = [], []
    for name in sorted(shapes):
        parts = name.split(".")
        i = next((i for i, part in enumerate(parts) if part.isdigit()), None)
        if i is None:
            outside.append(name)
            continue
        # The unit of selection is the module, not the tensor: a bias goes with its weight (Qwen's
        # q/k/v biases, GPT-2's, OPT/BART/Whisper's), a LayerNorm's weight and bias are one norm. A
        # fused QKV is one attention module: GPT-2 trains c_attn (C×3C) or c_proj (C×C), 3/4 or
        # 1/4 of a block's attention weights, 1/2 on average over the blocks.
        module = ".".join(parts[i + 1:-1])  # path inside the block, without the tensor's own name
        category = category_of(module) if module else None
        if category is None:
            unplaced.append(name)
            continue
        if category == "other":  # stored in a block, but a position embedding like those outside
            outside.append(name)
            continue
        block = blocks.setdefault((".".join(parts[:i]), int(parts[i])), {})
        full = ".".join(parts[:i + 1] + [module])
        block.setdefault(category, {}).setdefault(full, []).append(name)
    if unplaced:
        raise ValueError(
            f"could not place {len(unplaced)} parameter(s) inside a transformer block into "
            f"attention, cross-attention, MLP or norm: {unplaced}")
    if not blocks:
        raise ValueError(
            "no transformer blocks found: expected parameter names with a block index, like "
            f"'model.layers.0.self_attn.q_proj.weight' or 'transformer.h.0.attn.c_attn.weight'; "
            f"got {sorted(shapes)[:8]}")
    return [blocks[key] for key in sorted(blocks)], outside


def _tensor_key(t):
    """What makes two tensors of a state_dict one tied tensor: the same memory and layout."""
    if not torch.is_tensor(t) or t.numel() == 0 or t.device.type == "meta":
        return None  # a shape, or a tensor without memory of its own to compare
    return (t.untyped_storage().data_ptr(), t.storage_offset(), t.shape, t.stride(), t.dtype)


def _names(model_or_shapes) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """({name: shape}, {alias: name}): each tensor once, under its first name; a tied tensor's
    other names map to that one."""
    if isinstance(model_or_shapes, nn.Module):
        named = model_or_shapes.named_parameters(remove_duplicate=False)
        items = [(name, p, id(p)) for name, p in named]
    elif isinstance(model_or_shapes, Mapping):  # {name: shape}, or a state_dict of tensors
        items = [(name, s, _tensor_key(s)) for name, s in model_or_shapes.items()]
    else:
        raise TypeError("expected an nn.Module or a {name: shape} mapping, "
                        f"got {type(model_or_shapes).__name__}")
    shapes, aliases, first = {}, {}, {}
    for name, s, key in items:
        if key in first:  # (None, a shape's key, never is)
            aliases[name] = first[key]
            continue
        if key is not None:
            first[key] = name
        shapes[name] = tuple(getattr(s, "shape", s))
    return shapes, aliases


def _shapes(model_or_shapes) -> dict[str, tuple[int, ...]]:
    return _names(model_or_shapes)[0]


def _round(x: float) -> int:
    return math.floor(x + 0.5)  # half up: Python's round() goes to even, 2.5 -> 2 but 3.5 -> 4


def _by_category(blocks, ratio: float, rng: random.Random) -> list[str]:
    # A category with n modules in a block trains floor(r·n) of them, and one more in a random set
    # of blocks sized so that the average over the blocks is r·n (to the nearest whole block).
    # r = 1/2 gives the rule above, a two-matrix MLP (GPT-2) trains 1 of 2, and a decoder block's
    # 3 norms (BART, T5) train 2 or 1.
    chosen = []
    for category in CATEGORIES + CROSS:  # cross last: without it, a model draws as it did before
        per_block = [sorted(block.get(category, {})) for block in blocks]
        target = [ratio * len(modules) for modules in per_block]
        # floor(r·n) everywhere, one more in a random set of blocks so the average is r·n
        partial = [i for i, t in enumerate(target) if t > math.floor(t)]
        n_extra = _round(sum(target[i] - math.floor(target[i]) for i in partial))
        extra = set(rng.sample(partial, n_extra))
        for i, modules in enumerate(per_block):
            chosen += rng.sample(modules, math.floor(target[i]) + (i in extra))
    return chosen


def _by_model(blocks, shapes, ratio: float, rng: random.Random) -> list[str]:
    # ablation: random modules from anywhere in the blocks, until about r of the block parameters
    members = {m: names for block in blocks for modules in block.values()
               for m, names in modules.items()}
    size = {m: sum(math.prod(shapes[n]) for n in names) for m, names in members.items()}
    order = sorted(members)
    rng.shuffle(order)
    target, taken, chosen = ratio * sum(size.values()), 0, []
    for m in order:
        if taken + size[m] / 2 <= target:  # take it when that brings the total closer to the target
            chosen.append(m)
            taken += size[m]
    return chosen


def _by_layer(blocks, ratio: float, rng: random.Random) -> list[str]:
    # ablation: whole blocks, round(r·N) of the N
    picked = rng.sample(range(len(blocks)), _round(ratio * len(blocks)))
    return [m for i in picked for modules in blocks[i].values() for m in modules]


def select(model_or_shapes, seed: int = 0, stage: int = 0, ratio: float = 0.5,
           strategy: str = "category") -> list[str]:
    """Sorted names of the parameters to train in this stage; all others stay frozen.

    model_or_shapes: an nn.Module, or a {name: shape} mapping (a state_dict works too).
    seed, stage: the draw depends on these and the parameter names only (never on global RNG
    state), so every rank and every resumed run gets the same half; a new stage draws anew.
    ratio: fraction of the block parameters to train, in (0, 1]; 0.5 is the paper's HFT.
    strategy: 'category' (the paper's rule), 'model' or 'layer' (its ablations).
    """
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise ValueError(f"ratio must be a number in (0, 1], got {ratio!r}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    for arg, value in (("seed", seed), ("stage", stage)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{arg} must be an int, got {value!r}")
    if stage < 0:
        raise ValueError(f"stage must be >= 0, got {stage}")
    shapes = _shapes(model_or_shapes)
    blocks, outside = find_blocks(shapes)
    # a str seed hashes the same in every process
    rng = random.Random(f"hft/seed={seed}/stage={stage}")
    if strategy == "category":
        modules = _by_category(blocks, ratio, rng)
    elif strategy == "model":
        modules = _by_model(blocks, shapes, ratio, rng)
    else:
        modules = _by_layer(blocks, ratio, rng)
    members = {m: names for block in blocks for mods in block.values() for m, names in mods.items()}
    return sorted(outside + [name for m in modules for name in members[m]])


def _check_names(names, trainable) -> set[str]:
    """trainable as a set of first names (see _names); names = _names(...)."""
    shapes, aliases = names
    if isinstance(trainable, str):
        raise ValueError("trainable must be an iterable of parameter names, "
                         f"got the string {trainable!r}")
    trainable = set(trainable)
    unknown = sorted(trainable - set(shapes) - set(aliases))
    if unknown:
        raise ValueError(f"trainable names not found among the model's parameters: {unknown}")
    return {aliases.get(name, name) for name in trainable}


def apply(model: nn.Module, trainable: Iterable[str]) -> list[torch.nn.Parameter]:
    """Freeze every parameter not in `trainable` and unfreeze the rest (so a new stage starts from
    a fully unfrozen model); return the trainable parameters in model order, for the optimizer.
    A parameter frozen before (by an earlier stage, or by you) trains again if it is in trainable:
    to keep one frozen, leave its name out. A tied tensor trains if any of its names is in it."""
    named = list(model.named_parameters())  # a tied tensor once, under its first name
    trainable = _check_names(_names(model), trainable)
    params = []
    for name, p in named:
        p.requires_grad_(name in trainable)
        if name in trainable:
            params.append(p)
        else:
            p.grad = None  # a gradient left over from an earlier stage must not reach any optimizer
    return params


def summary(model_or_shapes, trainable: Iterable[str]) -> dict:
    """What is trained: parameter counts and fractions overall, over the blocks and by category
    (attn, mlp, norm inside the blocks, and cross_attn where the model has it; other = outside
    them), tensor counts, frozen names."""
    names = _names(model_or_shapes)
    shapes, trainable = names[0], _check_names(names, trainable)
    blocks, outside = find_blocks(shapes)
    category = {name: "other" for name in outside}
    for block in blocks:
        for cat, modules in block.items():
            category.update({name: cat for names in modules.values() for name in names})
    # cross_attn only where a block has it, so a decoder-only model's summary reads as it always did
    in_blocks = [*CATEGORIES, *(c for c in CROSS if any(c in block for block in blocks))]
    counts = {cat: {"trainable": 0, "total": 0} for cat in (*in_blocks, "other")}
    for name, shape in shapes.items():
        counts[category[name]]["total"] += math.prod(shape)
        counts[category[name]]["trainable"] += math.prod(shape) if name in trainable else 0
    for c in counts.values():
        c["fraction"] = c["trainable"] / c["total"] if c["total"] else 0.0
    inside = [counts[cat] for cat in in_blocks]
    n_trainable = sum(c["trainable"] for c in counts.values())
    n_total = sum(c["total"] for c in counts.values())
    n_inside = sum(c["total"] for c in inside)
    frozen = sorted(set(shapes) - trainable)
    return {
        "trainable": n_trainable,
        "total": n_total,
        "fraction": n_trainable / n_total if n_total else 0.0,  # 0 / 0: zero-size tensors only
        "block_fraction": sum(c["trainable"] for c in inside) / n_inside if n_inside else 0.0,
        "by_category": counts,
        "n_blocks": len(blocks),
        "n_trainable_tensors": len(shapes) - len(frozen),
        "n_frozen_tensors": len(frozen),
        "frozen": frozen,
    }
