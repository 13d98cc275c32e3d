"""The tiny forgetting experiment: pre-train a small Llama-style transformer on an invented world,
fine-tune it on a new skill six ways, and measure what it learned and what it forgot.

  full   AdamW.   l1/l2  loss + λ‖θ − θ0‖₁ or λ‖θ − θ0‖², a pull toward the pre-trained θ0.
  mofo   MoFO (Chen et al., arXiv 2407.20999, Algorithm 1): Adam that moves only the α fraction of
         each tensor's entries with the largest momentum (mofo.py).
  hft    Half Fine-Tuning (Hui et al., arXiv 2404.18466): half of each block frozen per task (hft.py).
  lora   LoRA (Hu et al., arXiv 2106.09685): W0 + (α/r)·BA on every block matrix, merged for eval.
  --replay mixes pre-training text into the batches: the reference that needs the old data.
Knowledge is scored as lm-eval scores MMLU/ARC, by multiple choice over each attribute's values
(log-likelihood; primary) and by greedy exact recall; general language by held-out text loss. Every
run is evaluated at step 0 and along training (its curves), so that learning can be read against
forgetting at every step, not only at the end. Each method is one entry of METHODS; the world and
the tasks are in data.py. Results carry a fingerprint of the code that made them (FINGERPRINT), and
the pre-trained checkpoint one of its corpus and model code: a cache never outlives its code.

    python train_tiny.py --method mofo --alpha 0.1      # pre-trains once (cached), then fine-tunes
    python train_tiny.py --method full --tasks add,reverse,sort,count
    torchrun --nproc_per_node=2 train_tiny.py --method hft
    torchrun --nproc_per_node=2 train_tiny.py --method mofo --fsdp   # weights sharded (FSDP2), not DDP
"""
import argparse
import concurrent.futures as cf
import functools
import hashlib
import inspect
import json
import math
import multiprocessing
import os
import random
import resource
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.distributed.tensor import DTensor

import hft
from data import (ARITH, ATTRIBUTES, TASKS, VOCAB, build_corpus, make_rows, shard,
                  test_problems, text_windows, train_problems)
from mofo import FILTERS, MoFO
from model import ModelConfig, TinyLlama

def opt(default, help):  # a config field with its one-line "why", shown by --help
    return field(default=default, metadata={"help": help})

@dataclass
class Config:
    out_dir: str = opt("out", "pre-trained checkpoint, fine-tuning checkpoints and JSON metrics")
    run_name: str = opt("", "name of this run's checkpoint and JSON in out_dir ('' = the method)")
    resume: bool = opt(False, "continue this run's checkpoint, bitwise as if never stopped (CPU)")
    ckpt_interval: int = opt(100, "resumable checkpoint every N fine-tuning iters (0: end of task only)")
    log_interval: int = opt(50, "log loss, lr and ms/iter every N iters")
    device: str = opt("auto", "auto (cuda, then mps, then cpu) or a torch device name")
    compile: bool = opt(False, "torch.compile the model: pays off on GPUs; its fused kernels round apart, so cached apart")
    fsdp: bool = opt(False, "under torchrun: fine-tune with the model sharded by FSDP2 (fully_shard), not DDP")
    data_seed: int = opt(0, "seed of the world, held-out text, test problems and pre-training")
    corpus: str = opt("v2", "v2: numbers and one-digit sums in the world's prose | v1: no digits at all")
    arith: float = opt(ARITH, "v2: fraction of pre-training sentences that state a one-digit sum")
    n_people: int = opt(150, "people in the world, 4 facts each, each fact in 3 sentence templates")
    filler: float = opt(0.1, "fraction of pre-training sentences that are narrative, not facts")
    n_layer: int = opt(4, "transformer blocks")
    n_head: int = opt(4, "attention heads")
    n_embd: int = opt(128, "channels")
    block_size: int = opt(128, "pre-training context length (characters)")
    pretrain_max_iters: int = opt(1200, "pre-training steps, once per out_dir (cached, keyed by the corpus and code)")
    pretrain_batch_size: int = opt(32, "pre-training windows per step")
    pretrain_lr: float = opt(3e-3, "pre-training peak learning rate (AdamW, cosine)")
    pretrain_warmup_iters: int = opt(50, "pre-training warm-up steps")
    pretrain_weight_decay: float = opt(0.1, "pre-training AdamW decay on matrices")
    grad_clip: float = opt(1.0, "clip the global gradient norm (0: off)")
    method: str = opt("mofo", "full | mofo | hft | l1 | l2 | lora (the METHODS table)")
    compare: str = opt("full", "the baseline fine-tuned beside --method (same model, data, seed, rate), or none")
    tasks: str = opt("add", "comma-separated sequence of add, reverse, sort, count (continual)")
    seed: int = opt(0, "fine-tuning seed: data order, HFT draw, LoRA init, MoFO random filter")
    max_iters: int = opt(1000, "fine-tuning steps per task: past the addition's learning transition")
    batch_size: int = opt(64, "problems per step (global: split across DDP ranks)")
    lr: float = opt(1e-3, "fine-tuning peak rate, the main knob for every method; 1e-3: where the committed "
                    "frontier's MoFO learns the task and keeps most facts (at 2e-3 every method erases them)")
    warmup_iters: int = opt(20, "linear warm-up: the first large Adam steps do most forgetting")
    weight_decay: float = opt(0.0, "fine-tuning decoupled decay (0, as in the MoFO paper)")
    alpha: float = opt(0.1, "MoFO: fraction of each tensor updated per step, in (0, 1]")
    filter: str = opt("momentum", "MoFO: rank entries by momentum | gradient | update | random")
    hft_ratio: float = opt(0.5, "HFT: fraction of block parameters trained, in (0, 1]")
    hft_strategy: str = opt("category", "HFT: category (the paper) | model | layer")
    reg: float = opt(-1.0, "L1/L2: penalty strength λ (-1: the method's default, l1 1e-4, l2 1e-2)")
    rank: int = opt(8, "LoRA: rank r of BA (scale LORA_ALPHA/r)")
    lora_targets: str = opt("all", "LoRA: all (every block matrix, PEFT's all-linear) | qv (q_proj, v_proj: "
                            "PEFT's default for Llama and the LoRA paper's choice)")
    replay: float = opt(0.0, "fraction of each batch that is pre-training text, in [0, 1)")
    task_replay: float = opt(0.0, "continual: fraction of each batch that is earlier tasks' problems")
    eval_problems: int = opt(500, "held-out test problems per task, scored at the end")
    curve_points: int = opt(8, "evaluations along each task, besides step 0 (a subset of probes)")

