"""
MoFO, the Momentum-Filtered Optimizer: Chen et al., "MoFO: Momentum-Filtered Optimizer for
Mitigating Forgetting in LLM Fine-Tuning", arXiv 2407.20999 (2024), TMLR 2025; Algorithm 1.

MoFO is Adam whose *update* is filtered. Every step t (counted per tensor from 1), for each
parameter tensor p (one block) with gradient g:

    m = b1*m + (1-b1)*g          v = b2*v + (1-b2)*g^2          (every entry, selected or not)
    k = max(1, floor(alpha * numel(p)))   tau = k-th largest |m|   mask = |m| >= tau  (ties kept)
    p -= lr / (1-b1^t) * (m * mask) / (sqrt(v) / sqrt(1-b2^t) + eps)

Entries outside the mask stay put, so fine-tuning ends closer to the pre-trained weights and
forgets less. Tensors with fewer than 2 dimensions (biases, norms) and groups with alpha=1.0 take
the dense AdamW step; with alpha=1.0 everywhere MoFO *is* torch.optim.AdamW(foreach=False), bit
for bit, because the arithmetic follows torch's single-tensor AdamW operation by operation.

mofo_update_ below is the whole algorithm for one tensor, its mask from a plain torch.topk.
MoFO.step() runs the same numbered lines with one reused buffer and a fast exact selection (end of
file) that finds the very same mask, hence bitwise the same parameters; fast=False runs
mofo_update_ itself. Parameters sharded by FSDP2 (DTensors) are stepped on each rank's rows with
the mask of the whole tensor (global_threshold), bitwise as in one process.
"""
import math

import torch

try:  # FSDP2's parameters are DTensors: see shard_of and global_threshold at the end of the file
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # a torch built without torch.distributed: isinstance(p, ()) is always False
    DTensor = ()


@torch.no_grad()
def mofo_update_(p, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay, alpha,
                 maximize=False, filter="momentum", generator=None):
    """One MoFO step of one tensor, in place; `step` is t (from 1). Returns the number of entries
    that got an Adam update: k (more on ties at tau), or numel for a dense step."""
    g = (-grad if maximize else grad).to(exp_avg.dtype)  # fp32 moments even for bf16 params
    # 1. Decoupled weight decay, every entry, selected or not (AdamW; the authors' code).
    if weight_decay != 0:
        p.mul_(1 - lr * weight_decay)
    # 2. Moments of every entry, selected or not.
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    # 3. Bias corrections, as torch AdamW.
    step_size = lr / (1 - beta1 ** step)
    denom = adam_denom(exp_avg_sq, (1 - beta2 ** step) ** 0.5, eps)
    if p.dim() < 2 or alpha == 1.0:  # vectors (biases, norms) and alpha=1: the dense AdamW step
        p.addcdiv_(exp_avg, denom, value=-step_size)
        return p.numel()
    # 4. Filter this block: mask = |m| >= its k-th largest |m| (ties kept), or an ablation's
    #    score; max(1, .) so that a tiny tensor still moves one entry.
    k = max(1, math.floor(alpha * p.numel()))
    mask = filter_mask(filter, g, exp_avg, denom, k, generator)
    # 5. The AdamW step with the unselected entries' momentum zeroed: selected entries move
    #    exactly as in AdamW, the others by exactly 0.
    p.addcdiv_(exp_avg * mask, denom, value=-step_size)
    return mask.sum()


def adam_denom(exp_avg_sq, bias_correction2_sqrt, eps, out=None):
    """Adam's denominator sqrt(v) / sqrt(1 - b2^t) + eps, in torch AdamW's operation order (so
    alpha=1 is AdamW bit for bit); `out` lets the fast path write it into a reused buffer."""
    return torch.sqrt(exp_avg_sq, out=out).div_(bias_correction2_sqrt).add_(eps)


