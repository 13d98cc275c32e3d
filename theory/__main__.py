"""python -m theory: check the GD-MoFO and the Adam-MoFO bounds over their grids, print tables.

MoFO, arXiv 2407.20999 (GD variant and Algorithm 1). Every number printed is measured by
theory/check.py, theory/adam.py and theory/adam_bound.py; this file only runs them and formats the
results. --part gd | adam | all picks the sections (all by default).
"""
import argparse
import dataclasses
import math
import os
import time

# Every matrix here is small (150 × 100 in an Adam batch, at most 1000 × 1000): BLAS threads cost
# more than they save and oversubscribe a shared CPU (an Adam batch of 150 runs: 24 s with two
# OpenBLAS threads, 6 s with one, on a 2-core machine running another job). Set before numpy loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from theory import adam_bound as ab
from theory.adam import adam_mofo_trajectories
from theory.check import (RTOL, GridConfig, floor_rounded_step, floor_vs_ceil, grid_losses,
                          negative_control, run_config)
from theory.gd import partition
from theory.losses import make_loss

VIOLATIONS = ("lemma_violations", "descent_violations", "monotone_violations", "bound_violations")
LEGEND = ("worst lemma slack = min over steps and blocks of ‖g⊙γ‖²/‖g‖² − α (≥ 0 claimed; "
          "0 in any row that includes α = 1, which keeps whole blocks; see the by-α table); "
          "worst descent slack = min of [f_t − η(1−Lη/2)‖g⊙γ‖² − f_{t+1}] / "
          "(|f_t|+|f_{t+1}|+η‖g⊙γ‖²) (≥ 0 claimed); "
          "max tightness = max over T of min_{t<T}‖∇f‖² ÷ bound (≤ 1 claimed).")


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def counts(r):
    return " / ".join(str(r[k]) for k in VIOLATIONS)


def group(rows, keys):
    """Merge grid rows that agree on `keys`: counts add, slacks take the worst."""
    out = {}
    for r in rows:
        k = tuple(r[key] for key in keys)
        if k not in out:
            out[k] = dict(r)
            continue
        g = out[k]
        for key in ("runs", "checks", "saved_by_tolerance", *VIOLATIONS):
            g[key] += r[key]
        for key in ("worst_lemma_slack", "worst_descent_slack"):
            g[key] = min(g[key], r[key])
        g["max_tightness"] = max(g["max_tightness"], r["max_tightness"])
    return list(out.values())


def print_losses(cfg):
    print("### Losses (L and f* derived by sympy from each formula)\n")
    print(table(["loss", "d", "L", "f* (exact or lower bound)", "where from"],
                [[l.name, l.d, f"{l.L:.4g}",
                  f"{l.f_star:g} ({'exact' if l.f_star_exact else 'lower bound'})", l.notes]
                 for l in grid_losses(cfg)]))


def print_grid(cfg):
    rows = run_config(cfg)
    print(f"\n### GD-MoFO inside the theorem: {sum(r['runs'] for r in rows)} runs × {cfg.steps} "
          f"steps, alpha in {cfg.alphas}, eta*L in {cfg.eta_factors}, seeds {cfg.seeds}\n")
    print(LEGEND + "\n")
    print(table(["loss", "d", "partition", "runs", "checks",
                 "lemma / descent / monotone / bound violations", "passed only by RTOL",
                 "worst lemma slack", "worst descent slack", "max tightness"],
                [[r["loss"], r["d"], r["partition"], r["runs"], r["checks"], counts(r),
                  r["saved_by_tolerance"], f"{r['worst_lemma_slack']:.3g}",
                  f"{r['worst_descent_slack']:.3g}", f"{r['max_tightness']:.3g}"]
                 for r in group(rows, ("loss", "d", "partition"))]))
    print("\n#### By α: smallest kept share ‖g⊙γ‖²/‖g‖² of any block at any step (≥ α claimed), "
          "and max tightness for each η·L (≤ 1 claimed); over all losses, dims, partitions, "
          "seeds\n")
    tight = {(r["alpha"], r["eta_L"]): r["max_tightness"] for r in group(rows, ("alpha", "eta_L"))}
    share = {r["alpha"]: r["alpha"] + r["worst_lemma_slack"] for r in group(rows, ("alpha",))}
    print(table(["α", "min kept share", *(f"tightness ηL={c}" for c in cfg.eta_factors)],
                [[a, f"{share[a]:.3g}", *(f"{tight[(a, c)]:.3g}" for c in cfg.eta_factors)]
                 for a in cfg.alphas]))


