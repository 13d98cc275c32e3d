"""What the main command prints and draws: runs side by side, along training and at the end.

The table puts each run's task accuracy and knowledge at every scored step next to each other,
then the end point against the pre-trained model; the figure draws the same curves, and knowledge
against task accuracy, where upper right is best. The lesson is in the difference between columns,
and in what one rate cannot show: the last two lines say it, with the study's numbers.
"""
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent
COLORS = {"full": "black", "mofo": "tab:orange", "hft": "tab:green", "l1": "tab:cyan",
          "l2": "tab:blue", "lora": "tab:purple", "replay": "tab:gray", "wise": "tab:brown",
          "lines": "tab:pink", "mofo_l2": "tab:olive"}  # one colour per method in every figure


def color(name):  # "mofo alpha=0.1" -> MoFO's colour; "replay 25%" -> replay's
    return COLORS.get(name.split(" ")[0].split("-")[0].lower(), "tab:red")


def summary_lines(path=ROOT / "results" / "summary.json"):
    """What the main command's comparison is not, in the study's numbers (sweep.py --export
    writes them); a pointer to the study where it has not been exported."""
    try:
        return json.loads(Path(path).read_text())["main_command"]
    except (OSError, ValueError, KeyError):
        return ["the rate study (python sweep.py --sweep axis, then --export) is not in results/ "
                "here, and one rate cannot say which method forgets less."]


def label(config, knob):  # "mofo alpha=0.1": a run's method and its own knob (Method.knob)
    name = config["method"] + (f" {knob}={config[knob]:g}" if knob else "")
    if config["method"] == "mofo" and config["filter"] != "momentum":
        name += f" filter={config['filter']}"
    if config["method"] == "lora" and config.get("lora_targets", "all") != "all":
        name += f" on {config['lora_targets']}"
    return name

def report(ms, names):
    """One table of runs side by side: along training (task accuracy, knowledge kept), then the end
    point against the pre-trained model. The lesson is in the difference between the columns."""
    first = ms[0]
    w = max(16, *(len(n) + 2 for n in names))
    print(f"\nalong training (each point: {first['config']['eval_problems']} test problems and all "
          "facts)")
    print(f"{'':>10}" + "".join(f"{n:>{w}}" for n in names))
    print(f"{'step':>10}" + f"{'task   facts':>{w}}" * len(ms))
    for points in zip(*(m["curve"] for m in ms)):
        step_ = points[0]["stage"] * first["config"]["max_iters"] + points[0]["iter"]
        task = first["tasks"][points[0]["stage"]]
        print(f"{step_:>10}" + "".join(f"{p[task + '_acc']:.1%} {p['fact_mc']:6.1%}".rjust(w)
                                       for p in points))
    rows = [(f"task accuracy ({t})", first["R0"][j], [m["R"][-1][j] for m in ms], "{:.1%}")
            for j, t in enumerate(first["tasks"])]
    rows += [(f"facts kept, MC (chance {first['fact_chance']:.1%})", first["fact_mc_before"],
              [m["fact_mc_after"] for m in ms], "{:.1%}"),
             ("facts, greedy recall", first["fact_greedy_before"],
              [m["fact_greedy_after"] for m in ms], "{:.1%}"),
             ("held-out loss", first["heldout_loss_before"],
              [m["heldout_loss_after"] for m in ms], "{:.3f}"),
             ("|θ-θ0| (relative)", None, [f"{m['dist_abs']:.2f} ({m['dist_rel']:.3f})" for m in ms],
              "{}"),
             ("entries changed", None, [m["frac_changed"] for m in ms], "{:.1%}"),
             ("fine-tuning seconds", None, [m["time_s"] for m in ms], "{:.0f}")]
    if len(first["tasks"]) > 1:
        rows += [("continual OP", None, [m["OP"] for m in ms], "{:.1%}"),
                 ("continual BWT", None, [m["BWT"] for m in ms], "{:+.1%}")]
    head = f"end point ({first['config']['eval_problems']} problems, all facts)"
    print(f"\n{head:34s}{'before':>8}" + "".join(f"{n:>{w}}" for n in names))
    for name, before, after, fmt in rows:
        print(f"{name:34s}{'' if before is None else fmt.format(before):>8}"
              + "".join(f"{fmt.format(a):>{w}}" for a in after))
    c = first["config"]
    same = "the same " if len(ms) > 1 else ""
    print(f"\nWhat this is: {' and '.join(names)} at {same}rate {c['lr']:g}, {same}steps "
          f"({c['max_iters']}) and {same}seed ({c['seed']}): one point of a rate axis.")
    print("What it is not: " + " ".join(summary_lines()))

def plot(ms, names, path):
    """Task accuracy and knowledge against step, and knowledge against task accuracy, per run."""
    from matplotlib.figure import Figure  # no pyplot: nothing to show, no backend to pick
    fig = Figure(figsize=(12, 3.6), dpi=100, layout="constrained")
    axes = fig.subplots(1, 3)
    first = ms[0]
    for m, name in zip(ms, names):
        steps = [p["stage"] * m["config"]["max_iters"] + p["iter"] for p in m["curve"]]
        acc = [p[f"{m['tasks'][p['stage']]}_acc"] for p in m["curve"]]
        facts = [p["fact_mc"] for p in m["curve"]]
        axes[0].plot(steps, acc, "o-", ms=3, label=name, color=color(name))
        axes[1].plot(steps, facts, "o-", ms=3, label=name, color=color(name))
        axes[2].plot(acc, facts, "o-", ms=3, label=name, color=color(name))
    for ax in axes[1:]:
        ax.axhline(first["fact_mc_before"], color="gray", ls="--", lw=1, label="pre-trained")
        ax.axhline(first["fact_chance"], color="gray", ls=":", lw=1, label="chance")
    kept, acc = "facts kept (multiple choice)", "task accuracy"
    for ax, (x, y) in zip(axes, (("step", acc), ("step", kept), (acc, kept))):
        ax.set(xlabel=x, ylabel=y, ylim=(-0.02, 1.02))
    axes[2].set_xlim(-0.02, 1.02)
    for ax in axes:
        ax.legend(fontsize=7)
    c = first["config"]
    fig.suptitle(f"{', '.join(first['tasks'])}: lr {c['lr']:g}, seed {c['seed']}, {c['max_iters']} "
                 "steps per task (upper right of the last panel is best)", fontsize=10)
    fig.savefig(path, metadata={"Software": None})

