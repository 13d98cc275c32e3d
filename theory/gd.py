"""GD-MoFO runs on the toy losses, recording what the bound's proof needs at every step.

GD-MoFO (MoFO, arXiv 2407.20999, GD variant):  θ_{t+1} = θ_t − η (∇f(θ_t) ⊙ γ_t), where γ_t keeps,
inside each block, the ⌈α·n_b⌉ entries of largest |∇f| (ties kept). The update is gd_mofo_step_
below, its mask mofo.py's topk_mask_reference, applied to float64 torch views of a numpy θ.

The mask γ_t is read off the update that was actually applied (the entries of θ that changed),
so the checks test what the optimizer did, not what it was meant to do.
"""
import math

import numpy as np
import torch

from mofo import topk_mask_reference


@torch.no_grad()
def gd_mofo_step_(params, grads, lr, alpha):
    """GD-MoFO, θ -= lr * (g ⊙ top-α mask of |g|), each tensor one block, in place.

    k = ⌈α·numel⌉, unlike the optimizer's ⌊α·numel⌋ (at least 1): the convergence bound rests on
    ‖g ⊙ mask‖² ≥ α‖g‖², which needs k / numel ≥ α.
    """
    for p, g in zip(params, grads):
        mask = topk_mask_reference(g.abs(), math.ceil(alpha * g.numel()))
        p.sub_(lr * torch.where(mask, g, 0))


def partition(d, kind):
    """Block sizes for θ ∈ R^d: 'one' block, 'several' uneven blocks, or one 'entry' per block."""
    if kind == "one":
        return [d]
    if kind == "several":
        # cut points at 10%, 30%, 60% of d: four uneven blocks (1, 2, 3, 4 entries at d = 10)
        cuts = [0, *(int(round(q * d)) for q in (0.1, 0.3, 0.6)), d]
        return [b - a for a, b in zip(cuts, cuts[1:]) if b > a]
    if kind == "entry":
        return [1] * d
    raise ValueError(f"kind must be 'one', 'several' or 'entry', got {kind!r}")


def initial_point(d, seed):
    """θ0 ~ N(0, I), seeded; the seed varies the start, the loss's data stay fixed."""
    return np.random.default_rng(seed).standard_normal(d)


def run_gd_mofo(loss, theta0, blocks, alpha, eta, steps, step=gd_mofo_step_):
    """Run `steps` GD-MoFO steps from theta0; return the per-step record as plain arrays.

    step(params, grads, lr, alpha) is the in-place update; the default is gd_mofo_step_, and tests
    pass deliberately broken ones to see that the checks catch them.

    Returns dict with
      f              (steps+1,)  f(θ_t)
      grad_sq        (steps+1,)  ‖∇f(θ_t)‖²
      block_grad_sq  (steps, B)  ‖g_t,b‖² per block b
      block_filt_sq  (steps, B)  ‖g_t,b ⊙ γ_t,b‖² per block, γ_t read off the applied update
      theta          (d,)        θ_steps
    """
    if sum(blocks) != loss.d or min(blocks) < 1:
        raise ValueError(f"blocks must be positive sizes summing to d={loss.d}, got {blocks}")
    theta = np.array(theta0, dtype=np.float64)                        # (d,)
    theta_t = torch.from_numpy(theta)                                 # shares memory with theta
    edges = np.cumsum([0, *blocks])
    starts = edges[:-1]
    views = [theta_t[a:b] for a, b in zip(edges[:-1], edges[1:])]
    g_buf = np.empty_like(theta)                    # each step's gradient is copied in here, so
    g_views = [torch.from_numpy(g_buf)[a:b] for a, b in zip(edges[:-1], edges[1:])]  # views once
    f = np.empty(steps + 1)
    grad_sq = np.empty(steps + 1)
    block_grad_sq = np.empty((steps, len(blocks)))
    block_filt_sq = np.empty((steps, len(blocks)))
    for t in range(steps):
        f[t], g = loss.value_and_grad(theta)
        grad_sq[t] = g @ g
        g_buf[:] = g
        before = theta.copy()
        step(views, g_views, eta, alpha)
        moved = theta != before                                       # γ_t as applied
        block_grad_sq[t] = np.add.reduceat(g * g, starts)
        block_filt_sq[t] = np.add.reduceat(np.where(moved, g * g, 0.0), starts)
    f[steps], g = loss.value_and_grad(theta)
    grad_sq[steps] = g @ g
    return {"f": f, "grad_sq": grad_sq, "block_grad_sq": block_grad_sq,
            "block_filt_sq": block_filt_sq, "theta": theta}