def first(values):
    """Per-seed first failures as text: '0, 0' or '-' where a seed never failed."""
    return ", ".join("-" if v is None else str(v) for v in values)


def print_controls(cfg):
    rows = negative_control()
    r0 = rows[0]
    print(f"\n### Negative control: a smoothness constant believed too small, quadratic (d = 100, "
          f"one block), L_true = {r0['L_true']:g}, L_assumed = {r0['L_assumed']:g}, "
          f"η = {r0['eta']:g} (η·L_assumed = {r0['eta'] * r0['L_assumed']:g} < 2, "
          f"η·L_true = {r0['eta_L_true']:g} > 2), seeds 0, 1, {r0['steps']} steps\n")
    print("Checked with L_assumed, so the right side is positive. Sides of the bound at "
          f"T = {r0['steps']}, per seed; first failures: step t of the descent inequality, T of "
          "the bound ('-': never); κ_max = largest curvature a step met (the descent inequality "
          "with L holds exactly when κ_t ≤ L); honest case: same α and seeds, "
          f"η = {r0['eta'] * r0['L_assumed']:g}/L_true, checked with L_true.\n")
    print(table(["α", "lemma / descent / monotone / bound violations",
                 "left side min‖∇f‖²", "right side (> 0)", "first descent failure t",
                 "first bound failure T", "f(θ_T)/f(θ_0), max over seeds", "κ_max",
                 "honest case: violations, max tightness"],
                [[r["alpha"], counts(r), ", ".join(f"{v:.3g}" for v in r["lhs"]),
                  ", ".join(f"{v:.3g}" for v in r["rhs"]), first(r["first_descent_violation"]),
                  first(r["first_bound_violation"]), f"{r['f_growth']:.3g}",
                  f"{r['max_curvature']:.4g}",
                  f"{r['honest_violations']}, {r['honest_max_tightness']:.3g}"]
                 for r in rows]))

    print("\n### The checks can fail: deliberately broken inputs, same grid of α and η·L, "
          "seeds as above\n")
    broken = [["mask with k = ⌊α n_b⌋, no max(1, k)",
               *[sum(r[k] for r in run_config(cfg, step=floor_rounded_step)) for k in VIOLATIONS]]]
    for scale in (0.5, 0.9):
        rows = run_config(cfg, L_scale=scale)
        for name in cfg.losses:
            broken.append([f"L believed {scale}× the true L ({name})",
                           *[sum(r[k] for r in rows if r["loss"] == name) for k in VIOLATIONS]])
    print(table(["broken input", "lemma", "descent", "monotone", "bound"], broken))
    fc = floor_vs_ceil()
    print(f"\nfloor vs ceil, n = {fc['n']}, α = {fc['alpha']}, nearly equal entries: "
          f"k = ⌊αn⌋ = {fc['k_floor']} keeps a share {fc['share_floor']:.4f} of ‖g‖² (< α), "
          f"k = ⌈αn⌉ = {fc['k_ceil']} keeps {fc['share_ceil']:.4f} (≥ α)")


def print_adam(cfg, d, lr, steps):
    print(f"\n### Adam-based MoFO (mofo.MoFO, lr = {lr}, {steps} steps, d = {d}, 'several' "
          "blocks, seed 0): observed, no bound claimed\n")
    rows = []
    for name in cfg.losses:
        tr = adam_mofo_trajectories(make_loss(name, d), cfg.alphas, lr, steps)
        adam_dist = tr["dist"][-1, -1] if tr["alphas"][-1] == 1.0 else np.nan
        for i, a in enumerate(tr["alphas"]):
            rows.append([name, a, f"{tr['f'][i, 0]:.4g} → {tr['f'][i, -1]:.4g}",
                         f"{tr['grad_norm'][i, 0]:.3g} → {tr['grad_norm'][i, -1]:.3g}",
                         f"{tr['dist'][i, -1]:.3g}", f"{tr['dist'][i, -1] / adam_dist:.2f}",
                         f"{tr['moved_fraction'][i]:.2f}"])
    print(table(["loss", "α", "f: start → end", "‖∇f‖: start → end", "‖θ_T − θ0‖",
                 "÷ same at α = 1", "share of coordinates moved"], rows))


# ----- The Adam-MoFO bound (theory/adam_bound.py)

BOUND_CHECKS = ("gradient_bound", "rho", "c", "lag", "kept", "smooth", "one_step", "bound",
                "corollary")