PRESETS = {  # --preset: a named starting point; flags given on the command line still win
    "smoke": dict(out_dir="out/smoke", n_people=12, n_layer=2, n_head=2, n_embd=32, block_size=64,
                  pretrain_max_iters=60, pretrain_batch_size=8, pretrain_warmup_iters=5, max_iters=20,
                  batch_size=8, warmup_iters=2, eval_problems=40, curve_points=4, ckpt_interval=10,
                  log_interval=10)}
PRETRAIN_KEYS = ("data_seed", "corpus", "arith", "n_people", "filler", "n_layer", "n_head", "n_embd",
                 "block_size", "pretrain_max_iters", "pretrain_batch_size", "pretrain_lr",
                 "pretrain_warmup_iters", "pretrain_weight_decay")
RUNTIME_KEYS = ("resume", "ckpt_interval", "log_interval", "device", "fsdp", "compare")  # free on resume
                                                                                      # (compile rounds apart)
PRETRAIN_BETAS = (0.9, 0.95)   # nanoGPT's pre-training betas
FINETUNE_BETAS = (0.9, 0.999)  # torch's defaults, which the MoFO paper's fine-tuning uses
LORA_ALPHA = 16.0              # LoRA's scale is LORA_ALPHA / rank: 2 at rank 8, PEFT's common lora_alpha=16
REPLAY_CONTEXT_DIVISOR = 2     # replayed text windows are half the pre-training context (loss is a per-row mean)
CURVE_PROBES = 100             # probes scored along the way (of 600): ~3 s per point on one CPU thread
CURVE_PROBLEMS = 200           # test problems scored along the way (all eval_problems at the end)
SHIPPED = Path(__file__).resolve().parent / "results"  # where the default pre-trained checkpoint is committed
SOURCES = ("train_tiny.py", "data.py", "mofo.py", "hft.py")  # the files whose text decides a run's numbers

@dataclass(frozen=True)
class Stage:  # one training stage's schedule; pre-training and fine-tuning have the same shape
    max_iters: int
    batch_size: int
    lr: float
    warmup_iters: int
    weight_decay: float

def stage_of(cfg, prefix=""):  # stage_of(cfg, "pretrain_") or stage_of(cfg): the same names
    return Stage(*(getattr(cfg, prefix + f.name) for f in fields(Stage)))

# ----------------------------------------------------------------------------------------------
# Evaluation: multiple choice by log-likelihood, greedy exact match, held-out loss
@torch.no_grad()
def score_answers(model, prompts, answers, device="cpu", rows_per_batch=512):
    """Per (prompt, answer): the answer's summed log-probability, and whether greedy decoding from
    the prompt writes exactly the answer. Greedy writes it iff every answer token is the argmax
    given the prompt and the answer so far, so one teacher-forced pass decides all rows at once."""
    logp, exact = [], []
    for s in range(0, len(prompts), rows_per_batch):
        x, y = make_rows(prompts[s:s + rows_per_batch], answers[s:s + rows_per_batch])
        logits = model(x.to(device))[0].float().log_softmax(-1).cpu()  # (B, T, V)
        mask, target = y >= 0, y.clamp(min=0)
        logp += (logits.gather(-1, target[..., None])[..., 0] * mask).sum(1).tolist()
        exact += ((logits.argmax(-1) == target) | ~mask).all(1).tolist()
    return logp, exact

def fact_scores(model, probes, device="cpu"):
    """fact_mc: the true value is the most likely of the attribute's candidates (lm-eval's multiple
    choice); fact_greedy: greedy decoding writes it; fact_chance: what guessing scores at MC."""
    rows = [(prompt, f" {c}.", c == value) for attr, prompt, value in probes for c in ATTRIBUTES[attr][0]]
    logp, exact = score_answers(model, [r[0] for r in rows], [r[1] for r in rows], device)
    mc = greedy = i = 0
    for attr, _, value in probes:
        n = len(ATTRIBUTES[attr][0])
        mc += rows[max(range(i, i + n), key=logp.__getitem__)][2]  # the most likely candidate
        greedy += next(exact[j] for j in range(i, i + n) if rows[j][2])  # the true value's row
        i += n
    n = len(probes)
    return {"fact_mc": mc / n, "fact_greedy": greedy / n,
            "fact_chance": sum(1 / len(ATTRIBUTES[a][0]) for a, _, _ in probes) / n}

def task_scores(model, problems, device="cpu"):
    """(exact-match accuracy, answer loss): the loss, nats per answer character averaged over the
    problems, moves smoothly where the accuracy jumps."""
    prompts, answers = zip(*problems)
    logp, exact = score_answers(model, prompts, answers, device)
    return sum(exact) / len(problems), -sum(lp / len(a) for lp, a in zip(logp, answers)) / len(problems)

