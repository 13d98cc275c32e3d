"""The Adam-based MoFO with a step size η/√t, and an explicit O(log T / √T) bound, checked.

MoFO: Chen et al., arXiv 2407.20999. Its later version (v3; TMLR 2025) states a convergence rate of
order log T / √T for the Adam-based MoFO, in a gradient norm restricted to the filtered coordinates.
We could not read that theorem's text (theory/README.md says why and what we assumed); the bound
below, of that order, is derived in theory/README.md and every constant in it is explicit.

The analysed algorithm (full-batch gradients g_t = ∇f(θ_t), t = 1, 2, ..., m_0 = v_0 = 0):

    m_t = β1 m_{t-1} + (1−β1) g_t              v_t = β2 v_{t-1} + (1−β2) g_t²
    γ_t = in each block b: |m_t| ≥ the k_b-th largest |m_t| of b, k_b = max(1, ⌊α n_b⌋)  (ties kept)
    θ_{t+1} = θ_t − η_t/(1−β1^t) · (m_t ⊙ γ_t) / (√v_t / √(1−β2^t) + ε),    η_t = η / √t

which is mofo.MoFO (its mofo_update_, weight decay 0) under the schedule lr_t = η/√t.

The bound (f ≥ f*, ∇f L-Lipschitz in ‖·‖₂, ‖∇f‖_∞ ≤ G, 0 ≤ β1 < √β2 < 1, ε ≥ 0): for every T ≥ 1,

    Σ_{t≤T} η_t ‖g_t ⊙ γ_t‖² / Σ_{t≤T} η_t  ≤  R_T
    R_T = (G + ε) [f(θ_1) − f* + K L Σ_{t≤T} (c_t η_t B_t + ρ_t² η_t² / 2)] / Σ_{t≤T} η_t

with constants that depend on β1, β2, η and t only (`constants`):
    ρ_t ≥ |m̂_t| / √v̂_t   (Cauchy–Schwarz; bounded in t exactly when β1² < β2)
    c_t ≥ |g_t| / √v̂_t    = √((1−β2^t)/(1−β2))
    B_t = Σ_s w_ts Σ_{r=s}^{t−1} η_r ρ_r,  w_ts = (1−β1) β1^(t−s) / (1−β1^t)
          (‖m̂_t − g_t‖ ≤ L√K B_t)
    K   = Σ_b k_b, the coordinates moved per step (exactly K unless |m| ties at the threshold)

The minimum over t ≤ T of ‖g_t ⊙ γ_t‖² is below the weighted mean, so below R_T as well.
"""
import math
from dataclasses import dataclass

import numpy as np

from theory.check import RTOL
from theory.gd import initial_point, partition
from theory.losses import make_loss, robust_regression

# Student-t 97.5 % quantile with 18 degrees of freedom (SLOPE_POINTS − 2), from tables: the
# half-width of a 95 % confidence interval for a slope fitted to SLOPE_POINTS points
SLOPE_POINTS = 20
T975 = 2.1009


def adam_mofo_step(theta, m, v, t, grad, lr, beta1, beta2, eps, alpha, blocks):
    """One step of the analysed algorithm for R runs at once (one per row); returns
    (theta, m, v, mask). theta, m, v, grad: (R, d); lr, beta1, beta2, alpha: scalars or (R,), one
    per run; t: the step number (from 1); blocks: block sizes summing to d."""
    lr, beta1, beta2, alpha = (np.broadcast_to(np.asarray(x, float), (len(theta),))[:, None]
                               for x in (lr, beta1, beta2, alpha))          # (R, 1) each
    # 1. Moments of every coordinate, selected or not.
    m = beta1 * m + (1 - beta1) * grad
    v = beta2 * v + (1 - beta2) * grad * grad
    # 2. Filter each block: |m| >= its k-th largest |m| (ties kept), k = max(1, floor(alpha n)) as
    #    in mofo.py. m and the bias-corrected m_hat differ by a positive factor: the same mask.
    mask = np.empty(m.shape, dtype=bool)
    rows = np.arange(len(m))
    for a, n in zip(np.cumsum([0, *blocks[:-1]]), blocks):
        score = np.abs(m[:, a:a + n])                                        # (R, n)
        k = np.maximum(1, np.floor(alpha[:, 0] * n).astype(int))             # (R,)
        tau = -np.sort(-score, axis=1)[rows, k - 1]                          # k-th largest
        mask[:, a:a + n] = score >= tau[:, None]
    # 3. The bias-corrected Adam step, on the selected coordinates only (torch AdamW's form).
    step_size = lr / (1 - beta1**t)
    denom = np.sqrt(v) / np.sqrt(1 - beta2**t) + eps
    return theta - step_size * np.where(mask, m, 0.0) / denom, m, v, mask