def slope_summary(rows, key="slope_mean_q"):
    """Mean fitted slope over the rows with a 95 % CI over them (normal: n ≥ 30), and the range."""
    s = np.array([r[key][0] for r in rows])
    half = 1.96 * s.std(ddof=1) / math.sqrt(len(s)) if len(s) > 1 else float("nan")
    return f"{s.mean():.3f} ± {half:.3f} [{s.min():.3f}, {s.max():.3f}]"


def bound_counts(rows):
    return " / ".join(str(sum(r[f"{c}_violations"] for r in rows)) for c in BOUND_CHECKS)


def saved_counts(rows):
    saved = {c: sum(r["saved_by_tolerance"][c] for r in rows) for c in BOUND_CHECKS}
    return ", ".join(f"{c} {n}" for c, n in saved.items() if n) or "0"


def by(rows, *keys):
    out = {}
    for r in rows:
        out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return out


def print_adam_bound(cfg):
    print(f"\nbound config: {cfg}\n")
    print("### Adam-MoFO with η_t = η/√t (theory/adam_bound.py): losses with bounded gradients "
          "(L, G = sup‖∇f‖_∞ and f* from each formula)\n")
    print(table(["loss", "d", "L", "G", "f* (exact or lower bound)"],
                [[l.name, l.d, f"{l.L:.4g}", f"{l.G:.4g}",
                  f"{l.f_star:g} ({'exact' if l.f_star_exact else 'lower bound'})"]
                 for l in (ab.bounded_loss(n, d) for n in cfg.losses for d in cfg.dims)]))
    loss = ab.bounded_loss("robust", 30)
    worst = max(ab.compare_with_mofo(loss, partition(30, "several"), a, 0.9, 0.99, 0.1, 300, fast=f)
                for a in (0.1, 1.0) for f in (True, False))
    print(f"\nmofo.MoFO under lr_t = 0.1/√t (LambdaLR) vs the analysed algorithm, robust d = 30, "
          f"'several' blocks, α ∈ {{0.1, 1}}, fast and reference paths, 300 steps each on its own "
          f"trajectory: max |Δθ| = {worst[0]:.2g}, steps × coordinates moved by one only: "
          f"{worst[1]}")

    rows = ab.run_adam_grid(cfg)
    print(f"\n### Inside the assumptions: {len(rows)} runs × {cfg.steps} steps, α in {cfg.alphas}, "
          f"(β1, β2) in {cfg.betas}, η in {cfg.etas}, seeds {cfg.seeds}\n")
    print("Violations, in order: " + " / ".join(BOUND_CHECKS) + " (the premise ‖g‖_∞, √v̂ ≤ G; "
          "|m̂|/√v̂ ≤ ρ_t; |g|/√v̂ ≤ c_t; ‖m̂−g‖ ≤ L√K B_t; |γ_t| ≤ K; L-smoothness; the proof's "
          "one-step inequality; the bound at every T; the corollary for ‖g‖_∞ at every T). "
          "Tightness = max over T of the weighted mean of ‖g⊙γ‖² ÷ R_T; slope = fitted log-log "
          "slope of that mean over the last decade of T, mean ± 95 % CI over the runs [range].\n")
    print(table(["loss", "d", "partition", "runs", "violations", "passed only by RTOL",
                 "max tightness", "tightness at T", "slope"],
                [[l, d, k, len(rs), bound_counts(rs), saved_counts(rs),
                  f"{max(r['tightness'] for r in rs):.3g}",
                  f"{max(r['mean_q'][-1] / r['R'][-1] for r in rs):.2g}", slope_summary(rs)]
                 for (l, d, k), rs in by(rows, "loss", "d", "partition").items()]))
    rate, floor = rows[0]["slope_rate"], rows[0]["slope_floor"]
    print(f"\n#### Fitted slopes by η and by (β1, β2): descriptive, no test of the rate. The "
          f"weighted mean cannot fall faster than 1/Σ_(t≤T) η_t (slope {floor:.3f} over these T) "
          f"and sits there once Σ_t η_t q_t stops growing; log T/√T has slope {rate:.3f} over "
          f"the same T\n")
    print(table(["η", "runs", "slope", "falling (CI < 0)", f"CI below {rate:.3f}",
                 "slope of R_T"],
                [[e, len(rs), slope_summary(rs), sum(map(ab.falling, rs)),
                  sum(map(ab.below_rate_slope, rs)), slope_summary(rs, "slope_R")]
                 for (e,), rs in sorted(by(rows, "eta").items())]))
    far = ab.bounded_loss("logcosh", 10)
    gap = far.value(ab.initial_point(10, 0)) - far.f_star
    T = np.arange(1, 10**6 + 1)

    def far_slope(b1, b2):  # R_T of logcosh d = 10, one block, α = 1, η = 0.1, seed 0, to T = 10⁶
        R, _ = ab.rhs(gap, far.L, far.G, 10, cfg.eps, ab.constants(10**6, 0.1, b1, b2))
        return "%.3f ± %.3f" % ab.loglog_slope(T, R)

    print()
    print(table(["(β1, β2)", "ρ_∞ = lim ρ_t", "runs", "slope", "falling", f"CI below {rate:.3f}",
                 "slope of R_T, T ≤ 10⁶ (one case)"],
                [[b, f"{(1 - b[0]) / math.sqrt((1 - b[1]) * (1 - b[0] ** 2 / b[1])):.3g}", len(rs),
                  slope_summary(rs), sum(map(ab.falling, rs)), sum(map(ab.below_rate_slope, rs)),
                  far_slope(*b)]
                 for b, rs in ((b, [r for r in rows if (r["beta1"], r["beta2"]) == b])
                               for b in cfg.betas)]))
    print(f"\n(log T/√T has slope {ab.loglog_slope(T, np.log(T + 1.0) / np.sqrt(T))[0]:.3f} "
          f"over T in [10⁵, 10⁶])")

    ctrl = ab.beta_control()
    print("\n### Negative control: β1 = 0.999 with β2 = 0.9 < β1² (outside) against β2 = 0.9999 "
          "(inside), η = 0.3, d = 100, 'several' blocks, seeds 0-2\n")
    print(table(["loss", "α", "β2", "runs", "violations", "R_T at T", "slope of R_T", "slope",
                 "falling"],
                [[l, a, b2, len(rs), bound_counts(rs), f"{max(r['R'][-1] for r in rs):.3g}",
                  slope_summary(rs, "slope_R"), slope_summary(rs), sum(map(ab.falling, rs))]
                 for (l, a, b2), rs in by(ctrl, "loss", "alpha", "beta2").items()]))

    small = dataclasses.replace(cfg, dims=(10,), partitions=("one",))
    print("\n### The checks can fail: a wrong constant fed to the check (runs unchanged), "
          "d = 10, one block, the rest of the grid as above\n")
    print(table(["broken input", "runs", "violations"],
                [[name, len(rs), bound_counts(rs)] for name, rs in (
                    ("G believed 0.5× the true G", ab.run_adam_grid(small, G_scale=0.5)),
                    ("L believed 0.1× the true L", ab.run_adam_grid(small, L_scale=0.1)))]))


