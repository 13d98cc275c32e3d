"""Tests for theory/: the GD-MoFO bound holds on the grid, and the checks can fail."""
import math

import numpy as np
import pytest
import sympy as sp
import torch

from theory.adam import adam_mofo_trajectories
from theory.check import (RTOL, GridConfig, bound_curve, check_run, floor_rounded_step,
                          floor_vs_ceil, negative_control, run_config, run_grid)
from theory.gd import gd_mofo_step_, initial_point, partition, run_gd_mofo
from theory.losses import logistic, make_loss, quadratic, robust_regression, symbolic_loss

NAMES = ("quadratic", "logistic", "robust")
VIOLATIONS = ("lemma_violations", "descent_violations", "monotone_violations", "bound_violations")


@pytest.fixture(scope="module")
def grid():
    return GridConfig(), run_config(GridConfig())


def test_full_grid_has_no_violations_inside_the_theorem(grid):
    cfg, rows = grid
    # the grid is the one promised: every α, η·L, loss, dimension and partition kind occurs
    assert {r["alpha"] for r in rows} == set(cfg.alphas) == {0.01, 0.05, 0.1, 0.25, 0.5, 1.0}
    assert {r["eta_L"] for r in rows} == set(cfg.eta_factors) == {0.1, 0.5, 1.0, 1.5, 1.9}
    assert {r["loss"] for r in rows} == set(NAMES)
    assert {r["partition"] for r in rows} == {"one", "several", "entry"}
    assert {r["d"] for r in rows} == {10, 100, 1000}
    assert all(r["runs"] == len(cfg.seeds) >= 2 for r in rows)
    for r in rows:
        assert [r[k] for k in VIOLATIONS] == [0, 0, 0, 0], r
        assert r["saved_by_tolerance"] == 0, r       # RTOL decided nothing
        assert r["worst_lemma_slack"] >= 0 and r["worst_descent_slack"] >= 0, r
        assert 0 < r["max_tightness"] <= 1, r


def test_negative_control_eta_above_2_over_L_is_detected():
    rows = {r["alpha"]: r for r in negative_control(alphas=(0.1, 1.0))}
    plain = rows[1.0]
    assert plain["monotone_violations"] > 0 and plain["f_growth"] > 1e3    # f blows up
    # for η > 2/L the bound's right side is negative: the same check flags every T
    assert all(r["bound_violations"] == r["runs"] * 100 for r in rows.values())
    # the smoothness inequality itself holds for any η; the check must not flag it
    assert all(r["descent_violations"] == 0 for r in rows.values())


def test_gd_mofo_alpha_one_is_plain_gd():
    rng = np.random.default_rng(0)
    theta = [torch.from_numpy(rng.standard_normal((5, 7))), torch.from_numpy(rng.standard_normal(9))]
    grads = [torch.from_numpy(rng.standard_normal((5, 7))), torch.from_numpy(rng.standard_normal(9))]
    expected = [t - 0.1 * g for t, g in zip(theta, grads)]
    gd_mofo_step_(theta, grads, lr=0.1, alpha=1.0)
    for t, e in zip(theta, expected):
        assert t.dtype == torch.float64 and torch.equal(t, e)


def test_gd_mofo_uses_ceil_and_keeps_an_alpha_share_of_the_norm():
    rng = np.random.default_rng(1)
    g = torch.from_numpy(rng.standard_normal((10, 10)))
    theta = torch.zeros(10, 10, dtype=torch.float64)
    gd_mofo_step_([theta], [g], lr=1.0, alpha=0.123)  # ceil(12.3) = 13 entries, not 12
    moved = theta != 0
    assert int(moved.sum()) == 13
    assert torch.equal(moved, g.abs() >= torch.topk(g.abs().reshape(-1), 13).values[-1])
    assert float((g * moved).pow(2).sum()) >= 0.123 * float(g.pow(2).sum())


@pytest.mark.parametrize("name", NAMES)
def test_alpha_one_is_plain_gd_bitwise(name):
    loss = make_loss(name, 30)
    eta, steps = 1.5 / loss.L, 40
    theta0 = initial_point(30, seed=3)
    theta, f_ref = theta0.copy(), []
    for _ in range(steps):
        f, g = loss.value_and_grad(theta)
        f_ref.append(f)
        theta = theta - eta * g
    for kind in ("one", "several"):
        run = run_gd_mofo(loss, theta0, partition(30, kind), 1.0, eta, steps)
        assert np.array_equal(run["theta"], theta)
        assert np.array_equal(run["f"][:-1], f_ref)


@pytest.mark.parametrize("d", [10, 100])
def test_quadratic_L_from_sympy_is_the_largest_hessian_eigenvalue(d):
    loss = quadratic(d, kappa=1000)
    for seed in (0, 1):
        eig = np.linalg.eigvalsh(loss.hessian(initial_point(d, seed)))
        assert math.isclose(eig[-1], loss.L, rel_tol=1e-10)
        assert math.isclose(eig[0], 1.0, rel_tol=1e-8)          # κ^0: f* = 0 is the minimum
    assert loss.L == 1000 and loss.f_star == 0 and loss.f_star_exact


