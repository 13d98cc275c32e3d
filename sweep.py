"""Forgetting trade-off frontiers: every method over a learning-rate grid and seeds.

    python sweep.py                    # the frontier sweep on 2 CPU cores (~37 min), then its table
    python sweep.py --sweep budget     # the main methods' frontiers again with 600 steps instead of 400
    python sweep.py --sweep alpha      # MoFO's α from 0.02 to 1 at one learning rate
    python sweep.py --sweep ablation   # MoFO's filter ablation (momentum/gradient/random/update)
    python sweep.py --sweep defaults   # train_tiny.py's default run (600 steps, lr 2e-3) per method and α
    python sweep.py --sweep continual  # four tasks in a row, every method: accuracy matrix, OP, BWT
    python sweep.py --preset smoke     # every sweep's pipeline on a toy model, in seconds (tests, CI)

Why a sweep: the learning rate decides how much any method forgets. At one rate MoFO forgets less
than full fine-tuning, but full fine-tuning at a lower rate may keep as much at the same task accuracy.
The fair comparison is each method's *frontier*: over its learning rates, the upper-right envelope of
(task accuracy, knowledge kept), where knowledge is the multiple-choice fact accuracy. Each point is
the mean over seeds; the table reads the knowledge kept off each frontier at matched task accuracy.

Every run is one train_tiny.run(); its metrics land in <out_dir>/sweep/<key>.json, the key a readable
name plus a hash of the run's whole configuration. An interrupted sweep resumes where it stopped, and
a re-run computes only what is missing (change the step budget and every key changes).
"""
import argparse
import concurrent.futures as cf
import contextlib
import hashlib
import json
import multiprocessing
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace

import torch

import data
import train_tiny as tt

# ----------------------------------------------------------------------------------------------
# What is swept: a method is a label and the train_tiny flags that make it
FRONTIER = {
    "full": dict(method="full"),
    "mofo α=0.02": dict(method="mofo", alpha=0.02),
    "mofo α=0.05": dict(method="mofo", alpha=0.05),
    "mofo α=0.1": dict(method="mofo", alpha=0.1),
    "mofo α=0.2": dict(method="mofo", alpha=0.2),
    "hft": dict(method="hft"),
    "l1": dict(method="l1"),
    "l2": dict(method="l2"),
    "lora": dict(method="lora"),
    "replay 25%": dict(method="full", replay=0.25),  # the reference that needs pre-training data
}
ALPHAS = {f"mofo α={a}": dict(method="mofo", alpha=a) for a in (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)}
ABLATION = {f"mofo α=0.1 {f}": dict(method="mofo", alpha=0.1, filter=f)
            for f in ("momentum", "gradient", "update", "random")}
CONTINUAL = {k: dict(v, tasks="add,reverse,sort,count") for k, v in FRONTIER.items()
             if k in ("full", "mofo α=0.1", "hft", "l1", "l2", "lora", "replay 25%")}

BUDGET = {k: FRONTIER[k] for k in ("full", "mofo α=0.1", "mofo α=0.2", "hft", "l1", "l2")}
QUIET = dict(log_interval=10**9, ckpt_interval=0)  # sweeps keep each run's JSON, not its checkpoints

@dataclass
class Sweep:
    methods: dict
    lrs: tuple = (2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3)
    lr_scale: dict = field(default_factory=lambda: {"lora": 4.0})  # LoRA's usual rates are higher
    seeds: tuple = (0, 1, 2)
    base: dict = field(default_factory=lambda: dict(QUIET, max_iters=400))

SWEEPS = {"frontier": Sweep(FRONTIER),  # 400 steps: the whole sweep fits an hour on 2 CPU cores
          # 600 steps (train_tiny.py's default): does a longer budget move the frontiers?
          "budget": Sweep(BUDGET, base=dict(QUIET, max_iters=600)),
          "alpha": Sweep(ALPHAS, lrs=(2e-3,), base=dict(QUIET, max_iters=600)),  # at the default rate
          "ablation": Sweep(ABLATION, lrs=(1e-3, 2e-3, 4e-3), base=dict(QUIET, max_iters=600)),
          "continual": Sweep(CONTINUAL, lrs=(1e-3,), seeds=(0,)),
          "defaults": Sweep({**{k: FRONTIER[k] for k in ("full", "hft", "l1", "l2", "lora")}, **ALPHAS},
                            lrs=(2e-3,), seeds=(0,), lr_scale={}, base=QUIET)}  # train_tiny.py's defaults
SMOKE = {**tt.PRESETS["smoke"], **QUIET, "out_dir": "out/smoke"}

