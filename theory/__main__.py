"""python -m theory: check the GD-MoFO bound over the grid and print the results as markdown tables.

MoFO, arXiv 2407.20999 (GD variant and Algorithm 1). Every number printed is measured by
theory/check.py and theory/adam.py; this file only runs them and formats the results.
"""
import argparse
import dataclasses
import time

import numpy as np

from theory.adam import adam_mofo_trajectories
from theory.check import (RTOL, GridConfig, floor_rounded_step, floor_vs_ceil, grid_losses,
                          negative_control, run_config)
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


def print_controls(cfg):
    print("\n### Negative control: η = 2.1/L on the quadratic (d = 100, one block), "
          "outside the theorem\n")
    print(table(["α", "runs", "lemma / descent / monotone / bound violations",
                 "f(θ_100)/f(θ_0), max over seeds"],
                [[r["alpha"], r["runs"], counts(r), f"{r['f_growth']:.3g}"]
                 for r in negative_control()]))

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


def main():
    parser = argparse.ArgumentParser(prog="python -m theory",
                                     description=__doc__.splitlines()[0])
    for f in dataclasses.fields(GridConfig):  # one flag per grid field, tuples take several values
        many = isinstance(f.default, tuple)
        parser.add_argument(f"--{f.name}", type=type(f.default[0] if many else f.default),
                            nargs="+" if many else None, default=f.default)
    parser.add_argument("--adam_d", type=int, default=100, help="dimension of the Adam-MoFO runs")
    parser.add_argument("--adam_steps", type=int, default=1000)
    parser.add_argument("--adam_lr", type=float, default=0.01)
    args = parser.parse_args()
    cfg = GridConfig(**{f.name: tuple(v) if isinstance(v, list) else v
                        for f in dataclasses.fields(GridConfig)
                        for v in [getattr(args, f.name)]})
    print(f"config: {cfg}\nrelative round-off tolerance RTOL = {RTOL:g}\n")
    t0 = time.time()
    print_losses(cfg)
    print_grid(cfg)
    print_controls(cfg)
    print_adam(cfg, args.adam_d, args.adam_lr, args.adam_steps)
    print(f"\n(took {time.time() - t0:.0f} s)")


if __name__ == "__main__":
    np.seterr(over="raise")  # an overflow would poison a check silently; fail loudly instead
    main()
