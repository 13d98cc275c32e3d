"""Check the GD-MoFO convergence bound, step by step, on the toy losses.

MoFO (arXiv 2407.20999), GD variant. For f ≥ f* with L-Lipschitz ∇f and 0 < η < 2/L:

    filter lemma    ‖g_t ⊙ γ_t‖² ≥ α ‖g_t‖²                          (per block, hence overall)
    descent         f(θ_{t+1}) ≤ f(θ_t) − η(1 − Lη/2) ‖g_t ⊙ γ_t‖²
    bound           min_{t<T} ‖∇f(θ_t)‖² ≤ (f(θ_0) − f*) / (α η (1 − Lη/2) T)   for every T ≥ 1

plus the consequence f(θ_{t+1}) ≤ f(θ_t) (monotone decrease). Every comparison allows a relative
tolerance RTOL for floating-point round-off and nothing else: a violation is reported when the
left side exceeds the right side by more than RTOL times the size of the quantities compared.
"""
import math
from dataclasses import dataclass

import numpy as np

from mofo import topk_mask_reference
from theory.gd import gd_mofo_step_, initial_point, partition, run_gd_mofo
from theory.losses import make_loss

# float64 round-off of sums of up to 1000 terms is ~1e-13 relative; 1e-10 leaves room, no more
RTOL = 1e-10


def check_run(run, alpha, eta, L, f_star, rtol=RTOL):
    """Test one recorded run against the lemma, the descent inequality and the bound.

    Returns plain data: violation counts, the worst slacks, and per-T arrays for plotting
    (`T`, `min_grad_sq` = min_{t<T} ‖∇f(θ_t)‖², `bound`, `tightness` = min_grad_sq / bound).
    """
    decrease = eta * (1 - L * eta / 2)
    if decrease == 0:
        raise ValueError("eta must not be exactly 2/L: the bound's right side is undefined there")
    gb, fb = run["block_grad_sq"], run["block_filt_sq"]              # (steps, B)
    f, grad_sq = run["f"], run["grad_sq"]
    steps = len(f) - 1
    # 1. filter lemma, per block: the kept share of ‖g_b‖² is at least α
    lemma_viol = int(np.sum(alpha * gb - fb > rtol * gb))
    share = np.where(gb > 0, fb / np.where(gb > 0, gb, 1.0), 1.0)
    # 2. descent inequality, and the monotone decrease it implies when η < 2/L
    filt = fb.sum(axis=1)                                            # ‖g_t ⊙ γ_t‖²
    scale = np.abs(f[:-1]) + np.abs(f[1:]) + eta * filt
    descent_slack = f[:-1] - decrease * filt - f[1:]
    descent_viol = int(np.sum(descent_slack < -rtol * scale))
    monotone_viol = int(np.sum(f[1:] - f[:-1] > rtol * scale))
    # 3. the bound for every T, evaluated literally: for η > 2/L its right side is negative, so
    #    it fails as soon as ∇f ≠ 0 (the theorem says nothing there; see negative_control)
    T = np.arange(1, steps + 1)
    min_grad_sq = np.minimum.accumulate(grad_sq[:-1])
    bound = (f[0] - f_star) / (alpha * decrease * T)
    bound_viol = int(np.sum(min_grad_sq > bound + rtol * np.abs(bound)))
    tightness = min_grad_sq / bound if decrease > 0 else np.full(steps, np.nan)
    # comparisons that fail as written and pass only thanks to RTOL: should stay at 0
    saved = (np.sum(alpha * gb - fb > 0) - lemma_viol
             + np.sum(descent_slack < 0) - descent_viol
             + np.sum(f[1:] > f[:-1]) - monotone_viol
             + np.sum(min_grad_sq > bound) - bound_viol)
    return {
        "saved_by_tolerance": int(saved),
        "lemma_violations": lemma_viol,
        "descent_violations": descent_viol,
        "monotone_violations": monotone_viol,
        "bound_violations": bound_viol,
        "worst_lemma_slack": float(np.min(share) - alpha),           # min kept share − α
        "worst_descent_slack": float(np.min(descent_slack / np.where(scale > 0, scale, 1.0))),
        "max_tightness": float(np.max(tightness)),
        "T": T, "min_grad_sq": min_grad_sq, "bound": bound, "tightness": tightness,
        "f": f, "grad_sq": grad_sq,
    }


def bound_curve(loss, alpha, eta_times_L, seed=0, blocks="several", steps=100, step=gd_mofo_step_,
                L=None):
    """Per-T measured min ‖∇f‖² and the bound for one setting (for plots).

    `loss` is a ToyLoss; η = eta_times_L / L. `L` overrides the loss's constant in both the step
    size and the check (to show what a wrong L does); `blocks` is a partition kind or a size list.
    """
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    if eta_times_L <= 0:
        raise ValueError(f"eta_times_L must be > 0, got {eta_times_L}")
    L = loss.L if L is None else L
    eta = eta_times_L / L
    sizes = partition(loss.d, blocks) if isinstance(blocks, str) else list(blocks)
    run = run_gd_mofo(loss, initial_point(loss.d, seed), sizes, alpha, eta, steps, step)
    return check_run(run, alpha, eta, L, loss.f_star)