def topk_mask_reference(score, k):
    """score >= tau, tau the k-th largest score (1 <= k <= numel): the top k, ties at tau kept."""
    tau = torch.topk(score.reshape(-1), k, sorted=False).values.min()
    return score >= tau


def filter_mask(filter, grad, exp_avg, denom, k, generator=None):
    """The entries that move: the k top-scoring ones, ties kept, or k drawn from `generator`
    (not the global RNG) for "random"."""
    if filter == "random":
        return random_mask(exp_avg.numel(), k, generator, exp_avg.device).view(exp_avg.shape)
    return topk_mask_reference(filter_score(filter, grad, exp_avg, denom), k)


def random_mask(n, k, generator, device):
    """k of n entries drawn from `generator`, as a flat bool mask."""
    idx = torch.randperm(n, generator=generator)[:k].to(device)
    return torch.zeros(n, dtype=torch.bool, device=device).index_fill_(0, idx, True)


def filter_score(filter, grad, exp_avg, denom, out=None):
    """What ranks the entries: |m| (MoFO) or the paper's ablations, |g| and "update" |m|/denom,
    which ranks like the Adam step's size |m_hat| / (sqrt(v_hat) + eps)."""
    if filter == "gradient":
        return torch.abs(grad, out=out)
    score = torch.abs(exp_avg, out=out)
    return score.div_(denom) if filter == "update" else score


FILTERS = ("momentum", "gradient", "random", "update")


def _check_group(group):
    beta1, beta2 = group["betas"]
    if not 0.0 <= group["lr"]:
        raise ValueError(f"lr must be in [0, inf), got {group['lr']}")
    if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
        raise ValueError(f"betas must both be in [0, 1), got {group['betas']}")
    if not 0.0 <= group["eps"]:
        raise ValueError(f"eps must be in [0, inf), got {group['eps']}")
    if not 0.0 <= group["weight_decay"]:
        raise ValueError(f"weight_decay must be in [0, inf), got {group['weight_decay']}")
    if not 0.0 < group["alpha"] <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {group['alpha']}")
    if group["filter"] not in FILTERS:
        raise ValueError(f"filter must be one of {FILTERS}, got {group['filter']!r}")


