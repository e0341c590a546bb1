"""Issue 10, part B, items 5, 6 and 8: outlying and forbidden costs, precision of the
inputs, and the default epsilon's gradient. Every reference is independent of monge:
POT / NumPy in float64, closed forms, finite differences in x64."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import ot
import pytest

import monge
from monge.solution import Status
from monge.solvers.linear.exact import Exact
from monge.problems import PartialProblem
from monge.solvers.linear.partial import PartialExact, PartialSinkhorn

_SCALE_BIG = 1e3  # the finite stand-in of a forbidden pair in the float64 references


def _scale_sinkhorn(a, b, C, eps, **kw):
    """POT's log-domain Sinkhorn in float64 (the plain one underflows at small eps)."""
    return ot.sinkhorn(a, b, C, eps, method="sinkhorn_log", **kw)


def _scale_sinkhorn2(a, b, C, eps, **kw):
    return float(np.sum(_scale_sinkhorn(a, b, C, eps, **kw) * C))


def _scale_three(B, dtype=np.float32):
    return np.array([[0, 1, B], [1, 0, B], [B, B, 0]], dtype)


def _scale_marginal_error(P, a, b):
    P = np.asarray(P, np.float64)
    return np.abs(P.sum(1) - a).sum() + np.abs(P.sum(0) - b).sum()


def _scale_masked(seed, n, m, frac=0.3, square=False):
    """Uniform costs in [0, 1] with a random fraction forbidden (inf), every row and
    column keeping allowed pairs (the diagonal, for square problems)."""
    rng = np.random.default_rng(seed)
    C = rng.uniform(size=(n, m))
    mask = rng.uniform(size=(n, m)) < frac
    if square:
        mask[np.arange(n), np.arange(n)] = False
    mask[:, 0] &= np.arange(n) % 2 == 0  # keep some structure in the first column
    return C, mask


def _scale_weights(seed, n, m):
    rng = np.random.default_rng(seed + 100)
    a, b = rng.uniform(0.5, 1.5, n), rng.uniform(0.5, 1.5, m)
    return a / a.sum(), b / b.sum()


# -- item 5: a few huge costs -------------------------------------------------------------
@pytest.mark.parametrize("B", [1e4, 1e8, 1e10])
def test_scale_huge_costs_eps_one(B):
    """The issue's case: eps = 1, float32. B = 1e8 gave a wrong cost and B = 1e10 cost
    2.0 with marginal error 1.17, both converged with error 0.0."""
    C = _scale_three(B)
    u = np.ones(3) / 3
    ref = _scale_sinkhorn2(u, u, C.astype(np.float64), 1.0, stopThr=1e-13, numItermax=100_000)
    sol = monge.solve_matrix(C, epsilon=1.0)
    assert bool(sol.converged)
    assert _scale_marginal_error(sol.plan, u, u) <= 1e-3
    np.testing.assert_allclose(float(sol.cost), ref, rtol=1e-4)
    assert float(sol.error) > 0.0  # never below what float32 resolves


