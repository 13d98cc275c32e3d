"""The study: every method at the same learning rates and seeds, read at the same task accuracy.

    python sweep.py --study            # the 2000-step study, sweep after sweep (a restart resumes it)
    python sweep.py --sweep axis       # one sweep: the 2000-step axis, lora, filters, alpha_low,
                                       #   recovery, width64; the long budget's pilot, pilot2,
                                       #   explore, explore_hft, control (the grids below)
    python sweep.py --export           # results/<sweep>.json from the cache: what the notebooks draw
    python sweep.py --preset smoke     # a sweep's whole pipeline on a toy model, in seconds (CI)
    python sweep.py --preset quick --method mofo --filter random   # your method beside full and MoFO
    python sweep.py --revalidate       # after a code change: re-run a few cached runs, re-stamp if equal

Why a sweep: the learning rate decides how much any method forgets, so a comparison at one rate says
little; each method runs at the same rates, and is read at the same task accuracy. A run is scored
every 250 steps on all 600 facts, the test problems and 200 validation problems; how a run is read
and two methods compared (differences paired by seed, 95 % t-intervals) is stats.py.

Every run is one train_tiny.run(); its metrics land in <out_dir>/sweep/<key>.json with the
fingerprint of the code that produced them. A cached run is served only while its configuration
*and* that code are unchanged; otherwise it is recomputed, and the sweep says which files changed.
An empty cache (a fresh clone) is first filled from the committed results/*.json, stamps and all,
so that a run the code still makes is not computed twice.
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
from pathlib import Path

import torch

import data
import pretrain
import stats
import train_tiny as tt
from report import color, label
from stamp import changed, stamp

ROOT = Path(__file__).resolve().parent
STAMP = stamp("train_tiny.py")  # what every run computes with: taken at import, the code this process runs

# ----------------------------------------------------------------------------------------------
# What is swept: a label and the train_tiny flags that make it. Grids fixed before any of their runs.
RATES = (1e-4, 2e-4, 5e-4, 1e-3, 2e-3)  # the rate axis: 1/30 ... 2/3 of pre-training's 3e-3, 1-2-5
STEPS = 2000  # from one pilot (full, lr 1e-4): task accuracy 79 % at 1000 steps, 95 % at 2000
QUIET = dict(log_interval=10**9, ckpt_interval=0,  # sweeps keep each run's JSON, not its checkpoints,
             device="cpu")  # and pre-train and fine-tune on the CPU: a GPU's bf16 autocast rounds apart
LATER_FLAGS = {"task_replay": 0.0, "compile": False, "lora_targets": "all", "pullback": False,
               "pullback_fine": False}
# flags that joined the key after runs were cached: left out at this value, so a run's key stays

@dataclass
class Sweep:
    methods: dict  # label -> train_tiny flags
    lrs: tuple = RATES
    lr_for: dict = field(default_factory=dict)  # label -> its own rates
    seeds: tuple = (0, 1, 2)
    base: dict = field(default_factory=lambda: dict(QUIET, max_iters=STEPS))

AXIS = {  # one configuration per family, each at every rate: equal tuning is the same 5 rates
    "full": dict(method="full", pullback=True),  # + WiSE-FT and LiNeS at its end (pullback.py)
    "mofo-α0.05": dict(method="mofo", alpha=0.05),  # the paper's continual α
    "mofo-α0.1": dict(method="mofo", alpha=0.1),  # the paper's default α
    "hft": dict(method="hft", hft_ratio=0.5),  # the paper's half, by category
    "l2": dict(method="l2", reg=1e-2),
    "replay 25%": dict(method="full", replay=0.25),  # the reference that needs the old data
}
SWEEPS = {"axis": Sweep(AXIS, lr_for={"replay 25%": (1e-4, 1e-3)})}
# LoRA at the same rates as every other method, at twice the steps: it learns more slowly per step
SWEEPS["lora"] = Sweep({"lora": dict(method="lora", rank=8)}, base=dict(QUIET, max_iters=2 * STEPS))
FILTERS = {f"mofo-{f}": dict(method="mofo", alpha=0.1, filter=f)  # the MoFO paper's ablation;
           for f in ("momentum", "gradient", "random")}  # momentum's runs are the axis's; "update"
# (the paper's fourth) cut for the study's budget: the question is momentum against gradient, random
SWEEPS["filters"] = Sweep(FILTERS, lrs=RATES[:4])
SWEEPS["alpha_low"] = Sweep({**{f"mofo-α{a:g}": dict(method="mofo", alpha=a)  # α 1 is full: AdamW
                                for a in (0.01, 0.05, 0.1, 0.25, 0.5)}, "full": AXIS["full"]},
                            lrs=(2e-4,))
AXIS_BEST = {"full": 2e-4, "mofo-α0.1": 5e-4}  # the recovery and width sweeps' rates: each method's
# best on the whole axis sweep (facts kept at 90 % validation accuracy, mean over its 3 seeds;
# own_best_rates), fixed before any of their runs
# Continual: four tasks at those rates, then task 1 again: how many steps bring it back, against
# learning it from the pre-trained model (stage 0 of the same run): skill or format?
TASKS5 = "add,reverse,sort,count,add"
RECOVERY = {"full": dict(method="full", tasks=TASKS5),
            "mofo alpha=0.1": dict(method="mofo", alpha=0.1, tasks=TASKS5)}  # replay: budget cut
SWEEPS["recovery"] = Sweep(RECOVERY, lrs=(AXIS_BEST["full"],),  # replay at full's rate
                           lr_for={"mofo alpha=0.1": (AXIS_BEST["mofo-α0.1"],)},
                           base=dict(QUIET, max_iters=STEPS, curve_points=10, eval_problems=200))
# Width on the same pre-training tokens (the 128-wide model's 1200 steps); width128 is axis runs
SIZES = {64: dict(n_embd=64, n_head=2), 128: dict(n_embd=128, n_head=4),  # head size 32
         192: dict(n_embd=192, n_head=6, pretrain_lr=2e-3)}
WIDTH = {"full": AXIS["full"], "mofo alpha=0.1": dict(method="mofo", alpha=0.1)}
for w in SIZES:
    SWEEPS[f"width{w}"] = Sweep(WIDTH, lrs=(AXIS_BEST["full"],),
                                lr_for={"mofo alpha=0.1": (AXIS_BEST["mofo-α0.1"],)},
                                base=dict(QUIET, max_iters=STEPS, **SIZES[w]))
# The longer budget's pilot (fixed before its runs): full at 1e-4 and MoFO α 0.1 at 2e-4, the low
# rates the 2000-step budget stopped, scored every 250 steps; the study's budget is the one at
# which both pass 90 % validation accuracy by about two thirds of the run (same cosine shape).
# Round 1, 6000 steps: both pass 90 % at about a third of the run (full 2000, MoFO 2250); round 2
# at the budget that predicts (the same schedule's lr integral to those steps), 4000: full 2000,
# MoFO 2250, by 56 % of the run. So BUDGET = 4000 (about 650 s a run on one thread).
PILOT = {"full": dict(method="full"), "mofo-α0.1": dict(method="mofo", alpha=0.1)}
for name, steps in (("pilot", 6000), ("pilot2", 4000)):
    SWEEPS[name] = Sweep(PILOT, lr_for={"full": (1e-4,), "mofo-α0.1": (2e-4,)}, seeds=(0,),
                         base=dict(QUIET, max_iters=steps, curve_points=steps // 250))
# The long-budget study, fixed before any of its runs: every method at the pilot's budget, scored
# every 250 steps, over one grid of half-decade rates; seeds 0-2 explore (each method's best rate),
# seeds 3-10 then confirm the headline three at those rates: no seed both picks and judges a rate.
BUDGET = 4000
HALF_DECADE = (1e-4, 1.4e-4, 2e-4, 3e-4, 5e-4, 7e-4, 1e-3)
BELOW = (7e-5, 5e-5)  # added, before their runs, for a method whose best is still the lowest rate
LONG = dict(QUIET, max_iters=BUDGET, curve_points=BUDGET // 250)
HEADLINE = {"full": dict(AXIS["full"], pullback_fine=True),  # pulled back at the end, finely
            **{k: AXIS[k] for k in ("mofo-α0.1", "l2")}}
SWEEPS["explore"] = Sweep(HEADLINE, lrs=HALF_DECADE, base=LONG)
SWEEPS["explore_hft"] = Sweep({"hft": AXIS["hft"]}, lrs=HALF_DECADE, base=LONG)
# Cut for the budget (7-9 h of the machine; the headline's 63 + 24 runs, MoFO + L2 and the control
# take about 9) before any of these runs, in the order LoRA, replay, MoFO α 0.05, HFT: their
# 2000-step sweeps stay, labelled as such; explore_hft runs last, only if the budget remains.
# Tasks in a row, the control: the other three tasks first and addition met for the first time
# last, at the recovery sweep's rates and steps: relearning is judged against first learning.
SWEEPS["control"] = replace(SWEEPS["recovery"], methods={
    k: {**v, "tasks": "reverse,sort,count,add"} for k, v in RECOVERY.items()})
# Run order: explore, control, then confirm and mofo_l2 at explore's rates; explore_hft last.
STUDY = ("axis", "lora", "filters", "alpha_low", "recovery", "width64")  # run order; width192
# cut for the study's budget: its pre-training and runs cost more than the other two widths together

SMOKE = {**tt.PRESETS["smoke"], **QUIET}

def smoke(sweep):  # the same sweep shrunk to seconds: toy model, one rate, one seed
    return replace(sweep, lrs=sweep.lrs[-1:], lr_for={}, seeds=sweep.seeds[:1], base={
        **{k: v for k, v in sweep.base.items() if k not in SMOKE}, **SMOKE})

def quick(flags):
    """--preset quick: a student's method (train_tiny flags, e.g. method="mofo", filter="random")
    beside full fine-tuning and MoFO α 0.1 at two rates of the axis, seed 0. The baselines' runs are
    the axis sweep's (served from results/axis.json): only the student's runs are computed."""
    methods = {"full": AXIS["full"], "mofo-α0.1": AXIS["mofo-α0.1"]}
    flags = {"method": "mofo", **flags}
    if flags not in ({"method": "full"}, {"method": "mofo"}, *methods.values()):  # not a baseline again
        config = asdict(replace(tt.Config(), **flags))
        methods["yours: " + label(config, tt.METHODS[config["method"]].knob)] = flags
    return Sweep(methods, lrs=(2e-4, 1e-3), seeds=(0,))

def family(label):  # "mofo alpha=0.1" -> "mofo"; "replay 25%" -> "replay"
    return label.split(" ")[0]

# ----------------------------------------------------------------------------------------------
# Runs and their cache
def configs(sweep, out_dir=None):
    """[(label, lr, seed, key, Config)] of every run in the sweep, seed by seed (a sweep cut short
    still has whole seeds)."""
    runs = []
    for seed in sweep.seeds:
        for label, flags in sweep.methods.items():
            for lr in sweep.lr_for.get(label, sweep.lrs):
                cfg = tt.Config(**{**sweep.base, **flags, "seed": seed, "lr": lr})
                cfg = replace(cfg, out_dir=out_dir or cfg.out_dir)
                what = {k: v for k, v in asdict(cfg).items() if k not in tt.RUNTIME_KEYS + ("out_dir", "run_name")
                        and not (k in LATER_FLAGS and v == LATER_FLAGS[k])}
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

def fill_cache(sweep, out_dir=None, echo=print, results_dir=ROOT / "results"):
    """Fill the cache's gaps from the committed results/*.json (a fresh clone has no out/): each
    committed run that the sweep has and the cache lacks is written where the sweep looks for it,
    stamps and all. Nothing is trusted blindly: a run stamped by other code is still stale, so
    `--revalidate` can re-stamp it and `python sweep.py` recomputes it. Returns how many it wrote."""
    saved = {}
    for path in sorted(Path(results_dir).glob("*.json")):
        saved.update(json.loads(path.read_text()).get("runs", {}))  # keys hash the whole config: no clashes
    n = 0
    for *_, key, cfg in configs(sweep, out_dir):
        if key in saved and cached(cfg) is None:
            path = Path(cfg.out_dir, cfg.run_name + ".json")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(saved[key]))
            n += 1
    if n:
        echo(f"took {n} runs from {Path(results_dir).name}/ into the cache ({Path(out_dir or sweep.base.get('out_dir', 'out'), 'sweep')})")
    return n

def stale(m, now):
    """What changed since m was computed (file names), [] if it still follows the code."""
    return changed(m.get("fingerprint", {}), now)

def run_one(cfg):
    """One run on one thread (results depend on the thread count), its output in <key>.log; a
    diverged run is a result too (kept, and left off the plots)."""
    path = os.path.join(cfg.out_dir, cfg.run_name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with open(path + ".log", "w") as f, contextlib.redirect_stdout(f):
        try:
            m = {**tt.run(cfg), "fingerprint": STAMP}
        except FloatingPointError as e:
            m = {"diverged": str(e), "config": asdict(cfg), "fingerprint": STAMP}
        finally:
            torch.set_num_threads(threads)
    with open(path + ".json", "w") as g:  # the run's own JSON, stamped
        json.dump(m, g, indent=1)
    if os.path.exists(path + ".pt"):
        os.remove(path + ".pt")  # the JSON is the result; 3 MB of weights per run adds up
    return m

def finished(todo, workers):
    """Yield (run, metrics) as runs finish: in this process, or in `workers` processes of one thread
    each (two single-threaded runs use two cores better than one run with two threads)."""
    if workers == 1:
        yield from ((r, run_one(r[4])) for r in todo)
        return
    with cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(run_one, r[4]): r for r in todo}
        for f in cf.as_completed(futures):
            yield futures[f], f.result()

def pretrain_first(runs):  # here, before the workers start, so that they do not all pre-train it
    for cfg in {pretrain.pretrained_path(r[4]): r[4] for r in runs}.values():
        corpus = data.build_corpus(cfg.data_seed, cfg.n_people, cfg.filler, cfg.corpus, cfg.arith)
        pretrain.load_or_pretrain(cfg, corpus, cfg.device, nullcontext(), 0, 1)  # the sweep's device: the CPU

def run_sweep(sweep, out_dir=None, workers=2, echo=print):
    """Run what the cache lacks or what changed code made stale; return ({key: metrics}, #computed)."""
    runs, now = configs(sweep, out_dir), STAMP
    results = {key: m for *_, key, cfg in runs if (m := cached(cfg)) is not None}
    old = {key: stale(m, now) for key, m in results.items() if stale(m, now)}
    if old:
        files = sorted({f for fs in old.values() for f in fs})
        echo(f"{', '.join(files)} changed since these results: recomputing {len(old)} runs "
             "(python sweep.py --revalidate re-stamps them instead if a few re-runs reproduce them)")
    todo = [r for r in runs if r[3] not in results or r[3] in old]
    echo(f"{len(runs)} runs, {len(runs) - len(todo)} cached, {len(todo)} to compute")
    if todo:
        pretrain_first(todo)
    t0 = time.time()
    for i, ((label, lr, seed, key, cfg), m) in enumerate(finished(todo, workers), 1):
        results[key] = m
        echo(f"[{i}/{len(todo)}] {label:18s} lr {cfg.lr:.1e} seed {seed}: " + (
             f"diverged ({m['diverged']})" if "diverged" in m else f"task {m['task_acc']:6.1%}, facts MC "
             f"{m['fact_mc_after']:6.1%} ({m['wall_s']:.0f} s; {time.time() - t0:.0f} s so far)"))
    return {key: results[key] for *_, key, _ in runs}, len(todo)

NOT_COMPARED = ("time_s", "tokens_per_s", "wall_s", "peak_rss_mb", "pretrain_time_s",  # the clock, the machine
                "config", "fingerprint", "pretrained_fingerprint", "revalidated")  # (run name) and the stamps

def revalidate(sweep, out_dir=None, per_family=1, workers=2, echo=print):
    """Re-run `per_family` stale runs of each family with the code in front of us. A family whose
    re-runs reproduce their cached metrics exactly has its stale runs re-stamped with the new
    fingerprint (the change kept its numbers); the others stay stale. Returns True if all were."""
    runs, now = configs(sweep, out_dir), STAMP
    old = [r for r in runs if (m := cached(r[4])) is not None and stale(m, now)]
    if not old:
        echo("nothing to revalidate: every cached run follows the code")
        return True
    picks = {}
    for r in old:
        picks.setdefault(family(r[0]), [])
        if len(picks[family(r[0])]) < per_family:
            picks[family(r[0])].append(r)
    picks = [r for rs in picks.values() for r in rs]
    echo(f"{len(old)} runs are stale; re-running {len(picks)} of them ({per_family} per family)")
    pretrain_first(picks)
    was, differ = {r[3]: cached(r[4]) for r in picks}, set()
    for (label, lr, seed, key, cfg), new in finished(
            [(*r[:4], replace(r[4], run_name=r[4].run_name + ".revalidate")) for r in picks], workers):
        bad = [k for k in was[key] if k not in NOT_COMPARED and was[key][k] != new.get(k)]
        echo(f"{label} lr {cfg.lr:.1e} seed {seed}: " + ("reproduced" if not bad else f"differs in {', '.join(bad)}"))
        if bad:
            differ.add(family(label))
        new_pretrained = new.get("pretrained_fingerprint")
        os.remove(os.path.join(cfg.out_dir, cfg.run_name + ".json"))
    kept = [r for r in old if family(r[0]) not in differ]
    for *_, cfg in kept:
        m = cached(cfg)
        m["revalidated"] = {"from": m["fingerprint"], "by": [r[3] for r in picks]}
        m["fingerprint"], m["pretrained_fingerprint"] = now, new_pretrained
        Path(cfg.out_dir, cfg.run_name + ".json").write_text(json.dumps(m, indent=1))
    echo(f"re-stamped {len(kept)} runs with the new fingerprint" + (
        f"; {', '.join(sorted(differ))}: the change moved the numbers, `python sweep.py` recomputes"
        " them" if differ else ""))
    return not differ

# ----------------------------------------------------------------------------------------------
# Committed results: one compact file per sweep, stamped with the code's fingerprint
def export(name, results, path=None):
    path = Path(path or ROOT / "results" / f"{name}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    prints = {json.dumps(m.get("fingerprint"), sort_keys=True) for m in results.values()}
    if len(prints) != 1:
        raise ValueError(f"the {name} sweep's runs come from {len(prints)} versions of the code; run it again first")
    path.write_text(json.dumps({"sweep": name, "fingerprint": json.loads(prints.pop()), "runs": results},
                               separators=(",", ":")))
    return path

def whole_seeds(sweep, results):
    """(the sweep cut to the seeds of which `results` holds every run, those runs): the tables and
    figures compare methods on whole seeds only, so that a cut-short sweep compares like with like."""
    runs = configs(sweep)
    seeds = tuple(s for s in sweep.seeds if all(r[3] in results for r in runs if r[2] == s))
    return replace(sweep, seeds=seeds), {r[3]: results[r[3]] for r in runs if r[2] in seeds}

def fresh(sweep, out_dir=None):
    """{key: metrics} of the sweep's cached runs that follow the code in front of us. Computes nothing."""
    return {key: m for *_, key, cfg in configs(sweep, out_dir)
            if (m := cached(cfg)) is not None and not stale(m, STAMP)}

def complete(sweep, out_dir=None):
    """whole_seeds() of the cache: the finished seeds and their runs."""
    return whole_seeds(sweep, fresh(sweep, out_dir))

def load(name, path=None, echo=print):
    """The committed results of a sweep; says loudly when the code in front of us is not the code
    that produced them."""
    saved = json.loads(Path(path or ROOT / "results" / f"{name}.json").read_text())
    diff = changed(saved["fingerprint"], STAMP)
    if diff:
        echo(f"WARNING: {', '.join(diff)} changed since results/{name}.json was computed: these plots show the "
             f"old code's numbers. Run `python sweep.py --sweep {name}` (or --revalidate), then --export.")
    return saved["runs"]

# ----------------------------------------------------------------------------------------------
# Frontiers: upper-right envelopes over configurations and steps, read at a matched task accuracy
def trained(sweep, results, out_dir=None):
    """[(label, lr, seed, metrics)] of every run in `results` that trained: not diverged, not
    missing; what stats.py's functions read."""
    return [(label, lr, seed, results[key]) for label, lr, seed, key, _ in configs(sweep, out_dir)
            if key in results and "diverged" not in results[key]]

def sweep_tasks(sweep):
    return next(iter(sweep.methods.values())).get("tasks", "add")

# ----------------------------------------------------------------------------------------------
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sweep", choices=sorted(SWEEPS), default="axis", help="which sweep (default: axis)")
    p.add_argument("--preset", choices=["smoke", "quick"], help="smoke: a toy model, one rate, one seed (seconds); "
                   "quick: your method (--method and its train_tiny flags) beside full and MoFO, seed 0 (minutes)")
    p.add_argument("--workers", type=int, default=2, help="runs in parallel, one thread each (default: 2)")
    p.add_argument("--out_dir", default=None, help="where the pre-trained checkpoints and sweep/ live "
                                                   "(default: out, out/smoke)")
    p.add_argument("--revalidate", action="store_true", help="re-run one stale run per method; if all "
                   "reproduce exactly, re-stamp the cache with the new code's fingerprint")
    p.add_argument("--export", action="store_true", help="write results/<sweep>.json for the notebooks from "
                   "the cache (its finished seeds; computes nothing)")
    p.add_argument("--study", action="store_true", help="the whole study, sweep after sweep in the "
                   f"order {', '.join(STUDY)}; with --export, every one of them")
    args, rest = p.parse_known_args(argv)
    if args.study:  # one command for the study; the cache resumes it after an interruption
        flags = [f for f in (argv if argv is not None else sys.argv[1:]) if f != "--study"]
        return max(main([*flags, "--sweep", name]) for name in STUDY)
    if args.workers < 1:
        p.error(f"--workers must be >= 1, got {args.workers}")
    if rest and args.preset != "quick":
        p.error(f"unrecognized arguments: {' '.join(rest)} (train_tiny flags go with --preset quick)")
    if args.preset == "quick":
        try:
            cfg = tt.parse_args(rest)
            tt.check_config(cfg)  # an unknown method or a bad knob: one line, before any run
            given = asdict(cfg)
        except ValueError as e:
            p.error(str(e))
        default = asdict(tt.Config())  # the flags given are those that differ from train_tiny's defaults
        flags = {k: v for k, v in given.items() if v != default[k] and k not in tt.RUNTIME_KEYS}
        return quick_main(quick(flags), args)
    sweep = smoke(SWEEPS[args.sweep]) if args.preset else SWEEPS[args.sweep]
    if not args.preset:
        fill_cache(sweep, args.out_dir)
    if args.revalidate:
        return 0 if revalidate(sweep, args.out_dir, workers=args.workers) else 1
    if args.export:  # every fresh run, so that a cut-short sweep resumes from results/ on a fresh clone;
        runs = fresh(sweep, args.out_dir)  # the tables (here and in the notebooks) take its whole seeds
        if not runs:  # said, not raised: --study --export goes on to the next sweep
            print(f"sweep.py: no run of the {args.sweep} sweep in the cache follows the code: run "
                  f"`python sweep.py --sweep {args.sweep}` first", file=sys.stderr)
            return 1
        done, results = whole_seeds(sweep, runs)
        print(f"{args.sweep}: seeds {list(done.seeds)} of {list(sweep.seeds)} finished, {len(results)} runs; "
              f"{len(runs) - len(results)} runs of unfinished seeds kept for the next session\n")
        if results:
            print(tables(done, results, args.out_dir))
        if len(done.seeds) >= 2 and args.sweep == "axis" and not args.preset:  # the main command's
            path = ROOT / "results" / "summary.json"  # last lines: a rate chosen on other seeds
            path.write_text(json.dumps({"main_command": stats.main_command_lines(trained(done, results))}, indent=1))
            print(f"wrote {path}")
        print(f"\nwrote {export(args.sweep + ('_smoke' if args.preset else ''), runs)}")
        return 0
    t0 = time.time()
    results, computed = run_sweep(sweep, args.out_dir, args.workers)
    first = next(m for m in results.values() if "diverged" not in m)
    print(f"\n{args.sweep} sweep: {len(results)} runs ({computed} computed) in {time.time() - t0:.0f} s; "
          f"{first['config']['max_iters']} steps per task; facts MC before {first['fact_mc_before']:.1%}, "
          f"chance {first['fact_chance']:.1%}; task accuracy before {first['task_acc_before']:.1%}\n")
    print(tables(sweep, results, args.out_dir))
    return 0

def tables(sweep, results, out_dir=None):  # a continual sweep's lines, or the verdicts
    if "," in sweep_tasks(sweep):
        return stats.continual_lines(trained(sweep, results, out_dir))
    return stats.study_tables(trained(sweep, results, out_dir))

def quick_main(sweep, args):
    fill_cache(sweep, args.out_dir)  # full's and MoFO's runs are the axis sweep's: not computed again
    t0 = time.time()
    results, computed = run_sweep(sweep, args.out_dir, args.workers)
    print(f"\nquick sweep: {len(results)} runs ({computed} computed) in {time.time() - t0:.0f} s; one seed, so "
          "a difference of a few points may be noise (notebook 02 has the 3-seed intervals)\n")
    print(stats.study_tables(trained(sweep, results, args.out_dir)))
    path = Path(args.out_dir or "out", "quick.png")
    plot_quick(sweep, results, path)
    print(f"\nfigure {path}")
    return 0

def plot_quick(sweep, results, path):
    """Task accuracy against facts kept along training, one panel per rate: upper right is best."""
    from matplotlib.figure import Figure  # no pyplot: nothing to show, no backend to pick
    fig = Figure(figsize=(4 * len(sweep.lrs), 3.8), dpi=100, layout="constrained")
    axes = fig.subplots(1, len(sweep.lrs), squeeze=False)[0]
    for label, lr, seed, m in trained(sweep, results):
        ax = axes[sweep.lrs.index(lr)]
        xs, ys = zip(*[(p["add_acc"], p["fact_mc"]) for p in m["curve"]])
        ax.plot(xs, ys, "o-", ms=3, color=color(label), label=label)  # yours: red
        ax.set(title=f"lr {lr:g}", xlabel="task accuracy (test)", xlim=(-0.02, 1.02), ylim=(-0.02, 1.02))
    axes[0].set_ylabel("facts kept (all 600, multiple choice)")
    axes[-1].legend(fontsize=8, loc="lower left")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, metadata={"Software": None})

if __name__ == "__main__":
    sys.exit(main())