def kept_per_step(blocks, alpha):
    """K = Σ_b max(1, ⌊α n_b⌋): the coordinates a step moves when |m| has no ties at a threshold."""
    return sum(max(1, math.floor(alpha * n)) for n in blocks)


def constants(steps, eta, beta1, beta2, schedule="sqrt"):
    """The bound's per-step constants for t = 1..steps, each (steps,): eta_t, rho_t, c_t, B_t.

    schedule "sqrt" is the theorem's η_t = η/√t; "constant" (η_t = η) is for comparison only.
    """
    t = np.arange(1, steps + 1, dtype=float)
    eta_t = eta / np.sqrt(t) if schedule == "sqrt" else np.full(steps, float(eta))
    # |m̂_t| = |Σ_s a_s g_s| ≤ √(Σ_s a_s²/b_s) · √(Σ_s b_s g_s²) = ρ_t √v̂_t, with the weights
    # a_s = (1−β1)β1^(t−s)/(1−β1^t) of m̂ and b_s = (1−β2)β2^(t−s)/(1−β2^t) of v̂, so
    # ρ_t² = (1−β1)²(1−β2^t) / ((1−β1^t)²(1−β2)) · Σ_{j<t} (β1²/β2)^j
    geometric = np.cumsum((beta1**2 / beta2) ** np.arange(steps))
    rho = np.sqrt((1 - beta1) ** 2 * (1 - beta2**t) / ((1 - beta1**t) ** 2 * (1 - beta2))
                  * geometric)
    # v̂_t ≥ (1−β2) g_t² / (1−β2^t): the current gradient is at most c_t √v̂_t
    c = np.sqrt((1 - beta2**t) / (1 - beta2))
    # B_t = Σ_s w_ts (P_t − P_s) with P_s = Σ_{r<s} η_r ρ_r; Σ_s w_ts = 1, and Σ_s w_ts P_s is the
    # bias-corrected running mean of P with factor β1, exactly as m̂ is of g
    P = np.concatenate([[0.0], np.cumsum(eta_t * rho)[:-1]])                 # P_1 = 0
    ema, B = 0.0, np.empty(steps)
    for i in range(steps):
        ema = beta1 * ema + (1 - beta1) * P[i]
        B[i] = P[i] - ema / (1 - beta1 ** (i + 1))
    return {"eta_t": eta_t, "rho": rho, "c": c, "B": B}


def rhs(f_gap, L, G, K, eps, k):
    """R_T for T = 1..steps from the constants k (a `constants` dict), and the corollary's bound
    on the η-weighted mean of ‖∇f(θ_t)‖²_∞ (every coordinate, not only the filtered ones)."""
    eta_t, B = k["eta_t"], k["B"]
    per_step = K * L * (k["c"] * eta_t * B + k["rho"] ** 2 * eta_t**2 / 2)
    R = (G + eps) * (f_gap + np.cumsum(per_step)) / np.cumsum(eta_t)
    # ‖g_t‖_∞ ≤ ‖g_t ⊙ γ_t‖ + 2‖m̂_t − g_t‖ ≤ √q_t + 2 L √K B_t, squared: ≤ 2 q_t + 8 L² K B_t²
    R_inf = 2 * R + 8 * L**2 * K * np.cumsum(eta_t * B**2) / np.cumsum(eta_t)
    return R, R_inf


