"""Run every notebook top to bottom in quick mode and check the arrays behind its plots.

The checks are appended as extra cells to an in-memory copy, so they see the notebook's own
variables; the committed notebooks (with their full-mode outputs) are not touched.
"""
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"

CHECKS = {
    "01_convergence.ipynb": """
for key, r in CURVES.items():  # the bound lies above the measured curve at every T
    assert np.all(r["min_grad_sq"] <= r["bound"] * (1 + 1e-9)), key
    assert r["lemma_violations"] == r["descent_violations"] == r["bound_violations"] == 0, key
assert 0 < TIGHTNESS.max() <= 1
assert sum(r["bound_violations"] + r["monotone_violations"] for r in NEG) > 0  # the control is caught
assert next(r for r in NEG if r["alpha"] == 1.0)["f_growth"] > 1               # plain GD blows up
assert ADAM["grad_norm"].shape == ADAM["dist"].shape and ADAM["grad_norm"].shape[0] == len(ADAM["alphas"])
assert np.all(np.diff(ADAM["dist"][:, -1]) > 0)   # larger α travels further from θ0
assert ADAM["moved_fraction"][-1] == 1.0
for r in AGRID + ACTRL:  # the Adam-MoFO bound: every lemma at every step, the bound at every T
    assert all(r[k] == 0 for k in VIOL), {k: r[k] for k in VIOL if r[k]}
    assert np.all(r["min_q"] <= r["mean_q"] * (1 + 1e-12)) and np.all(r["mean_q"] <= r["R"])
    assert r["T"].shape == r["mean_q"].shape == r["R"].shape == r["min_q"].shape
assert {r["loss"] for r in AGRID} == {"logcosh", "logistic", "robust"} and len(AGRID) == 36
assert all(ab.falling(r) for r in AGRID if r["eta"] == 0.3)       # inside: it falls
outside = [r for r in ACTRL if r["beta2"] < r["beta1"] ** 2 and r["alpha"] == 1.0]
inside = [r for r in ACTRL if r["beta2"] > r["beta1"] ** 2 and r["alpha"] == 1.0]
assert outside and inside and not any(ab.falling(r) for r in outside)  # the control is caught
assert all(ab.falling(r) for r in inside) and all(r["R"][-1] > 1e80 for r in outside)
assert set(SLOPES) >= {"η = 0.01", "η = 0.1", "η = 0.3", "control outside, α ≥ 0.5", "control inside"}
assert all(s.ndim == 2 and s.shape[1] == 2 and np.all(np.isfinite(s)) for s in SLOPES.values())
assert np.all(SLOPES["control outside, α ≥ 0.5"][:, 0] > SLOPES["control inside"][:, 0].max())
assert len(SLOPES["η = 0.3"]) == sum(r["eta"] == 0.3 for r in AGRID) == 12
assert (FIGURES / "01_adam_bound.png").stat().st_size > 0
assert not str(FIGURES).startswith(str(ROOT))  # quick mode leaves the repository alone
""",
    "02_forgetting.ipynb": """
s, r = DONE["axis"]
assert s.seeds and set(CURVES) >= set(s.methods) and RATES == sorted(s.lrs)
for label, lr, seed, m in sweep.trained(s, r):  # every curve point scores every fact and the validation problems
    assert all({"fact_mc", "add_acc", "add_val_acc", "dist_abs"} <= p.keys() for p in m["curve"]), label
    assert m["curve"][-1]["fact_mc"] == m["fact_mc_after"], label
for label, by_lr in CURVES.items():  # the drawn curve is the mean over seeds of the runs' points
    for lr, c in by_lr.items():
        runs = [m["curve"] for l, r_, _, m in sweep.trained(s, r) if (l, r_) == (label, lr)]
        assert c.shape == (len(runs[0]), 2), label
        assert np.allclose(c[:, 1], np.mean([[p["fact_mc"] for p in run] for run in runs], 0)), label
assert set(PTS) == set(s.methods) | {"full + wise", "full + lines"}
for label, by_lr in PTS.items():  # each chosen point reaches 90 % on validation, and is the nearest θ0 that does
    for by_seed in by_lr.values():
        assert all(p is None or p["add_val_acc"] >= AT for p in by_seed.values()), label
assert DIST.ndim == 2 or len(DIST) == 0
assert DELTA["mofo"].shape == DELTA["full"].shape == tuple(THETA0[MATRIX].shape)
assert FRACTION["full"] > FRACTION["mofo"] > 0  # MoFO moved fewer entries of the matrix than full fine-tuning
for lr, by_name in PULLED.items():  # the pulled-back points: each the mean of the seeds' own
    runs = [m for label, lr_, seed, m in sweep.trained(s, r) if label == "full" and lr_ == lr]
    assert set(by_name) == {"end", *runs[0]["pullback"]}
    assert np.allclose(by_name["end"], np.mean([(m["curve"][-1]["add_val_acc"], m["fact_mc_after"]) for m in runs], 0))
    assert np.allclose(TRAINED[lr][-1], by_name["end"]) and TRAINED[lr].shape == (len(runs[0]["curve"]), 2)
assert set(HANDLES) == set(CURVES) | {"pre-trained", "chance"}  # every method's line is in the legend
for name in ("02_curves", "02_per_rate", "02_distance", "02_pullback", "02_mask"):
    assert (FIGURES / f"{name}.png").stat().st_size > 0
assert not str(FIGURES).startswith(str(ROOT))  # quick mode leaves the repository alone
""",
    "03_continual.ipynb": """
assert {label for label, _ in SUMMARY} == set(sweep.CONTINUAL)
for label, lr, seed, m in sweep.trained(SWEEP, RESULTS):  # OP and BWT as defined, from each run's matrix
    r = np.array(m["R"])
    assert r.shape == (len(TASKS), len(TASKS)), label
    assert np.isclose(m["OP"], r[-1].mean()), label
    assert np.isclose(m["BWT"], np.mean([r[-1, j] - r[j, j] for j in range(len(TASKS) - 1)])), label
for (label, lr), row in SUMMARY.items():  # the table's means are the runs' means
    ops = [m["OP"] for l, r_, s, m in sweep.trained(SWEEP, RESULTS) if (l, r_) == (label, lr)]
    assert np.isclose(row["OP"][0], np.mean(ops)) and row["n_seeds"] == len(ops), label
for (fam, y), front in FRONTS.items():  # every front point is a configuration's mean, none dominated
    pts = [(r["OP"][0], r[y][0]) for (label, _), r in SUMMARY.items() if sweep.family(label) == fam]
    assert set(front) <= set(pts) and front, fam
assert set(R) == set(sweep.CONTINUAL)
assert {label for label, _ in LOW} == set(sweep.CONTINUAL_LOW) and LOW_SWEEP.seeds
for label, lr, seed, m in sweep.trained(LOW_SWEEP, LOW_RESULTS):  # the low-rate runs: the same definitions
    r = np.array(m["R"])
    assert np.isclose(m["OP"], r[-1].mean()) and m["config"]["max_iters"] == low_first["config"]["max_iters"], label
assert set(PAIRS) == {sweep.family(label) for label in sweep.CONTINUAL_LOW}  # every family beside its high-rate run
assert all(hi[0][1] == LR and PAIRS[f][1][1] is LOW[lo[0]] for f, (hi, lo) in PAIRS.items())
assert len(R_LOW) == len(LOW)
for name in ("03_op_bwt", "03_accuracy_matrices", "03_low_rates", "03_low_rate_matrices"):
    assert (FIGURES / f"{name}.png").stat().st_size > 0
assert not str(FIGURES).startswith(str(ROOT))  # quick mode leaves the repository alone
""",
    "04_scale.ipynb": """
assert len(set(PARAMS.values())) == 3 and list(PARAMS.values()) == sorted(PARAMS.values())  # three sizes, growing
assert set(FAMILIES) == {sweep.family(label) for label in sweep.SCALE}
for (fam, a), pts in SCALE.items():  # the plotted means are the summary's, at the model's parameter count
    for w in SWEEPS:
        ms = FRONT[w][fam]["at"][a][0]
        assert (ms is None) == all(p[0] != PARAMS[w] for p in pts), (fam, a, w)
assert FIT and all((fam, "all") in FIT for fam, _ in FIT)  # a line per method and size, and pooled
for (fam, w), (slope, icpt, r, n) in FIT.items():
    assert n > 2 and np.isfinite(slope) and (-1 <= r <= 1 or np.isnan(r)), (fam, w)  # nan: flat (toy) knowledge
for fam in {f for f, _ in FIT}:  # the pooled fit has every size's points
    assert sum(FIT[f, w][3] for f, w in FIT if f == fam and w != "all") == FIT[fam, "all"][3], fam
assert set(T_SWEEPS) == set(SWEEPS) and set(T_FAMILIES) == {sweep.family(label) for label in sweep.TOKENS}
T_CFGS = {w: [c for *_, c in sweep.configs(sw)] for w, sw in T_SWEEPS.items()}  # every width: the same tokens
assert len({(c.pretrain_max_iters, c.pretrain_batch_size, c.block_size, c.max_iters) for cs in T_CFGS.values() for c in cs}) == 1
assert all({c.n_embd for c in T_CFGS[w]} == {sweep.configs(SWEEPS[w])[0][4].n_embd} for w in T_SWEEPS)  # the widths above
assert any(T_SCALE.values())  # something is drawn (a check of no points could not fail)
for (fam, a), pts in T_SCALE.items():  # the plotted shares are the summary's means over what that width knew
    for w in T_SWEEPS:
        assert (T_FRONT[w][fam]["at"][a][0] is None) == all(p[0] != PARAMS[w] for p in pts), (fam, a, w)
    for p in pts:
        w = next(w for w in T_SWEEPS if PARAMS[w] == p[0])
        assert (p[1], p[2]) == T_FRONT[w][fam]["at"][a][0] and np.isclose(p[3], p[1] / T_BEFORE[w]), (fam, a, w)
for name in ("04_scale", "04_loss_vs_forgetting", "04_scale_tokens"):
    assert (FIGURES / f"{name}.png").stat().st_size > 0
assert not str(FIGURES).startswith(str(ROOT))  # quick mode leaves the repository alone
""",
    "05_mofo_knobs.ipynb": """
assert set(FRONT_F) == {sweep.family(label) for label in sweep.ABLATION}
assert set(FRONT_A) == {sweep.family(label) for label in sweep.ALPHAS}
for rows, name in ((FRONT_F, "ablation"), (FRONT_A, "alpha")):  # each seed's envelope: a Pareto front of its runs
    curves = sweep.curves(SWEEPS[name], RESULTS[name])
    for fam, r in rows.items():
        assert r["n_runs"] == r["n_configs"] * r["n_seeds"] == len(SWEEPS[name].lrs) * len(SWEEPS[name].seeds), fam
        for seed, front in r["fronts"].items():
            pts = [sweep.xy_of(p) for _, _, c in curves[fam][seed] for p in c]
            assert front and set(front) <= set(pts), fam
            assert not any(x >= fx and y >= fy and (x, y) != (fx, fy) for fx, fy in front for x, y in pts), fam
assert set(KEPT) == {0.5, 0.8} and all(k.shape == (len(ALPHA_OF), 3) for k in KEPT.values())
assert sorted(KEPT[0.8][:, 0]) == sorted(ALPHA_OF.values())
assert EQUAL and all(diff == [] for diff in EQUAL.values())  # α = 1 is full fine-tuning, every field
assert BY["mofo-α0.5", 0]["curve"] != BY["full", 0]["curve"]  # the comparison tells other runs apart
for name in ("05_filters", "05_alpha"):
    assert (FIGURES / f"{name}.png").stat().st_size > 0
assert not str(FIGURES).startswith(str(ROOT))  # quick mode leaves the repository alone
""",
    "06_rates.ipynb": """
assert set(FRONT) == set(sweep.RATES) and SWEEP.seeds and set(RESULTS) <= set(ALL)
for fam, r in FRONT.items():  # every family tuned over the same rates
    assert r["n_configs"] == len(SWEEP.lrs) and r["n_runs"] == len(SWEEP.lrs) * len(SWEEP.seeds), fam
assert set(PER_RATE) == set(SWEEP.lrs) and all(r["n_configs"] == 1 for rows in PER_RATE.values() for r in rows.values())
for label, lr, seed, key, cfg in sweep.configs(SWEEP):  # the grid as stated: LoRA at 4x, q and v for lora-qv
    assert cfg.lr == lr * {"lora-r1": 0.5}.get(label, 4 if cfg.method == "lora" else 1) and cfg.max_iters == STEPS, label
    assert (cfg.lora_targets == "qv") == (label == "lora-qv") and RESULTS[key]["config"]["lr"] == cfg.lr, label
for fam in FRONT:  # the right-hand panel is the runs' end-point task accuracy
    runs = [m["task_acc"] for l, lr, s, m in sweep.trained(SWEEP, RESULTS) if sweep.family(l) == fam and lr == LOW]
    assert np.isclose(FINAL[fam][LOW], np.mean(runs)), fam
assert set(TRANS) == set(sweep.RATES)
assert set(BY_BUDGET[LONG_STEPS]) == set(BY_BUDGET[STEPS]) == {sweep.family(k) for k in sweep.SWEEPS["rates_long"].methods}
short = {(label, seed): cfg for label, lr, seed, key, cfg in sweep.configs(SHORT_SWEEP)}
for label, lr, seed, key, cfg in sweep.configs(LONG_SWEEP):  # the rates sweep's lowest rate, twice its steps, nothing else
    assert cfg.max_iters == 2 * STEPS and key not in RESULTS and LONG_RESULTS[key]["config"]["max_iters"] == 2 * STEPS, label
    assert replace(cfg, max_iters=STEPS, run_name="") == replace(short[label, seed], run_name=""), label
for n, (sw, res) in BUDGET.items():  # each budget's table row is its own runs' mean end accuracy
    for fam in BY_BUDGET[n]:
        runs = [m["task_acc"] for l, _, _, m in sweep.trained(sw, res) if sweep.family(l) == fam]
        assert len(runs) == len(LONG_SWEEP.seeds) and np.isclose(END[n][fam], np.mean(runs)), (n, fam)
for name in ("06_frontier", "06_per_rate", "06_low_rate_curves", "06_long_budget"):
    assert (FIGURES / f"{name}.png").stat().st_size > 0
assert not str(FIGURES).startswith(str(ROOT))  # quick mode leaves the repository alone
""",
}


def test_every_notebook_is_checked():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(CHECKS)


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_notebook_runs_in_quick_mode(name, monkeypatch):
    monkeypatch.setenv("CI", "1")  # quick mode; the kernel inherits the environment
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(CHECKS[name]))
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    assert not any(o.get("output_type") == "error" for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    drawing = [c for c in nb.cells if c.cell_type == "code" and 'save(fig, "' in c.source]  # a cell that saves a figure
    assert drawing and all(any("image/png" in o.get("data", {}) for o in c.outputs) for c in drawing), \
        "a figure is saved but not shown: opened in Jupyter, the notebook would show no plot"


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_the_committed_notebook_shows_its_figures(name):
    """Opened in Jupyter without running anything, every cell that draws a figure shows it."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    drawing = [c for c in nb.cells if c.cell_type == "code" and 'save(fig, "' in c.source]
    assert drawing
    for c in drawing:
        assert any("image/png" in o.get("data", {}) for o in c.outputs), c.source[:80]
