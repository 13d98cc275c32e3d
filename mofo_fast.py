"""
MoFO's fast path: the mask of mofo.select_reference, the very same, without a full selection.

mofo.py is the algorithm and the optimizer a reader edits; this file is the opt-in fast path,
chosen by name: `mofo_fast.MoFO(params, ..., compiled=False)` is mofo.MoFO whose step hands each
tensor to Workspace.update_ below, which runs mofo.mofo_update_ with:

  select_             step 4: tau, the exact k-th largest |m|, from a strided sample that
                      brackets it (`bracket`), one pass that counts the entries above the bracket
                      and gathers those inside it (`band`), and an exact selection among those
                      few; then the mask in one pass. On a CPU a torch.topk of a whole tensor
                      costs several AdamW steps, and these few passes a fraction of that.
  reused buffers      one buffer, kept from step to step, for the denominator, m * mask and the
                      band's flags, instead of three per tensor whose pages a CPU would fault in
                      again each time.
  DTensors (FSDP2)    each rank steps its own rows with the mask of the whole tensor
                      (global_threshold): bitwise the parameters of one process.
  compiled=True       MoFO's momentum filter on contiguous float32 CPU matrices in C
                      (mofo_kernel.py, fused_step_): steps 1-5 in two passes over memory, the
                      moments and the band in one, the masked step in the other, rounded as
                      torch's ops, so bitwise mofo.MoFO's; other tensors and filters take
                      steps 4-5 in C, or the eager path.

A bracket that misses tau costs time (a full selection), never exactness: tau is always an exact
k-th value, so the parameters are bitwise those of mofo.MoFO (tests/test_mofo.py). An edit of
mofo.py's step 4 (select_reference, topk_mask_reference) is not seen here: this file finds the
same mask its own way; mofo.filter_score and mofo.random_mask it calls as they are.
"""
import functools
import math
import warnings

import torch

import mofo

try:  # FSDP2's parameters are DTensors: see shard_of and global_threshold at the end of the file
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # a torch built without torch.distributed: isinstance(p, ()) is always False
    DTensor = ()

# Entries sampled to estimate tau. The exact selection then runs on the band between two sample
# quantiles, which holds about 2 * SAMPLE_Z * sqrt(p(1-p) / SAMPLE_SIZE) of all entries (p = k/n):
# 1.9 % at alpha = 0.1. A larger sample narrows the band only as its square root while its own
# selection grows linearly: 2^14 balances the two on bench.py's 0.25-0.7 M-entry tensors.
SAMPLE_SIZE = 16384
# Bracket half-width in binomial standard deviations. The bracket misses tau when the number of
# sampled entries above tau falls outside mean +- spread: for a sample that does not line up with
# the data's order, a normal two-sided tail at 4 sd, 2 * (1 - Phi(4)) ~ 6e-5 per tensor and step.
SAMPLE_Z = 4.0


class MoFO(mofo.MoFO):
    """mofo.MoFO, bit for bit, with the mask found fast; it also steps FSDP2's DTensors.
    compiled=True runs the step of contiguous float32 CPU tensors in C (needs a C compiler)."""

    def __init__(self, params, *args, compiled=False, **kwargs):
        super().__init__(params, *args, **kwargs)
        self.compiled = compiled
        self.workspace = Workspace(compiled)  # its buffers live from step to step

    def update_(self, p, *args):
        return self.workspace.update_(p, *args)

    def __setstate__(self, state):  # an unpickled or copied optimizer gets its own buffers
        super().__setstate__(state)
        self.workspace = Workspace(self.compiled)

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("workspace", None)
        return {**state, "compiled": self.compiled}


