"""Pre-training the tiny model on the invented world, once, and serving it from a checkpoint.

Every fine-tuning run starts from the same pre-trained model, so it is trained once per setting
(the world, the model's size, the pre-training schedule) and cached in out_dir; the default one is
committed in results/ so that a fresh clone fine-tunes at once. A checkpoint is served only while
the corpus's tokens and the code that trains it (this file and what it imports: stamp.py) are
unchanged; otherwise it is trained again, and the log says why. Kept apart from train_tiny.py for
that reason: a change to a fine-tuning method does not re-train the model it starts from.

The loop is nanoGPT's: linear warm-up then cosine decay, AdamW (betas 0.9, 0.95, no decay on the
norm weights), gradient clipping, one process or DDP under torchrun. Its pieces (the schedule, the
step, the device and the processes, resumable checkpoints) are the ones fine-tuning uses too.
"""
import functools
import json
import math
import os
import platform
import random
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

from data import TASKS, VOCAB, estimate_loss, fact_scores, task_scores, test_problems, text_windows
from model import ModelConfig, TinyLlama
from stamp import changed, sha, stamp

PRETRAIN_KEYS = ("data_seed", "corpus", "arith", "n_people", "filler", "n_layer", "n_head",
                 "n_embd", "block_size", "pretrain_max_iters", "pretrain_batch_size", "pretrain_lr",
                 "pretrain_warmup_iters", "pretrain_weight_decay")  # the settings that name one
PRETRAIN_BETAS = (0.9, 0.95)  # nanoGPT's
SHIPPED = Path(__file__).resolve().parent / "results"  # where the default checkpoint is committed
CODE = stamp("pretrain.py")  # taken at import: the code this process runs


def log(msg):  # rank 0 speaks for all
    if int(os.environ.get("RANK", 0)) == 0:
        print(msg, flush=True)


def get_lr(it, lr, warmup_iters, max_iters, min_ratio=0.1):  # linear warm-up, cosine to lr/10
    if it < warmup_iters:
        return lr * (it + 1) / warmup_iters
    t = (it - warmup_iters) / max(1, max_iters - warmup_iters)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def step(optimizer, loss, params, grad_clip, where):
    """Backward, clip and step on `loss`; a loss that is not finite stops before anything moves."""
    if not math.isfinite(loss.item()):
        raise FloatingPointError(f"{where}: loss is {loss.item()}; stopped, the last checkpoint on "
                                 "disk is intact (try a lower --lr)")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()


def wrap(model, compile, world, ddp=True):  # what the loop calls: compiled and/or DDP where asked
    model = torch.compile(model) if compile else model
    return DDP(model) if world > 1 and ddp else model


def model_config(cfg):
    return ModelConfig(cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, len(VOCAB))


