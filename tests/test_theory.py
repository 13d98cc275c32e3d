"""Tests for theory/: the GD-MoFO bound holds on the grid, and the checks can fail."""
import dataclasses
import math

import numpy as np
import pytest
import sympy as sp
import torch

from theory.adam import adam_mofo_trajectories
from theory.check import (RTOL, GridConfig, bound_curve, check_run, floor_rounded_step,
                          floor_vs_ceil, negative_control, run_config, run_grid, step_curvature)
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


@pytest.fixture(scope="module")
def control():
    # L_assumed = L/2 = 500 and η = 1.5/L_assumed = 0.003: inside the theorem for L_assumed,
    # outside it for the true L = 1000 (η·L = 3); quadratic, d = 100, one block, seeds 0 and 1
    return {r["alpha"]: r for r in negative_control(alphas=(0.1, 0.25, 1.0))}


@pytest.mark.parametrize("alpha", [0.25, 1.0])
def test_negative_control_fires_with_a_positive_right_side(control, alpha):
    r = control[alpha]
    assert r["L_assumed"] < r["L_true"] and r["eta"] * r["L_assumed"] < 2 < r["eta_L_true"]
    # the left side exceeds a positive right side at T = 100, by far more than round-off
    for lhs, rhs in zip(r["lhs"], r["rhs"]):
        assert lhs > 10 * rhs > 0
    # the descent inequality with L_assumed fails at the very first step, in both seeds ...
    assert r["first_descent_violation"] == [0, 0]
    # ... and the bound from an early T on, for good: at every later T as well
    firsts = r["first_bound_violation"]
    assert all(T is not None and T <= 10 for T in firsts)
    assert r["bound_violations"] == sum(r["steps"] - T + 1 for T in firsts)
    assert r["f_growth"] > 1e10                      # the run diverges: f grew by > 10¹⁰
    # the filter lemma is not what failed: the assumption that broke is L
    assert r["lemma_violations"] == 0


def test_negative_control_curvature_explains_the_descent_failures(control):
    # the descent inequality with L holds at step t exactly when the curvature met κ_t ≤ L
    for r in control.values():
        for c in r["control"]:
            kappa = step_curvature(c, r["eta"])
            assert int(np.sum(kappa > r["L_assumed"])) == c["descent_violations"]
            assert np.all(kappa <= r["L_true"] * (1 + 1e-9))    # never above the true L
    assert control[1.0]["max_curvature"] == pytest.approx(control[1.0]["L_true"], rel=1e-9)


def test_negative_control_honest_case_holds(control):
    # the same loss, α and seeds with η = 1.5/L_true, checked with the true L: nothing fails
    for r in control.values():
        assert r["honest_violations"] == 0 and 0 < r["honest_max_tightness"] <= 1
        for h in r["honest"]:
            assert np.all(h["bound"] > 0) and np.all(h["min_grad_sq"] <= h["bound"])


def test_negative_control_at_small_alpha_does_not_fire(control):
    # observed, not proved: at α = 0.1 no filtered step met curvature above L_assumed, so the
    # descent inequality with L_assumed held everywhere and the run converged; the control
    # fires only where the steps reach the curvature the wrong L leaves out (theory/README.md)
    r = control[0.1]
    assert r["descent_violations"] == r["bound_violations"] == 0
    assert r["max_curvature"] < r["L_assumed"] and r["f_growth"] < 1


def test_check_refuses_a_step_outside_eta_below_2_over_L():
    # for η ≥ 2/L the right side is ≤ 0: any run would "violate" it, which proves nothing
    loss = make_loss("quadratic", 10)
    for c in (2.0, 2.1):
        with pytest.raises(ValueError, match="below 2"):
            bound_curve(loss, alpha=0.5, eta_times_L=c, steps=5)


def test_gd_mofo_alpha_one_is_plain_gd():
    rng = np.random.default_rng(0)
    theta = [torch.from_numpy(rng.standard_normal(shape)) for shape in ((5, 7), 9)]
    grads = [torch.from_numpy(rng.standard_normal(shape)) for shape in ((5, 7), 9)]
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


