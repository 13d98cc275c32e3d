"""The study's statistics: each run's reading at a matched task accuracy, differences paired by
seed with their 95 % t-intervals, and the markdown tables sweep.py prints and the notebooks and
tests/test_readme.py recompute.

A run's point at a task accuracy is the first scored step whose *validation* accuracy reaches it
(never the test problems or the facts, which then score that step). Two methods are compared by
the difference of the facts kept, paired by seed, with a 95 % t-interval over the seeds; "each at
its own best rate" takes, for each seed, the rate that the *other* seeds keep the most at.

Every function takes plain data: `runs`, a list of (label, lr, seed, metrics), as
sweep.trained(sweep, results) gives it, or `pts`, matched()'s {label: {lr: {seed: point}}}.
"""
import torch

T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
# Student's t at 97.5 % by degrees of freedom (seeds - 1): a 95 % interval for a mean of n seeds
MATCHED = (0.8, 0.9)  # validation accuracies at which methods are compared (fixed before any run)


def interval(diffs):
    """(mean, low, high, n) of paired differences, one per seed: the 95 % t-interval of their mean
    (low = high = nan below 2 seeds). Two methods are level when the interval contains 0."""
    n = len(diffs)
    if n == 0:
        return float("nan"), float("nan"), float("nan"), 0
    mean = sum(diffs) / n
    if n < 2:
        return mean, float("nan"), float("nan"), 1
    sd = (sum((d - mean) ** 2 for d in diffs) / (n - 1)) ** 0.5
    half = T975.get(n - 1, 1.96) * sd / n ** 0.5
    return mean, mean - half, mean + half, n


def facts_sd(kept, n_facts=600):
    """The sampling sd of a share of n_facts facts: what scoring every fact leaves (0.012 at 90 %)."""
    return (kept * (1 - kept) / n_facts) ** 0.5


def chosen(points, acc, task="add"):
    """The first of a run's scored points (its curve, in step order) whose validation accuracy
    reaches acc, else None: the one reading rule. Validation problems choose; the test problems
    and the facts then score the choice."""
    return next((p for p in points if p[f"{task}_val_acc"] >= acc), None)


def matched(runs, acc, task="add"):
    """{label: {lr: {seed: chosen point or None}}} of runs [(label, lr, seed, metrics)]; a
    pulled-back full run adds the labels "<label> + wise" and "<label> + lines": the nearest θ0 of
    its chosen step and its end weights pulled back (each λ a point) that reach acc."""
    out = {}
    for label, lr, seed, m in runs:
        first = chosen(m["curve"], acc, task)
        out.setdefault(label, {}).setdefault(lr, {})[seed] = first
        for fam in ("wise", "lines") if "pullback" in m else ():
            pulled = [p for k, p in m["pullback"].items()
                      if k.startswith(fam) and p[f"{task}_val_acc"] >= acc]
            reached = [p for p in (first, *pulled) if p is not None]
            out.setdefault(f"{label} + {fam}", {}).setdefault(lr, {})[seed] = min(
                reached, key=lambda p: p["dist_abs"], default=None)
    return out


def at_rate(pts, a, b, lr, key="fact_mc"):
    """interval() of a − b at one rate, over the seeds where both reach the matched accuracy."""
    pa, pb = pts[a].get(lr, {}), pts[b].get(lr, {})
    return interval([pa[s][key] - pb[s][key] for s in pa
                     if pa[s] is not None and pb.get(s) is not None])


def best_rate(by_lr, seed, key="fact_mc"):
    """(point, lr): the seed's point at the rate the *other* seeds choose, the rate whose mean
    `key` over them is highest among the rates every one of them reaches; (None, None) if none.
    Leaving the scored seed out keeps the choice of rate from fitting that seed's noise;
    seed=None leaves none out (own_best_rates: a rate for later sweeps, chosen on all seeds)."""
    means = {}
    for lr, by_seed in by_lr.items():
        others = [p for s, p in by_seed.items() if s != seed]
        if others and all(p is not None for p in others):
            means[lr] = sum(p[key] for p in others) / len(others)
    if not means:
        return None, None
    lr = max(means, key=means.get)
    return by_lr[lr].get(seed), lr