def smoke(sweep):  # the same sweep shrunk to seconds: toy model, two rates, one seed
    return replace(sweep, lrs=sweep.lrs[-2:], seeds=sweep.seeds[:1], base=SMOKE)

# ----------------------------------------------------------------------------------------------
# Runs and their cache
def configs(sweep, out_dir=None):
    """[(label, lr, seed, key, Config)] of every run in the sweep, in a fixed order."""
    runs = []
    for label, flags in sweep.methods.items():
        for lr in sweep.lrs:
            for seed in sweep.seeds:
                cfg = tt.Config(**{**sweep.base, **flags, "seed": seed,
                                   "lr": lr * sweep.lr_scale.get(flags["method"], 1.0)})
                cfg = replace(cfg, out_dir=out_dir or cfg.out_dir)
                what = {k: v for k, v in asdict(cfg).items() if k not in tt.RUNTIME_KEYS + ("out_dir", "run_name")}
                digest = hashlib.sha1(json.dumps(what, sort_keys=True).encode()).hexdigest()[:10]
                key = f"{cfg.method}_lr{cfg.lr:.2e}_s{seed}_{digest}"  # labels may share a run
                runs.append((label, lr, seed, key, replace(cfg, run_name=f"sweep/{key}")))
    return runs

def cached(cfg):
    """The run's metrics if its JSON is complete, else None (a half-written file counts as missing)."""
    try:
        with open(os.path.join(cfg.out_dir, cfg.run_name + ".json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None

def run_one(cfg):
    """One run, its output in <key>.log; a diverged run is a result too (kept, and left off the plots)."""
    path = os.path.join(cfg.out_dir, cfg.run_name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".log", "w") as f, contextlib.redirect_stdout(f):
        try:
            m = tt.run(cfg)
        except FloatingPointError as e:
            m = {"diverged": str(e), "config": asdict(cfg)}
            with open(path + ".json", "w") as g:
                json.dump(m, g)
    if os.path.exists(path + ".pt"):
        os.remove(path + ".pt")  # the JSON is the result; 3 MB of weights per run adds up
    return m

def finished(todo, workers):
    """Yield (run, metrics) as runs finish: in this process, or in `workers` processes of one thread
    each (two single-threaded runs use two cores better than one run with two threads)."""
    if workers == 1:
        yield from ((r, run_one(r[4])) for r in todo)
        return
    spawn = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(workers, mp_context=spawn, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        futures = {pool.submit(run_one, r[4]): r for r in todo}
        for f in cf.as_completed(futures):
            yield futures[f], f.result()

def run_sweep(sweep, out_dir=None, workers=2, echo=print):
    """Run what the cache lacks; return {key: metrics} for the whole sweep and how many were computed."""
    runs = configs(sweep, out_dir)
    results = {key: m for *_, key, cfg in runs if (m := cached(cfg)) is not None}
    todo = [r for r in runs if r[3] not in results]
    echo(f"{len(runs)} runs, {len(results)} cached, {len(todo)} to compute")
    if todo:  # pre-train here first, so that the workers do not all pre-train the same checkpoint
        cfg = todo[0][4]
        tt.load_or_pretrain(cfg, data.build_corpus(cfg.data_seed, cfg.n_people, cfg.filler), "cpu", nullcontext(), 0, 1)
    t0 = time.time()
    for i, ((label, lr, seed, key, cfg), m) in enumerate(finished(todo, workers), 1):
        results[key] = m
        echo(f"[{i}/{len(todo)}] {label:18s} lr {cfg.lr:.1e} seed {seed}: " + (
             f"diverged ({m['diverged']})" if "diverged" in m else f"task {m['task_acc']:6.1%}, facts MC "
             f"{m['fact_mc_after']:6.1%} ({m['wall_s']:.0f} s; {time.time() - t0:.0f} s so far)"))
    return {key: results[key] for *_, key, _ in runs}, len(todo)

# ----------------------------------------------------------------------------------------------
# Frontiers: the upper-right envelope, and knowledge read off it at a matched task accuracy
def points(sweep, results, out_dir=None, x="task_acc", y="fact_mc_after"):
    """{label: {lr: {seed: (x, y)}}}, diverged runs left out."""
    out = {}
    for label, lr, seed, key, _ in configs(sweep, out_dir):
        m = results[key]
        if "diverged" not in m:
            out.setdefault(label, {}).setdefault(lr, {})[seed] = (m[x], m[y])
    return out

def frontier(xy):
    """The Pareto points of [(x, y)] (no other point is at least as good in both and better in one),
    sorted by x; joined by straight lines they are the upper-right envelope."""
    xy = sorted(set(xy), key=lambda p: (-p[0], -p[1]))  # right to left; keep a point only if it is higher
    front, best_y = [], float("-inf")
    for px, py in xy:
        if py > best_y:
            front.append((px, py))
            best_y = py
    return front[::-1]

def kept_at(front, acc):
    """Knowledge on the frontier at task accuracy `acc` (linear between Pareto points); None if the
    frontier never reaches `acc`."""
    if not front or acc > front[-1][0]:
        return None
    if acc <= front[0][0]:
        return front[0][1]
    for (x0, y0), (x1, y1) in zip(front, front[1:]):
        if x0 <= acc <= x1:
            return y0 + (y1 - y0) * (acc - x0) / (x1 - x0)

def mean_std(values):
    t = torch.tensor(values, dtype=torch.float64)
    return t.mean().item(), (t.std().item() if len(values) > 1 else 0.0)

def summary(sweep, results, out_dir=None, at=(0.5, 0.8, 0.9)):
    """Per method: mean points over seeds, their frontier, and knowledge at matched task accuracy
    (read off the frontier of each seed, then mean ± std over the seeds that reach it)."""
    rows = {}
    for label, by_lr in points(sweep, results, out_dir).items():
        stats = [[mean_std(v) for v in zip(*by_seed.values())] for by_seed in by_lr.values()]  # [(x, y)] per lr
        means = [(sx[0], sy[0]) for sx, sy in stats]
        per_seed = {s: [by_seed[s] for by_seed in by_lr.values() if s in by_seed] for s in sweep.seeds}
        matched = {a: [k for xy in per_seed.values() if (k := kept_at(frontier(xy), a)) is not None] for a in at}
        rows[label] = {"lrs": list(by_lr), "mean": means, "std": [(sx[1], sy[1]) for sx, sy in stats],
                       "frontier": frontier(means), "n_seeds": len(sweep.seeds),
                       "at": {a: (mean_std(v) if v else None, len(v)) for a, v in matched.items()}}
    return rows

def table(rows):
    at = list(next(iter(rows.values()))["at"])
    head = "| method | best task acc | " + " | ".join(f"knowledge at {a:.0%} task acc" for a in at) + " |"
    lines = [head, "|---" * (2 + len(at)) + "|"]
    for label, r in rows.items():
        cells = []
        for a in at:
            ms, n = r["at"][a]
            cells.append("not reached" if ms is None else
                         f"{ms[0]:.1%} ± {ms[1]:.1%}" + ("" if n == r["n_seeds"] else f" ({n}/{r['n_seeds']} seeds)"))
        lines.append(f"| {label} | {max(x for x, _ in r['mean']):.1%} | " + " | ".join(cells) + " |")
    return "\n".join(lines)

def continual_table(sweep, results, out_dir=None):
    lines = ["| method | lr | seed | OP | BWT | last row of R (" + sweep_tasks(sweep) + ") |", "|---" * 6 + "|"]
    for label, lr, seed, key, cfg in configs(sweep, out_dir):
        m = results[key]
        lines.append(f"| {label} | {cfg.lr:.1e} | {seed} | " + ("diverged | | |" if "diverged" in m else
                     f"{m['OP']:.1%} | {m['BWT']:+.1%} | " + ", ".join(f"{a:.0%}" for a in m["R"][-1]) + " |"))
    return "\n".join(lines)

def sweep_tasks(sweep):
    return next(iter(sweep.methods.values())).get("tasks", "add")

# ----------------------------------------------------------------------------------------------
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sweep", choices=sorted(SWEEPS), default="frontier", help="which sweep (default: frontier)")
    p.add_argument("--preset", choices=["smoke"], help="smoke: a toy model, two rates, one seed (seconds)")
    p.add_argument("--workers", type=int, default=2, help="runs in parallel, one thread each (default: 2)")
    p.add_argument("--out_dir", default=None, help="where pretrained.pt and sweep/ live (default: out, out/smoke)")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error(f"--workers must be >= 1, got {args.workers}")
    sweep = smoke(SWEEPS[args.sweep]) if args.preset else SWEEPS[args.sweep]
    t0 = time.time()
    results, computed = run_sweep(sweep, args.out_dir, args.workers)
    first = next(m for m in results.values() if "diverged" not in m)
    print(f"\n{args.sweep} sweep: {len(results)} runs ({computed} computed) in {time.time() - t0:.0f} s; "
          f"{first['config']['max_iters']} steps per task; facts MC before {first['fact_mc_before']:.1%}, "
          f"chance {first['fact_chance']:.1%}\n")
    multi = "," in sweep_tasks(sweep)
    print(continual_table(sweep, results, args.out_dir) if multi else table(summary(sweep, results, args.out_dir)))
    return 0

if __name__ == "__main__":
    sys.exit(main())
