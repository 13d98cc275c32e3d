"""Check the GD-MoFO convergence bound, step by step, on the toy losses.

MoFO (arXiv 2407.20999), GD variant. For f ≥ f* with L-Lipschitz ∇f and 0 < η < 2/L:

    filter lemma    ‖g_t ⊙ γ_t‖² ≥ α ‖g_t‖²                          (per block, hence overall)
    descent         f(θ_{t+1}) ≤ f(θ_t) − η(1 − Lη/2) ‖g_t ⊙ γ_t‖²
    bound           min_{t<T} ‖∇f(θ_t)‖² ≤ (f(θ_0) − f*) / (α η (1 − Lη/2) T)   for every T ≥ 1

plus the consequence f(θ_{t+1}) ≤ f(θ_t) (monotone decrease). Every comparison allows a relative
tolerance RTOL for floating-point round-off and nothing else: a violation is reported when the
left side exceeds the right side by more than RTOL times the size of the quantities compared.

The checks refuse η ≥ 2/L: there the bound's right side is not positive, so every run would
"violate" it and the violation would prove nothing. The negative control (negative_control)
breaks (A2) instead: the step and the check use an L_assumed below the true L, with η < 2/L_assumed,
so the right side is positive and a violation means the check caught the broken assumption.
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

    `L` is the smoothness constant the check believes in; it must give η·L < 2 (else ValueError:
    the bound's right side would not be positive and its "violation" would mean nothing).
    Returns plain data: violation counts, the worst slacks, where the descent inequality (step t)
    and the bound (T) first fail, and per-T arrays for plotting (`T`, `min_grad_sq` =
    min_{t<T} ‖∇f(θ_t)‖², `bound`, `tightness` = min_grad_sq / bound; `filt_sq` = ‖g_t ⊙ γ_t‖²).
    """
    decrease = eta * (1 - L * eta / 2)
    if decrease <= 0:
        # for η ≥ 2/L the right side is ≤ 0 (or undefined): every run with ∇f ≠ 0 would
        # "violate" it, so a violation there would prove nothing. Refuse instead of counting.
        raise ValueError(f"eta*L = {eta * L:g} must be below 2: the bound's right side is not "
                         "positive there, and a check against it could not fail for a reason")
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
    descent_bad = descent_slack < -rtol * scale                      # (steps,)
    descent_viol = int(np.sum(descent_bad))
    monotone_viol = int(np.sum(f[1:] - f[:-1] > rtol * scale))
    # 3. the bound for every T; its right side is > 0 here (η < 2/L and f(θ0) − f* > 0)
    T = np.arange(1, steps + 1)
    min_grad_sq = np.minimum.accumulate(grad_sq[:-1])
    bound = (f[0] - f_star) / (alpha * decrease * T)
    bound_bad = min_grad_sq > bound + rtol * np.abs(bound)
    bound_viol = int(np.sum(bound_bad))
    tightness = min_grad_sq / bound
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
        # where each check first fails (None: never): step t of the descent inequality, and T of
        # the bound; a negative control should fail early and for good, not by a hair at the end
        "first_descent_violation": int(np.argmax(descent_bad)) if descent_bad.any() else None,
        "first_bound_violation": int(T[np.argmax(bound_bad)]) if bound_bad.any() else None,
        "T": T, "min_grad_sq": min_grad_sq, "bound": bound, "tightness": tightness,
        "f": f, "grad_sq": grad_sq, "filt_sq": filt,
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


def step_curvature(result, eta):
    """The curvature each step met, with d_t = g_t ⊙ γ_t (so that θ_{t+1} = θ_t − η d_t):

        κ_t = 2 (f(θ_{t+1}) − f(θ_t) + η‖d_t‖²) / (η²‖d_t‖²).

    Taylor's formula with the integral remainder makes κ_t a weighted mean of d_tᵀ∇²f d_t/‖d_t‖²
    along the step (exactly that Rayleigh quotient on a quadratic), and the descent inequality
    with a constant L holds at step t exactly when κ_t ≤ L. So max_t κ_t is the smallest L with
    which this run passes the descent check. `result` is check_run's (or bound_curve's) dict.
    """
    f, filt = result["f"], result["filt_sq"]
    with np.errstate(divide="ignore", invalid="ignore"):   # a step with d_t = 0 met nothing: nan
        return np.where(filt > 0, 2 * (f[1:] - f[:-1] + eta * filt) / (eta**2 * filt), np.nan)


def negative_control(d=100, L_ratio=0.5, eta_times_L_assumed=1.5,
                     alphas=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0), seeds=(0, 1), steps=100):
    """Break (A2) while the bound stays meaningful: the step is chosen with a wrong smoothness.

    On the quadratic (true L = 1000), L_assumed = L_ratio · L. The step η = eta_times_L_assumed /
    L_assumed is inside the theorem *for L_assumed* (η·L_assumed < 2, so the right side
    (f(θ0) − f*) / (α η (1 − L_assumed η/2) T) is positive) but not for the true L (with the
    defaults η·L = 3 > 2). The check uses L_assumed, as a user with that belief would. One block;
    `steps` stays short on purpose: a diverging run overflows float64 after a few hundred steps.

    Beside each α, the honest case: the same loss, α and seeds with η = eta_times_L_assumed / L
    and the true L in the check, where the theorem applies and nothing may fail.
    One row per α: the control's violation counts, first failures and sides of the bound at
    T = steps (per seed), f(θ_T)/f(θ_0) (worst seed), the largest curvature a step met, the
    honest case's violation count and tightness, and both cases' per-seed results for plots.
    """
    loss = make_loss("quadratic", d)
    L_assumed = L_ratio * loss.L
    eta = eta_times_L_assumed / L_assumed
    rows = []
    for alpha in alphas:
        control = [bound_curve(loss, alpha, eta_times_L_assumed, s, "one", steps, L=L_assumed)
                   for s in seeds]
        honest = [bound_curve(loss, alpha, eta_times_L_assumed, s, "one", steps) for s in seeds]
        rows.append({
            "alpha": alpha, "runs": len(seeds), "L_true": loss.L, "L_assumed": L_assumed,
            "eta": eta, "eta_L_true": eta * loss.L, "steps": steps,
            **{k: sum(r[k] for r in control) for k in (
                "lemma_violations", "descent_violations", "monotone_violations",
                "bound_violations")},
            "first_descent_violation": [r["first_descent_violation"] for r in control],
            "first_bound_violation": [r["first_bound_violation"] for r in control],
            "lhs": [float(r["min_grad_sq"][-1]) for r in control],    # min_{t<T} ‖∇f‖², T = steps
            "rhs": [float(r["bound"][-1]) for r in control],          # > 0 by construction
            "f_growth": float(max(r["f"][-1] / r["f"][0] for r in control)),  # worst seed
            "max_curvature": float(max(np.nanmax(step_curvature(r, eta)) for r in control)),
            "honest_violations": sum(r[k] for r in honest for k in (
                "lemma_violations", "descent_violations", "monotone_violations",
                "bound_violations")),
            "honest_max_tightness": float(max(r["max_tightness"] for r in honest)),
            "control": control, "honest": honest,
        })
    return rows