def test_logistic_L_is_lambda_max_over_4n():
    n, d = 100, 20
    loss = logistic(d, n=n)
    X = loss.A                                                      # rows y_j x_j, y_j = ±1
    assert math.isclose(loss.L, np.linalg.eigvalsh(X.T @ X)[-1] / (4 * n), rel_tol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_L_bounds_the_hessian_and_f_star_bounds_f(name):
    loss = make_loss(name, 20)
    rng = np.random.default_rng(0)
    for scale in (0.1, 1.0, 10.0):
        theta = scale * rng.standard_normal(20)
        eig = np.linalg.eigvalsh(loss.hessian(theta))
        assert np.max(np.abs(eig)) <= loss.L * (1 + 1e-12)
        assert loss.value(theta) >= loss.f_star
    if name == "robust":  # non-convex: some Hessian eigenvalue is negative at θ0
        assert np.linalg.eigvalsh(loss.hessian(initial_point(20, 0)))[0] < 0


@pytest.mark.parametrize("build", [lambda: quadratic(4), lambda: logistic(4, n=6),
                                   lambda: robust_regression(4, m=6)], ids=NAMES)
def test_vectorised_formulas_match_sympy_on_the_whole_loss(build):
    loss = build()   # few rows: sympy differentiates the whole expanded sum
    theta, f = symbolic_loss(loss)
    grad = sp.lambdify(theta, [sp.diff(f, t) for t in theta], "numpy")
    hess = sp.lambdify(theta, sp.hessian(f, theta), "numpy")
    value = sp.lambdify(theta, f, "numpy")
    x = initial_point(4, 5)
    np.testing.assert_allclose(loss.value(x), value(*x), rtol=1e-12)
    np.testing.assert_allclose(loss.grad(x), grad(*x), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(loss.hessian(x), np.array(hess(*x), dtype=float), rtol=1e-10,
                               atol=1e-12)


def test_floor_rounding_breaks_the_lemma_and_ceil_does_not():
    fc = floor_vs_ceil(n=10, alpha=0.25)
    assert (fc["k_floor"], fc["k_ceil"]) == (2, 3)
    assert fc["share_floor"] < 0.25 <= fc["share_ceil"]


def test_loosened_mask_is_caught_by_the_lemma_check():
    loss = make_loss("quadratic", 10)
    rows = run_grid([loss], lambda _: ["several"], [0.25, 0.5], [1.0], [0], 50,
                    step=floor_rounded_step)
    assert all(r["lemma_violations"] > 0 and r["worst_lemma_slack"] < 0 for r in rows)


@pytest.mark.parametrize("L_scale", [0.5, 0.9])
def test_too_small_L_is_caught(L_scale):
    # the run and the check both believe in L_scale·L, as they would with a mis-derived L
    loss = make_loss("quadratic", 10)
    rows = run_grid([loss], lambda _: ["one"], [1.0, 0.5], [1.9], [0, 1], 100, L_scale=L_scale)
    assert sum(r["descent_violations"] for r in rows) > 0


def test_check_run_counts_a_fabricated_violation_of_each_kind():
    # one block, α = 0.5, η = 1, L = 1 (so η(1 − Lη/2) = 0.5), three steps
    run = {"f": np.array([10.0, 9.0, 9.5, 1.0]),
           "grad_sq": np.array([20.0, 20.0, 20.0, 20.0]),
           "block_grad_sq": np.array([[4.0], [4.0], [4.0]]),
           "block_filt_sq": np.array([[2.0], [1.0], [4.0]])}   # step 1 keeps only a 0.25 share
    r = check_run(run, alpha=0.5, eta=1.0, L=1.0, f_star=0.0)
    assert r["lemma_violations"] == 1                          # 1.0 < 0.5 · 4
    assert r["descent_violations"] == 1                        # 9.5 > 9 − 0.5 · 1
    assert r["monotone_violations"] == 1
    np.testing.assert_allclose(r["bound"], 10 / (0.5 * 0.5 * np.arange(1, 4)))
    assert r["bound_violations"] == 1                          # only T = 3: 20 > 40/3
    assert r["saved_by_tolerance"] == 0
    # a violation smaller than RTOL is round-off: passed, but counted as saved
    run["f"] = np.array([10.0, 9.0, 9.0 * (1 + RTOL / 10), 8.0])
    run["block_filt_sq"] = np.array([[2.0], [2.0], [2.0]])
    r = check_run(run, alpha=0.5, eta=1e-30, L=1.0, f_star=0.0)
    assert r["monotone_violations"] == 0 and r["saved_by_tolerance"] >= 1


def test_bound_curve_returns_plot_arrays():
    r = bound_curve(make_loss("logistic", 10), alpha=0.1, eta_times_L=1.0, steps=30)
    assert r["T"].tolist() == list(range(1, 31))
    assert r["min_grad_sq"].shape == r["bound"].shape == r["tightness"].shape == (30,)
    assert np.all(np.diff(r["min_grad_sq"]) <= 0) and np.all(r["min_grad_sq"] <= r["bound"])


def test_adam_mofo_converges_and_small_alpha_stays_closer_to_theta0():
    for name in NAMES:
        tr = adam_mofo_trajectories(make_loss(name, 50), alphas=(0.05, 1.0), lr=0.01, steps=300)
        assert tr["f"].shape == tr["grad_norm"].shape == tr["dist"].shape == (2, 301)
        assert np.all(tr["f"][:, -1] < tr["f"][:, 0])                 # both make progress
        assert tr["dist"][0, -1] < tr["dist"][1, -1]                  # α = 5% travels less
        assert tr["moved_fraction"][0] < tr["moved_fraction"][1] == 1.0
        assert np.all(tr["dist"][:, 0] == 0)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="name"):
        make_loss("cubic", 10)
    with pytest.raises(ValueError, match="kind"):
        partition(10, "two")
    with pytest.raises(ValueError, match="alpha"):
        bound_curve(make_loss("quadratic", 10), alpha=0.0, eta_times_L=1.0)
    with pytest.raises(ValueError, match="blocks"):
        run_gd_mofo(make_loss("quadratic", 10), np.zeros(10), [3, 3], 0.5, 1e-3, 5)
    with pytest.raises(ValueError, match="d must be"):
        quadratic(1)