@torch.no_grad()
def estimate_loss(model, data, block_size, device="cpu", max_windows=64):
    n = min(max_windows, (len(data) - 1) // block_size)
    x, y = (torch.stack([data[i * block_size + o:(i + 1) * block_size + o] for i in range(n)]) for o in (0, 1))
    return model(x.to(device), y.to(device))[1].item()

# ----------------------------------------------------------------------------------------------
# Methods: what each one trains and with which optimizer; LoRA and the L1/L2 pull toward θ0
class LoRA(nn.Module):
    """Parametrizes a frozen W0 as W = W0 + (α/r)·BA; B starts at zero, so training starts at W0."""

    def __init__(self, weight, rank):
        super().__init__()
        self.scale = LORA_ALPHA / rank
        self.lora_A = nn.Parameter(torch.empty(rank, weight.size(1), device=weight.device))
        self.lora_B = nn.Parameter(torch.zeros(weight.size(0), rank, device=weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's init, as in the LoRA paper's code

    def forward(self, W0):
        return W0 + self.scale * self.lora_B @ self.lora_A

def all_params(model, cfg, stage):
    return list(model.parameters()), None

def hft_half(model, cfg, stage):  # a new half of every block per stage (task)
    trainable = hft.select(model, seed=cfg.seed, stage=stage, ratio=cfg.hft_ratio, strategy=cfg.hft_strategy)
    return hft.apply(model, trainable), trainable

LORA_TARGETS = {"all": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                "qv": ("q_proj", "v_proj")}

def lora_params(model, cfg, stage):  # on the block matrices that lora_targets names (all: attention and MLP)
    model.requires_grad_(False)
    for block in model.model.layers:
        for linear in (m for n, m in (*block.self_attn.named_children(), *block.mlp.named_children())
                       if n in LORA_TARGETS[cfg.lora_targets]):
            parametrize.register_parametrization(linear, "weight", LoRA(linear.weight, cfg.rank))
    return [p for n, p in model.named_parameters() if "lora_" in n], None

def adamw(params, cfg):
    return torch.optim.AdamW(params, lr=cfg.lr, betas=FINETUNE_BETAS, weight_decay=cfg.weight_decay)

def mofo(params, cfg):
    return MoFO(params, lr=cfg.lr, betas=FINETUNE_BETAS, weight_decay=cfg.weight_decay,
                alpha=cfg.alpha, filter=cfg.filter, seed=cfg.seed)

def l1_pull(delta):  # the gradient of ‖θ − θ0‖₁ (times λ)
    return delta.sign()

def l2_pull(delta):  # the gradient of ‖θ − θ0‖² (times λ)
    return 2 * delta

@dataclass(frozen=True)
class Method:
    params: object             # (model, cfg, stage) -> (trainable parameters, HFT selection or None)
    optimizer: object          # (params, cfg) -> a torch.optim.Optimizer
    pull: object = None        # Δ = θ − θ0 -> the gradient of a penalty toward θ0, added times λ
    reg: float = 0.0           # the penalty's default λ (tuned on the v1 frontier)
    knob: str = ""             # the Config field that is this method's own knob (named in tables and plots)

METHODS = {  # adding a method is one entry (and one sweep label): e.g. "mofo_l2": Method(all_params, mofo, l2_pull, 1e-2)
    "full": Method(all_params, adamw),
    "mofo": Method(all_params, mofo, knob="alpha"),
    "hft": Method(hft_half, adamw, knob="hft_ratio"),
    "l1": Method(all_params, adamw, l1_pull, reg=1e-4, knob="reg"),
    "l2": Method(all_params, adamw, l2_pull, reg=1e-2, knob="reg"),
    "lora": Method(lora_params, adamw, knob="rank"),
}

def label(config):  # "mofo alpha=0.1" from a run's config (a dict): the method and its own knob
    knob = METHODS[config["method"]].knob
    extra = f" filter={config['filter']}" if config["method"] == "mofo" and config["filter"] != "momentum" else ""
    extra += f" on {config['lora_targets']}" if config["method"] == "lora" and config.get("lora_targets", "all") != "all" else ""
    return config["method"] + (f" {knob}={config[knob]:g}" if knob else "") + extra

def end_stage(model):  # LoRA's W0 + (α/r)·BA becomes the plain weight (same name); all trainable again
    for module in model.modules():
        if parametrize.is_parametrized(module):
            parametrize.remove_parametrizations(module, "weight")
    model.requires_grad_(True)

def add_pull(model, theta0, pull, reg):
    """Add λ·pull(θ − θ0) to each gradient (the penalty's gradient); the logged loss stays the task's."""
    for name, p in model.named_parameters():
        if p.grad is not None:
            p.grad.add_(pull(p.detach() - theta0[name]), alpha=reg)

def weights(model, names):  # the weights as the forward pass sees them (LoRA's W0 + (α/r)·BA included)
    return {n: getattr(model.get_submodule(n.rpartition(".")[0]), n.rpartition(".")[2]) for n in names}

def distance(model, theta0):  # ‖θ − θ0‖
    return torch.cat([(full(w.detach()) - theta0[n]).flatten() for n, w in weights(model, theta0).items()]).norm().item()

# ----------------------------------------------------------------------------------------------
# Training: one loop for pre-training and fine-tuning, single process or DDP
def get_lr(it, lr, warmup_iters, max_iters, min_ratio=0.1):  # linear warm-up, cosine to lr/10
    if it < warmup_iters:
        return lr * (it + 1) / warmup_iters
    t = (it - warmup_iters) / max(1, max_iters - warmup_iters)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))

def train(fwd, model, optimizer, get_batch, stage, grad_clip, ctx, start=0, after_backward=None,
          on_eval=None, eval_every=0, save=None, ckpt_interval=0, log_interval=50, tag="train"):
    """Iterations start..max_iters-1 on get_batch() -> [(x, y, weight)]; on_eval(it) before the
    steps it = 0, eval_every, 2·eval_every, ... and after the last. Returns (seconds, tokens), the
    evaluations' time left out."""
    params = [p for p in model.parameters() if p.requires_grad]
    t0, tokens, eval_s, last = time.time(), 0, 0.0, (time.time(), start)
    for it in range(start, stage.max_iters + 1):
        if on_eval is not None and (it == stage.max_iters or it % eval_every == 0):
            t_eval = time.time()
            on_eval(it)
            eval_s += time.time() - t_eval
        if it == stage.max_iters:
            break
        for group in optimizer.param_groups:
            group["lr"] = get_lr(it, stage.lr, stage.warmup_iters, stage.max_iters)
        loss = 0.0
        for x, y, weight in get_batch():
            with ctx:
                loss = loss + weight * fwd(x, y)[1]
            tokens += x.numel()
        if not math.isfinite(loss.item()):  # stop before the step touches the weights
            raise FloatingPointError(f"{tag}: loss is {loss.item()} at iter {it}; stopped, the last "
                                     "checkpoint on disk is intact (try a lower --lr)")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if after_backward is not None:
            after_backward()  # e.g. the L1/L2 penalty's gradient
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        if log_interval and (it % log_interval == 0 or it == stage.max_iters - 1):
            log(f"{tag} iter {it}: loss {loss.item():.4f}, lr {optimizer.param_groups[0]['lr']:.2e}, "
                f"{1000 * (time.time() - last[0]) / (it + 1 - last[1]):.1f} ms/iter")
            last = (time.time(), it + 1)
        if save is not None and ckpt_interval and (it + 1) % ckpt_interval == 0 and it + 1 < stage.max_iters:
            save(it + 1)
    return time.time() - t0 - eval_s, tokens

def log(msg):  # rank 0 speaks for all
    if int(os.environ.get("RANK", 0)) == 0:
        print(msg, flush=True)

def pick_device(name):  # auto: cuda, then mps, then cpu
    if name != "auto":
        return name
    return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"

def autocast(device):  # bf16 autocast on CUDA; float32 elsewhere
    return torch.autocast("cuda", torch.bfloat16) if device.startswith("cuda") else nullcontext()

def setup_distributed(device):
    """(rank, world, device). Under torchrun: one process per rank, gloo on CPU, nccl on GPU."""
    if "RANK" not in os.environ:
        return 0, 1, device
    if device.startswith("cuda"):
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size(), device

def wrap(model, compile, world, ddp=True):  # what the loop calls: the model, compiled and/or DDP-wrapped
    model = torch.compile(model) if compile else model
    return DDP(model) if world > 1 and ddp else model

def shard_model(model, device, world):
    """--fsdp: FSDP2 instead of DDP. Each block, then the rest, becomes DTensors split by rows across
    the ranks (gathered for each forward, gradients reduce-scattered); the optimizer steps each
    rank's rows (MoFO still with each whole tensor's mask)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(torch.device(device).type, (world,))
    for block in model.model.layers:
        fully_shard(block, mesh=mesh)
    # reshard_after_forward given: by default the root keeps its whole weights after a forward (as
    # an evaluation's), and model.parameters() would hand those out in place of the sharded ones.
    return fully_shard(model, mesh=mesh, reshard_after_forward=True)

def full(t):  # a whole tensor: an FSDP2 DTensor gathered from every rank (all must call), others as is
    return t.full_tensor() if isinstance(t, DTensor) else t

def model_config(cfg):
    return ModelConfig(cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, len(VOCAB))

def pretrain(cfg, corpus, device, ctx, rank, world):
    torch.manual_seed(cfg.data_seed)
    model = TinyLlama(model_config(cfg)).to(device)
    groups = [{"params": [p for p in model.parameters() if p.dim() >= 2]},  # no decay on norms, as nanoGPT
              {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    stage = stage_of(cfg, "pretrain_")
    optimizer = torch.optim.AdamW(groups, lr=stage.lr, betas=PRETRAIN_BETAS, weight_decay=stage.weight_decay)
    rng = random.Random(f"pretrain/{cfg.data_seed}")
    batch = lambda: [(*(t.to(device) for t in text_windows(
        corpus.train, cfg.block_size, stage.batch_size, rng, rank, world)), 1.0)]
    seconds, tokens = train(wrap(model, cfg.compile, world), model, optimizer, batch, stage, cfg.grad_clip, ctx,
                            log_interval=cfg.log_interval, tag="pretrain")
    metrics = {**fact_scores(model, corpus.probes, device), "time_s": seconds, "tokens_per_s": tokens * world / seconds,
               "heldout_loss": estimate_loss(model, corpus.heldout, cfg.block_size, device),
               **{f"{t}_acc": task_scores(model, test_problems(t, cfg.data_seed, cfg.eval_problems,
                                                                corpus.stated), device)[0] for t in TASKS}}
    log(f"pre-trained in {seconds:.0f} s: {json.dumps(metrics)}")
    return {"model": model.state_dict(), "config": asdict(cfg), "metrics": metrics}

PRETRAIN_CODE = (ModelConfig, TinyLlama, get_lr, train, text_windows, pretrain)

# ----------------------------------------------------------------------------------------------
# Fingerprints: a cached result is served only for the code and data that produced it
def sha(data):
    return hashlib.sha256(data).hexdigest()[:12]

def fingerprint():
    """The files whose text decides a fine-tuning run's numbers, by hash, and the torch version."""
    here = Path(__file__).resolve().parent
    return {**{f: sha((here / f).read_bytes()) for f in SOURCES}, "torch": str(torch.__version__)}

FINGERPRINT = fingerprint()  # taken at import: the code this process runs, even if the files change later

def pretrain_fingerprint(corpus):
    """What a pre-trained checkpoint is made of: the corpus's tokens, the model and the loop."""
    return {"corpus": sha(corpus.train.numpy().tobytes()), "torch": str(torch.__version__),
            "code": sha("".join(inspect.getsource(obj) for obj in PRETRAIN_CODE).encode())}

def changed(old, new):  # what differs between two fingerprints, by name
    return [k for k in new if old.get(k) != new[k]]

# ----------------------------------------------------------------------------------------------
# One run: pre-train if missing (atomic checkpoints), fine-tune on each task, evaluate, write JSON
def save_checkpoint(obj, path):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)  # atomic: a crash mid-write leaves the previous file intact