def bracket(by_lr, lr, key="fact_mc"):
    """What a best rate is: "bracketed" when a rate on each side of it keeps less (mean over the
    seeds; a rate not every seed reaches keeps nothing), else what stopped it: "lowest rate
    reached" (a lower rate of the grid does not reach the level: the budget), "lowest rate"
    or "highest rate" (the grid's edge). Only a bracketed rate is a best rate."""
    rates = sorted(by_lr)
    mean = {r: (sum(p[key] for p in by_lr[r].values()) / len(by_lr[r])
                if all(p is not None for p in by_lr[r].values()) else -1.0) for r in rates}
    i = rates.index(lr)
    if i == len(rates) - 1:
        return "highest rate"
    if i == 0:
        return "lowest rate"
    if mean[rates[i - 1]] < 0:
        return "lowest rate reached"
    return "bracketed" if mean[rates[i - 1]] < mean[lr] > mean[rates[i + 1]] else "not the best"


def interpolated(curve, acc, key="fact_mc", task="add"):
    """`key` at exactly acc validation accuracy, linear between the last scored step below it and
    the first that reaches it (the reading's sensitivity to the 250-step grid); None if never."""
    for before, p in zip(curve, curve[1:]):
        v0, v1 = before[f"{task}_val_acc"], p[f"{task}_val_acc"]
        if v1 >= acc > v0:
            return before[key] + (acc - v0) / (v1 - v0) * (p[key] - before[key])
    return curve[0][key] if curve and curve[0][f"{task}_val_acc"] >= acc else None


def over_axis(pts, a, b, key="fact_mc"):
    """interval() of a − b, each at its own best rate (best_rate), paired by seed."""
    seeds = sorted({s for by_seed in pts[a].values() for s in by_seed})
    if len(seeds) < 2:  # the rate is chosen on the other seeds: there must be some
        return float("nan"), float("nan"), float("nan"), -1
    diffs = []
    for s in seeds:
        pa, pb = best_rate(pts[a], s, key)[0], best_rate(pts[b], s, key)[0]
        if pa is not None and pb is not None:
            diffs.append(pa[key] - pb[key])
    return interval(diffs)


def cell(iv, scale=100, seeds=None):
    """'+3.1 [-0.4, +6.6]' (points) from an interval(); 'level' is left to the reader: 0 inside.
    Where fewer than `seeds` seeds reached the reading, it says how many did."""
    mean, lo, hi, n = iv
    if n == -1:
        return "needs 2 seeds"
    if n == 0:
        return "not reached"
    if n < 2:
        return f"{scale * mean:+.1f} (1 seed)"
    some = f" ({n} of {seeds} seeds)" if seeds and n < seeds else ""
    return f"{scale * mean:+.1f} [{scale * lo:+.1f}, {scale * hi:+.1f}]{some}"


def verdict_table(pts, base="full", key="fact_mc"):
    """Markdown: each label against `base`, per rate and over the rate axis (points of facts kept,
    mean difference over seeds and its 95 % interval)."""
    lrs = sorted({lr for by_lr in pts.values() for lr in by_lr})
    seeds = max(len(by_seed) for by_lr in pts.values() for by_seed in by_lr.values())
    head = "| method − " + base + " | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | own best rates |"
    lines = [head, "|---" * (len(lrs) + 2) + "|"]
    for label in pts:
        if label == base:
            continue
        cells = [cell(at_rate(pts, label, base, lr, key), seeds=seeds)
                 if lr in pts[label] and lr in pts[base] else "" for lr in lrs]
        best = cell(over_axis(pts, label, base, key), seeds=seeds)
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {best} |")
    return "\n".join(lines)


def ends(runs):
    """{label: {lr: {seed: the run's last point}}}: the end-of-run reading (the papers' checkpoints)."""
    out = {}
    for label, lr, seed, m in runs:
        out.setdefault(label, {}).setdefault(lr, {})[seed] = m["curve"][-1]
    return out


