"""
MoFO, the Momentum-Filtered Optimizer: Chen et al., "MoFO: Momentum-Filtered Optimizer for
Mitigating Forgetting in LLM Fine-Tuning", arXiv 2407.20999 (2024), TMLR 2025; Algorithm 1.

MoFO is Adam whose *update* is filtered. Every step t (counted per tensor from 1), for each
parameter tensor p (one block) with gradient g:

    1. p = p * (1 - lr*wd)                           decoupled weight decay, every entry
    2. m = b1*m + (1-b1)*g    v = b2*v + (1-b2)*g^2  moments of every entry, selected or not
    3. step = lr / (1-b1^t)   denom = sqrt(v) / sqrt(1-b2^t) + eps
    4. k = max(1, floor(alpha * numel(p)))   tau = k-th largest |m|   mask = |m| >= tau
    5. p = p - step * (m * mask) / denom

Entries outside the mask stay put, so fine-tuning ends closer to the pre-trained weights and
forgets less. Tensors with fewer than 2 dimensions (biases, norms) and groups with alpha=1.0 take
the dense AdamW step; with alpha=1.0 everywhere MoFO *is* torch.optim.AdamW(foreach=False), bit
for bit: the arithmetic follows torch's single-tensor AdamW operation by operation. As AdamW
does, a complex tensor is stepped as its real view (torch.view_as_real): its real and imaginary
parts are two entries, each with its own moments, and two entries of the mask and of numel (so a
complex vector, whose real view is a matrix, is filtered).

mofo_update_ is the algorithm for one tensor, select_reference (a torch.topk) its step 4; this
file needs nothing but torch. mofo_fast.MoFO, beside it, is the opt-in fast path: the very same
mask found without a full selection (so bitwise the same parameters, by test), FSDP2's sharded
DTensors, and steps 4-5 in C with compiled=True.
"""
import math

import torch

try:  # FSDP2's parameters are DTensors: mofo_fast.MoFO steps them shard by shard
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without torch.distributed: isinstance(p, ()) is always False
    DTensor = ()

FILTERS = ("momentum", "gradient", "random", "update")
MOFO_KEYS = ("lr", "betas", "eps", "weight_decay", "alpha", "filter", "maximize")  # per group


def mofo_update_(p, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay, alpha,
                 maximize=False, filter="momentum", generator=None, select=None, numel=None,
                 denom=None):
    """One MoFO step of one tensor, in place, under torch.no_grad() (as MoFO.step runs it); `step`
    is t (from 1). Returns the number of entries that got an Adam update: k (more on ties at tau),
    or numel for a dense step. select: step 4, select(filter, g, m, denom, k, generator, p,
    step_size) -> (m * mask, count), select_reference if None; one that takes step 5 too returns
    (None, count). numel: the whole tensor's size where p is a shard of it; denom: a buffer for
    step 3's denominator."""
    n = p.numel() if numel is None else numel
    lr = lr.squeeze() if torch.is_tensor(lr) else lr  # a 1-element tensor lr, as AdamW takes it
    g = (-grad if maximize else grad).to(exp_avg.dtype)  # fp32 moments even for bf16 params
    # 1. Decoupled weight decay, every entry, selected or not (AdamW; the authors' code).
    if weight_decay != 0:
        p.mul_(1 - lr * weight_decay)
    if torch.is_complex(p):  # then, as AdamW, the real view: a complex entry is two real ones
        p, g, exp_avg, exp_avg_sq = map(torch.view_as_real, (p, g, exp_avg, exp_avg_sq))
        n *= 2
    dense = p.dim() < 2 or alpha == 1.0 or n == 0  # vectors, alpha=1, no entries: AdamW's step
    # 2. Moments of every entry, selected or not.
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    # 3. Bias corrections, as torch AdamW.
    step_size = lr / (1 - beta1 ** step)
    denom = torch.sqrt(exp_avg_sq, out=denom).div_((1 - beta2 ** step) ** 0.5).add_(eps)
    if dense:
        p.addcdiv_(exp_avg, denom, value=-step_size)
        return n
    # 4. Filter this block: kept = m * mask, mask = |m| >= its k-th largest |m| (ties kept), or
    #    an ablation's score; max(1, .) so that a tiny tensor still moves one entry.
    k = max(1, math.floor(alpha * n))
    kept, count = (select or select_reference)(filter, g, exp_avg, denom, k, generator, p,
                                               step_size)
    # 5. AdamW's step with unselected momentum zeroed: selected entries move as in AdamW, others 0.
    if kept is not None:  # None: the select took this step (mofo_fast's C kernel fuses 4-5)
        p.addcdiv_(kept, denom, value=-step_size)
    return count


def select_reference(filter, grad, exp_avg, denom, k, generator=None, p=None, step_size=None):
    """Step 4 as written: (exp_avg * mask, the mask's size), the mask the k top-scoring entries,
    ties at tau kept, or k entries drawn from `generator` (not the global RNG) for "random".
    p and step_size are there for a select that also takes step 5; this one does not."""
    if filter == "random":
        mask = random_mask(exp_avg.numel(), k, generator, exp_avg.device).view(exp_avg.shape)
    else:
        mask = topk_mask_reference(filter_score(filter, grad, exp_avg, denom), k)
    return exp_avg * mask, mask.sum()