def bounded_loss(name, d):
    """The toy losses with bounded gradients: logistic, logcosh, and robust without its ridge."""
    loss = robust_regression(d, mu=0.0) if name == "robust" else make_loss(name, d)
    if not math.isfinite(loss.G):
        raise ValueError(f"{name!r} has unbounded gradients (G = inf): the bound does not apply")
    return loss


def run_rows(loss, theta0, blocks, alpha, beta1, beta2, eta, steps, eps=1e-8, schedule="sqrt"):
    """Run the analysed algorithm for R runs at once (theta0: (R, d); the hyper-parameters scalars
    or (R,)); return the per-step record, each (R, steps) unless said:

      f (R, steps+1)  f(θ_t)          q        ‖g_t ⊙ γ_t‖²       kept   |γ_t|, coordinates moved
      grad_sq         ‖g_t‖²          grad_inf ‖g_t‖_∞            lag    ‖m̂_t − g_t‖₂
      vhat_max        max_i √v̂_t,i
      ratio_m         max_i |m̂_t,i|/√v̂_t,i   ratio_g  max_i |g_t,i|/√v̂_t,i   (0/0 read as 0)
      smooth          f_{t+1} − f_t − ⟨g_t, Δ_t⟩ − (L/2)‖Δ_t‖²  (≤ 0 by L-smoothness)
    """
    R = len(theta0)
    beta1, beta2, eta = (np.broadcast_to(np.asarray(x, float), (R,)) for x in (beta1, beta2, eta))
    theta = np.array(theta0, dtype=np.float64)
    m, v = np.zeros_like(theta), np.zeros_like(theta)
    rec = {k: np.empty((R, steps)) for k in ("q", "kept", "grad_sq", "grad_inf", "vhat_max", "lag",
                                              "ratio_m", "ratio_g", "smooth")}
    rec["f"] = np.empty((R, steps + 1))
    f, g = loss.value_and_grad_rows(theta)
    for i in range(steps):
        t = i + 1
        lr = eta / math.sqrt(t) if schedule == "sqrt" else eta
        new, m, v, mask = adam_mofo_step(theta, m, v, t, g, lr, beta1, beta2, eps, alpha, blocks)
        m_hat = m / (1 - beta1[:, None] ** t)
        v_hat_sqrt = np.sqrt(v / (1 - beta2[:, None] ** t))
        safe = np.where(v_hat_sqrt > 0, v_hat_sqrt, 1.0)          # v̂ = 0 only where g_s = 0 ∀s
        rec["f"][:, i] = f
        rec["q"][:, i] = np.sum(np.where(mask, g * g, 0.0), axis=1)
        rec["kept"][:, i] = mask.sum(axis=1)
        rec["grad_sq"][:, i] = np.sum(g * g, axis=1)
        rec["grad_inf"][:, i] = np.abs(g).max(axis=1)
        rec["vhat_max"][:, i] = v_hat_sqrt.max(axis=1)
        rec["lag"][:, i] = np.linalg.norm(m_hat - g, axis=1)
        rec["ratio_m"][:, i] = (np.abs(m_hat) / safe).max(axis=1)
        rec["ratio_g"][:, i] = (np.abs(g) / safe).max(axis=1)
        f_new, g_new = loss.value_and_grad_rows(new)
        step = new - theta
        rec["smooth"][:, i] = (f_new - f - np.sum(g * step, axis=1)
                               - loss.L / 2 * np.sum(step * step, axis=1))
        theta, f, g = new, f_new, g_new
    rec["f"][:, steps] = f
    rec["theta"] = theta
    return rec


