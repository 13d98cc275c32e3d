"""What the main command prints and draws: runs side by side, along training and at the end.

The table puts each run's task accuracy and knowledge at every scored step next to each other,
then the end point against the pre-trained model; the figure draws the same curves, and knowledge
against task accuracy, where upper right is best. The lesson is in the difference between columns.
"""

def report(ms, names, curve_problems, curve_probes):
    """One table of runs side by side: along training (task accuracy, knowledge kept), then the end
    point against the pre-trained model. The lesson is in the difference between the columns."""
    first = ms[0]
    w = max(16, *(len(n) + 2 for n in names))
    print(f"\nalong training (each point: up to {curve_problems} held-out problems and "
          f"{curve_probes} facts)")
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
        line, = axes[0].plot(steps, acc, "o-", ms=3, label=name)
        axes[1].plot(steps, facts, "o-", ms=3, color=line.get_color())
        axes[2].plot(acc, facts, "o-", ms=3, color=line.get_color())
    for ax in axes[1:]:
        ax.axhline(first["fact_chance"], color="gray", ls=":", lw=1)
    axes[1].text(0, first["fact_chance"] + 0.02, "chance", color="gray", fontsize=8)
    kept, acc = "facts kept (multiple choice)", "task accuracy"
    for ax, (x, y) in zip(axes, (("step", acc), ("step", kept), (acc, kept))):
        ax.set(xlabel=x, ylabel=y, ylim=(-0.02, 1.02))
    axes[2].set_xlim(-0.02, 1.02)
    axes[0].legend(fontsize=8)
    c = first["config"]
    fig.suptitle(f"{', '.join(first['tasks'])}: lr {c['lr']:g}, seed {c['seed']}, {c['max_iters']} "
                 "steps per task (upper right of the last panel is best)", fontsize=10)
    fig.savefig(path, metadata={"Software": None})