@pytest.mark.parametrize("B", [1e8, 1e10])
def test_scale_huge_costs_default_epsilon(B):
    """Default epsilon: set by the typical costs (order 1), not by B."""
    C = _scale_three(B)
    u = np.ones(3) / 3
    sol = monge.solve_matrix(C)
    eps = float(sol.epsilon)
    assert eps <= 0.05 * 4 * 1.0 + 1e-6  # 4 medians at most (the median cost is 1)
    ref = _scale_sinkhorn2(u, u, C.astype(np.float64), eps, stopThr=1e-13, numItermax=100_000)
    assert bool(sol.converged)
    assert _scale_marginal_error(sol.plan, u, u) <= 1e-3
    np.testing.assert_allclose(float(sol.cost), ref, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_scale_few_outlying_costs_kind(seed):
    """The kind: a random matrix with a few entries 1e9, weights not uniform, an
    explicit epsilon below the old annealing start."""
    rng = np.random.default_rng(seed)
    n, m = 13, 17
    C = rng.uniform(size=(n, m))
    C[rng.integers(0, n, 6), rng.integers(0, m, 6)] = 1e9
    a, b = _scale_weights(seed, n, m)
    sol = monge.solve_matrix(C.astype(np.float32), a=a, b=b, epsilon=0.02)
    P = _scale_sinkhorn(a, b, C, 0.02, stopThr=1e-13, numItermax=200_000)
    assert bool(sol.converged)
    assert _scale_marginal_error(sol.plan, a, b) <= 2e-3
    np.testing.assert_allclose(float(sol.cost), np.sum(P * np.where(C < 1e8, C, 0)), rtol=2e-3)


def test_scale_outlying_point_cloud():
    """One far point in a cloud makes the mean cost 40x the typical one; the default
    epsilon follows the typical cost (a solve at that epsilon matches POT)."""
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(40, 2)), rng.normal(size=(30, 2)) + 0.5
    x[0] = 60.0
    geom = monge.PointCloud(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))
    problem = monge.LinearProblem(geom)
    C = ot.dist(x, y)
    mean = C.mean()
    eps = float(problem.resolved_epsilon())
    assert eps < 0.05 * mean / 5  # not dominated by the outlier
    assert eps >= 0.05 * np.median(C) * 0.5
    sol = monge.Sinkhorn()(problem)
    u, v = np.ones(40) / 40, np.ones(30) / 30
    ref = _scale_sinkhorn2(u, v, C, eps, stopThr=1e-13, numItermax=200_000)
    assert bool(sol.converged)
    np.testing.assert_allclose(float(sol.cost), ref, rtol=2e-3)


@pytest.mark.parametrize("offset", [1e4, 1e6])
def test_scale_unresolvable_potentials_are_not_converged(offset):
    """Costs offset + D (D in [0, 1]) at eps = 0.1 in float32: potentials of size
    `offset` that float32 resolves to ~offset * 1e-7, against eps = 0.1. `converged`
    must mean the plan (recomputed in float64 from the float32 costs) meets the
    threshold; otherwise the status says the precision is the reason."""
    rng = np.random.default_rng(4)
    C = (offset + rng.uniform(size=(11, 9))).astype(np.float32)
    a, b = np.ones(11) / 11, np.ones(9) / 9
    sol = monge.solve_matrix(C, epsilon=0.1)
    err = _scale_marginal_error(sol.plan, a, b)
    if bool(sol.converged):
        assert err <= 1e-3
    else:
        assert int(sol.status) == Status.IMPRECISE
        assert float(sol.error) > 1e-3
    if offset == 1e6:  # far beyond: 1e6 * 1.2e-7 / 0.1 ~ 1 per entry
        assert int(sol.status) == Status.IMPRECISE
        assert "imprecise" in sol.message


# -- item 5: exact certificates ---------------------------------------------------------
@pytest.mark.parametrize("method", ["sinkhorn_rounding", "auction", "network_simplex"])
@pytest.mark.parametrize("B", [1e8, 1e31])
def test_scale_exact_certificate_with_huge_costs(method, B):
    """The optimum of the 3x3 case is 0 (the diagonal). Sinkhorn rounding returned a
    plan of cost 7e-5 B certified as converged: the gap was relative to mean |C| ~ B."""
    C = _scale_three(B)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sol = Exact(method=method)(monge.LinearProblem(monge.CostMatrix(C)))
    if bool(sol.converged):
        assert float(sol.cost) <= 1e-2  # a relative gap of 1e-3 of the typical cost, 1
        np.testing.assert_allclose(np.asarray(sol.plan), np.eye(3) / 3, atol=1e-3)
    else:
        assert int(sol.status) != Status.CONVERGED


def test_scale_exact_default_epsilon_and_partial_share_one_rule():
    C = _scale_three(1e10)
    geom = monge.CostMatrix(C)
    linear = monge.LinearProblem(geom).resolved_epsilon()
    partial = PartialProblem(geom, mass=0.5).resolved_epsilon()
    assert float(linear) == float(partial)
    assert float(linear) <= 0.2 + 1e-6


