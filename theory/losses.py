"""Toy losses for checking the GD-MoFO convergence bound numerically.

MoFO: Chen et al., "MoFO: Momentum-Filtered Optimizer for Mitigating Forgetting in LLM
Fine-Tuning", arXiv 2407.20999. The bound (GD variant, see theory/README.md) needs two constants
of the loss: the Lipschitz constant L of the gradient and a lower bound f* of f. Both are derived
here from the formula, not typed in by hand.

Every toy loss has the form

    f(θ) = c · Σ_j φ(z_j) + (μ/2)‖θ‖²,        z = Aθ − b,   A: (m, d),

with a scalar link φ written once in sympy. sympy differentiates φ and finds sup φ'', inf φ'' and
inf φ over the real line; the chain rule through the fixed linear map A then gives, vectorised,

    ∇f(θ)  = c · Aᵀ φ'(z) + μθ
    ∇²f(θ) = c · Aᵀ diag(φ''(z)) A + μI
    L      = c · sup|φ''| · λ_max(AᵀA) + μ      (‖∇²f‖₂ ≤ L everywhere)
    f*    ≥ c · m · inf φ                      (a certified lower bound; μ ≥ 0)

With μ = 0 the gradient is bounded too, which the Adam-MoFO bound (theory/adam_bound.py) needs:

    ‖∇f(θ)‖_∞ ≤ G = c · sup|φ'| · max_i Σ_j |A_ji|      (sup|φ'| by sympy; G = ∞ when μ > 0)

Writing φ per coordinate keeps sympy fast at d = 1000; `symbolic_loss` expands the full
expression for small d so that tests can compare the vectorised formulas with sympy's own
differentiation of the whole loss.
"""
import functools
from dataclasses import dataclass, field

import numpy as np
import sympy as sp

# the scalar argument of every link φ
z = sp.Symbol("z", real=True)


@dataclass
class ToyLoss:
    name: str
    phi: sp.Expr            # scalar link φ(z)
    A: np.ndarray           # (m, d) fixed linear map
    b: np.ndarray           # (m,)
    c: float                # weight of the link sum
    mu: float               # ridge weight
    L: float                # Lipschitz constant of ∇f, derived from the formula
    f_star: float           # f* or a certified lower bound of it
    f_star_exact: bool      # True when f* is the minimum itself, False for a lower bound
    notes: str              # where L and f* come from, in words
    _phi: object = field(init=False, repr=False)
    _dphi: object = field(init=False, repr=False)
    _d2phi: object = field(init=False, repr=False)

    def __post_init__(self):
        self._phi = sp.lambdify(z, self.phi, "numpy")
        self._dphi = sp.lambdify(z, sp.diff(self.phi, z), "numpy")
        self._d2phi = sp.lambdify(z, sp.diff(self.phi, z, 2), "numpy")

    @property
    def d(self):
        return self.A.shape[1]

    def value(self, theta):
        r = self.A @ theta - self.b                                   # (m,)
        return float(self.c * np.sum(self._phi(r)) + 0.5 * self.mu * theta @ theta)

    def grad(self, theta):
        r = self.A @ theta - self.b
        return self.c * (self.A.T @ self._dphi(r)) + self.mu * theta  # (d,)

    def value_and_grad(self, theta):
        # one pass through A for both: this is the inner loop of every run
        r = self.A @ theta - self.b
        f = float(self.c * np.sum(self._phi(r)) + 0.5 * self.mu * theta @ theta)
        return f, self.c * (self.A.T @ self._dphi(r)) + self.mu * theta

    def value_and_grad_rows(self, theta):
        """value_and_grad of R points at once: theta (R, d) -> f (R,), grad (R, d)."""
        r = theta @ self.A.T - self.b                                 # (R, m)
        f = self.c * np.sum(self._phi(r), axis=1) + 0.5 * self.mu * np.sum(theta * theta, axis=1)
        return f, self.c * (self._dphi(r) @ self.A) + self.mu * theta

    @property
    def G(self):
        """A bound on ‖∇f(θ)‖_∞ over all θ: c · sup|φ'| · max_i Σ_j |A_ji|, or ∞ with a ridge."""
        if self.mu != 0:
            return float("inf")  # μθ grows without bound
        sup_d1, inf_d1 = link_slope_bounds(self.phi)
        return float(self.c * max(abs(sup_d1), abs(inf_d1)) * np.abs(self.A).sum(axis=0).max())

    def hessian(self, theta):
        r = self.A @ theta - self.b
        w = np.broadcast_to(self._d2phi(r), r.shape)                  # φ'' may be a constant
        return self.c * (self.A.T * w) @ self.A + self.mu * np.eye(self.d)  # (d, d)