def kept_table(pts):
    """Markdown: the facts kept (%) at each label's chosen points, per rate: mean [95 % interval]
    (unsigned percentages, where `cell` gives signed differences in points)."""
    lrs = sorted({lr for by_lr in pts.values() for lr in by_lr})
    lines = ["| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |",
             "|---" * (len(lrs) + 1) + "|"]
    for label, by_lr in pts.items():
        cells = []
        for lr in lrs:
            by_seed = by_lr.get(lr, {})
            mean, lo, hi, n = interval([p["fact_mc"] for p in by_seed.values() if p is not None])
            cells.append("not reached" if n == 0 else f"{100 * mean:.1f} (1 seed)" if n == 1 else
                         f"{100 * mean:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"
                         + (f" ({n} of {len(by_seed)} seeds)" if n < len(by_seed) else ""))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def study_tables(runs, base="full"):
    """The verdicts of a single-task sweep's runs as markdown: at each matched validation accuracy,
    and at the end of the runs; each method against `base` (full fine-tuning), in points of facts.
    A sweep without `base` (LoRA's) gets what it keeps; notebook 02 sets it beside full's runs."""
    if base not in {label for label, *_ in runs}:
        return "\n\n".join(f"facts kept at {acc:.0%} validation accuracy "
                           "(mean over seeds [95 % interval]):\n"
                           + kept_table(matched(runs, acc))
                           for acc in MATCHED)
    parts = []
    for acc in MATCHED:
        parts.append(f"facts kept, method − {base}, at {acc:.0%} validation accuracy "
                     "(points; mean over seeds [95 % interval]):\n"
                     + verdict_table(matched(runs, acc), base))
    parts.append(f"facts kept, method − {base}, at the end of the runs:\n"
                 + verdict_table(ends(runs), base))
    return "\n\n".join(parts)


def main_command_lines(runs, acc=0.9, method="mofo-α0.1", base="full"):
    """What the main command's one-rate comparison is not, in the axis sweep's numbers."""
    pts, seeds = matched(runs, acc), sorted({seed for _, _, seed, _ in runs})
    kept, rates = {}, {}
    for label in (method, base):
        picks = [best_rate(pts[label], s) for s in seeds]
        vals = [p["fact_mc"] for p, _ in picks if p is not None]
        kept[label] = sum(vals) / max(len(vals), 1)
        rates[label] = ", ".join(f"{lr:g}" for lr in sorted({lr for _, lr in picks if lr}))
    mean, lo, hi, n = over_axis(pts, method, base)
    return [f"At {acc:.0%} task accuracy, each at its own best rate (lr {rates[base]} for full, "
            f"{rates[method]} for MoFO α 0.1; 2000 steps, {n} seeds), full fine-tuning keeps "
            f"{kept[base]:.1%} of the facts and MoFO {kept[method]:.1%}: a difference of "
            f"{100 * mean:+.1f} points [{100 * lo:+.1f}, {100 * hi:+.1f}] (results/axis.json)."]


def recovery(m, task="add", level=1.0):
    """(steps to regain level x the accuracy first learned, the same from the pre-trained model),
    from a run whose last stage repeats its first task: relearning faster than learning means the
    skill was kept and only its use was lost. None where the curve never gets there."""
    reached = {}  # stage -> the first evaluated step at which the task is back
    for p in m["curve"]:
        if p[f"{task}_acc"] >= level * m["R"][0][0]:
            reached.setdefault(p["stage"], p["iter"])
    return reached.get(len(m["R"]) - 1), reached.get(0)

def own_best_rates(runs, acc=0.9):
    """{label: the rate at which it keeps the most facts at acc, mean over all the seeds}: how the
    recovery and width sweeps were given their rates (AXIS_BEST), from the whole axis sweep."""
    return {label: best_rate(by_lr, seed=None)[1]
            for label, by_lr in matched(runs, acc).items() if " + " not in label}


def continual_lines(runs):
    """Markdown of a sweep whose last stage repeats its first task: the four-task sequence's OP
    and BWT, the facts after it, and the steps back to task 1's first accuracy (notebook 03)."""
    lines = ["| method | lr | seeds | OP | BWT | facts kept | steps back (again / first time) |",
             "|---" * 7 + "|"]
    by_config = {}
    for label, lr, seed, m in runs:
        by_config.setdefault((label, lr), []).append(m)
    for (label, lr), ms in by_config.items():
        four = len(ms[0]["R"]) - 1  # the stages before the repeat
        R = [torch.tensor(m["R"], dtype=torch.float64)[:four, :four] for m in ms]
        op = [r[-1].mean().item() for r in R]
        bwt = [(r[-1, :-1] - r.diagonal()[:-1]).mean().item() for r in R]
        facts = [next(p["fact_mc"] for p in m["curve"] if p["stage"] == four) for m in ms]
        steps = " ".join(f"{a}/{b}" for a, b in map(recovery, ms))
        mean = lambda v: f"{100 * sum(v) / len(v):.1f} %"
        lines.append(f"| {label} | {lr:g} | {len(ms)} | {mean(op)} | {mean(bwt)} | {mean(facts)} | {steps} |")
    return "\n".join(lines)