def exceeds(lhs, rhs_, scale=None, rtol=RTOL):
    """(violations, saved): how many lhs > rhs beyond a round-off tolerance rtol·scale (scale:
    the size of the numbers that were rounded, by default |lhs| + |rhs|), and how many fail as
    written but pass within the tolerance (this should stay 0: the tolerance decided nothing)."""
    scale = np.abs(lhs) + np.abs(rhs_) if scale is None else scale
    violations = int(np.sum(lhs > rhs_ + rtol * scale))
    return violations, int(np.sum(lhs > rhs_)) - violations


def loglog_slope(T, y, first=0.1):
    """Slope of log y against log T over T in [first·T_end, T_end], fitted by least squares to
    SLOPE_POINTS log-spaced points; returns (slope, half-width of its 95 % confidence interval)."""
    idx = np.unique(np.geomspace(first * T[-1], T[-1], SLOPE_POINTS).round().astype(int)) - 1
    if len(idx) != SLOPE_POINTS:  # T975 is for SLOPE_POINTS − 2 degrees of freedom
        raise ValueError(f"need {SLOPE_POINTS} distinct T in the window; run more steps")
    x, yy = np.log(T[idx]), np.log(y[idx])
    X = np.stack([x, np.ones_like(x)], axis=1)
    coef, *_ = np.linalg.lstsq(X, yy, rcond=None)
    resid = yy - X @ coef
    dof = len(x) - 2
    se = math.sqrt(resid @ resid / dof / np.sum((x - x.mean()) ** 2))
    return float(coef[0]), T975 * se


def check_rows(rec, loss, blocks, alpha, beta1, beta2, eta, eps=1e-8, schedule="sqrt",
               G=None, L=None):
    """Check every row of a run_rows record against the lemmas and the bound; one dict per row.

    `G` and `L` override the loss's constants in the check (to show what a wrong one does).
    Per row: violation counts, the per-T arrays T, mean_q (η-weighted mean of ‖g⊙γ‖²), min_q,
    R (= R_T), mean_inf / R_inf (the corollary), and the fitted log-log slopes with 95 % CIs.
    """
    G = loss.G if G is None else G
    L = loss.L if L is None else L
    R, steps = rec["q"].shape
    alpha, beta1, beta2, eta = (np.broadcast_to(np.asarray(x, float), (R,))
                                for x in (alpha, beta1, beta2, eta))
    T = np.arange(1, steps + 1)
    out = []
    for r in range(R):
        k = constants(steps, eta[r], beta1[r], beta2[r], schedule)
        K = kept_per_step(blocks, alpha[r])
        Rt, Rt_inf = rhs(rec["f"][r, 0] - loss.f_star, L, G, K, eps, k)
        q, f = rec["q"][r], rec["f"][r]
        w = np.cumsum(k["eta_t"])
        mean_q = np.cumsum(k["eta_t"] * q) / w
        mean_inf = np.cumsum(k["eta_t"] * rec["grad_inf"][r] ** 2) / w
        min_q = np.minimum.accumulate(q)
        # one-step inequality of the proof: f_{t+1} ≤ f_t − η_t q_t/(G+ε) + η_t c_t K L B_t + …
        one_step = (f[:-1] - k["eta_t"] * q / (G + eps) + k["eta_t"] * k["c"] * K * L * k["B"]
                    + L / 2 * k["eta_t"] ** 2 * k["rho"] ** 2 * K)
        # f is rounded at its own size, and each of its m link terms at least at the size 1 that
        # log(1 + ·) and log cosh go through: near f* = 0 that floor dominates
        f_scale = np.abs(f[:-1]) + np.abs(f[1:]) + loss.c * len(loss.b)
        checks = {  # (lhs, rhs, round-off scale) of every inequality, at every step or T
            "gradient_bound": (np.maximum(rec["grad_inf"][r], rec["vhat_max"][r]), G, None),
            "rho": (rec["ratio_m"][r], k["rho"], None),
            "c": (rec["ratio_g"][r], k["c"], None),
            # m̂_t = m_t/(1−β1^t) is rounded at the size of g_t: m̂_1 = g_1 only up to round-off
            "lag": (rec["lag"][r], L * math.sqrt(K) * k["B"], np.sqrt(rec["grad_sq"][r])),
            "kept": (rec["kept"][r], K, None),
            "smooth": (rec["smooth"][r], 0.0, f_scale),
            "one_step": (f[1:], one_step, f_scale + np.abs(one_step)),
            "bound": (mean_q, Rt, None),
            "corollary": (mean_inf, Rt_inf, None),
        }
        counts = {name: exceeds(*c) for name, c in checks.items()}
        out.append({
            **{f"{name}_violations": v for name, (v, _) in counts.items()},
            "saved_by_tolerance": {name: saved for name, (_, saved) in counts.items()},
            "T": T, "mean_q": mean_q, "min_q": min_q, "R": Rt, "mean_inf": mean_inf,
            "R_inf": Rt_inf, "tightness": float(np.max(mean_q / Rt)),
            "slope_mean_q": loglog_slope(T, mean_q), "slope_min_q": loglog_slope(T, min_q),
            "slope_R": loglog_slope(T, Rt),
            # the theorem's rate log T / √T, fitted on the same points: its local slope
            "slope_rate": loglog_slope(T, np.log(T + 1.0) / np.sqrt(T))[0],
            # the floor under slope_mean_q: Σ_{t≤T} η_t q_t never falls, so the mean falls no
            # faster than 1/Σ_{t≤T} η_t (slope ≈ −1/2 for η_t = η/√t), whatever q_t does
            "slope_floor": loglog_slope(T, 1.0 / w)[0],
        })
    return out