@functools.lru_cache(maxsize=None)  # sympy's maximum/minimum take ~0.3 s; each φ is asked often
def link_bounds(phi):
    """sup φ'', inf φ'' and inf φ over the reals, found by sympy."""
    d2 = sp.diff(phi, z, 2)
    return (sp.maximum(d2, z, sp.S.Reals), sp.minimum(d2, z, sp.S.Reals),
            sp.minimum(phi, z, sp.S.Reals))


@functools.lru_cache(maxsize=None)
def link_slope_bounds(phi):
    """sup φ' and inf φ' over the reals, found by sympy (for the gradient bound G)."""
    d1 = sp.diff(phi, z)
    return sp.maximum(d1, z, sp.S.Reals), sp.minimum(d1, z, sp.S.Reals)


def spectrum_map(d, kappa, seed):
    """(A, max_s λ, min_s λ): A = Λ^½ Qᵀ, λ(s) = κ^s at d points of [0, 1], Q a seeded rotation;
    the extremes of λ by sympy from the formula."""
    if d < 2:
        raise ValueError(f"d must be >= 2 (the spectrum spans s in [0, 1]), got {d}")
    if kappa < 1:
        raise ValueError(f"kappa must be >= 1, got {kappa}")
    s = sp.Symbol("s", real=True)
    spectrum = sp.Integer(kappa) ** s if float(kappa).is_integer() else sp.Float(kappa) ** s
    lam = np.asarray(sp.lambdify(s, spectrum, "numpy")(np.linspace(0.0, 1.0, d)), dtype=float)
    Q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))
    return (np.sqrt(lam)[:, None] * Q.T, sp.maximum(spectrum, s, sp.Interval(0, 1)),
            sp.minimum(spectrum, s, sp.Interval(0, 1)))


def logcosh(d, kappa=1000, seed=0):
    """The ill-conditioned quadratic's twin with bounded gradients: f(θ) = Σ_j log cosh((Aθ)_j).

    A = Λ^½ Qᵀ as in `quadratic` (same spectrum κ^s, same seeded rotation), so near θ = 0 this is
    ½ θᵀ Q Λ Qᵀ θ, while far away it grows only linearly: φ' = tanh ∈ (−1, 1) bounds the gradient
    (G = max_i Σ_j |A_ji|). φ'' = sech² ≤ 1, so L = max_s κ^s; f* = 0 at θ = 0, exactly.
    In float64, cosh overflows for |(Aθ)_j| > 710; the runs stay far inside (|Aθ| ≲ 100).
    """
    A, lam_max, _ = spectrum_map(d, kappa, seed)
    phi = sp.log(sp.cosh(z))
    sup_d2, inf_d2, inf_phi = link_bounds(phi)
    L = float(max(abs(sup_d2), abs(inf_d2)) * lam_max)
    return ToyLoss("logcosh", phi, A, np.zeros(d), 1.0, 0.0, L, float(d * inf_phi), True,
                   f"L = sup phi'' * max_s kappa^s = {lam_max}, sup phi'' = {sup_d2}; "
                   f"f* = 0 at theta = 0")


def quadratic(d, kappa=1000, seed=0):
    """Ill-conditioned quadratic f(θ) = ½ θᵀ Q Λ Qᵀ θ with spectrum λ(s) = κ^s, s ∈ [0, 1].

    Q is a seeded random rotation, so the Hessian is dense. L = max_s λ(s) and f* = 0 (attained at
    θ = 0 because min_s λ(s) > 0) both come from the spectrum formula.
    """
    A, lam_max, lam_min = spectrum_map(d, kappa, seed)  # AᵀA = Q Λ Qᵀ
    phi = z**2 / 2
    sup_d2, inf_d2, inf_phi = link_bounds(phi)
    assert lam_min > 0 and inf_d2 >= 0                 # positive definite, so f* = f(0) = 0
    L = float(max(abs(sup_d2), abs(inf_d2)) * lam_max)
    return ToyLoss("quadratic", phi, A, np.zeros(d), 1.0, 0.0, L, float(d * inf_phi), True,
                   f"L = sup phi'' * max_s kappa^s = {lam_max}; f* = 0 at theta = 0")


