"""Pre-training the tiny model on the invented world, once, and serving it from a checkpoint.

Every fine-tuning run starts from the same pre-trained model, so it is trained once per setting
(the world, the model's size, the pre-training schedule) and cached in out_dir; the default one is
committed in results/ so that a fresh clone fine-tunes at once. A checkpoint is served only while
the corpus's tokens and the code that trains it (this file and what it imports: stamp.py) are
unchanged; otherwise it is trained again, and the log says why. Kept apart from train_tiny.py for
that reason: a change to a fine-tuning method does not re-train the model it starts from.

The loop is nanoGPT's: linear warm-up then cosine decay, AdamW (betas 0.9, 0.95, no decay on the
norm weights), gradient clipping, one process or DDP under torchrun; its pieces are loop.py's,
the ones fine-tuning uses too.
"""
import functools
import json
import os
import random
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from data import TASKS, VOCAB, estimate_loss, fact_scores, task_scores, test_problems, text_windows
from loop import get_lr, log, read_checkpoint, save_checkpoint, train_step, wrap
from model import ModelConfig, TinyLlama
from stamp import changed, sha, stamp

PRETRAIN_KEYS = ("data_seed", "corpus", "arith", "n_people", "filler", "n_layer", "n_head",
                 "n_embd", "block_size", "pretrain_max_iters", "pretrain_batch_size", "pretrain_lr",
                 "pretrain_warmup_iters", "pretrain_weight_decay")  # the settings that name one
PRETRAIN_BETAS = (0.9, 0.95)  # nanoGPT's
SHIPPED = Path(__file__).resolve().parent / "results"  # where the default checkpoint is committed
CODE = stamp("pretrain.py")  # taken at import: the code this process runs


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
        train_step(optimizer, loss, params, cfg.grad_clip, f"pretrain iter {it}")
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