def add_flags(parser, config, prefix=""):
    """One flag per dataclass field; tuples take several values, pairs are written 0.9,0.999."""
    for f in dataclasses.fields(config):
        many = isinstance(f.default, tuple)
        first = f.default[0] if many else f.default
        kind = (lambda s: tuple(float(x) for x in s.split(","))) if isinstance(first, tuple) \
            else type(first)
        parser.add_argument(f"--{prefix}{f.name}", type=kind, nargs="+" if many else None,
                            default=f.default)


def config_from(args, config, prefix=""):
    return config(**{f.name: tuple(v) if isinstance(v, list) else v
                     for f in dataclasses.fields(config)
                     for v in [getattr(args, prefix + f.name)]})


def main():
    parser = argparse.ArgumentParser(prog="python -m theory",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("gd", "adam", "all"), default="all",
                        help="gd: the GD-MoFO bound and the observed mofo.MoFO runs; "
                             "adam: the Adam-MoFO bound; all: both")
    add_flags(parser, GridConfig)
    add_flags(parser, ab.AdamGridConfig, prefix="bound_")
    parser.add_argument("--adam_d", type=int, default=100, help="dimension of the Adam-MoFO runs")
    parser.add_argument("--adam_steps", type=int, default=1000)
    parser.add_argument("--adam_lr", type=float, default=0.01)
    args = parser.parse_args()
    cfg = config_from(args, GridConfig)
    bound_cfg = config_from(args, ab.AdamGridConfig, prefix="bound_")
    print(f"relative round-off tolerance RTOL = {RTOL:g}")
    t0 = time.time()
    if args.part in ("gd", "all"):
        print(f"config: {cfg}\n")
        print_losses(cfg)
        print_grid(cfg)
        print_controls(cfg)
        print_adam(cfg, args.adam_d, args.adam_lr, args.adam_steps)
    if args.part in ("adam", "all"):
        print_adam_bound(bound_cfg)
    print(f"\n(took {time.time() - t0:.0f} s)")


if __name__ == "__main__":
    np.seterr(over="raise")  # an overflow would poison a check silently; fail loudly instead
    main()
