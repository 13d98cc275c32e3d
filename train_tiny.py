"""The tiny forgetting experiment: a small Llama-style model that knows an invented world learns a
new skill, seven ways, and we watch what it learns and what it forgets along the way.

  full   AdamW on every weight.
  mofo   MoFO (Chen et al., arXiv 2407.20999): Adam that moves only the α fraction of each
         tensor's entries with the largest momentum (mofo.py).
  hft    Half Fine-Tuning (Hui et al., arXiv 2404.18466): half of each block frozen per task.
  l1/l2  AdamW on loss + λ‖θ − θ0‖₁ or λ‖θ − θ0‖²: a pull toward the pre-trained weights θ0;
         mofo_l2: MoFO on the same pulled loss (do the two add up?).
  lora   LoRA (Hu et al., arXiv 2106.09685): W0 + (α/r)·BA on the block matrices, merged after.

The model (model.py) is pre-trained once on the world (pretrain.py, cached); the world, the tasks
and how a model is scored are in data.py. Every run is scored at step 0 and along training (its
curves) on task accuracy, knowledge of the world's facts and the loss on held-out text, so that
learning can be read against forgetting at every step. Each method is one entry of METHODS.

    python train_tiny.py --method mofo --alpha 0.1      # beside full fine-tuning, same everything
    python train_tiny.py --method full --tasks add,reverse,sort,count --compare none
    torchrun --nproc_per_node=2 train_tiny.py --method hft
    torchrun --nproc_per_node=2 train_tiny.py --method full --fsdp   # weights sharded (FSDP2)
"""
import argparse
import concurrent.futures as cf
import inspect
import json
import math
import multiprocessing
import os
import random
import re
import resource
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.utils import parametrize

import hft
import pullback
from data import (TASKS, build_corpus, estimate_loss, fact_scores, make_rows, shard, task_scores,
                  test_problems, text_windows, train_problems)
import mofo
from loop import (autocast, get_lr, load_state, log, machine, pick_device, read_checkpoint,
                  save_state, setup_distributed, shard_model, train_step, whole, wrap)
from model import TinyLlama
from pretrain import load_or_pretrain, model_config
from report import label, plot, report

@dataclass
class Config:  # every field is a flag: --help shows the comment beside it
    out_dir: str = "out"  # pre-trained checkpoint, fine-tuning checkpoints and JSON metrics
    run_name: str = ""  # name of this run's checkpoint and JSON in out_dir ('' = the method)
    resume: bool = False  # continue this run's checkpoint, bitwise as if never stopped (CPU)
    ckpt_interval: int = 100  # resumable checkpoint every N fine-tuning iters (0: end of task)
    log_interval: int = 50  # log loss, lr and ms/iter every N iters
    device: str = "auto"  # auto (cuda, then mps, then cpu) or a torch device name
    compile: bool = False  # torch.compile the model: pays on GPUs; rounds apart, so cached apart
    fsdp: bool = False  # under torchrun: shard the model with FSDP2 (fully_shard) instead of DDP
    data_seed: int = 0  # seed of the world, held-out text, test problems and pre-training
    corpus: str = "v2"  # v2: numbers and one-digit sums in the world's prose | v1: no digits
    arith: float = 0.05  # v2: share of pre-training sentences that state a one-digit sum
    n_people: int = 150  # people in the world, 4 facts each, each in 3 sentence templates
    filler: float = 0.1  # share of pre-training sentences that are narrative, not facts
    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # attention heads
    n_embd: int = 128  # channels
    block_size: int = 128  # pre-training context length (characters)
    pretrain_max_iters: int = 1200  # pre-training steps, once per out_dir (cached)
    pretrain_batch_size: int = 32  # pre-training windows per step
    pretrain_lr: float = 3e-3  # pre-training peak learning rate (AdamW, cosine)
    pretrain_warmup_iters: int = 50  # pre-training warm-up steps
    pretrain_weight_decay: float = 0.1  # pre-training AdamW decay on matrices
    grad_clip: float = 1.0  # clip the global gradient norm (0: off)
    method: str = "mofo"  # full | mofo | hft | l1 | l2 | lora | mofo_l2 (the METHODS table)
    compare: str = "full"  # the baseline fine-tuned beside --method (same everything), or none
    tasks: str = "add"  # comma-separated sequence of add, reverse, sort, count (continual)
    seed: int = 0  # fine-tuning seed: data order, HFT draw, LoRA init, MoFO random filter
    max_iters: int = 1000  # fine-tuning steps per task
    batch_size: int = 64  # problems per step (global: split across DDP ranks)
    lr: float = 1e-3  # fine-tuning peak learning rate, every method's main knob
    warmup_iters: int = 20  # linear warm-up: the first large Adam steps do most forgetting
    weight_decay: float = 0.0  # fine-tuning decoupled decay (0, as in the MoFO paper)
    alpha: float = 0.1  # MoFO: fraction of each tensor updated per step, in (0, 1]
    filter: str = "momentum"  # MoFO: rank entries by momentum | gradient | update | random
    hft_ratio: float = 0.5  # HFT: fraction of block parameters trained, in (0, 1]
    hft_strategy: str = "category"  # HFT: category (the paper) | model | layer
    reg: float = -1.0  # L1/L2: penalty strength λ (-1: the method's default)
    rank: int = 8  # LoRA: rank r of BA (scale LORA_ALPHA / r)
    lora_targets: str = "all"  # LoRA: all (every block matrix) | qv (q_proj and v_proj only)
    replay: float = 0.0  # share of each batch that is pre-training text, in [0, 1)
    task_replay: float = 0.0  # continual: share of each batch that is earlier tasks' problems
    eval_problems: int = 500  # held-out test problems per task, scored at the end
    curve_points: int = 8  # evaluations along each task, besides step 0 (every fact, every problem)
    pullback: bool = False  # score the end weights pulled back toward θ0 too (pullback.py)
    pullback_fine: bool = False  # with --pullback, WiSE-FT at λ 0.8, 0.85, 0.9, 0.95 too