# -- item 5: forbidden pairs ---------------------------------------------------------------
@pytest.mark.parametrize("shape", [(9, 12), (23, 17)])
def test_scale_forbidden_pairs_sinkhorn(shape):
    n, m = shape
    C, mask = _scale_masked(0, n, m)
    a, b = _scale_weights(0, n, m)
    Ci = np.where(mask, np.inf, C).astype(np.float32)
    eps = 0.05
    P_ref = _scale_sinkhorn(a, b, np.where(mask, _SCALE_BIG, C), eps, stopThr=1e-13, numItermax=200_000)
    sol = monge.solve_matrix(Ci, a=a, b=b, epsilon=eps, threshold=1e-5)
    P = np.asarray(sol.plan)
    assert bool(sol.converged)
    assert np.all(P[mask] == 0.0)
    np.testing.assert_allclose(P, P_ref, atol=2e-5)
    cost = float(sol.cost)
    assert np.isfinite(cost)
    np.testing.assert_allclose(cost, np.sum(P_ref * np.where(mask, 0, C)), rtol=1e-4)
    # d reg_cost / dC = P (envelope theorem), finite, 0 on forbidden pairs
    grad = jax.grad(lambda C: monge.solve_matrix(C, a=a, b=b, epsilon=eps, threshold=1e-5).reg_cost)(
        jnp.asarray(Ci)
    )
    assert np.all(np.isfinite(np.asarray(grad)))
    np.testing.assert_allclose(np.asarray(grad), P_ref, atol=2e-5)
    grad_cost = jax.grad(lambda C: monge.solve_matrix(C, a=a, b=b, epsilon=eps).cost)(jnp.asarray(Ci))
    assert np.all(np.isfinite(np.asarray(grad_cost)))
    # under jit (no check at the door) and with the default epsilon
    jitted = jax.jit(lambda C: monge.solve_matrix(C, a=a, b=b).cost)(jnp.asarray(Ci))
    assert np.isfinite(float(jitted))


def test_scale_forbidden_pairs_vmap():
    n, m = 8, 10
    Cs, As = [], []
    for seed in range(3):
        C, mask = _scale_masked(seed, n, m)
        Cs.append(np.where(mask, np.inf, C))
    Cs = jnp.asarray(np.stack(Cs), jnp.float32)
    costs = jax.vmap(lambda C: monge.solve_matrix(C, epsilon=0.05).cost)(Cs)
    for k in range(3):
        Ck = np.asarray(Cs[k], np.float64)
        mask = ~np.isfinite(Ck)
        P = _scale_sinkhorn(np.ones(n) / n, np.ones(m) / m, np.where(mask, _SCALE_BIG, Ck), 0.05,
                        stopThr=1e-13, numItermax=200_000)
        np.testing.assert_allclose(float(costs[k]), np.sum(P * np.where(mask, 0, Ck)), rtol=2e-3)


@pytest.mark.parametrize("method", ["network_simplex", "sinkhorn_rounding", "assignment", "auction"])
def test_scale_forbidden_pairs_exact(method):
    square = method in ("assignment", "auction")
    n, m = (10, 10) if square else (9, 13)
    C, mask = _scale_masked(1, n, m, square=square)
    a, b = (np.ones(n) / n, np.ones(m) / m) if square else _scale_weights(1, n, m)
    Ci = np.where(mask, np.inf, C)
    ref = ot.emd2(a, b, np.where(mask, _SCALE_BIG, C))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sol = Exact(method=method)(monge.LinearProblem(monge.CostMatrix(jnp.asarray(Ci, jnp.float32)), a, b))
        grad = jax.grad(
            lambda C: Exact(method=method)(monge.LinearProblem(monge.CostMatrix(C), a, b)).reg_cost
        )(jnp.asarray(Ci, jnp.float32))
    P = np.asarray(sol.plan)
    assert bool(sol.converged), sol.message
    assert np.all(P[mask] == 0.0)
    tol = 2e-3 if method == "sinkhorn_rounding" else 1e-5
    np.testing.assert_allclose(float(sol.cost), ref, rtol=tol)
    # sinkhorn_rounding: its plan is exact before the (certified, tiny) forbidden leak
    # is zeroed
    assert _scale_marginal_error(P, a, b) <= (1e-3 if method == "sinkhorn_rounding" else 1e-5)
    assert np.all(np.isfinite(np.asarray(grad)))
    assert np.all(np.asarray(grad)[mask] == 0.0)
    # the exact front door too
    if method == "network_simplex":
        front = monge.solve_matrix(Ci, a=a, b=b, epsilon=0)
        np.testing.assert_allclose(float(front.cost), ref, rtol=1e-5)