def logistic(d, n=100, seed=0):
    """Logistic regression, f(w) = (1/n) Σ_j log(1 + exp(−y_j x_jᵀ w)), on n seeded samples.

    φ'' ≤ 1/4 (sympy), y_j² = 1, so L = λ_max(XᵀX)/(4n), with λ_max computed from the fixed data.
    Each term is positive, so f* ≥ 0: a certified lower bound (not attained when the data are
    separable, as they are for d ≥ n).
    """
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))                                   # (n, d)
    y = np.sign(X @ rng.standard_normal(d) + 0.5 * rng.standard_normal(n))
    y[y == 0] = 1.0
    phi = sp.log(1 + sp.exp(-z))
    sup_d2, inf_d2, inf_phi = link_bounds(phi)
    lam_max = np.linalg.eigvalsh(X.T @ X)[-1] if d <= n else np.linalg.eigvalsh(X @ X.T)[-1]
    L = float(max(abs(sup_d2), abs(inf_d2))) * lam_max / n
    return ToyLoss("logistic", phi, y[:, None] * X, np.zeros(n), 1.0 / n, 0.0, L,
                   float(inf_phi), False,
                   f"L = sup phi'' * lambda_max(X^T X)/n, sup phi'' = {sup_d2}; "
                   f"f* >= inf phi = {inf_phi} (lower bound)")


def robust_regression(d, m=100, mu=0.1, seed=0):
    """Smooth non-convex loss: Cauchy regression with a ridge term.

    f(θ) = Σ_j log(1 + (Bθ − y)_j²) + (μ/2)‖θ‖². φ(r) = log(1 + r²) has φ'' ∈ [−1/4, 2] (sympy), so
    the Hessian is indefinite where residuals are large, and L = 2 λ_max(BᵀB) + μ. Each term is
    non-negative, so f* ≥ 0: a certified lower bound (not attained: Bθ = y and θ = 0 conflict).
    """
    if mu < 0:
        raise ValueError(f"mu must be >= 0, got {mu}")
    rng = np.random.default_rng(seed)
    B = rng.standard_normal((m, d)) / np.sqrt(d)                      # (m, d)
    y = 3.0 * rng.standard_normal(m)
    phi = sp.log(1 + z**2)
    sup_d2, inf_d2, inf_phi = link_bounds(phi)
    lam_max = np.linalg.eigvalsh(B.T @ B)[-1] if d <= m else np.linalg.eigvalsh(B @ B.T)[-1]
    L = float(max(abs(sup_d2), abs(inf_d2))) * lam_max + mu
    return ToyLoss("robust", phi, B, y, 1.0, mu, L, float(m * inf_phi), False,
                   f"L = max(-inf phi'', sup phi'') * lambda_max(B^T B) + mu, "
                   f"phi'' in [{inf_d2}, {sup_d2}]; "
                   f"f* >= m * inf phi = {inf_phi} (lower bound)")


def make_loss(name, d, seed=0):
    """The toy loss `name` in dimension d; `seed` fixes its data (not θ0)."""
    builders = {"quadratic": quadratic, "logistic": logistic, "robust": robust_regression,
                "logcosh": logcosh}
    if name not in builders:
        raise ValueError(f"name must be one of {sorted(builders)}, got {name!r}")
    return builders[name](d, seed=seed)


def symbolic_loss(loss):
    """The whole loss as one sympy expression in d symbols (small d only), for cross-checks."""
    if loss.d > 12:
        raise ValueError(f"symbolic_loss expands every term; use d <= 12, got {loss.d}")
    theta = sp.symbols(f"theta0:{loss.d}", real=True)
    r = sp.Matrix(loss.A) * sp.Matrix(theta) - sp.Matrix(loss.b)
    f = loss.c * sum(loss.phi.subs(z, r_j) for r_j in r) + sp.Rational(1, 2) * loss.mu * sum(
        t**2 for t in theta)
    return theta, f
