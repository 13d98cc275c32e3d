"""
MoFO: the Momentum-Filtered Optimizer.

Chen, Wang, Lin, Qin, Zhang, Ding, Sun, "MoFO: Momentum-Filtered Optimizer for Mitigating
Forgetting in LLM Fine-Tuning", arXiv 2407.20999 (2024), TMLR 2025; Algorithm 1.

MoFO is Adam whose *update* is filtered. Every step, for each parameter tensor p (one block):

    m = b1*m + (1-b1)*g          v = b2*v + (1-b2)*g^2          (every entry, selected or not)
    k = floor(alpha * numel(p))  tau = k-th largest |m|         mask = |m| >= tau  (ties kept)
    p -= lr / (1-b1^t) * (m * mask) / (sqrt(v) / sqrt(1-b2^t) + eps)

Entries outside the mask stay where they are, so fine-tuning ends closer to the pre-trained
weights and forgets less. Tensors with fewer than 2 dimensions (biases, norms) and param groups
with alpha=1.0 take the plain dense AdamW step; with alpha=1.0 everywhere MoFO *is*
torch.optim.AdamW(foreach=False), bit for bit, because the arithmetic below is written in the
same operation order as torch's single-tensor AdamW.

The mask is exact without a full sort: a strided sample brackets the k-th largest |m|, two
comparison passes count the entries above the bracket and find the few inside it, and an exact
selection among those few gives tau (see topk_threshold). The temporaries live in one buffer
reused by all tensors of a step (see workspace).
"""
import math

import torch

FILTERS = ("momentum", "gradient", "random", "update")
SAMPLE_SIZE = 16384  # entries sampled to bracket the k-th largest value
SAMPLE_Z = 4.0       # bracket half-width in binomial standard deviations: misses ~1e-4 likely


def kth_largest(x, k):
    """Exact k-th largest entry (1 <= k <= numel) of a 1-D tensor, as a 0-dim tensor."""
    return torch.topk(x, k, sorted=False).values.min()