class Workspace:
    """One MoFO step's fast path: update_ runs mofo.mofo_update_ with select_ below, in buffers
    reused from tensor to tensor; compiled: take steps 4-5 in C where the C kernel applies."""

    def __init__(self, compiled=False):
        self.compiled, self.buffer = compiled, None
        self.shard = self.kept = self.scratch = None

    def update_(self, p, grad, exp_avg, exp_avg_sq, *hyper):
        """mofo.mofo_update_(p, grad, exp_avg, exp_avg_sq, *hyper), the same bits, faster."""
        numel, self.shard = None, None
        if isinstance(p, DTensor):  # FSDP2: this rank's rows; the mask is the whole p's
            numel, self.shard = p.numel(), shard_of(p)
            p, grad, exp_avg, exp_avg_sq = (t.to_local() for t in (p, grad, exp_avg, exp_avg_sq))
            if p.is_complex():  # mofo_update_ steps the real view: two entries per complex one
                group, start, n = self.shard
                self.shard = group, 2 * start, 2 * n
        m = torch.view_as_real(exp_avg) if exp_avg.is_complex() else exp_avg
        self.kept, denom, self.scratch = self.carve(m)
        if self.compiled and self.shard is None:
            count = fused_step_(p, grad, exp_avg, exp_avg_sq, *hyper, out=self.kept)
            if count is not None:  # else a tensor or a filter the fused C step does not take
                return count
        return mofo.mofo_update_(p, grad, exp_avg, exp_avg_sq, *hyper, select=self.select_,
                                 numel=numel, denom=denom)

    def select_(self, filter, grad, exp_avg, denom, k, generator, p, step_size):
        """mofo.select_reference's (m * mask, count), the mask found fast; or, compiled, steps
        4-5 in C: (None, count)."""
        if self.compiled and filter == "momentum" and self.shard is None:
            count = compiled_step_(p, exp_avg, denom, k, step_size, self.kept)
            if count is not None:  # else not a contiguous float32 CPU tensor: the eager path
                return None, count
        count = filter_fast_(filter, grad, exp_avg, denom, k, generator, self.kept, self.scratch,
                             self.shard)
        return self.kept, count

    def carve(self, m):
        """(kept, denom, scratch): two buffers shaped like m and 2 * numel int8s, carved from one
        buffer that is replaced only when too small: one allocation for all tensors of a step."""
        n, size = m.numel(), m.numel() * m.element_size()
        need = 2 * size + 2 * n
        if self.buffer is None or self.buffer.numel() < need or self.buffer.device != m.device:
            self.buffer = torch.empty(need, dtype=torch.uint8, device=m.device)
        kept = self.buffer[:size].view(m.dtype).view(m.shape)
        denom = self.buffer[size:2 * size].view(m.dtype).view(m.shape)
        return kept, denom, self.buffer[2 * size:2 * size + 2 * n].view(torch.int8)


def filter_fast_(filter, grad, exp_avg, denom, k, generator, out, scratch, shard=None):
    """exp_avg * mask, the mask mofo.select_reference's, written into `out` (a buffer shaped like
    exp_avg); returns the mask's size. The same draw, or the same exact tau. shard: None, or
    shard_of(p) when exp_avg is this rank's part of a DTensor's; the mask is the whole p's."""
    if filter == "random":  # a sharded p draws from all of p, alike on every rank, keeps its part
        start, n = (0, exp_avg.numel()) if shard is None else shard[1:]
        mask = mofo.random_mask(n, k, generator, out.device)[start:start + exp_avg.numel()]
        torch.mul(exp_avg, mask.view(exp_avg.shape), out=out)
        return k
    score = mofo.filter_score(filter, grad, exp_avg, denom, out=out)
    if shard is None:
        tau, count = topk_threshold(score, k, scratch)
    else:
        tau, count = global_threshold(score, k, shard[0], shard[2], scratch)
    if filter == "momentum" and out.device.type == "cpu":
        # |m| >= tau is |m| > (the float just below tau), as no float lies between them:
        # hardshrink keeps exactly those entries (ties at tau too) and zeroes the rest in one pass
        # instead of two. Its threshold is a Python float: a host sync, which only a GPU pays for.
        below = torch.nextafter(tau, tau.new_tensor(-math.inf)).item()
        torch.hardshrink(exp_avg, below, out=out)
    else:
        torch.ge(out, tau, out=out).mul_(exp_avg)
    return count


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
    # 2. One comparison pass against each end. The flags are int8, not bool: bool has no
    #    subtraction, and a CPU runs xor and sums of bools far slower than of int8s.
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
    in_words = s[:n8].view(-1, 8).index_select(0, words).view(-1)
    in_words = in_words[flags.index_select(0, words).view(torch.bool)]
    return n_above, torch.cat([in_words, s[n8:][inside[n8:].bool()]])


def compiled_step_(p, m, denom, k, step_size, out):
    """Steps 4-5 in C (mofo_kernel.py): the tau of topk_threshold from one read of m, then
    p.addcdiv_(m * mask, denom) in one pass, bit for bit. Returns the mask's size, or None
    (nothing done) unless p, m and denom are contiguous float32 CPU tensors."""
    import mofo_kernel  # opt-in: it compiles C on first use
    if not mofo_kernel.compilable(p, m, denom):
        return None
    found = mofo_kernel.threshold_c(m, k, SAMPLE_SIZE, SAMPLE_Z, out)
    if found is None:  # the bracket missed: the full selection
        found = topk_threshold(torch.abs(m, out=out), k, sampled=False)
    tau, count = found
    mofo_kernel.apply_c(p, m, denom, tau, -float(step_size))  # float: lr may be a tensor
    return count


