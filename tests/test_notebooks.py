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
""",
    "02_forgetting.ipynb": """
assert set(FRONT) == set(sweep.FRONTIER)
for label, r in FRONT.items():  # every method produced a point at every learning rate
    assert len(r["mean"]) == len(SWEEPS["frontier"].lrs), label
    assert all(0 <= x <= 1 and 0 <= y <= 1 for x, y in r["mean"]), label
    assert set(r["frontier"]) <= set(r["mean"]), label
    for fx, fy in r["frontier"]:  # no point beats a frontier point in both coordinates
        assert not any(x >= fx and y >= fy and (x, y) != (fx, fy) for x, y in r["mean"]), label
assert set(FRONT600) == set(sweep.BUDGET) and all(len(r["mean"]) == len(SWEEPS["budget"].lrs) for r in FRONT600.values())
assert alpha_xy.shape == (len(sweep.ALPHAS), 2) and alphas == sorted(alphas)
assert DIST["frac_changed"]["mofo α=0.02"][0] < DIST["frac_changed"]["mofo α=1.0"][0]
assert set(ABL) == set(sweep.ABLATION)
for name in ("02_frontier", "02_alpha_sweep", "02_distance_vs_alpha", "02_filter_ablation"):
    assert (FIGURES / f"{name}.png").stat().st_size > 0
""",
    "03_continual.ipynb": """
assert set(RUNS) == set(sweep.CONTINUAL)
for label, m in RUNS.items():  # OP and BWT as defined, from the matrix
    r = R[label]
    assert r.shape == (len(TASKS), len(TASKS)), label
    assert np.isclose(OP[label], r[-1].mean()), label
    assert np.isclose(BWT[label], np.mean([r[-1, j] - r[j, j] for j in range(len(TASKS) - 1)])), label
assert (FIGURES / "03_accuracy_matrices.png").stat().st_size > 0
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