def topk_mask_reference(score, k):
    """score >= tau, tau the k-th largest score (1 <= k <= numel): the top k, ties at tau kept."""
    tau = torch.topk(score.reshape(-1), k, sorted=False).values.min()
    return score >= tau


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


def _check_group(group):
    lr, (beta1, beta2) = group["lr"], group["betas"]
    if torch.is_tensor(lr) and lr.numel() != 1:
        raise ValueError(f"lr must be a number or a 1-element tensor, got shape {tuple(lr.shape)}")
    for name, ok, allowed in (
            ("lr", 0.0 <= lr, "[0, inf)"), ("betas", 0 <= beta1 < 1 and 0 <= beta2 < 1, "[0, 1)"),
            ("eps", 0.0 <= group["eps"], "[0, inf)"), ("alpha", 0 < group["alpha"] <= 1, "(0, 1]"),
            ("weight_decay", 0.0 <= group["weight_decay"], "[0, inf)"),
            ("filter", group["filter"] in FILTERS, f"{FILTERS}")):
        if not ok:
            raise ValueError(f"{name} must be in {allowed}, got {group[name]!r}")


class MoFO(torch.optim.Optimizer):
    """AdamW that moves, in each tensor, only the alpha fraction of entries with the largest |m|.

    filter: what ranks the entries (the paper's ablations), "momentum" |m| (MoFO), "gradient"
    |g|, "update" |m|/denom or "random" (k entries drawn from a generator seeded by `seed`, saved
    in state_dict). weight_decay is decoupled, as in AdamW and the authors' code: every entry of
    every tensor with a gradient, selected or not. Moments are fp32 (or p's dtype if wider).
    last_update_fraction: the share of entries the last step updated."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 alpha=0.1, filter="momentum", maximize=False, seed=0):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, alpha=alpha,
                        filter=filter, maximize=maximize)
        _check_group(defaults)  # before torch looks at params: a bad value is a ValueError, as AdamW
        super().__init__(params, defaults)  # validates every group through add_param_group
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.last_update_fraction = 0.0

    def add_param_group(self, param_group):
        _check_group({**self.defaults, **param_group})  # before it joins: a refused group stays out
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        moved, total = 0, 0
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            hyper = (group["lr"], beta1, beta2, group["eps"], group["weight_decay"],
                     group["alpha"], group["maximize"], group["filter"], self.generator)
            for p in group["params"]:
                total += p.numel() * (2 if p.is_complex() else 1)  # as mofo_update_ counts
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError("MoFO does not support sparse gradients (param.grad)")
                state = self.state[p]
                if len(state) == 0:  # lazy init, named like torch.optim.AdamW's state
                    zeros = torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32))
                    state.update(step=torch.tensor(0.0), exp_avg=zeros, exp_avg_sq=zeros.clone())
                state["step"] += 1
                moved += self.update_(p, p.grad, state["exp_avg"], state["exp_avg_sq"],
                                      state["step"].item(), *hyper)
        self.last_update_fraction = float(moved) / max(total, 1)  # one host sync per step
        return loss

    def update_(self, p, *args):  # one tensor's step; mofo_fast.MoFO swaps in the fast one
        if isinstance(p, DTensor):
            raise ValueError("DTensors (FSDP2): use mofo_fast.MoFO, which steps each rank's rows")
        return mofo_update_(p, *args)

    def state_dict(self):  # the "random" filter's generator is optimizer state too
        return {**super().state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        generator_state = state_dict.pop("generator", None)
        super().load_state_dict(state_dict)  # ends in __setstate__ below
        if generator_state is not None:
            self.generator.set_state(generator_state)
        # torch casts loaded state to the parameter's dtype; keep bf16/fp16 params' moments fp32.
        saved = [i for g in state_dict["param_groups"] for i in g["params"]]
        for i, p in zip(saved, [p for g in self.param_groups for p in g["params"]]):
            for key in {"exp_avg", "exp_avg_sq"} & state_dict["state"].get(i, {}).keys():
                dtype = torch.promote_types(p.dtype, torch.float32)
                self.state[p][key] = state_dict["state"][i][key].to(p.device, dtype)

    def __setstate__(self, state):  # unpickling, deepcopy and load_state_dict come through here
        super().__setstate__(state)
        for group in self.param_groups:  # a group saved without one of MoFO's own keys (AdamW's);
            for key in MOFO_KEYS:  # torch's own keys (differentiable, ...) stay as saved
                group.setdefault(key, self.defaults[key])
            _check_group(group)
            for p in group["params"]:  # an older checkpoint's step, a number: a tensor, as torch
                s = self.state.get(p, {})
                if "step" in s and not torch.is_tensor(s["step"]):
                    s["step"] = torch.tensor(float(s["step"]))

    def __getstate__(self):  # pickling and deepcopy keep the generator and the fraction
        keep = ("seed", "generator", "last_update_fraction")
        return {**super().__getstate__(), **{key: getattr(self, key) for key in keep}}