def topk_threshold(score, k, scratch=None):
    """(tau, count): tau the exact k-th largest entry of `score` (1 <= k <= numel, any shape),
    count the number of entries >= tau (k, or more when entries tie with tau); both 0-dim tensors
    on score's device, so that a GPU step does not wait for the host.

    A full selection (torch.topk) costs several times an Adam step. Instead:
      1. a sample of SAMPLE_SIZE entries gives two quantiles [lo, hi] that bracket tau with
         overwhelming probability, with only a few percent of all entries between them;
      2. one comparison pass against lo and one against hi; entries > hi rank above tau;
      3. gather the entries in [lo, hi] and take the exact (k - #above)-th largest of them.
    If the bracket misses tau, tau is taken from the full tensor: the result never depends on
    the sample, which only decides how much work is done.
    scratch: optional int8 tensor of at least 2 * numel entries to work in (saves allocations).
    """
    s = score.reshape(-1)
    n = s.numel()
    if n <= 4 * SAMPLE_SIZE or s.is_cuda:  # small tensor: a direct selection is already cheap; on a
        tau = kth_largest(s, k)             # GPU torch.topk is fast and the bracket's host syncs are not
        return tau, (s >= tau).sum()
    # 1. An evenly strided sample: deterministic, so it draws from no generator (the global RNG
    #    and the "random" filter's stream stay untouched) and is cache friendly. A stride
    #    coprime with n is coprime with any row length, so it visits all columns, not a few.
    stride = n // SAMPLE_SIZE
    while math.gcd(stride, n) > 1:
        stride -= 1
    sample = s[stride // 2::stride][:SAMPLE_SIZE]
    mean = k / n * SAMPLE_SIZE  # expected number of sampled entries >= tau
    spread = SAMPLE_Z * math.sqrt(mean * (1 - k / n)) + 1
    top = torch.topk(sample, min(SAMPLE_SIZE, math.ceil(mean + spread))).values  # descending
    lo = top[-1]
    hi = top[math.floor(mean - spread) - 1] if mean - spread >= 1 else s.new_tensor(math.inf)
    # 2. Comparisons written as int8 (several times faster than bool on CPU).
    if scratch is None:
        scratch = torch.empty(2 * n, dtype=torch.int8, device=s.device)
    ge_lo = torch.ge(s, lo, out=scratch[:n])
    gt_hi = torch.gt(s, hi, out=scratch[n:2 * n])
    n_above = int(gt_hi.sum(dtype=torch.int32))
    band = ge_lo.sub_(gt_hi)  # 1 where lo <= s <= hi
    # 3. Gather the band: scan the flags 8 bytes at a time for the 8-entry words that hold any
    #    of it (an eighth of the work of a per-entry scan), then pick the entries inside.
    n8 = n - n % 8
    flags = band[:n8].view(torch.int64)
    words = torch.nonzero(flags).squeeze(1)
    cand = torch.cat([s[:n8].view(-1, 8).index_select(0, words).view(-1)[flags.index_select(0, words).view(torch.bool)],
                      s[n8:][band[n8:].bool()]])
    if not 0 <= k - n_above - 1 < cand.numel():  # tau is outside [lo, hi]: no shortcut
        tau = kth_largest(s, k)
        return tau, (s >= tau).sum()
    tau = kth_largest(cand, k - n_above)
    return tau, n_above + (cand >= tau).sum()


def topk_mask(x, k):
    """Boolean mask of |x| >= (k-th largest |x|): the top-k entries by magnitude, ties kept."""
    if k <= 0:
        return torch.zeros(x.shape, dtype=torch.bool, device=x.device)
    if k >= x.numel():
        return torch.ones(x.shape, dtype=torch.bool, device=x.device)
    a = x.abs()
    return a >= topk_threshold(a, k)[0]


def adam_denom(exp_avg_sq, bias_correction2_sqrt, eps):
    # in place after the sqrt: one temporary, the same arithmetic as (sqrt(v) / c).add_(eps)
    return exp_avg_sq.sqrt().div_(bias_correction2_sqrt).add_(eps)


@torch.no_grad()
def gd_mofo_step_(params, grads, lr, alpha):
    """GD-MoFO, theta -= lr * (g * top-alpha mask of |g|), each tensor one block.

    k = ceil(alpha * numel), unlike the optimizer's floor (at least 1): the convergence bound
    rests on ||g * mask||^2 >= alpha * ||g||^2, which needs k / numel >= alpha.
    """
    for p, g in zip(params, grads):
        mask = topk_mask(g, math.ceil(alpha * g.numel()))
        p.sub_(lr * torch.where(mask, g, 0))


def workspace(work, m):
    """(work, score, denom, scratch): two buffers shaped like m and 2*numel int8s, carved from
    `work`, which is replaced by a larger one when too small. One buffer reused by all the
    tensors of a step costs one allocation instead of three per tensor; on CPU each fresh
    allocation of this size is paid again in page faults.
    """
    n, size = m.numel(), m.numel() * m.element_size()
    if work is None or work.numel() < 2 * size + 2 * n or work.device != m.device:
        work = torch.empty(2 * size + 2 * n, dtype=torch.uint8, device=m.device)
    score = work[:size].view(m.dtype).view(m.shape)
    denom = work[size:2 * size].view(m.dtype).view(m.shape)
    return work, score, denom, work[2 * size:2 * size + 2 * n].view(torch.int8)


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
    k = max(1, floor(alpha * numel)): a tiny tensor still moves one entry. weight_decay is
    decoupled as in AdamW and, as in the authors' code, shrinks every entry of every tensor that
    has a gradient, selected or not. Moments are kept in fp32 (or p's dtype if wider).
    After each step, last_update_fraction is the fraction of all parameter entries that got an
    Adam update (filtered and dense tensors together; weight decay not counted).
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 alpha=0.1, filter="momentum", maximize=False, seed=0):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, alpha=alpha,
                        filter=filter, maximize=maximize)
        super().__init__(params, defaults)  # validates every group through add_param_group
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.last_update_fraction = 0.0

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        _check_group(self.param_groups[-1])

    def _filter_(self, group, g, m, denom, k, out, scratch):
        """Write m with all but the k top-scoring entries zeroed into `out`; return how many
        entries were kept (k, or more on ties)."""
        if group["filter"] == "random":  # exactly k entries, from the optimizer's own generator
            idx = torch.randperm(m.numel(), generator=self.generator)[:k].to(m.device)
            out.zero_().view(-1).index_fill_(0, idx, 1.0)
            out.mul_(m)
            return k
        if group["filter"] == "momentum":
            torch.abs(m, out=out)
        elif group["filter"] == "gradient":
            torch.abs(g, out=out)
        else:  # "update": |m_hat| / (sqrt(v_hat) + eps) ranks like |m| / denom
            torch.abs(m, out=out).div_(denom)
        tau, count = topk_threshold(out, k, scratch)
        if group["filter"] == "momentum" and out.device.type == "cpu":
            # |m| >= tau is |m| > (the float just below tau): hardshrink keeps exactly those in
            # one pass (its threshold is a Python float: a host sync, which only a GPU pays for)
            torch.hardshrink(m, torch.nextafter(tau, tau.new_tensor(-math.inf)).item(), out=out)
        else:
            torch.ge(out, tau, out=out).mul_(m)
        return count

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        moved, total, work = 0, 0, None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, alpha = group["lr"], group["eps"], group["alpha"]
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
                g = p.grad.to(m.dtype)
                g = -g if group["maximize"] else g
                state["step"] += 1
                t = state["step"].item()
                # 1. Decoupled weight decay, every entry (AdamW; the authors' code).
                if group["weight_decay"] != 0:
                    p.mul_(1 - lr * group["weight_decay"])
                # 2. Moments of every entry, selected or not.
                m.lerp_(g, 1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                # 3. Bias corrections, as torch AdamW.
                step_size = lr / (1 - beta1 ** t)
                bias_correction2_sqrt = (1 - beta2 ** t) ** 0.5
                # 4. Vectors and alpha=1 groups: the dense AdamW step.
                if p.dim() < 2 or alpha == 1.0:
                    p.addcdiv_(m, adam_denom(v, bias_correction2_sqrt, eps), value=-step_size)
                    moved += p.numel()
                    continue
                # 5. Filter: mask the top-k entries by the group's score (ties kept).
                work, m_kept, denom, scratch = workspace(work, m)
                torch.sqrt(v, out=denom).div_(bias_correction2_sqrt).add_(eps)  # = adam_denom
                k = max(1, math.floor(alpha * p.numel()))
                moved += self._filter_(group, g, m, denom, k, m_kept, scratch)
                # 6. The AdamW step with the unselected entries' momentum zeroed: selected
                #    entries move exactly as in AdamW, the others by exactly 0.
                p.addcdiv_(m_kept, denom, value=-step_size)
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

    def __getstate__(self):  # pickling and deepcopy keep the generator too
        return {**super().__getstate__(), "seed": self.seed, "generator": self.generator}