def run_grid(losses, partitions, alphas, eta_factors, seeds, steps=100, step=gd_mofo_step_,
             L_scale=1.0):
    """Check every (loss, partition, α, ηL, seed); one summary row (a dict) per setting.

    `losses`: list of ToyLoss; `partitions(loss)` -> the partition kinds to use for that loss.
    `L_scale` multiplies the L that the run and the check believe in (1.0 = the true L).
    """
    rows = []
    for loss in losses:
        for kind in partitions(loss):
            for alpha in alphas:
                for c in eta_factors:
                    results = [bound_curve(loss, alpha, c, s, kind, steps, step, loss.L * L_scale)
                               for s in seeds]
                    rows.append({
                        "loss": loss.name, "d": loss.d, "partition": kind, "alpha": alpha,
                        "eta_L": c, "runs": len(results),
                        "checks": len(results) * steps * (len(partition(loss.d, kind)) + 3),
                        **{k: sum(r[k] for r in results) for k in (
                            "saved_by_tolerance", "lemma_violations", "descent_violations",
                            "monotone_violations", "bound_violations")},
                        "worst_lemma_slack": min(r["worst_lemma_slack"] for r in results),
                        "worst_descent_slack": min(r["worst_descent_slack"] for r in results),
                        "max_tightness": max(r["max_tightness"] for r in results),
                    })
    return rows


@dataclass
class GridConfig:
    losses: tuple = ("quadratic", "logistic", "robust")
    dims: tuple = (10, 100, 1000)
    quadratic_max_d: int = 100  # its dense d×d rotation makes d = 1000 steps ~10× dearer
    entry_max_d: int = 10       # one torch call per block; and ⌈α·1⌉ = 1 makes it plain GD anyway
    partitions: tuple = ("one", "several", "entry")
    alphas: tuple = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0)
    eta_factors: tuple = (0.1, 0.5, 1.0, 1.5, 1.9)  # η·L, inside (0, 2)
    seeds: tuple = (0, 1)       # vary θ0; each loss's data are fixed
    steps: int = 100            # the bound is checked for every T = 1..steps


def grid_losses(cfg):
    """The ToyLosses of the grid: every name × dimension, the quadratic only up to its cap."""
    return [make_loss(name, d) for name in cfg.losses for d in cfg.dims
            if name != "quadratic" or d <= cfg.quadratic_max_d]


def run_config(cfg, step=gd_mofo_step_, L_scale=1.0):
    """run_grid over the whole configured grid."""
    def kinds(loss):
        return [k for k in cfg.partitions if k != "entry" or loss.d <= cfg.entry_max_d]
    return run_grid(grid_losses(cfg), kinds, cfg.alphas, cfg.eta_factors, cfg.seeds, cfg.steps,
                    step, L_scale)


def floor_vs_ceil(n=10, alpha=0.25):
    """Why k = ⌈αn⌉: with k = ⌊αn⌋ the top-k entries may carry less than an α share of ‖g‖².

    Uses nearly equal, distinct entries (so no ties widen the mask) and mofo.topk_mask_reference.
    Returns the kept share for both roundings.
    """
    import torch

    g = torch.linspace(1.0, 1.001, n, dtype=torch.float64)
    out = {"n": n, "alpha": alpha}
    for name, k in (("floor", math.floor(alpha * n)), ("ceil", math.ceil(alpha * n))):
        kept = topk_mask_reference(g.abs(), k)
        out[f"k_{name}"] = k
        out[f"share_{name}"] = float((g[kept] ** 2).sum() / (g**2).sum())
    return out


def floor_rounded_step(params, grads, lr, alpha):
    """GD-MoFO with k = ⌊α n_b⌋ and no max(1, k) guard: a deliberately loosened mask.

    Delegates to gd_mofo_step_ with an α that makes its ⌈α n_b⌉ land on ⌊α n_b⌋ (half an
    entry below, so round-off in α·n_b cannot tip it over); blocks whose ⌊α n_b⌋ is 0 do not move
    at all. Only for showing that the lemma check catches it.
    """
    for p, g in zip(params, grads):
        k = math.floor(alpha * p.numel())
        if k > 0:
            gd_mofo_step_([p], [g], lr, (k - 0.5) / p.numel())


def negative_control(d=100, eta_times_L=2.1, alphas=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0),
                     seeds=(0, 1), steps=100):
    """η above 2/L on the quadratic: outside the theorem, so the same check must flag it."""
    loss = make_loss("quadratic", d)
    rows = run_grid([loss], lambda _: ["one"], alphas, [eta_times_L], seeds, steps)
    for r, alpha in zip(rows, alphas):
        curves = [bound_curve(loss, alpha, eta_times_L, s, "one", steps) for s in seeds]
        r["f_growth"] = float(max(c["f"][-1] / c["f"][0] for c in curves))  # worst seed
    return rows