@pytest.mark.parametrize("method", ["network_simplex", "sinkhorn_rounding"])
def test_scale_forbidden_infeasible_exact_status(method):
    """Two blocks of allowed pairs whose masses do not balance: every row and column
    has an allowed pair, but no plan exists."""
    C = np.full((4, 4), np.inf, np.float32)
    C[:2, :2] = 1.0
    C[2:, 2:] = 1.0
    C[0, 2] = 1.0
    a, b = np.array([0.4, 0.4, 0.1, 0.1]), np.array([0.1, 0.1, 0.4, 0.4])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sol = Exact(method=method)(monge.LinearProblem(monge.CostMatrix(C), a, b))
    assert int(sol.status) == Status.INFEASIBLE
    assert not bool(sol.converged)
    assert "infeasible" in sol.message


def test_scale_forbidden_infeasible_assignment_status():
    """No permutation avoids the forbidden pairs (rows 0 and 1 may only go to column 0)."""
    C = np.ones((3, 3), np.float32)
    C[0, 1:] = np.inf
    C[1, 1:] = np.inf
    for method in ("assignment", "auction"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sol = Exact(method=method)(monge.LinearProblem(monge.CostMatrix(C)))
        assert int(sol.status) == Status.INFEASIBLE, method


@pytest.mark.parametrize("kind", ["row", "column"])
def test_scale_forbidden_line_is_a_value_error(kind):
    C = np.ones((5, 6))
    if kind == "row":
        C[2, :] = np.inf
    else:
        C[:, 4] = np.inf
    for epsilon in (0.1, 0):
        with pytest.raises(ValueError, match=f"Infeasible problem: {kind} .* forbidden"):
            monge.solve_matrix(C, epsilon=epsilon)
    with pytest.raises(ValueError, match="Infeasible problem"):
        monge.solve_matrix(C, epsilon=0, mass=0.5)
    # a zero weight there is fine
    a = np.ones(5) / 5
    b = np.ones(6) / 6
    if kind == "row":
        a[2] = 0.0
        a /= a.sum()
    else:
        b[4] = 0.0
        b /= b.sum()
    assert bool(monge.solve_matrix(C, a=a, b=b, epsilon=0.1).converged)


@pytest.mark.parametrize("bad", [np.nan, -np.inf])
def test_scale_nan_or_negative_inf_cost_is_a_value_error(bad):
    C = np.ones((4, 5))
    C[1, 2] = bad
    with pytest.raises(ValueError, match=r"`C` has 1 NaN or -inf value\(s\)"):
        monge.solve_matrix(C)


def test_scale_forbidden_pairs_partial():
    n, m = 9, 12
    C, mask = _scale_masked(2, n, m)
    a, b = _scale_weights(2, n, m)
    Ci = np.where(mask, np.inf, C)
    Cbig = np.where(mask, _SCALE_BIG, C)
    mass = 0.6
    sol = PartialExact()(PartialProblem(monge.CostMatrix(jnp.asarray(Ci, jnp.float32)), a, b, mass=mass))
    ref = ot.partial.partial_wasserstein2(a, b, Cbig, m=mass)
    assert bool(sol.converged)
    assert np.all(np.asarray(sol.plan)[mask] == 0.0)
    np.testing.assert_allclose(float(sol.cost), ref, rtol=1e-5)
    eps = 0.1
    problem = PartialProblem(monge.CostMatrix(jnp.asarray(Ci, jnp.float32)), a, b, mass=mass, epsilon=eps)
    sol = PartialSinkhorn(threshold=1e-6)(problem)
    # POT's (non-log) entropic partial solver needs exp(-big/eps) > 0: big = 10, whose
    # entries carry e^-100 of the mass
    P_ref = ot.partial.entropic_partial_wasserstein(a, b, np.where(mask, 10.0, C), reg=eps, m=mass,
                                                    numItermax=100_000, stopThr=1e-14)
    P = np.asarray(sol.plan)
    assert bool(sol.converged)
    assert np.all(P[mask] == 0.0)
    np.testing.assert_allclose(P, P_ref, atol=1e-5)
    assert np.isfinite(float(sol.cost)) and np.isfinite(float(sol.reg_cost))
    grad = jax.grad(lambda C: PartialSinkhorn()(PartialProblem(monge.CostMatrix(C), a, b, mass=mass,
                                                               epsilon=eps)).reg_cost)(jnp.asarray(Ci, jnp.float32))
    assert np.all(np.isfinite(np.asarray(grad)))


# -- item 6: precision of the inputs --------------------------------------------------------
def _scale_clouds(seed=5, n=30, m=40):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 2)), rng.normal(size=(m, 2)) + 0.5


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_scale_low_precision_points_are_upcast(dtype):
    """float16/bfloat16 points: computed in float32 (documented), against POT in
    float64 on the points as rounded to their dtype."""
    x, y = _scale_clouds()
    xd, yd = jnp.asarray(x, dtype), jnp.asarray(y, dtype)
    x64, y64 = np.asarray(xd, np.float64), np.asarray(yd, np.float64)
    C = ot.dist(x64, y64)
    u, v = np.ones(len(x)) / len(x), np.ones(len(y)) / len(y)
    sol = monge.solve(xd, yd, epsilon=0.1)
    ref = _scale_sinkhorn2(u, v, C, 0.1, stopThr=1e-13, numItermax=100_000)
    assert sol.f.dtype == jnp.float32
    assert bool(sol.converged)
    np.testing.assert_allclose(float(sol.cost), ref, rtol=1e-3)
    exact = monge.solve(xd, yd, epsilon=0)
    np.testing.assert_allclose(float(exact.cost), ot.emd2(u, v, C), rtol=1e-5)


