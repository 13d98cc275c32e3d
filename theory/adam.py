"""The Adam-based MoFO (mofo.MoFO) on the toy losses: observed behaviour only, no bound claimed.

MoFO (arXiv 2407.20999, Algorithm 1). The later version of the paper proves an O(log T / √T) rate
for it in a filtered gradient norm, with a decaying step size (theory/adam_bound.py checks a bound
of that order); here, with a constant lr, we only measure, for each α, how fast ‖∇f‖ falls and how
far θ travels from θ0 — the quantity MoFO is meant to keep small.

θ is split into blocks, each a (1, n_b) torch parameter: MoFO filters tensors with ≥ 2 dimensions
only, and updates 1-D ones densely.
"""
import numpy as np
import torch

from mofo import MoFO
from theory.gd import initial_point, partition


def adam_mofo_trajectories(loss, alphas=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0), lr=0.01, steps=500,
                           seed=0, blocks="several"):
    """Run mofo.MoFO from the same θ0 for each α; return per-step arrays, one row per α.

    Returns dict with `alphas`, `f`, `grad_norm`, `dist` (‖θ_t − θ0‖), each (len(alphas), steps+1),
    and `moved_fraction` (len(alphas),): the share of coordinates of θ that ever changed.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    theta0 = initial_point(loss.d, seed)
    sizes = partition(loss.d, blocks) if isinstance(blocks, str) else list(blocks)
    edges = np.cumsum([0, *sizes])
    out = {k: np.empty((len(alphas), steps + 1)) for k in ("f", "grad_norm", "dist")}
    out["moved_fraction"] = np.empty(len(alphas))
    for i, alpha in enumerate(alphas):
        params = [torch.tensor(theta0[a:b], dtype=torch.float64).view(1, -1)   # (1, n_b)
                  .requires_grad_(True) for a, b in zip(edges[:-1], edges[1:])]
        opt = MoFO(params, lr=lr, alpha=alpha)
        for t in range(steps + 1):
            theta = torch.cat([p.detach().view(-1) for p in params]).numpy()   # (d,)
            f, g = loss.value_and_grad(theta)
            out["f"][i, t] = f
            out["grad_norm"][i, t] = np.sqrt(g @ g)
            out["dist"][i, t] = np.linalg.norm(theta - theta0)
            if t == steps:
                break
            for p, a, b in zip(params, edges[:-1], edges[1:]):
                p.grad = torch.from_numpy(g[a:b].copy()).view(1, -1)
            opt.step()
        out["moved_fraction"][i] = np.mean(theta != theta0)
    out["alphas"] = np.asarray(alphas, dtype=float)
    return out