def read_checkpoint(path):
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read checkpoint {path} ({type(e).__name__}); delete it to start over") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise ValueError(f"checkpoint {path} is not one of ours (no model/config); delete it to start over")
    return ckpt

@functools.lru_cache(maxsize=4)  # keyed by mtime: many runs in one process read it once
def read_pretrained(path, mtime_ns):
    return read_checkpoint(path)

def check_same(saved, cfg, keys, path):
    diff = [f"{k}={saved.get(k)!r} (now {getattr(cfg, k)!r})" for k in keys if saved.get(k) != getattr(cfg, k)]
    if diff:
        raise ValueError(f"checkpoint {path} does not match this run: {', '.join(diff)}; "
                         "use another --out_dir or delete it")

def pretrained_path(cfg):  # one checkpoint per pre-training configuration, side by side in out_dir
    what = {k: getattr(cfg, k) for k in PRETRAIN_KEYS} | ({"compile": True} if cfg.compile else {})
    key = sha(json.dumps(what, sort_keys=True).encode())  # (compile in the key only when on: the eager names stay)
    return os.path.join(cfg.out_dir, f"pretrained-{key}.pt")

def shipped_path(cfg):  # the repository ships the default model's checkpoint: a fresh clone fine-tunes at once
    return str(SHIPPED / os.path.basename(pretrained_path(cfg)))