def pretrain(cfg, corpus, device, ctx, rank, world):
    torch.manual_seed(cfg.data_seed)
    model = TinyLlama(model_config(cfg)).to(device)
    groups = [{"params": [p for p in model.parameters() if p.dim() >= 2]},  # no decay on norms
              {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=cfg.pretrain_lr, betas=PRETRAIN_BETAS,
                                  weight_decay=cfg.pretrain_weight_decay)
    rng = random.Random(f"pretrain/{cfg.data_seed}")
    fwd, params = wrap(model, cfg.compile, world), list(model.parameters())
    t0, tokens, last = time.time(), 0, time.time()
    for it in range(cfg.pretrain_max_iters):
        lr = get_lr(it, cfg.pretrain_lr, cfg.pretrain_warmup_iters, cfg.pretrain_max_iters)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = text_windows(corpus.train, cfg.block_size, cfg.pretrain_batch_size, rng, rank, world)
        with ctx:
            loss = fwd(x.to(device), y.to(device))[1]
        step(optimizer, loss, params, cfg.grad_clip, f"pretrain iter {it}")
        tokens += x.numel()
        if cfg.log_interval and (it % cfg.log_interval == 0 or it == cfg.pretrain_max_iters - 1):
            ms = 1000 * (time.time() - last) / (1 if it == 0 else cfg.log_interval)
            log(f"pretrain iter {it}: loss {loss.item():.4f}, lr {lr:.2e}, {ms:.1f} ms/iter")
            last = time.time()
    seconds = time.time() - t0
    tests = {t: test_problems(t, cfg.data_seed, cfg.eval_problems, corpus.stated) for t in TASKS}
    metrics = {**fact_scores(model, corpus.probes, device), "time_s": seconds,
               "tokens_per_s": tokens * world / seconds,
               "heldout_loss": estimate_loss(model, corpus.heldout, cfg.block_size, device),
               **{f"{t}_acc": task_scores(model, tests[t], device)[0] for t in TASKS}}
    log(f"pre-trained in {seconds:.0f} s: {json.dumps(metrics)}")
    return {"model": model.state_dict(), "config": asdict(cfg), "metrics": metrics}


def machine():  # what a result was computed on: runs round apart across CPUs and thread counts
    name = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": name or platform.machine(),
            "capability": torch.backends.cpu.get_cpu_capability(), "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__}


def pick_device(name):  # auto: cuda, then mps, then cpu; a device this machine lacks is an error
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device: unknown device {name!r} (auto, cpu, cuda, cuda:N, mps)") \
            from None
    if device.type == "cuda" and not (torch.cuda.is_available()
                                      and (device.index or 0) < torch.cuda.device_count()):
        raise ValueError(f"--device {name}: this machine's torch sees no such CUDA device "
                         f"(torch {torch.__version__}, {torch.cuda.device_count()} GPUs); "
                         "use --device cpu or auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available here; use --device cpu or auto")
    return name


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


def shard_model(model, device, world):
    """--fsdp: each block, then the rest, becomes DTensors split by rows across the ranks
    (gathered for each forward, gradients reduce-scattered); the optimizer steps each rank's rows
    (MoFO still with each whole tensor's mask)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(torch.device(device).type, (world,))
    for block in model.model.layers:
        fully_shard(block, mesh=mesh)
    # reshard_after_forward given: by default the root keeps its whole weights after a forward (as
    # a scoring pass's), and model.parameters() would hand those out in place of the sharded ones.
    return fully_shard(model, mesh=mesh, reshard_after_forward=True)


def whole(t):  # a whole tensor: an FSDP2 DTensor gathered from every rank (all must call)
    return t.full_tensor() if isinstance(t, DTensor) else t


def save_checkpoint(obj, path):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)  # atomic: a crash mid-write leaves the previous file intact


def save_state(path, model, optimizer, rng, rank, **extra):
    """A resumable checkpoint: the weights, the optimizer (or None), both random streams, extra."""
    model_state = {k: whole(v) for k, v in model.state_dict().items()}  # every rank: FSDP2 gathers
    if rank == 0:
        save_checkpoint({"model": model_state, "optimizer": optimizer and optimizer.state_dict(),
                         "rng": {"torch": torch.get_rng_state(), "data": rng.getstate()}, **extra},
                        path)


def restore(ckpt, model, optimizer, rng):  # what save_state saved, put back
    model.load_state_dict(ckpt["model"])
    if optimizer is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    rng.setstate(ckpt["rng"]["data"])


def read_checkpoint(path):
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read checkpoint {path} ({type(e).__name__}); "
                         "delete it to start over") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise ValueError(f"checkpoint {path} is not one of ours (no model/config); "
                         "delete it to start over")
    return ckpt


@functools.lru_cache(maxsize=4)  # keyed by mtime: the runs of one process read it once
def read_pretrained(path, mtime_ns):
    return read_checkpoint(path)


def pretrained_path(cfg):  # one checkpoint per pre-training setting, side by side in out_dir
    what = {k: getattr(cfg, k) for k in PRETRAIN_KEYS} | ({"compile": True} if cfg.compile else {})
    key = sha(json.dumps(what, sort_keys=True).encode())  # compiled kernels round apart
    return os.path.join(cfg.out_dir, f"pretrained-{key}.pt")


def shipped_path(cfg):
    return str(SHIPPED / os.path.basename(pretrained_path(cfg)))


def pretrained_stamp(corpus):
    """What a pre-trained checkpoint is made of: the corpus's tokens and the code that trains it."""
    return {"corpus": sha(corpus.train.numpy().tobytes()), **CODE}


def load_or_pretrain(cfg, corpus, device, ctx, rank, world):
    """The pre-trained checkpoint of cfg's setting: out_dir's, else the shipped one; trained first
    if neither exists or if the corpus or the code changed since (the log says which)."""
    path, want, why = pretrained_path(cfg), pretrained_stamp(corpus), "none yet"
    for where in (path, shipped_path(cfg)):
        if os.path.exists(where):
            ckpt = read_pretrained(where, os.stat(where).st_mtime_ns)
            stale = changed(ckpt.get("fingerprint", {}), want)
            if not stale:
                return ckpt
            if why == "none yet":  # say why of the first one found
                why = f"{', '.join(stale)} changed since {where} was trained"
    log(f"pre-trained checkpoint {path}: {why}; pre-training ({cfg.pretrain_max_iters} iters)")
    ckpt = {**pretrain(cfg, corpus, device, ctx, rank, world), "fingerprint": want}
    if rank == 0:
        save_checkpoint(ckpt, path)
    if world > 1:
        dist.barrier()
    return ckpt
