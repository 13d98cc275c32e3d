"""The training loop's pieces, shared by pre-training and fine-tuning (and timed by bench.py).

nanoGPT's loop, in parts: the schedule (linear warm-up, cosine decay), one optimizer step with
gradient clipping, the device and the processes (one, or DDP / FSDP2 under torchrun), and
resumable checkpoints written atomically. Each is a plain function; train_tiny.run and
pretrain.pretrain read top to bottom with them.
"""
import math
import os
import platform
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP


def log(msg):  # rank 0 speaks for all
    if int(os.environ.get("RANK", 0)) == 0:
        print(msg, flush=True)


def get_lr(it, lr, warmup_iters, max_iters, min_ratio=0.1):  # linear warm-up, cosine to lr/10
    if it < warmup_iters:
        return lr * (it + 1) / warmup_iters
    t = (it - warmup_iters) / max(1, max_iters - warmup_iters)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def train_step(optimizer, loss, params, grad_clip, where):
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


def load_state(ckpt, model, optimizer, rng):  # what save_state saved, put back
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