VIOLATIONS = ("gradient_bound_violations", "rho_violations", "c_violations", "lag_violations",
              "kept_violations", "smooth_violations", "one_step_violations", "bound_violations",
              "corollary_violations")


@dataclass
class AdamGridConfig:
    losses: tuple = ("logcosh", "logistic", "robust")  # bounded gradients: bounded_loss
    dims: tuple = (10, 100)
    partitions: tuple = ("one", "several")
    alphas: tuple = (0.05, 0.1, 0.25, 0.5, 1.0)
    betas: tuple = ((0.0, 0.999), (0.5, 0.99), (0.9, 0.999), (0.9, 0.99), (0.99, 0.999))  # β1 < √β2
    etas: tuple = (0.01, 0.1, 0.3)   # η of η_t = η/√t
    seeds: tuple = (0, 1)            # vary θ0; each loss's data are fixed
    steps: int = 2000                # the bound is checked at every T = 1..steps
    eps: float = 1e-8                # torch's default


def run_setting(loss, kind, alphas, betas, etas, seeds, steps, eps=1e-8, schedule="sqrt", G=None,
                L=None):
    """All (α, (β1, β2), η, seed) for one loss and partition in one batch of rows; returns the
    per-row check dicts, each with its hyper-parameters added."""
    blocks = partition(loss.d, kind)
    combos = [(a, b1, b2, e, s) for a in alphas for b1, b2 in betas for e in etas for s in seeds]
    alpha, beta1, beta2, eta, seed = (np.array(c, dtype=float) for c in zip(*combos))
    theta0 = np.stack([initial_point(loss.d, int(s)) for s in seed])
    rec = run_rows(loss, theta0, blocks, alpha, beta1, beta2, eta, steps, eps, schedule)
    rows = check_rows(rec, loss, blocks, alpha, beta1, beta2, eta, eps, schedule, G, L)
    for row, (a, b1, b2, e, s), f_final in zip(rows, combos, rec["f"][:, -1]):
        row.update(loss=loss.name, d=loss.d, partition=kind, alpha=a, beta1=b1, beta2=b2, eta=e,
                   seed=s, f_final=float(f_final))
    return rows