class MoFO(torch.optim.Optimizer):
    """AdamW that moves, in each tensor, only the alpha fraction of entries with the largest |m|.

    filter picks what ranks the entries (the paper's ablations): "momentum" |m| (MoFO),
    "gradient" |g|, "update" |m|/denom (the Adam update's size) or "random" (exactly k entries
    drawn from a generator seeded by `seed`, saved in state_dict so resumes are exact).
    weight_decay is decoupled as in AdamW and, as in the authors' code, shrinks every entry of
    every tensor that has a gradient, selected or not. Moments are fp32 (or p's dtype if wider).
    fast=False runs mofo_update_ itself; compiled=True runs steps 4-5 of float32 CPU tensors
    in C (mofo_kernel.py, opt-in: needs a C compiler). Neither changes a bit of the result, so
    they are no hyper-parameters and not in state_dict. last_update_fraction: after each step,
    the fraction of all parameter entries that got an Adam update (weight decay not counted).
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 alpha=0.1, filter="momentum", maximize=False, seed=0, fast=True, compiled=False):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, alpha=alpha,
                        filter=filter, maximize=maximize)
        super().__init__(params, defaults)  # validates every group through add_param_group
        self.seed, self.fast, self.compiled = seed, fast, compiled
        self.generator = torch.Generator().manual_seed(seed)
        self.last_update_fraction = 0.0

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        _check_group(self.param_groups[-1])

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        moved, total, work = 0, 0, None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, wd, alpha = group["lr"], group["eps"], group["weight_decay"], group["alpha"]
            for p in group["params"]:
                total += p.numel()
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError("MoFO does not support sparse gradients (param.grad)")
                state = self.state[p]
                if len(state) == 0:  # lazy init, named like torch.optim.AdamW's state
                    dtype = torch.promote_types(p.dtype, torch.float32)
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
                m, v = state["exp_avg"], state["exp_avg_sq"]
                local, grad, shard = p, p.grad, None  # what this process updates: all of p here
                if isinstance(p, DTensor):  # FSDP2: this rank's rows; the mask is the whole p's
                    if not self.fast:
                        raise ValueError("fast=False runs mofo_update_ on whole tensors, not DTensors")
                    local, grad, shard = p.to_local(), grad.to_local(), shard_of(p)
                    m, v = m.to_local(), v.to_local()  # the state stays DTensors, as AdamW's
                state["step"] += 1
                t = state["step"].item()
                if not self.fast:  # the reference, exactly as written at the top of this file
                    moved += mofo_update_(p, p.grad, m, v, t, lr, beta1, beta2, eps, wd, alpha,
                                          group["maximize"], group["filter"], self.generator)
                    continue
                # mofo_update_, line for line, with one buffer and the fast exact selection:
                g = (-grad if group["maximize"] else grad).to(m.dtype)
                # 1. Decoupled weight decay, every entry.
                if wd != 0:
                    local.mul_(1 - lr * wd)
                # 2. Moments of every entry.
                m.lerp_(g, 1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                # 3. Bias corrections, as torch AdamW; the denominator goes into the buffer.
                step_size = lr / (1 - beta1 ** t)
                work, kept, denom, scratch = workspace(work, m)
                adam_denom(v, (1 - beta2 ** t) ** 0.5, eps, out=denom)
                if p.dim() < 2 or alpha == 1.0:  # vectors and alpha=1: the dense AdamW step
                    local.addcdiv_(m, denom, value=-step_size)
                    moved += p.numel()
                    continue
                # 4. Filter this block: kept = m * mask, with the mask found fast (below).
                k = max(1, math.floor(alpha * p.numel()))
                if self.compiled and group["filter"] == "momentum" and shard is None:
                    count = compiled_step_(local, m, denom, k, step_size, kept)
                    if count is not None:  # else not a float32 CPU tensor: the eager path
                        moved += count
                        continue
                moved += filter_fast_(group["filter"], g, m, denom, k, self.generator, kept, scratch, shard)
                # 5. The AdamW step with the unselected entries' momentum zeroed.
                local.addcdiv_(kept, denom, value=-step_size)
        self.last_update_fraction = float(moved) / max(total, 1)  # one host sync per step
        return loss

    # The "random" filter's generator is part of the optimizer's state: save and restore it.
    def state_dict(self):
        return {**super().state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        generator_state = state_dict.pop("generator", None)
        super().load_state_dict(state_dict)
        if generator_state is not None:
            self.generator.set_state(generator_state)
        # torch casts loaded state to the parameter's dtype; keep bf16/fp16 params' moments fp32.
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(saved_ids, params):
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state_dict["state"].get(i, {}):
                    dtype = torch.promote_types(p.dtype, torch.float32)
                    self.state[p][key] = state_dict["state"][i][key].to(p.device, dtype)

    def __getstate__(self):  # pickling and deepcopy keep the generator and the choice of path
        return {**super().__getstate__(), "seed": self.seed, "fast": self.fast,
                "compiled": self.compiled, "generator": self.generator}


# ----- The fast path: the same mask as topk_mask_reference without a full selection. On a CPU
# a torch.topk of a whole tensor costs several AdamW steps; topk_threshold about a third of that.

# Entries sampled to estimate tau. The exact selection then runs on the band between two sample
# quantiles, which holds about 2 * SAMPLE_Z * sqrt(p(1-p) / SAMPLE_SIZE) of all entries (p = k/n):
# 1.9 % at alpha = 0.1. A larger sample narrows the band only as its square root while its own
# selection grows linearly; 2^13 and 2^14 measured fastest on bench.py's 0.25-0.7 M-entry tensors.
SAMPLE_SIZE = 16384
# Bracket half-width in binomial standard deviations. The bracket misses tau when the number of
# sampled entries above tau falls outside mean +- spread: for a sample that does not line up with
# the data's order, a normal two-sided tail at 4 sd, 2 * (1 - Phi(4)) ~ 6e-5 per tensor and step.
# A miss costs time only (a full selection), never exactness: tau is always an exact k-th value.
SAMPLE_Z = 4.0


def kth_largest(x, k):
    """Exact k-th largest entry (1 <= k <= numel) of a 1-D tensor, as a 0-dim tensor."""
    return torch.topk(x, k, sorted=False).values.min()


def topk_threshold(score, k, scratch=None, sampled=None):
    """(tau, count): tau the exact k-th largest entry of `score` (1 <= k <= numel, any shape),
    count the number of entries >= tau (k, or more on ties); 0-dim tensors on score's device.

    sampled=None takes the sampled path for CPU tensors of over 4 * SAMPLE_SIZE entries (below,
    the sample is over a quarter of the tensor and saves little; on a GPU torch.topk is fast and
    the bracket's host syncs are not); True forces it (n >= SAMPLE_SIZE; tests run it on CUDA),
    False a direct torch.topk. scratch: optional int8 tensor of >= 2 * numel entries to work in.
    """
    s = score.reshape(-1)
    n = s.numel()
    if sampled is None:
        sampled = n > 4 * SAMPLE_SIZE and s.device.type == "cpu"
    if not sampled:
        tau = kth_largest(s, k)
        return tau, (s >= tau).sum()
    lo, hi = bracket(s, k, n)  # 1. around tau, from a sample
    if scratch is None:
        scratch = torch.empty(2 * n, dtype=torch.int8, device=s.device)
    n_above, cand = band(s, lo, hi, scratch)  # 2.-3. the entries above it, and inside it
    if not n_above < k <= n_above + cand.numel():  # the bracket missed tau: select in full
        tau = kth_largest(s, k)
        return tau, (s >= tau).sum()
    tau = kth_largest(cand, k - n_above)  # exact: the k-th largest is the band's (k - n_above)-th
    return tau, n_above + (cand >= tau).sum()


def bracket(s, k, n, gather=None):
    """[lo, hi]: two sampled entries around tau, the k-th largest of n entries, from the 1-D s
    (all n, or this rank's part: then gather(sample) collects the sample of every rank)."""
    # 1. An evenly strided sample: deterministic (it draws from no generator, so the global RNG
    #    and the "random" filter's stream stay untouched). The stride is made coprime with n,
    #    hence with the row length of any matrix of n entries, so the samples walk through every
    #    column: a stride sharing a factor d with it visits 1/d of them, and columns differ.
    stride = n // SAMPLE_SIZE
    while math.gcd(stride, n) > 1:
        stride -= 1
    sample = s[stride // 2::stride][:SAMPLE_SIZE]
    sample = sample if gather is None else gather(sample)
    mean = k / n * sample.numel()  # expected number of sampled entries >= tau
    spread = SAMPLE_Z * math.sqrt(mean * (1 - k / n)) + 1  # +1: ranks are whole numbers
    top = torch.topk(sample, min(sample.numel(), math.ceil(mean + spread))).values  # descending
    # lo is the ceil(mean + spread)-th largest sampled value, hi the floor(mean - spread)-th, at
    # index one less as top[0] is the 1st: rounding outward keeps [lo, hi] at least mean +- spread
    # wide. If mean - spread < 1 no entry is surely above tau: hi = inf.
    lo = top[-1]
    hi = top[math.floor(mean - spread) - 1] if mean - spread >= 1 else sample.new_tensor(math.inf)
    return lo, hi


def band(s, lo, hi, scratch):
    """(n_above, cand): how many entries of the 1-D s are > hi, and those in [lo, hi]."""
    n = s.numel()
    # 2. One comparison pass against each end. The flags are int8, not bool: on a CPU the flag
    #    passes below (two comparisons, a sum, a subtraction, the scan) took about 4x as long
    #    with bool flags (bool has no subtraction; xor and bool sums are slower; torch 2.13).
    ge_lo = torch.ge(s, lo, out=scratch[:n])
    gt_hi = torch.gt(s, hi, out=scratch[n:2 * n])
    n_above = int(gt_hi.sum(dtype=torch.int32))  # entries surely above tau
    inside = ge_lo.sub_(gt_hi)  # 1 where lo <= s <= hi
    # 3. Gather the band. Its flags are scanned as 8-byte int64 words: a word is nonzero iff one
    #    of its 8 entries is in the band, so nonzero() scans n/8 words instead of n bytes; only
    #    the few words found (a few % of n) are then looked at entry by entry.
    n8 = n - n % 8
    flags = inside[:n8].view(torch.int64)
    words = torch.nonzero(flags).squeeze(1)
    return n_above, torch.cat([s[:n8].view(-1, 8).index_select(0, words).view(-1)[flags.index_select(0, words).view(torch.bool)],
                               s[n8:][inside[n8:].bool()]])


def filter_fast_(filter, grad, exp_avg, denom, k, generator, out, scratch, shard=None):
    """exp_avg * filter_mask(...), written into `out` (a buffer shaped like exp_avg); returns
    the mask's size. The mask is the same: the same draw, or the same exact tau. shard: None,
    or shard_of(p) when exp_avg is this rank's part of a DTensor's; the mask is the whole p's."""
    if filter == "random":  # a sharded p draws from all of p, alike on every rank, keeps its part
        start, n = (0, exp_avg.numel()) if shard is None else shard[1:]
        mask = random_mask(n, k, generator, out.device)[start:start + exp_avg.numel()]
        torch.mul(exp_avg, mask.view(exp_avg.shape), out=out)
        return k
    score = filter_score(filter, grad, exp_avg, denom, out=out)
    if shard is None:
        tau, count = topk_threshold(score, k, scratch)
    else:
        tau, count = global_threshold(score, k, shard[0], shard[2], scratch)
    if filter == "momentum" and out.device.type == "cpu":
        # |m| >= tau is |m| > (the float just below tau), as no float lies between them:
        # hardshrink keeps exactly those entries (ties at tau too) and zeroes the rest in one pass
        # instead of two. Its threshold is a Python float: a host sync, which only a GPU pays for.
        torch.hardshrink(exp_avg, torch.nextafter(tau, tau.new_tensor(-math.inf)).item(), out=out)
    else:
        torch.ge(out, tau, out=out).mul_(exp_avg)
    return count


def compiled_step_(p, m, denom, k, step_size, out):
    """Steps 4-5 in C (mofo_kernel.py): the tau of topk_threshold from one read of m, then
    p.addcdiv_(m * mask, denom) in one pass, bit for bit. Returns the mask's size, or None
    (nothing done) unless p, m and denom are contiguous float32 CPU tensors."""
    import mofo_kernel  # opt-in: mofo.py alone needs nothing but PyTorch
    if not mofo_kernel.compilable(p, m, denom):
        return None
    found = mofo_kernel.threshold_c(m, k, SAMPLE_SIZE, SAMPLE_Z, out)
    if found is None:  # the bracket missed: the full selection
        found = topk_threshold(torch.abs(m, out=out), k, sampled=False)
    tau, count = found
    mofo_kernel.apply_c(p, m, denom, tau, -step_size)
    return count


def workspace(work, m):
    """(work, kept, denom, scratch): two buffers shaped like m and 2*numel int8s, carved from
    `work` (replaced by a larger one when too small). One buffer for all tensors of a step: one
    allocation instead of three per tensor, whose pages a CPU would fault in again each time."""
    n, size = m.numel(), m.numel() * m.element_size()
    if work is None or work.numel() < 2 * size + 2 * n or work.device != m.device:
        work = torch.empty(2 * size + 2 * n, dtype=torch.uint8, device=m.device)
    kept = work[:size].view(m.dtype).view(m.shape)
    denom = work[size:2 * size].view(m.dtype).view(m.shape)
    return work, kept, denom, work[2 * size:2 * size + 2 * n].view(torch.int8)


# ----- Sharded parameters. FSDP2 (torch.distributed.fsdp.fully_shard) makes each parameter a
# DTensor whose rank r holds rows r*c .. (r+1)*c - 1 (c = ceil(rows / ranks), as torch.chunk: the
# last rank's part may be short or empty). Everything but the mask is elementwise, so MoFO steps
# each rank's rows; the mask needs the k-th largest score of the whole tensor, found exactly here.

def shard_of(p):
    """(group, start, n): the process group p's rows are split over, the flat index of this
    rank's first entry, and p's numel. Dims of the mesh where p is replicated (HSDP) are left out:
    their ranks hold the same numbers, so they find the same tau without talking."""
    dims = [d for d, placement in enumerate(p.placements) if not placement.is_replicate()]
    if len(dims) != 1 or p.placements[dims[0]] != Shard(0):
        raise ValueError(f"MoFO needs DTensors split on dim 0 only (FSDP2's layout), got {p.placements}")
    rows = -(-p.shape[0] // p.device_mesh.size(dims[0]))  # torch.chunk's rows per rank
    start = min(p.device_mesh.get_local_rank(dims[0]) * rows, p.shape[0]) * (p.numel() // p.shape[0])
    return p.device_mesh.get_group(dims[0]), start, p.numel()


def global_threshold(score, k, group, n, scratch=None):
    """topk_threshold of a tensor of n entries split over the ranks of `group`, this rank holding
    `score` (any part, maybe empty): the same tau and count on every rank. Exact for the same
    reason as topk_threshold: every rank compares its part with the same [lo, hi] (from one sample
    gathered from all parts); the entries above hi are counted and those inside gathered, so the
    k-th largest of the whole tensor is the gathered band's (k - n_above)-th largest. Every rank
    sees the same totals, so all see a miss alike and widen [lo, hi] to everything: the whole
    tensor is gathered, as it is from the start for tensors that topk_threshold selects directly."""
    s, inf = score.reshape(-1), score.new_tensor(math.inf)
    if scratch is None:
        scratch = torch.empty(2 * s.numel(), dtype=torch.int8, device=s.device)
    lo, hi = -inf, inf
    if n > 4 * SAMPLE_SIZE:  # with the whole tensor's stride: about SAMPLE_SIZE samples in all
        lo, hi = bracket(s, k, n, gather=lambda sample: all_gather_cat(sample, 0, group)[0])
    for lo, hi in ((lo, hi), (-inf, inf)):
        n_above, cand = band(s, lo, hi, scratch)
        cand, n_above = all_gather_cat(cand, n_above, group)
        if n_above < k <= n_above + cand.numel():
            break
    tau = kth_largest(cand, k - n_above)
    return tau, n_above + (cand >= tau).sum()


def all_gather_cat(x, count, group):
    """(every rank's 1-D x concatenated, the sum of every rank's count). The x may differ in
    size: all_gather needs equal ones, so their sizes are gathered first and each x is padded."""
    sizes = [torch.empty(2, dtype=torch.int64, device=x.device) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, torch.tensor([x.numel(), count], device=x.device), group=group)
    sizes = [s.tolist() for s in sizes]
    width = max(1, max(size for size, _ in sizes))  # >= 1: no collective of empty tensors
    parts = [x.new_empty(width) for _ in sizes]
    dist.all_gather(parts, torch.cat([x, x.new_zeros(width - x.numel())]), group=group)
    return torch.cat([part[:size] for part, (size, _) in zip(parts, sizes)]), sum(c for _, c in sizes)