PRESETS = {  # --preset: a named starting point; flags given on the command line still win
    "smoke": dict(out_dir="out/smoke", n_people=12, n_layer=2, n_head=2, n_embd=32, block_size=64,
                  pretrain_max_iters=60, pretrain_batch_size=8, pretrain_warmup_iters=5,
                  max_iters=20, batch_size=8, warmup_iters=2, eval_problems=40, curve_points=4,
                  ckpt_interval=10, log_interval=10)}
RUNTIME_KEYS = ("resume", "ckpt_interval", "log_interval", "device", "fsdp", "compare")  # how it
# runs, not what it computes: free to change on --resume, and not part of a sweep's key
FINETUNE_BETAS = (0.9, 0.999)  # torch's defaults, which the MoFO paper's fine-tuning uses
LORA_ALPHA = 16.0  # LoRA's scale is LORA_ALPHA / rank: 2 at rank 8, PEFT's common lora_alpha=16
REPLAY_CONTEXT_DIVISOR = 2  # replayed windows: half the pre-training context (a row is one unit)
VAL_PROBLEMS = 200  # per task: validation problems, which choose a run's step (never the tests)

# ----------------------------------------------------------------------------------------------
# Methods: what each one trains, with which optimizer, and its penalty toward θ0
class LoRA(nn.Module):
    """Parametrizes a frozen W0 as W = W0 + (α/r)·BA; B starts at zero, so training starts at W0."""

    def __init__(self, weight, rank):
        super().__init__()
        self.scale = LORA_ALPHA / rank
        self.lora_A = nn.Parameter(torch.empty(rank, weight.size(1), device=weight.device))
        self.lora_B = nn.Parameter(torch.zeros(weight.size(0), rank, device=weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's, as LoRA's code

    def forward(self, W0):
        return W0 + self.scale * self.lora_B @ self.lora_A

LORA_TARGETS = {  # qv: PEFT's default for Llama, the LoRA paper's choice
    "all": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "qv": ("q_proj", "v_proj")}

def all_params(model, cfg, stage):  # -> (the parameters to train, HFT's selection or None)
    return list(model.parameters()), None

def hft_half(model, cfg, stage):  # a new half of every block per stage (task)
    trainable = hft.select(model, seed=cfg.seed, stage=stage, ratio=cfg.hft_ratio,
                           strategy=cfg.hft_strategy)
    return hft.apply(model, trainable), trainable

def lora_params(model, cfg, stage):  # adapters on the block matrices that lora_targets names
    model.requires_grad_(False)
    for block in model.model.layers:
        for name, linear in (*block.self_attn.named_children(), *block.mlp.named_children()):
            if name in LORA_TARGETS[cfg.lora_targets]:
                adapter = LoRA(linear.weight, cfg.rank)
                parametrize.register_parametrization(linear, "weight", adapter)
    return [p for n, p in model.named_parameters() if "lora_" in n], None

def make_adamw(params, cfg):
    return torch.optim.AdamW(params, lr=cfg.lr, betas=FINETUNE_BETAS, weight_decay=cfg.weight_decay)

def make_mofo(params, cfg):  # mofo.py's: the code a reader edits is the code that runs
    return mofo.MoFO(params, lr=cfg.lr, betas=FINETUNE_BETAS, weight_decay=cfg.weight_decay,
                     alpha=cfg.alpha, filter=cfg.filter, seed=cfg.seed)

def l1_norm(delta):
    return delta.abs().sum()

def l2_norm(delta):  # squared
    return delta.pow(2).sum()

@dataclass(frozen=True)
class Method:
    params: object  # (model, cfg, stage) -> (trainable parameters, HFT's selection or None)
    optimizer: object  # (params, cfg) -> a torch.optim.Optimizer
    penalty: object = None  # Δ = θ − θ0 -> a norm, added to the loss times λ (cfg.reg)
    reg: float = 0.0  # the penalty's default λ
    knob: str = ""  # the Config field that is the method's own knob (named in tables and plots)

METHODS = {  # a new method is one entry, as "mofo_l2" is
    "full": Method(all_params, make_adamw),
    "mofo": Method(all_params, make_mofo, knob="alpha"),
    "hft": Method(hft_half, make_adamw, knob="hft_ratio"),
    "l1": Method(all_params, make_adamw, l1_norm, reg=1e-4, knob="reg"),
    "l2": Method(all_params, make_adamw, l2_norm, reg=1e-2, knob="reg"),
    "lora": Method(lora_params, make_adamw, knob="rank"),
    "mofo_l2": Method(all_params, make_mofo, l2_norm, reg=1e-2, knob="alpha"),
}

def end_stage(model):  # LoRA's W0 + (α/r)·BA becomes the plain weight; all trainable again
    for module in model.modules():
        if parametrize.is_parametrized(module):
            parametrize.remove_parametrizations(module, "weight")
    model.requires_grad_(True)

def penalty(model, theta0, norm):  # Σ over the trained tensors of norm(θ − θ0)
    return sum(norm(p - theta0[n]) for n, p in model.named_parameters() if p.requires_grad)

def distance(model, theta0):  # ‖θ − θ0‖ of the weights the forward pass sees (LoRA: W0 + BA)
    weights = {n: getattr(model.get_submodule(n.rpartition(".")[0]), n.rpartition(".")[2])
               for n in theta0}
    return torch.cat([(whole(w.detach()) - theta0[n]).flatten()
                      for n, w in weights.items()]).norm().item()

# ----------------------------------------------------------------------------------------------
# One run: fine-tune on each task in turn from the pre-trained model, score along the way
def get_batch(cfg, tasks, stage, rng, held_out, text, rank, world, device):
    """[(x, y, weight)]: the global batch, drawn alike on every rank, this rank's shard of it;
    with --replay a second part of pre-training text, weighted by its share of the rows."""
    n_replay = round(cfg.replay * cfg.batch_size)
    problems = train_problems(tasks, stage, cfg.batch_size - n_replay, rng, held_out,
                              round(cfg.task_replay * cfg.batch_size))
    x, y = make_rows(*zip(*shard(problems, rank, world)))
    parts = [(x.to(device), y.to(device), 1 - n_replay / cfg.batch_size)]
    if n_replay:
        block_size = cfg.block_size // REPLAY_CONTEXT_DIVISOR
        x, y = text_windows(text, block_size, n_replay, rng, rank, world)
        parts.append((x.to(device), y.to(device), n_replay / cfg.batch_size))
    return parts

def measure(model, theta0, probes, heldout, tests, block_size, device):
    """A point of the curves: knowledge, held-out loss, ‖θ − θ0‖, each task's accuracy and loss."""
    point = {"fact_mc": fact_scores(model, probes, device)["fact_mc"],
             "heldout_loss": estimate_loss(model, heldout, block_size, device),
             "dist_abs": distance(model, theta0)}
    for task, problems in tests.items():
        point[f"{task}_acc"], point[f"{task}_loss"] = task_scores(model, problems, device)
    return point

def run(cfg: Config) -> dict:
    """Pre-train if needed, fine-tune on cfg.tasks in turn, score: <run_name>.json's metrics."""
    t_start = time.time()
    rank, world, device = setup_distributed(pick_device(cfg.device))
    check_config(cfg, world)
    ctx, method = autocast(device), METHODS[cfg.method]
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
    n = cfg.eval_problems  # test problems first, then validation problems: disjoint, held out
    drawn = {t: test_problems(t, cfg.data_seed, n + VAL_PROBLEMS, corpus.stated) for t in tasks}
    held_out = {t: {prompt for prompt, _ in drawn[t]} for t in tasks}
    tests = {t: problems[:n] for t, problems in drawn.items()}
    scored = {**tests, **{f"{t}_val": problems[n:] for t, problems in drawn.items()}}
    torch.manual_seed(cfg.seed)
    rng = random.Random(f"finetune/{cfg.seed}")
    state = {"task": 0, "iter_num": 0, "R": [], "curve": [], "time_s": 0.0, "tokens": 0,
             "R0": [task_scores(model, tests[t], device)[0] for t in tasks]}
    ckpt = None
    if cfg.resume:
        if not os.path.exists(ckpt_path):
            raise ValueError(f"--resume: no checkpoint at {ckpt_path}")
        ckpt = read_checkpoint(ckpt_path)
        diff = [f"{f.name}={ckpt['config'].get(f.name)!r} (now {getattr(cfg, f.name)!r})"
                for f in fields(cfg) if f.name not in RUNTIME_KEYS
                and ckpt["config"].get(f.name) != getattr(cfg, f.name)]
        if diff:  # a resumed run goes on with the settings it began with
            raise ValueError(f"checkpoint {ckpt_path} does not match this run: {', '.join(diff)};"
                             " use another --out_dir or delete it")
        state = {k: ckpt[k] for k in state}
        log(f"resuming {ckpt_path} at task {state['task']}, iter {state['iter_num']}")
        if ckpt["iter_num"] == 0:  # saved at a task boundary: merged weights, before the setup
            load_state(ckpt, model, None, rng)
            ckpt = None
    for i in range(state["task"], len(tasks)):
        params, trainable = method.params(model, cfg, i)
        optimizer = method.optimizer(params, cfg)
        if ckpt is not None:  # saved mid-task: restored once the stage is set up as it was then
            load_state(ckpt, model, optimizer, rng)
            ckpt = None
        fwd = wrap(model, cfg.compile, world, ddp=not sharded)
        every, tag = max(1, cfg.max_iters // cfg.curve_points), f"{cfg.method} {tasks[i]}"
        t0, eval_s, last = time.time(), 0.0, (time.time(), state["iter_num"])
        for it in range(state["iter_num"], cfg.max_iters + 1):
            if it % every == 0 or it == cfg.max_iters:  # one point of the curves
                t_eval = time.time()
                point = measure(model, theta0, corpus.probes, corpus.heldout, scored,
                                cfg.block_size, device)
                state["curve"] = state["curve"] + [{"stage": i, "iter": it, **point}]
                log(f"{tag} step {it}: task accuracy {point[f'{tasks[i]}_acc']:.1%}, facts "
                    f"{point['fact_mc']:.1%}, held-out loss {point['heldout_loss']:.3f}")
                eval_s += time.time() - t_eval
            if it == cfg.max_iters:
                break
            lr = get_lr(it, cfg.lr, cfg.warmup_iters, cfg.max_iters)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = 0.0
            for x, y, weight in get_batch(cfg, tasks, i, rng, held_out, corpus.train, rank, world,
                                          device):
                with ctx:
                    loss = loss + weight * fwd(x, y)[1]
                state["tokens"] += x.numel() * world
            objective = loss
            if method.penalty is not None:  # the L1/L2 pull toward θ0, on the loss
                objective = loss + cfg.reg * penalty(model, theta0, method.penalty)
            train_step(optimizer, objective, params, cfg.grad_clip, f"{tag} iter {it}")
            if cfg.log_interval and (it % cfg.log_interval == 0 or it == cfg.max_iters - 1):
                ms = 1000 * (time.time() - last[0]) / (it + 1 - last[1])
                log(f"{tag} iter {it}: loss {loss.item():.4f}, lr {lr:.2e}, {ms:.1f} ms/iter")
                last = (time.time(), it + 1)
            if cfg.ckpt_interval and (it + 1) % cfg.ckpt_interval == 0 and it + 1 < cfg.max_iters:
                state["iter_num"] = it + 1
                save_state(ckpt_path, model, None if sharded else optimizer, rng, rank,
                           hft=trainable, config=asdict(cfg), **state)
        state["time_s"] += time.time() - t0 - eval_s
        end_stage(model)
        state["R"] = state["R"] + [[task_scores(model, tests[t], device)[0] for t in tasks]]
        log(f"after {tasks[i]}: {', '.join(f'{t} {a:.1%}' for t, a in zip(tasks, state['R'][-1]))}")
        state["task"], state["iter_num"] = i + 1, 0
        save_state(ckpt_path, model, None, rng, rank, hft=trainable, config=asdict(cfg), **state)
    metrics = evaluate(model, theta0, cfg, corpus, pre, state, tasks, scored, device)
    metrics["wall_s"] = time.time() - t_start  # scoring (and pre-training, if it ran) included
    if rank == 0:
        Path(cfg.out_dir, f"{name}.json").write_text(json.dumps(metrics, indent=1))
    return metrics

def evaluate(model, theta0, cfg, corpus, pre, state, tasks, scored, device):
    """The end point on every fact and test problem, against the pre-trained model; with
    --pullback, the end weights pulled back toward θ0 too, each scored as a point of the curves."""
    before, after = pre["metrics"], fact_scores(model, corpus.probes, device)
    after["heldout_loss"] = estimate_loss(model, corpus.heldout, cfg.block_size, device)
    R, T = state["R"], len(tasks)
    delta = [(whole(p.detach()) - theta0[n]).flatten() for n, p in model.named_parameters()]
    dist_abs = torch.cat(delta).norm().item()
    norm0 = torch.cat([p.flatten() for p in theta0.values()]).norm().item()
    m = {"method": cfg.method, "tasks": tasks, "config": asdict(cfg), "R0": state["R0"], "R": R,
         "task_acc": R[-1][-1], "task_acc_before": state["R0"][-1], "OP": sum(R[-1]) / T,
         "BWT": sum(R[-1][j] - R[j][j] for j in range(T - 1)) / (T - 1) if T > 1 else None,
         "fact_chance": after["fact_chance"], "dist_abs": dist_abs, "dist_rel": dist_abs / norm0,
         "frac_changed": sum((d != 0).sum().item() for d in delta) / sum(d.numel() for d in delta),
         "curve": state["curve"], "time_s": state["time_s"],
         "tokens_per_s": state["tokens"] / max(state["time_s"], 1e-9),
         "machine": machine(),  # runs round apart across CPUs and thread counts
         "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
         "pretrain_time_s": before["time_s"], "pretrained_fingerprint": pre["fingerprint"],
         "forget_mc": before["fact_mc"] - after["fact_mc"],
         "forget_greedy": before["fact_greedy"] - after["fact_greedy"],
         "heldout_loss_rise": after["heldout_loss"] - before["heldout_loss"]}
    if cfg.pullback:  # the last use of the model: it is left pulled back
        theta, m["pullback"] = {n: p.detach().clone() for n, p in model.named_parameters()}, {}
        for name, (a, b) in pullback.settings(cfg.pullback_fine).items():
            pullback.pull_back_(model, theta0, theta, cfg.n_layer, a, b)
            m["pullback"][name] = measure(model, theta0, corpus.probes, corpus.heldout, scored,
                                          cfg.block_size, device)
    return m | {f"{k}_{when}": v[k] for k in ("fact_mc", "fact_greedy", "heldout_loss")
                for when, v in (("before", before), ("after", after))}

# ----------------------------------------------------------------------------------------------
# Command line: argparse generated from Config; bad input gives one line and a non-zero exit
def check_config(cfg, world=1):
    """Each setting is checked once, by the code that uses it: train_tiny's own here, and the
    method's (mofo.py's alpha and filter, hft.py's ratio and strategy) by building it on a model
    of the meta device, so that a bad flag fails in one line before any pre-training."""
    ints = ("n_layer", "n_head", "n_embd", "block_size", "n_people", "pretrain_max_iters", "rank",
            "pretrain_batch_size", "max_iters", "batch_size", "eval_problems", "curve_points")
    choices = {"method": METHODS, "compare": (*METHODS, "none"), "lora_targets": LORA_TARGETS}
    checks = [(getattr(cfg, k) in v,
               f"--{k} must be one of {', '.join(v)}, got {getattr(cfg, k)!r}")
              for k, v in choices.items()]
    checks += [(getattr(cfg, k) >= 1, f"--{k} must be >= 1, got {getattr(cfg, k)}") for k in ints]
    checks += [
        (set(cfg.tasks.split(",")) <= set(TASKS), f"--tasks: unknown task in {cfg.tasks!r}, "
                                                  f"choose from {TASKS}"),
        (cfg.reg == -1 or cfg.reg >= 0, f"--reg must be >= 0 (or -1: the default), got {cfg.reg}"),
        (0 <= cfg.replay < 1, f"--replay must be in [0, 1), got {cfg.replay}"),
        (0 <= cfg.task_replay and cfg.replay + cfg.task_replay < 1,
         "--task_replay must be >= 0, with replay + task_replay < 1"),
        (cfg.lr > 0 and cfg.pretrain_lr > 0,
         f"--lr and --pretrain_lr must be > 0, got {cfg.lr}, {cfg.pretrain_lr}"),
        (cfg.n_embd % (2 * cfg.n_head) == 0,
         f"--n_embd must be a multiple of 2·n_head (rotary), got {cfg.n_embd}"),
        (cfg.batch_size % world == 0, f"--batch_size {cfg.batch_size} must be divisible by the "
                                      f"{world} ranks"),
        (not cfg.fsdp or (cfg.method in ("full", "hft") and not cfg.resume and not cfg.pullback),
         "--fsdp runs --method full or hft, without --resume or --pullback (MoFO on FSDP2 is "
         "mofo_fast.MoFO's; LoRA, the L1/L2 pull and the pull-back need whole tensors)")]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    method, flags = METHODS[cfg.method], "--corpus, --filler or --arith"
    try:  # data.py checks the world's settings, then the method's code (mofo.py, hft.py) its own
        build_corpus(cfg.data_seed, cfg.n_people, cfg.filler, cfg.corpus, cfg.arith)
        flags = f"--method {cfg.method}"
        with torch.device("meta"):
            method.optimizer(method.params(TinyLlama(model_config(cfg)), cfg, 0)[0], cfg)
    except ValueError as e:
        raise ValueError(f"{flags}: {e}") from None

class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of the usage block
        raise ValueError(message)

def field_help():  # {field: the comment beside it in Config}
    return dict(re.findall(r"^\s+(\w+): \w+ = .*?  # (.*)$", inspect.getsource(Config), re.M))

def parse_args(argv=None):
    p = Parser(description=__doc__.split("\n\n")[0],
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default=argparse.SUPPRESS,
                   help="start from a named set of defaults (smoke: the whole pipeline in seconds)")
    helps = field_help()  # a field without a comment: an empty help
    for f in fields(Config):
        kind = dict(action=argparse.BooleanOptionalAction) if f.type is bool else dict(type=f.type)
        p.add_argument(f"--{f.name}", default=argparse.SUPPRESS,
                       help=f"{helps.get(f.name, '')} (default: {f.default!r})", **kind)
    given = vars(p.parse_args(argv))  # only the flags on the command line (defaults suppressed)
    return Config(**{**PRESETS.get(given.pop("preset", None), {}), **given})

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
    device = pick_device(cfg.device)  # pre-trained here first, so that the two do not both do it
    load_or_pretrain(cfg, build_corpus(cfg.data_seed, cfg.n_people, cfg.filler, cfg.corpus,
                                       cfg.arith), device, autocast(device), 0, 1)
    threads = max(1, torch.get_num_threads() // 2)
    names = " and ".join(label(asdict(c), METHODS[c.method].knob) for c in runs)
    log(f"fine-tuning {names} side by side, {threads} thread(s) each")
    quiet = [replace(c, log_interval=0) for c in runs]  # the curve points are the progress report
    with cf.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn"),
                                initializer=torch.set_num_threads, initargs=(threads,)) as pool:
        return list(pool.map(run, quiet))

def main(argv=None):
    try:
        cfg = parse_args(argv)
        ms = compare(cfg) if cfg.compare not in ("none", cfg.method) else [run(cfg)]
        if int(os.environ.get("RANK", 0)) == 0:
            names = [label(m["config"], METHODS[m["method"]].knob) for m in ms]
            report(ms, names)
            figure = os.path.join(cfg.out_dir, f"{cfg.run_name or cfg.method}.png")
            plot(ms, names, figure)
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