def load_or_pretrain(cfg, corpus, device, ctx, rank, world):
    """The pre-trained checkpoint of cfg's world and model: out_dir's, else the shipped one; trained
    first if neither exists, and again (saying why) if the corpus or the model/loop code changed
    since it was trained."""
    path, want, why = pretrained_path(cfg), pretrain_fingerprint(corpus), "none yet"
    for where in (path, shipped_path(cfg)):
        if os.path.exists(where):
            ckpt = read_pretrained(where, os.stat(where).st_mtime_ns)
            stale = changed(ckpt.get("fingerprint", {}), want)
            if not stale:
                return ckpt
            if why == "none yet":  # say why of the first one found
                why = f"the {' and the '.join(stale)} changed since {where} was trained"
    log(f"pre-trained checkpoint {path}: {why}; pre-training ({cfg.pretrain_max_iters} iters)")
    ckpt = {**pretrain(cfg, corpus, device, ctx, rank, world), "fingerprint": want}
    if rank == 0:
        save_checkpoint(ckpt, path)
    if world > 1:
        dist.barrier()
    return ckpt

def check_config(cfg, world=1):
    ints = ("n_layer", "n_head", "n_embd", "block_size", "n_people", "pretrain_max_iters", "pretrain_batch_size",
            "max_iters", "batch_size", "eval_problems", "rank", "curve_points")
    checks = [
        (cfg.method in METHODS, f"--method must be one of {', '.join(METHODS)}, got {cfg.method!r}"),
        (cfg.compare in (*METHODS, "none"), f"--compare must be none or one of {', '.join(METHODS)}, got {cfg.compare!r}"),
        (set(cfg.tasks.split(",")) <= set(TASKS), f"--tasks: unknown task in {cfg.tasks!r}, choose from {TASKS}"),
        (0 < cfg.alpha <= 1, f"--alpha must be in (0, 1], got {cfg.alpha}"),
        (cfg.filter in FILTERS, f"--filter must be one of {', '.join(FILTERS)}, got {cfg.filter!r}"),
        (cfg.lora_targets in LORA_TARGETS, f"--lora_targets must be one of {', '.join(LORA_TARGETS)}, got {cfg.lora_targets!r}"),
        (0 < cfg.hft_ratio <= 1, f"--hft_ratio must be in (0, 1], got {cfg.hft_ratio}"),
        (cfg.hft_strategy in hft.STRATEGIES, f"--hft_strategy must be in {hft.STRATEGIES}, got {cfg.hft_strategy!r}"),
        (cfg.reg == -1 or cfg.reg >= 0, f"--reg must be >= 0 (or -1 for the default), got {cfg.reg}"),
        (0 <= cfg.replay < 1 and 0 < cfg.filler < 1, "--replay must be in [0, 1) and --filler in (0, 1)"),
        (0 <= cfg.task_replay and cfg.replay + cfg.task_replay < 1, "--task_replay must be >= 0, with replay < 1"),
        (cfg.corpus in ("v1", "v2"), f"--corpus must be v1 or v2, got {cfg.corpus!r}"),
        (0 <= cfg.arith < 1 and cfg.filler + cfg.arith < 1, f"--arith must be in [0, 1 - filler), got {cfg.arith}"),
        (cfg.lr > 0 and cfg.pretrain_lr > 0, f"--lr and --pretrain_lr must be > 0, got {cfg.lr}, {cfg.pretrain_lr}"),
        (cfg.n_embd % (2 * cfg.n_head) == 0, f"--n_embd must be a multiple of 2·n_head (rotary), got {cfg.n_embd}"),
        (cfg.batch_size % world == 0, f"--batch_size {cfg.batch_size} must be divisible by the {world} ranks"),
        (not cfg.fsdp or (cfg.method in ("full", "mofo", "hft") and not cfg.resume),
         "--fsdp runs --method full, mofo or hft, without --resume (LoRA and the L1/L2 pull need whole tensors)"),
    ] + [(getattr(cfg, k) >= 1, f"--{k} must be >= 1, got {getattr(cfg, k)}") for k in ints]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)