def run_adam_grid(cfg, G_scale=1.0, L_scale=1.0):
    """run_setting over the whole grid; G_scale / L_scale < 1 feed the check a wrong constant."""
    rows = []
    for name in cfg.losses:
        for d in cfg.dims:
            loss = bounded_loss(name, d)
            for kind in cfg.partitions:
                rows += run_setting(loss, kind, cfg.alphas, cfg.betas, cfg.etas, cfg.seeds,
                                    cfg.steps, cfg.eps, G=loss.G * G_scale, L=loss.L * L_scale)
    return rows


def falling(row):
    """Whether the bounded quantity still falls: its fitted slope's 95 % CI lies below 0."""
    slope, half = row["slope_mean_q"]
    return slope + half < 0


def below_rate_slope(row):
    """Whether the fitted slope's CI lies below log T/√T's slope over the same T.

    Descriptive only, no test of the theorem's rate: the weighted mean cannot fall faster than
    1/Σ_{t≤T} η_t (row["slope_floor"], about −0.51 over [200, 2000]), and it reaches that floor
    as soon as Σ_t η_t q_t stops growing, so a slope near −1/2 follows from the averaging itself.
    """
    slope, half = row["slope_mean_q"]
    return slope + half <= row["slope_rate"]


def beta_control(losses=("robust", "logcosh"), d=100, beta1=0.999, beta2s=(0.9, 0.9999),
                 alphas=(0.1, 0.5, 1.0), eta=0.3, seeds=(0, 1, 2), steps=2000):
    """The negative control: β1 = 0.999 with β2 = 0.9 < β1² (outside the theorem) and, as the
    control's control, with β2 = 0.9999 > β1² (inside); all else equal. One row per run, as
    run_setting. Outside, ρ_t grows like (β1²/β2)^(t/2), so R_T explodes: the bound still holds but
    says nothing, and whether the run still converges is up to the run."""
    rows = []
    for name in losses:
        loss = bounded_loss(name, d)
        rows += run_setting(loss, "several", alphas, [(beta1, b2) for b2 in beta2s], [eta], seeds,
                            steps)
    return rows


def compare_with_mofo(loss, blocks, alpha, beta1, beta2, eta, steps, seed=0, fast=True):
    """Run mofo.MoFO (each block a (1, n_b) tensor, lr_t = η/√t through LambdaLR) and the analysed
    algorithm side by side from the same θ0, each on its own trajectory. Returns the largest
    |θ_MoFO − θ_analysed| over all steps and the number of (step, coordinate) pairs where one of
    them moved and the other did not. fast: mofo_fast.MoFO (the opt-in fast path), else mofo.MoFO."""
    import torch

    import mofo
    import mofo_fast

    theta0 = initial_point(loss.d, seed)
    edges = np.cumsum([0, *blocks])
    params = [torch.tensor(theta0[a:b]).view(1, -1).requires_grad_(True)
              for a, b in zip(edges[:-1], edges[1:])]
    optimizer = mofo_fast.MoFO if fast else mofo.MoFO
    opt = optimizer(params, lr=eta, betas=(beta1, beta2), eps=1e-8, alpha=alpha)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / math.sqrt(s + 1))  # step s+1
    theta, m, v = theta0[None].copy(), np.zeros((1, loss.d)), np.zeros((1, loss.d))
    worst, mismatched = 0.0, 0
    for t in range(1, steps + 1):
        before = torch.cat([p.detach().view(-1) for p in params]).numpy()    # (d,)
        _, g = loss.value_and_grad(before)
        for p, a, b in zip(params, edges[:-1], edges[1:]):
            p.grad = torch.from_numpy(g[a:b].copy()).view(1, -1)
        opt.step()
        sched.step()
        after = torch.cat([p.detach().view(-1) for p in params]).numpy()
        _, g_ours = loss.value_and_grad_rows(theta)
        theta, m, v, mask = adam_mofo_step(theta, m, v, t, g_ours, eta / math.sqrt(t), beta1,
                                           beta2, 1e-8, alpha, blocks)
        worst = max(worst, float(np.abs(theta[0] - after).max()))
        mismatched += int(np.sum((after != before) != mask[0]))
    return worst, mismatched