@pytest.mark.parametrize("x64", [False, True])
@pytest.mark.parametrize("offset", [0.0, 1e6])
def test_scale_far_float64_points(x64, offset):
    """float64 NumPy points near 1e6 with unit spread: centred before any cast (the
    cost was 1% off); with x64 on they stay float64."""
    x, y = _scale_clouds(6)
    u, v = np.ones(len(x)) / len(x), np.ones(len(y)) / len(y)
    C = ot.dist(x, y)  # translation invariant: the reference is computed at 0
    ref = _scale_sinkhorn2(u, v, C, 0.1, stopThr=1e-13, numItermax=100_000)
    if x64:
        with jax.enable_x64(True):
            sol = monge.solve(x + offset, y + offset, epsilon=0.1, threshold=1e-6)
            cost, dtype = float(sol.cost), sol.f.dtype
        rtol = 1e-5
    else:
        sol = monge.solve(x + offset, y + offset, epsilon=0.1)
        cost, dtype = float(sol.cost), sol.f.dtype
        rtol = 1e-3
    assert dtype == (jnp.float64 if x64 else jnp.float32)
    np.testing.assert_allclose(cost, ref, rtol=rtol)
    for cost_name in ("euclidean", "cityblock"):
        got = monge.solve(x + offset, y + offset, epsilon=0.1, cost=cost_name)
        metric = "euclidean" if cost_name == "euclidean" else "cityblock"
        Cn = ot.dist(x, y, metric=metric)
        refn = _scale_sinkhorn2(u, v, Cn, 0.1, stopThr=1e-13, numItermax=100_000)
        np.testing.assert_allclose(float(got.cost), refn, rtol=2e-3)