def run(cfg: Config) -> dict:
    """Pre-train if needed, fine-tune on cfg.tasks in turn, evaluate: the metrics of <run_name>.json."""
    t_start = time.time()
    check_config(cfg)
    rank, world, device = setup_distributed(pick_device(cfg.device))
    check_config(cfg, world)
    ctx = autocast(device)
    method = METHODS[cfg.method]
    cfg = replace(cfg, reg=method.reg if cfg.reg == -1 else cfg.reg)
    name, tasks = cfg.run_name or cfg.method, cfg.tasks.split(",")
    ckpt_path = os.path.join(cfg.out_dir, f"{name}.pt")
    log(f"config: {json.dumps(asdict(cfg))}")
    corpus = build_corpus(cfg.data_seed, cfg.n_people, cfg.filler, cfg.corpus, cfg.arith)
    pre = load_or_pretrain(cfg, corpus, device, ctx, rank, world)
    model = TinyLlama(model_config(cfg)).to(device)
    model.load_state_dict(pre["model"])
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    sharded = cfg.fsdp and world > 1
    if sharded:  # before the optimizers are made: sharding replaces the parameters by DTensors
        shard_model(model, device, world)
    tests = {t: test_problems(t, cfg.data_seed, cfg.eval_problems, corpus.stated) for t in tasks}
    held_out = {t: {prompt for prompt, _ in tests[t]} for t in tasks}
    # Along the way: a fixed subset of probes and problems, the same at every point of every run
    curve_probes = tuple(random.Random("curve").sample(corpus.probes, min(CURVE_PROBES, len(corpus.probes))))
    torch.manual_seed(cfg.seed)
    rng = random.Random(f"finetune/{cfg.seed}")
    state = {"task": 0, "iter_num": 0, "R": [], "curve": [], "time_s": 0.0, "tokens": 0,
             "R0": [task_scores(model, tests[t], device)[0] for t in tasks]}
    resume = None
    if cfg.resume:
        if not os.path.exists(ckpt_path):
            raise ValueError(f"--resume: no checkpoint at {ckpt_path}")
        resume = read_checkpoint(ckpt_path)
        check_same(resume["config"], cfg, [f.name for f in fields(Config) if f.name not in RUNTIME_KEYS], ckpt_path)
        state = {k: resume[k] for k in state}
        log(f"resuming {ckpt_path} at task {state['task']}, iter {state['iter_num']}")

    def restore(optimizer):  # weights, optimizer and both random streams as they were; resume done
        model.load_state_dict(resume["model"])
        if optimizer is not None:
            optimizer.load_state_dict(resume["optimizer"])
        torch.set_rng_state(resume["rng"]["torch"])
        rng.setstate(resume["rng"]["data"])
        return None

    def save(optimizer, trainable, iter_num):
        state["iter_num"] = iter_num
        model_state = {k: full(v) for k, v in model.state_dict().items()}  # every rank: FSDP2 gathers
        if rank == 0:  # (an FSDP2 optimizer's state is left out: --resume is not offered with --fsdp)
            save_checkpoint({"model": model_state, "optimizer": None if sharded or not optimizer else optimizer.state_dict(),
                             "hft": trainable, "config": asdict(cfg), **state,
                             "rng": {"torch": torch.get_rng_state(), "data": rng.getstate()}}, ckpt_path)

    def batch(i):  # the global batch, drawn alike on every rank; this rank keeps its shard
        n_replay = round(cfg.replay * cfg.batch_size)
        problems = train_problems(tasks, i, cfg.batch_size - n_replay, rng, held_out,
                                  round(cfg.task_replay * cfg.batch_size))
        x, y = make_rows(*zip(*shard(problems, rank, world)))
        parts = [(x.to(device), y.to(device), 1 - n_replay / cfg.batch_size)]
        if n_replay:
            x, y = text_windows(corpus.train, cfg.block_size // REPLAY_CONTEXT_DIVISOR, n_replay, rng, rank, world)
            parts.append((x.to(device), y.to(device), n_replay / cfg.batch_size))
        return parts

    def curve_point(stage, it):  # learning and forgetting along the way: one point of the curves
        point = {"stage": stage, "iter": it, "fact_mc": fact_scores(model, curve_probes, device)["fact_mc"],
                 "heldout_loss": estimate_loss(model, corpus.heldout, cfg.block_size, device),
                 "dist_abs": distance(model, theta0)}
        for t in tasks:
            point[f"{t}_acc"], point[f"{t}_loss"] = task_scores(model, tests[t][:CURVE_PROBLEMS], device)
        state["curve"] = state["curve"] + [point]
        log(f"{cfg.method} {tasks[stage]} step {it}: task accuracy {point[f'{tasks[stage]}_acc']:.1%}, "
            f"facts {point['fact_mc']:.1%}, held-out loss {point['heldout_loss']:.3f}")

    if resume is not None and resume["iter_num"] == 0:  # saved at a task boundary: merged weights
        resume = restore(None)
    for i in range(state["task"], len(tasks)):
        params, trainable = method.params(model, cfg, i)
        optimizer = method.optimizer(params, cfg)
        if resume is not None:  # saved mid-task: restore after the stage is set up as it was then
            resume = restore(optimizer)
        seconds, tokens = train(
            wrap(model, cfg.compile, world, ddp=not sharded), model, optimizer, functools.partial(batch, i), stage_of(cfg),
            cfg.grad_clip, ctx, start=state["iter_num"],
            after_backward=method.pull and functools.partial(add_pull, model, theta0, method.pull, cfg.reg),
            on_eval=functools.partial(curve_point, i), eval_every=max(1, cfg.max_iters // cfg.curve_points),
            save=functools.partial(save, optimizer, trainable), ckpt_interval=cfg.ckpt_interval,
            log_interval=cfg.log_interval, tag=f"{cfg.method} {tasks[i]}")
        state["time_s"], state["tokens"] = state["time_s"] + seconds, state["tokens"] + tokens * world
        end_stage(model)
        state["R"] = state["R"] + [[task_scores(model, tests[t], device)[0] for t in tasks]]
        log(f"after {tasks[i]}: " + ", ".join(f"{t} {a:.1%}" for t, a in zip(tasks, state["R"][-1])))
        state["task"] = i + 1
        save(None, trainable, 0)
    metrics = evaluate(model, theta0, cfg, corpus, pre, state, tasks, device)
    metrics["wall_s"] = time.time() - t_start  # evaluation (and pre-training, if it ran) included
    if rank == 0:
        Path(cfg.out_dir, f"{name}.json").write_text(json.dumps(metrics, indent=1))
    return metrics

def evaluate(model, theta0, cfg, corpus, pre, state, tasks, device):
    before, after = pre["metrics"], fact_scores(model, corpus.probes, device)
    after["heldout_loss"] = estimate_loss(model, corpus.heldout, cfg.block_size, device)
    R, T = state["R"], len(tasks)
    delta = [(full(p.detach()) - theta0[n]).flatten() for n, p in model.named_parameters()]
    dist_abs, norm0 = torch.cat(delta).norm().item(), torch.cat([p.flatten() for p in theta0.values()]).norm().item()
    m = {"method": cfg.method, "tasks": tasks, "config": asdict(cfg), "R0": state["R0"], "R": R,
         "task_acc": R[-1][-1], "task_acc_before": state["R0"][-1], "OP": sum(R[-1]) / T,
         "BWT": sum(R[-1][j] - R[j][j] for j in range(T - 1)) / (T - 1) if T > 1 else None,
         "fact_chance": after["fact_chance"], "dist_abs": dist_abs, "dist_rel": dist_abs / norm0,
         "frac_changed": sum((d != 0).sum().item() for d in delta) / sum(d.numel() for d in delta),
         "curve": state["curve"], "time_s": state["time_s"],
         "tokens_per_s": state["tokens"] / max(state["time_s"], 1e-9), "threads": torch.get_num_threads(),
         "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "pretrain_time_s": before["time_s"],
         "fingerprint": FINGERPRINT, "pretrained_fingerprint": pre["fingerprint"]}
    for k in ("fact_mc", "fact_greedy", "heldout_loss"):  # forgetting: drops in knowledge, rise in loss
        m[f"{k}_before"], m[f"{k}_after"] = before[k], after[k]
    m["forget_mc"], m["forget_greedy"] = (before[k] - after[k] for k in ("fact_mc", "fact_greedy"))
    m["heldout_loss_rise"] = after["heldout_loss"] - before["heldout_loss"]
    return m

def report(ms):
    """One table of runs side by side: along training (task accuracy, knowledge kept), then the end
    point against the pre-trained model. The lesson is in the difference between the columns."""
    names, first = [label(m["config"]) for m in ms], ms[0]
    w = max(16, *(len(n) + 2 for n in names))
    print(f"\nalong training (each point: up to {CURVE_PROBLEMS} held-out problems and {CURVE_PROBES} facts)")
    print(f"{'':>10}" + "".join(f"{n:>{w}}" for n in names))
    print(f"{'step':>10}" + f"{'task   facts':>{w}}" * len(ms))
    for points in zip(*(m["curve"] for m in ms)):
        step = points[0]["stage"] * first["config"]["max_iters"] + points[0]["iter"]
        task = first["tasks"][points[0]["stage"]]
        print(f"{step:>10}" + "".join(f"{p[task + '_acc']:.1%} {p['fact_mc']:6.1%}".rjust(w) for p in points))
    rows = [(f"task accuracy ({t})", first["R0"][j], [m["R"][-1][j] for m in ms], "{:.1%}")
            for j, t in enumerate(first["tasks"])]
    rows += [(f"facts kept, MC (chance {first['fact_chance']:.1%})", first["fact_mc_before"],
              [m["fact_mc_after"] for m in ms], "{:.1%}"),
             ("facts, greedy recall", first["fact_greedy_before"], [m["fact_greedy_after"] for m in ms], "{:.1%}"),
             ("held-out loss", first["heldout_loss_before"], [m["heldout_loss_after"] for m in ms], "{:.3f}"),
             ("|θ-θ0| (relative)", None, [f"{m['dist_abs']:.2f} ({m['dist_rel']:.3f})" for m in ms], "{}"),
             ("entries changed", None, [m["frac_changed"] for m in ms], "{:.1%}"),
             ("fine-tuning seconds", None, [m["time_s"] for m in ms], "{:.0f}")]
    if len(first["tasks"]) > 1:
        rows += [("continual OP", None, [m["OP"] for m in ms], "{:.1%}"),
                 ("continual BWT", None, [m["BWT"] for m in ms], "{:+.1%}")]
    print(f"\n{'end point (' + str(first['config']['eval_problems']) + ' problems, all facts)':34s}{'before':>8}"
          + "".join(f"{n:>{w}}" for n in names))
    for name, before, after, fmt in rows:
        print(f"{name:34s}{'' if before is None else fmt.format(before):>8}" + "".join(f"{fmt.format(a):>{w}}" for a in after))

def plot(ms, path):
    """Task accuracy and knowledge against step, and knowledge against task accuracy, per run."""
    from matplotlib.figure import Figure  # no pyplot: nothing to show, no backend to pick
    fig = Figure(figsize=(12, 3.6), dpi=100, layout="constrained")
    axes = fig.subplots(1, 3)
    first = ms[0]
    for m, name in zip(ms, (label(m["config"]) for m in ms)):
        steps = [p["stage"] * m["config"]["max_iters"] + p["iter"] for p in m["curve"]]
        acc = [p[f"{m['tasks'][p['stage']]}_acc"] for p in m["curve"]]
        facts = [p["fact_mc"] for p in m["curve"]]
        line, = axes[0].plot(steps, acc, "o-", ms=3, label=name)
        axes[1].plot(steps, facts, "o-", ms=3, color=line.get_color())
        axes[2].plot(acc, facts, "o-", ms=3, color=line.get_color())
    for ax in axes[1:]:
        ax.axhline(first["fact_chance"], color="gray", ls=":", lw=1)
    axes[1].text(0, first["fact_chance"] + 0.02, "chance", color="gray", fontsize=8)
    for ax, (x, y) in zip(axes, (("step", "task accuracy"), ("step", "facts kept (multiple choice)"),
                                 ("task accuracy", "facts kept (multiple choice)"))):
        ax.set(xlabel=x, ylabel=y, ylim=(-0.02, 1.02))
    axes[2].set_xlim(-0.02, 1.02)
    axes[0].legend(fontsize=8)
    c = first["config"]
    fig.suptitle(f"{', '.join(first['tasks'])}: lr {c['lr']:g}, seed {c['seed']}, {c['max_iters']} steps per task "
                 "(upper right of the last panel is best)", fontsize=10)
    fig.savefig(path, metadata={"Software": None})

# ----------------------------------------------------------------------------------------------
# Command line: argparse generated from Config; bad input gives one line and a non-zero exit
class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of the usage block
        raise ValueError(message)

def parse_args(argv=None):
    p = Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default=argparse.SUPPRESS,
                   help="start from a named set of defaults (smoke: the whole pipeline in seconds)")
    for f in fields(Config):
        kind = dict(action=argparse.BooleanOptionalAction) if f.type is bool else dict(type=f.type)
        p.add_argument(f"--{f.name}", default=argparse.SUPPRESS, help=f"{f.metadata['help']} (default: {f.default!r})",
                       **kind)
    given = vars(p.parse_args(argv))  # only the flags on the command line (defaults suppressed)
    return Config(**{**PRESETS.get(given.pop("preset", None), {}), **given})

def run_alone(cfg, threads):  # one run of a comparison, in a process of its own with its share of the cores
    torch.set_num_threads(threads)
    return run(cfg)

def compare(cfg):
    """cfg.method and the baseline cfg.compare, fine-tuned from the same pre-trained model with the
    same data, seed, rate and steps; side by side, one process each with half of the cores (under
    torchrun, one after the other). Returns their metrics, cfg's first."""
    name = cfg.run_name or cfg.method
    runs = [cfg, replace(cfg, method=cfg.compare, run_name=f"{name}-{cfg.compare}")]
    for c in runs:
        check_config(c)
    if "RANK" in os.environ:
        return [run(c) for c in runs]
    device = pick_device(cfg.device)  # pre-trained here first, so that the two runs do not both do it
    corpus = build_corpus(cfg.data_seed, cfg.n_people, cfg.filler, cfg.corpus, cfg.arith)
    load_or_pretrain(cfg, corpus, device, autocast(device), 0, 1)
    threads = max(1, torch.get_num_threads() // 2)
    log(f"fine-tuning {' and '.join(label(asdict(c)) for c in runs)} side by side, {threads} thread(s) each")
    quiet = [replace(c, log_interval=0) for c in runs]  # the curve points are the progress report
    with cf.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(run_alone, quiet, [threads] * 2))

def main(argv=None):
    try:
        cfg = parse_args(argv)
        ms = compare(cfg) if cfg.compare not in ("none", cfg.method) else [run(cfg)]
        if int(os.environ.get("RANK", 0)) == 0:
            report(ms)
            figure = os.path.join(cfg.out_dir, f"{cfg.run_name or cfg.method}.png")
            plot(ms, figure)
            print(f"\nfigure {figure}; metrics and curves in {cfg.out_dir}/<run>.json")
    except (ValueError, FloatingPointError) as e:  # bad flags, checkpoints or a diverged run
        print(f"train_tiny.py: error: {e}", file=sys.stderr)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0

if __name__ == "__main__":
    sys.exit(main())