def fused_step_(p, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay, alpha,
                maximize=False, filter="momentum", generator=None, out=None, checked=True):
    """mofo.mofo_update_ of one tensor in two passes of C (mofo_kernel.py), bit for bit: the
    moments, the sample and the band in one, the selection among the band, then decay, denominator
    and masked step in the other; nothing is allocated (out: a float32 buffer of >= numel
    entries). Returns the mask's size, or None (nothing done) where it does not apply: another
    filter, a dense step (AdamW's ops, eager), tensors other than contiguous float32 CPU ones, or
    a torch whose rounding the kernel does not reproduce (fused_matches_torch; checked=False
    skips that check, for the check itself)."""
    import mofo_kernel  # opt-in: it compiles C on first use
    if filter != "momentum":
        return None
    if p.is_complex():  # as mofo_update_: the real view, two entries per complex one
        if not grad.is_complex():
            return None
        p, grad, exp_avg, exp_avg_sq = map(torch.view_as_real, (p, grad, exp_avg, exp_avg_sq))
    n = p.numel()
    if p.dim() < 2 or alpha == 1.0 or n == 0 or out is None or out.numel() < n:
        return None
    if not mofo_kernel.compilable(p, grad, exp_avg, exp_avg_sq, out):
        return None
    if checked and not fused_matches_torch():
        return None
    lr = lr.squeeze() if torch.is_tensor(lr) else lr
    k = max(1, math.floor(alpha * n))  # mofo_update_'s k
    # The scalars as mofo_update_ computes them (a tensor lr makes some of them float32 tensors);
    # ctypes rounds each to float32 as torch does when it takes a Python number for a float op.
    found = mofo_kernel.moments_threshold_c(grad, exp_avg, exp_avg_sq, k, -1.0 if maximize else 1.0,
                                            1 - beta1, beta2, 1 - beta2, SAMPLE_SIZE, SAMPLE_Z, out)
    if found is None:  # a NaN in m, which torch.topk ranks first: its full selection
        score = torch.abs(exp_avg, out=out.reshape(-1)[:n].view(exp_avg.shape))
        tau, count = topk_threshold(score, k, sampled=False)
        found = tau.item(), int(count)
    tau, count = found
    decay = float(1 - lr * weight_decay) if weight_decay != 0 else None
    step_size = lr / (1 - beta1 ** step)
    mofo_kernel.masked_step_c(p, exp_avg, exp_avg_sq, tau, decay, (1 - beta2 ** step) ** 0.5, eps,
                              -float(step_size))
    return count


@functools.cache
def fused_matches_torch():
    """Whether fused_step_ gives mofo.mofo_update_'s bits on this machine and torch build: checked
    once on a few tensors (sampled and not, both of lerp's formulas, decay, maximize, a tensor lr).
    Where it does not, MoFO(compiled=True) keeps to steps 4-5 in C, with a warning."""
    gen = torch.Generator().manual_seed(0)
    for shape, beta1, wd, maximize, lr in (((4 * SAMPLE_SIZE + 3, 3), 0.9, 0.0, False, 1e-3),
                                           ((37, 41), 0.3, 0.1, True, torch.tensor([1e-2]))):
        p, m, v = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen) * 1e-3, \
            torch.rand(shape, generator=gen) * 1e-6
        grads = [torch.randn(shape, generator=gen) * 1e-2 for _ in range(2)]
        runs = []
        for fused in (False, True):
            q, mq, vq = p.clone(), m.clone(), v.clone()
            for step, g in enumerate(grads, 1):
                hyper = (step, lr, beta1, 0.999, 1e-8, wd, 0.1, maximize, "momentum", None)
                if fused:
                    fused_step_(q, g, mq, vq, *hyper, out=torch.empty_like(q), checked=False)
                else:
                    mofo.mofo_update_(q, g, mq, vq, *hyper)
            runs.append([t.view(torch.int32) for t in (q, mq, vq)])
        if not all(torch.equal(a, b) for a, b in zip(*runs)):
            warnings.warn("MoFO(compiled=True): this torch rounds AdamW's ops unlike the fused C "
                          "step; it takes steps 4-5 in C only")
            return False
    return True


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
        raise ValueError(f"MoFO needs DTensors split on dim 0 only (FSDP2's layout), "
                         f"got {p.placements}")
    mesh, dim = p.device_mesh, dims[0]
    rows = -(-p.shape[0] // mesh.size(dim))  # torch.chunk's rows per rank
    start = min(mesh.get_local_rank(dim) * rows, p.shape[0]) * (p.numel() // p.shape[0])
    return mesh.get_group(dim), start, p.numel()


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
    world = dist.get_world_size(group)
    sizes = [torch.empty(2, dtype=torch.int64, device=x.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([x.numel(), count], device=x.device), group=group)
    sizes = [s.tolist() for s in sizes]
    width = max(1, max(size for size, _ in sizes))  # >= 1: no collective of empty tensors
    parts = [x.new_empty(width) for _ in sizes]
    dist.all_gather(parts, torch.cat([x, x.new_zeros(width - x.numel())]), group=group)
    gathered = torch.cat([part[:size] for part, (size, _) in zip(parts, sizes)])
    return gathered, sum(count for _, count in sizes)