def test_the_theorem_covers_the_gd_variant_not_mofo_as_implemented():
    # theory/README.md: the GD theorem's filter ranks |g| and keeps ⌈α n⌉ entries; mofo.MoFO ranks
    # |m| and keeps max(1, ⌊α n⌋). Here n = 10, α = 0.25: 3 entries against 2, and at step 2 the
    # largest |m| (entries 0, 1, from step 1's gradient) are not the largest |g| (entries 2-4).
    from mofo import MoFO
    g1 = torch.tensor([[10.0, 10.0, 0, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.float64)
    g2 = torch.tensor([[0, 0, 1.0, 1.0, 1.0, 0, 0, 0, 0, 0]], dtype=torch.float64)
    p = torch.zeros(1, 10, dtype=torch.float64, requires_grad=True)
    opt = MoFO([p], lr=0.1, alpha=0.25)            # β1 = 0.9: m_2 = 0.09·g1 + 0.1·g2
    for g in (g1, g2):
        before = p.detach().clone()
        p.grad = g.clone()
        opt.step()
    moved_mofo = (p.detach() != before)[0]
    assert moved_mofo.tolist() == [True, True] + [False] * 8
    theta = torch.zeros(1, 10, dtype=torch.float64)
    gd_mofo_step_([theta], [g2], lr=0.1, alpha=0.25)
    assert (theta != 0)[0].tolist() == [False, False, True, True, True] + [False] * 5


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


# ----- The Adam-based MoFO with η_t = η/√t and its explicit bound (theory/adam_bound.py)

from theory import adam_bound as ab

BOUNDED = ("logcosh", "logistic", "robust")
BOUND_VIOLATIONS = tuple(f"{c}_violations" for c in (
    "gradient_bound", "rho", "c", "lag", "kept", "smooth", "one_step", "bound", "corollary"))
SMALL = ab.AdamGridConfig(dims=(10,), alphas=(0.1, 0.5, 1.0),
                          betas=((0.0, 0.999), (0.9, 0.999), (0.99, 0.999)), etas=(0.01, 0.3),
                          seeds=(0,), steps=300)


@pytest.mark.parametrize("alpha", [0.1, 0.34, 1.0])
@pytest.mark.parametrize("fast", [True, False])
def test_analysed_algorithm_is_mofo_under_a_one_over_sqrt_t_schedule(alpha, fast):
    # each on its own trajectory for 300 steps: the same θ to float64 round-off, the same masks
    loss = ab.bounded_loss("robust", 30)
    worst, mismatched = ab.compare_with_mofo(loss, partition(30, "several"), alpha, 0.9, 0.99,
                                             0.1, 300, fast=fast)
    assert worst < 1e-13 and mismatched == 0


def test_analysed_step_moves_exactly_k_entries_per_block_and_alpha_one_is_adam():
    rng = np.random.default_rng(0)
    theta, grad = rng.standard_normal((2, 10)), rng.standard_normal((2, 10))
    zeros = np.zeros((2, 10))
    new, m, v, mask = ab.adam_mofo_step(theta, zeros, zeros, 1, grad, 0.1, 0.9, 0.999, 1e-8,
                                        [0.25, 1.0], [4, 6])
    assert mask[0, :4].sum() == 1 and mask[0, 4:].sum() == 1      # max(1, ⌊0.25·n⌋) = 1 per block
    assert mask[0, :4][np.argmax(np.abs(grad[0, :4]))]            # the largest |m| = (1−β1)|g|
    assert np.array_equal(new[0] != theta[0], mask[0]) and mask[1].all()
    adam = theta[1] - 0.1 * grad[1] / (np.abs(grad[1]) + 1e-8)    # Adam's first step: ≈ sign(g)
    np.testing.assert_allclose(new[1], adam, rtol=1e-14)


def test_constants_are_the_formulas_they_stand_for():
    steps, eta, b1, b2 = 40, 0.1, 0.9, 0.99
    k = ab.constants(steps, eta, b1, b2)
    for t in (1, 2, 7, 40):
        s = np.arange(1, t + 1)
        a = (1 - b1) * b1 ** (t - s) / (1 - b1**t)                 # weights of m̂_t
        b = (1 - b2) * b2 ** (t - s) / (1 - b2**t)                 # weights of v̂_t
        assert math.isclose(k["rho"][t - 1], math.sqrt(np.sum(a**2 / b)), rel_tol=1e-12)
        assert math.isclose(k["c"][t - 1], math.sqrt(1 / b[-1]), rel_tol=1e-12)
        eta_r, rho_r = eta / np.sqrt(s), k["rho"][:t]
        B = sum(a[i] * np.sum(eta_r[i:t - 1] * rho_r[i:t - 1]) for i in range(t))
        assert math.isclose(k["B"][t - 1], B, rel_tol=1e-12, abs_tol=1e-15)
    assert k["rho"][0] == k["c"][0] == 1 and k["B"][0] == 0        # m̂_1 = g_1, v̂_1 = g_1²
    # ρ_t tends to (1−β1)/√((1−β2)(1−β1²/β2)) exactly when β1² < β2, and explodes otherwise
    inside = ab.constants(20000, eta, b1, b2)["rho"][-1]
    assert math.isclose(inside, (1 - b1) / math.sqrt((1 - b2) * (1 - b1**2 / b2)), rel_tol=1e-9)
    assert ab.constants(2000, eta, 0.999, 0.9)["rho"][-1] > 1e40


def test_bound_rhs_falls_like_log_T_over_sqrt_T():
    k = ab.constants(200000, 0.1, 0.5, 0.99)
    R, R_inf = ab.rhs(10.0, 2.0, 1.0, 10, 1e-8, k)
    T = np.arange(1, 200001)
    # √T R_T / log T levels off: its growth over the last decade is far below √T's (×3.16)
    ratio = R * np.sqrt(T) / np.log(T + 1.0)
    assert ratio[-1] / ratio[19999] < 1.2 and np.all(R_inf >= 2 * R)
    slope, half = ab.loglog_slope(T, R)
    assert -0.5 < slope < -0.3 and half < 0.01


@pytest.mark.parametrize("name", BOUNDED)
def test_bounded_losses_have_the_G_and_L_they_claim(name):
    loss = ab.bounded_loss(name, 20)
    rng = np.random.default_rng(0)
    # up to 3× the runs' θ0 scale (logcosh's cosh overflows in float64 only beyond |Aθ| ≈ 710)
    thetas = np.concatenate([s * rng.standard_normal((5, 20)) for s in (0.1, 1.0, 3.0)])
    f, g = loss.value_and_grad_rows(thetas)
    assert np.all(np.abs(g).max(axis=1) <= loss.G) and np.all(f >= loss.f_star)
    for theta, fi, gi in zip(thetas, f, g):   # the batched formulas are the one-point ones
        f1, g1 = loss.value_and_grad(theta)
        assert math.isclose(fi, f1, rel_tol=1e-12) and np.allclose(gi, g1, rtol=1e-12, atol=1e-15)
        assert np.max(np.abs(np.linalg.eigvalsh(loss.hessian(theta)))) <= loss.L * (1 + 1e-12)
    with pytest.raises(ValueError, match="unbounded"):
        ab.bounded_loss("quadratic", 20)           # ½θᵀHθ: ‖∇f‖ grows without bound
    assert robust_regression(20).G == math.inf     # so does any ridge term


def test_logcosh_formulas_match_sympy_on_the_whole_loss():
    loss = make_loss("logcosh", 4)
    theta, f = symbolic_loss(loss)
    grad = sp.lambdify(theta, [sp.diff(f, t) for t in theta], "numpy")
    x = initial_point(4, 5)
    np.testing.assert_allclose(loss.grad(x), grad(*x), rtol=1e-10, atol=1e-12)
    assert loss.L == 1000 and loss.f_star == 0 and loss.f_star_exact


@pytest.fixture(scope="module")
def small_adam_grid():
    return ab.run_adam_grid(SMALL)


def test_small_adam_grid_has_no_violations_inside_the_assumptions(small_adam_grid):
    rows = small_adam_grid
    assert len(rows) == 3 * 2 * 3 * 3 * 2 and {r["loss"] for r in rows} == set(BOUNDED)
    for r in rows:
        assert [r[k] for k in BOUND_VIOLATIONS] == [0] * len(BOUND_VIOLATIONS), r
        assert np.all(r["min_q"] <= r["mean_q"] * (1 + 1e-12)) and np.all(r["mean_q"] <= r["R"])
        assert 0 < r["tightness"] <= 1
        # what passes only by RTOL is the t = 1 equalities ρ_1 = c_1 = 1, m̂_1 = g_1: once at most
        assert all(n <= 1 for n in r["saved_by_tolerance"].values()), r["saved_by_tolerance"]
        assert set(k for k, n in r["saved_by_tolerance"].items() if n) <= {"rho", "c", "lag"}
    # with η = 0.3 the bounded quantity falls in every run. Its slope is steeper than log T/√T's
    # but never below the floor that the weighted mean's own averaging sets (the slope of
    # 1/Σ η_t): that is all a slope near −1/2 shows, no evidence for the bound's rate
    fast = [r for r in rows if r["eta"] == 0.3]
    assert all(ab.falling(r) for r in fast)
    assert np.mean([r["slope_mean_q"][0] for r in fast]) < fast[0]["slope_rate"]
    # (exact, not approximate: the fitted slope of a non-decreasing Σ η_t q_t is ≥ 0)
    assert all(r["slope_mean_q"][0] >= r["slope_floor"] - 1e-9 for r in rows)


def test_beta_control_outside_beta1_below_sqrt_beta2_is_caught():
    rows = ab.beta_control(losses=("robust",), alphas=(1.0,), seeds=(0, 1))
    inside = [r for r in rows if r["beta2"] == 0.9999]
    outside = [r for r in rows if r["beta2"] == 0.9]
    assert len(inside) == len(outside) == 2
    # the bound still holds (it holds for any β) but explodes: R_T grows like (β1²/β2)^(T/2)
    assert all(r[k] == 0 for r in rows for k in BOUND_VIOLATIONS)
    assert all(r["R"][-1] > 1e80 and r["slope_R"][0] > 10 for r in outside)
    # the rate fails: the bounded quantity stops falling, and only outside
    assert not any(ab.falling(r) for r in outside)
    assert all(ab.falling(r) for r in inside)


def test_wrong_constants_are_caught_by_the_checks():
    cfg = dataclasses.replace(SMALL, losses=("logcosh",), partitions=("one",), etas=(0.3,))
    for kw, check in ((dict(G_scale=0.5), "gradient_bound_violations"),
                      (dict(L_scale=0.1), "lag_violations")):
        assert sum(r[check] for r in ab.run_adam_grid(cfg, **kw)) > 0, kw


def test_loglog_slope_recovers_a_power_law_and_refuses_too_few_points():
    T = np.arange(1, 1001)
    slope, half = ab.loglog_slope(T, 3.0 * T**-0.5)
    assert math.isclose(slope, -0.5, abs_tol=1e-12) and half < 1e-10
    with pytest.raises(ValueError, match="distinct"):
        ab.loglog_slope(np.arange(1, 51), np.ones(50))
