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
assert set(SEQ) == set(sweep.RECOVERY) and SWEEP.seeds and TASKS[0] == TASKS[-1]
for (label, seed), m in RUNS.items():  # the sequence's OP and BWT as defined, from each run's matrix
    r = np.array(m["R"])
    assert r.shape == (len(TASKS), len(TASKS)), label
    i = list(SWEEP.seeds).index(seed)
    assert np.isclose(OP[label][i], r[FOUR - 1, :FOUR].mean()), label
    assert np.isclose(BWT[label][i], np.mean([r[FOUR - 1, j] - r[j, j] for j in range(FOUR - 1)])), label
    assert m["config"]["lr"] == sweep.configs(SWEEP)[0][4].lr or label != "full"
    back, learn = REC[label][i]  # the recovery counts read the curve of stage 4 and stage 0
    assert learn is not None and learn <= STEPS  # the first stage ends at its own end accuracy at the latest
    c = stage_curve(m, len(TASKS) - 1)
    assert back is None or (c[c[:, 0] == back][0, 1] >= r[0, 0] and all(c[c[:, 0] < back][:, 1] < r[0, 0]))
for label, r in R.items():  # the drawn matrices are the means of the runs'
    assert np.allclose(r, np.mean([np.array(RUNS[label, s]["R"])[:, :FOUR] for s in SWEEP.seeds], 0))
for name in ("03_matrices", "03_recovery", "03_facts"):
    assert (FIGURES / f"{name}.png").stat().st_size > 0
assert not str(FIGURES).startswith(str(ROOT))  # quick mode leaves the repository alone
""",
    "04_scale.ipynb": """
assert list(PARAMS) == WIDTHS and list(PARAMS.values()) == sorted(PARAMS.values())  # growing
CFGS = {w: [c for *_, c in sweep.configs(s)] for w, s in SWEEPS.items()}  # every width: the same tokens
assert len({(c.pretrain_max_iters, c.pretrain_batch_size, c.block_size, c.max_iters) for cs in CFGS.values() for c in cs}) == 1
assert all(len({c.n_embd for c in cs}) == 1 for cs in CFGS.values()) and len({cs[0].n_embd for cs in CFGS.values()}) == len(WIDTHS)
assert {(label, c.lr) for w in SWEEPS for label, _, _, _, c in sweep.configs(SWEEPS[w])} == set(RATE.items())
for (label, acc), rows in KEPT.items():  # each plotted point: the mean of the runs' chosen points
    for w, mean, lo, hi, n in rows:
        s, r = DONE[w]
        pts = [p for by_seed in stats.matched(sweep.trained(s, r), acc)[label].values() for p in by_seed.values()]
        assert np.isclose(mean, np.mean([p["fact_mc"] for p in pts])) and n == len(s.seeds) == len(pts), (label, w)
        assert all(p["add_val_acc"] >= acc for p in pts), (label, w)
for w, (s, r) in DONE.items():  # the end verdict: MoFO's last points minus full's, paired by seed
    ends = {(label, seed): m["fact_mc_after"] for label, lr, seed, m in sweep.trained(s, r)}
    diffs = [ends["mofo alpha=0.1", seed] - ends["full", seed] for seed in s.seeds]
    assert np.isclose(VERDICT[w][-1][0], np.mean(diffs)) and VERDICT[w][-1][3] == len(s.seeds), w
for name in ("04_width_curves", "04_width"):
    assert (FIGURES / f"{name}.png").stat().st_size > 0
assert not str(FIGURES).startswith(str(ROOT))  # quick mode leaves the repository alone
""",
    "05_mofo_knobs.ipynb": """
assert set(F_PTS) == set(sweep.FILTERS) and set(A_CURVES) == set(A_SWEEP.methods)
for label, lr, seed, key, cfg in sweep.configs(F_SWEEP):  # every filter at α 0.1, the same rates
    assert cfg.alpha == 0.1 and cfg.filter == label.removeprefix("mofo-") and F_RESULTS[key]["config"]["lr"] == lr
assert len({(cfg.lr, cfg.max_iters) for *_, cfg in sweep.configs(F_SWEEP)}) == len(F_SWEEP.lrs)
for label, lr, seed, m in sweep.trained(F_SWEEP, F_RESULTS):  # the left panel: each run's end accuracy
    assert F_END[label][lr][list(F_SWEEP.seeds).index(seed)] == m["task_acc"], label
assert sum(map(len, F_PATH.values())) == sum(len(m["curve"]) - 1 for *_, m in sweep.trained(F_SWEEP, F_RESULTS))
for label, by_lr in F_PTS.items():  # the plotted means are the chosen points' means
    for lr, vals in per_seed(by_lr, "fact_mc").items():
        assert np.isclose(stats.interval(vals)[0], np.mean([p["fact_mc"] for p in by_lr[lr].values()]))
        assert all(p["add_val_acc"] >= AT for p in by_lr[lr].values()), label
for label, lr, seed, m in sweep.trained(A_SWEEP, A_RESULTS):  # the right panel is the runs' last points
    assert A_ENDS[label]["fact_mc"][list(A_SWEEP.seeds).index(seed)] == m["fact_mc_after"], label
    assert m["config"]["lr"] == A_SWEEP.lrs[0] and (label == "full" or m["config"]["alpha"] == ALPHA_OF[label])
assert all(np.allclose(A_CURVES[label][-1], [np.mean(A_ENDS[label]["add_acc"]), np.mean(A_ENDS[label]["fact_mc"])])
           for label in A_CURVES)
for name in ("05_filters", "05_alpha"):
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


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_the_committed_outputs_are_clean(name):
    """No error, no warning that the results are older than the code, no missing file and no path
    of the machine that ran it in what a reader sees without running anything."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    for c in nb.cells:
        for o in c.get("outputs", []):
            assert o.get("output_type") != "error", c.source[:80]
            text = o.get("text", "") + "".join(v for k, v in o.get("data", {}).items() if k.startswith("text/"))
            for bad in ("WARNING", "Warning", "not present", "No such file", "/tmp/", "/home/", "/root/", "/work/"):
                assert bad not in text, (bad, c.source[:80])