def test_scale_far_points_transport_in_the_original_frame():
    """`transport` of the centred solve takes and returns points in the user's frame:
    the entropic map of the shifted problem is the shifted map (closed form: the
    barycentric projection, computed in float64 from POT's potentials)."""
    x, y = _scale_clouds(7)
    offset = 1e6
    sol = monge.solve(x + offset, y + offset, epsilon=0.1, threshold=1e-5)
    z = np.random.default_rng(8).normal(size=(5, 2))
    # reference: T(z) = sum_j p_j(z) y_j with p_j propto b_j exp((g_j - |z - y_j|^2)/eps)
    u, v = np.ones(len(x)) / len(x), np.ones(len(y)) / len(y)
    _, log = _scale_sinkhorn(u, v, ot.dist(x, y), 0.1, stopThr=1e-13, numItermax=100_000, log=True)
    # POT's scaling v_j is b_j e^{g_j / eps} up to a constant: P = diag(u) e^{-C/eps} diag(v)
    logits = log["log_v"] - ot.dist(z, y) / 0.1
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    ref = p @ y
    got = np.asarray(sol.transport(z + offset), np.float64) - offset
    np.testing.assert_allclose(got, ref, atol=0.07)  # float32 output near 1e6: 0.0625 apart


# -- item 8: the default epsilon's gradient ---------------------------------------------------
def test_scale_default_epsilon_gradient_is_stopped():
    """grad_x reg_cost with the default epsilon is the fixed-epsilon gradient
    2(diag(P1) x - P y) (P from POT in float64 at that epsilon), equal to the gradient
    with epsilon passed as a constant; finite differences of x -> reg_cost(x,
    eps(x)) differ by d reg_cost/d eps * d eps/dx."""
    rng = np.random.default_rng(9)
    x, y = rng.normal(size=(17, 2)), rng.normal(size=(13, 2)) + 1.0
    with jax.enable_x64(True):
        xj, yj = jnp.asarray(x), jnp.asarray(y)
        eps = float(monge.solve(xj, yj).epsilon)

        def reg(x, epsilon=None):
            return monge.solve(x, yj, epsilon=epsilon, threshold=1e-10, max_iterations=20_000).reg_cost

        g_default = np.asarray(jax.grad(reg)(xj))
        g_const = np.asarray(jax.grad(lambda x: reg(x, eps))(xj))
        u, v = np.ones(17) / 17, np.ones(13) / 13
        P = _scale_sinkhorn(u, v, ot.dist(x, y), eps, stopThr=1e-14, numItermax=200_000)
        closed = 2 * (P.sum(1)[:, None] * x - P @ y)
        np.testing.assert_allclose(g_default, g_const, atol=1e-9)
        np.testing.assert_allclose(g_default, closed, atol=1e-6)
        # finite differences see epsilon move with x: a different number
        d = rng.normal(size=x.shape)
        h = 1e-5
        fd = (float(reg(xj + h * d)) - float(reg(xj - h * d))) / (2 * h)
        assert abs(fd - np.sum(closed * d)) > 1e-3
        # ... and agree once epsilon is held fixed
        fd_fixed = (float(reg(xj + h * d, eps)) - float(reg(xj - h * d, eps))) / (2 * h)
        np.testing.assert_allclose(fd_fixed, np.sum(closed * d), atol=1e-6)


def test_scale_readme_gradient_float32():
    """The README example, float32: `jax.grad(lambda x: monge.solve(x, y).reg_cost)(x)`
    is 2(diag(P1)x - Py) at the default epsilon."""
    rng = np.random.default_rng(10)
    x, y = rng.normal(size=(23, 2)), rng.normal(size=(19, 2)) + 0.5
    xj, yj = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
    sol = monge.solve(xj, yj)
    grad = np.asarray(jax.grad(lambda x: monge.solve(x, yj, threshold=1e-5).reg_cost)(xj))
    P = _scale_sinkhorn(np.ones(23) / 23, np.ones(19) / 19, ot.dist(x, y), float(sol.epsilon),
                    stopThr=1e-14, numItermax=200_000)
    np.testing.assert_allclose(grad, 2 * (P.sum(1)[:, None] * x - P @ y), atol=2e-4)
