"""Quadratically regularised (smooth) OT: against POT, LP limits, finite differences.

Convention (read from POT 0.9.7's `ot/smooth.py`): `SquaredL2(gamma=reg).Omega(T) =
0.5 * gamma * sum(T**2)`, so `ot.smooth.smooth_ot_dual(a, b, M, reg, reg_type="l2")`
solves min <M, T> + (reg / 2) ||T||^2, exactly `SmoothOT(gamma=reg)`.
"""


import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import ot
import pytest
from conftest import central_difference, compile_log, sqdist

from monge import CostMatrix, LinearProblem, PointCloud
from monge.solvers.linear.smooth import SmoothOT

POT_SOLVERS = {"dual": ot.smooth.smooth_ot_dual, "semi_dual": ot.smooth.smooth_ot_semi_dual}


def pot_plan(formulation, a, b, C, gamma):
    solve = POT_SOLVERS[formulation]
    return solve(a, b, C, gamma, reg_type="l2", stopThr=1e-14, numItermax=10_000)


def regularised(P, C, gamma):
    return float(np.sum(P * C) + 0.5 * gamma * np.sum(P * P))


@pytest.fixture(scope="module")
def data(clouds):
    x, y, a, b = clouds
    return sqdist(x, y), a, b


@pytest.mark.parametrize(
    "formulation, gamma", [("dual", 1.0), ("semi_dual", 0.1), ("semi_dual", 10.0)]
)
def test_matches_pot(data, formulation, gamma):
    C, a, b = data
    with jax.enable_x64(True):
        solver = SmoothOT(
            gamma=gamma, formulation=formulation, threshold=1e-10, max_iterations=2000
        )
        sol = solver(LinearProblem(CostMatrix(C), a, b))
        plan, reg_cost = np.asarray(sol.plan), float(sol.reg_cost)
        assert bool(sol.converged) and int(sol.status) == 0
        assert float(sol.error) <= 1e-10
        cost = float(sol.cost)
    ref = pot_plan(formulation, a, b, C, gamma)
    np.testing.assert_allclose(plan, ref, atol=2e-6)
    assert reg_cost == pytest.approx(regularised(ref, C, gamma), rel=1e-6)
    # The dual value equals the primal value of the recovered plan (no duality gap).
    assert reg_cost == pytest.approx(regularised(plan, C, gamma), rel=1e-9)
    assert cost == pytest.approx(np.sum(plan * C), rel=1e-12)
    assert plan.min() >= 0
    np.testing.assert_allclose(plan.sum(1), a, atol=1e-10)
    np.testing.assert_allclose(plan.sum(0), b, atol=1e-10)
    assert 0 < np.count_nonzero(plan) < plan.size  # quadratic regularisation is sparse


@pytest.mark.parametrize("formulation, gamma", [("dual", 1e-2), ("semi_dual", 1e-3)])
def test_small_gamma_approaches_exact_ot(data, formulation, gamma):
    C, a, b = data
    P_lp = ot.emd(a, b, C)
    lp = float(np.sum(P_lp * C))
    with jax.enable_x64(True):
        solver = SmoothOT(
            gamma=gamma, formulation=formulation, threshold=1e-9, max_iterations=3000
        )
        sol = solver(LinearProblem(CostMatrix(C), a, b))
        reg_cost, cost = float(sol.reg_cost), float(sol.cost)
        assert bool(sol.converged)
    # LP <= <C, P_gamma> <= OT_gamma <= <C, P_lp> + gamma/2 ||P_lp||^2, up to the
    # marginal error (1e-9) times the largest cost.
    tol = 1e-9 * C.max()
    assert lp - tol <= cost <= reg_cost + tol
    assert reg_cost <= lp + 0.5 * gamma * np.sum(P_lp**2) + tol
    assert reg_cost - lp > 0.1 * 0.5 * gamma * np.sum(P_lp**2)  # the bound is not loose


@pytest.fixture(scope="module")
def larger():
    """80 and 60 weighted points in the unit square: at gamma = 0.1 the dual is badly
    conditioned (L-BFGS needs hundreds of steps, and stalls in float32)."""
    rng = np.random.default_rng(5)
    x, y = rng.uniform(size=(80, 2)), rng.uniform(size=(60, 2))
    a, b = rng.uniform(0.5, 1.5, 80), rng.uniform(0.5, 1.5, 60)
    return sqdist(x, y), a / a.sum(), b / b.sum()


@pytest.mark.parametrize("formulation", ["semi_dual", "dual"])
def test_float32_converges_and_matches_pot_float64(larger, formulation):
    C, a, b = larger
    gamma = 0.1
    C32, a32, b32 = (z.astype(np.float32) for z in (C, a, b))
    sol = SmoothOT(gamma=gamma, formulation=formulation)(
        LinearProblem(CostMatrix(C32), a32, b32)
    )
    assert sol.plan.dtype == jnp.float32
    assert int(sol.status) == 0 and bool(sol.converged) and float(sol.error) <= 1e-4
    assert int(sol.n_iters) < 100
    ref = pot_plan("dual", a, b, C, gamma)  # float64
    np.testing.assert_allclose(np.asarray(sol.plan), ref, atol=5e-5)
    assert float(sol.reg_cost) == pytest.approx(regularised(ref, C, gamma), rel=1e-5)


def test_lbfgs_method_matches_pot(data):
    C, a, b = data
    with jax.enable_x64(True):
        solver = SmoothOT(gamma=1.0, threshold=1e-10, max_iterations=2000, method="lbfgs")
        sol = solver(LinearProblem(CostMatrix(C), a, b))
        plan = np.asarray(sol.plan)
        assert bool(sol.converged)
    np.testing.assert_allclose(plan, pot_plan("semi_dual", a, b, C, 1.0), atol=2e-6)


def test_zero_weight_gives_empty_column_no_nan(data):
    C, a, b = data
    b0 = b.copy()
    b0[3] = 0.0
    b0 /= b0.sum()
    with jax.enable_x64(True):
        sol = SmoothOT(gamma=0.5, threshold=1e-10)(LinearProblem(CostMatrix(C), a, b0))
        plan = np.asarray(sol.plan)
        assert np.all(np.isfinite(np.asarray(sol.f))) and np.all(np.isfinite(np.asarray(sol.g)))
    assert np.all(plan[:, 3] == 0)
    keep = np.arange(C.shape[1]) != 3
    ref = pot_plan("dual", a, b0[keep], C[:, keep], 0.5)
    np.testing.assert_allclose(plan[:, keep], ref, atol=2e-6)


@pytest.mark.parametrize("formulation, output", [("dual", "reg_cost"), ("semi_dual", "cost")])
def test_gradient_wrt_cost_matches_finite_differences(clouds, formulation, output):
    x, y, _, _ = clouds
    C = sqdist(x[:5], y[:6])
    a, b = np.full(5, 0.2), np.full(6, 1 / 6)
    with jax.enable_x64(True):
        solver = SmoothOT(
            gamma=1.0, formulation=formulation, threshold=1e-12, max_iterations=3000
        )
        fun = jax.jit(lambda C: getattr(solver(LinearProblem(CostMatrix(C), a, b)), output))
        grad = np.asarray(jax.jit(jax.grad(fun))(jnp.asarray(C)))
        fd = central_difference(fun, C, 1e-4)
    np.testing.assert_allclose(grad, fd, atol=1e-7)


def test_gradient_wrt_weights_and_gamma_matches_finite_differences(clouds):
    x, y, _, _ = clouds
    C = sqdist(x[:5], y[:6])
    a, b = np.full(5, 0.2), np.full(6, 1 / 6)
    rng = np.random.default_rng(1)
    da, db = rng.normal(size=5), rng.normal(size=6)
    da, db = da - da.mean(), db - db.mean()  # keep the masses equal
    with jax.enable_x64(True):

        def value(a, b, gamma):
            solver = SmoothOT(gamma=gamma, threshold=1e-12, max_iterations=3000)
            return solver(LinearProblem(CostMatrix(C), a, b)).reg_cost

        fun = jax.jit(value)
        grads = jax.jit(jax.grad(value, argnums=(0, 1, 2)))(jnp.asarray(a), jnp.asarray(b), 1.0)
        ga, gb, gg = np.asarray(grads[0]), np.asarray(grads[1]), float(grads[2])
        h = 1e-5
        up, down = float(fun(a + h * da, b + h * db, 1.0)), float(fun(a - h * da, b - h * db, 1.0))
        fd_ab = (up - down) / (2 * h)
        fd_g = (float(fun(a, b, 1.0 + h)) - float(fun(a, b, 1.0 - h))) / (2 * h)
    assert ga @ da + gb @ db == pytest.approx(fd_ab, abs=1e-7)
    assert gg == pytest.approx(fd_g, abs=1e-7)


def test_jit_and_vmap_over_costs_and_gamma(data):
    C, a, b = data
    rng = np.random.default_rng(2)
    Cs = np.stack([C, C * 0.5 + rng.uniform(size=C.shape), C[::-1]]).astype(np.float32)
    gammas = np.array([0.5, 1.0, 4.0], np.float32)

    @jax.jit
    @jax.vmap
    def solve(C, gamma):
        sol = SmoothOT(gamma=gamma, threshold=1e-4)(LinearProblem(CostMatrix(C), a, b))
        return sol.plan, sol.reg_cost, sol.converged

    plans, values, converged = solve(jnp.asarray(Cs), jnp.asarray(gammas))
    assert np.all(np.asarray(converged))
    for P, v, Ci, g in zip(np.asarray(plans), np.asarray(values), Cs.astype(np.float64), gammas):
        ref = pot_plan("semi_dual", a, b, Ci, float(g))
        np.testing.assert_allclose(P, ref, atol=1e-4)
        assert float(v) == pytest.approx(regularised(ref, Ci, float(g)), rel=1e-4)


def test_new_gamma_does_not_recompile(data):
    C, a, b = (z.astype(np.float32) for z in data)
    problem = LinearProblem(CostMatrix(C), a, b)
    SmoothOT(gamma=0.3)(problem)  # compile

    def again():
        for gamma in (0.7, 2.0, 5.5):
            SmoothOT(gamma=gamma)(problem).plan.block_until_ready()

    compiles = [m for m in compile_log(again) if "solve_quadratic" in m]
    assert not compiles, compiles


def test_throw_when_not_converged(data):
    C, a, b = data
    problem = LinearProblem(CostMatrix(C), a, b)
    sol = SmoothOT(gamma=0.1, max_iterations=2, threshold=1e-8)(problem)
    assert not bool(sol.converged) and int(sol.status) == 1
    assert "max_iterations" in sol.message
    with pytest.raises(eqx.EquinoxRuntimeError, match="not converged"):
        SmoothOT(gamma=0.1, max_iterations=2, threshold=1e-8)(problem, throw=True)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"gamma": 0.0}, r"`SmoothOT\(gamma=...\)` must be positive .*received 0\.0\. Pass gamma > 0"),
        ({"gamma": -1.0}, r"`SmoothOT\(gamma=...\)` must be positive and finite; received -1\.0"),
        ({"gamma": np.inf}, r"`SmoothOT\(gamma=...\)` must be positive and finite; received inf"),
        ({"gamma": [0.1, 0.2]}, r"`SmoothOT\(gamma=...\)` must be a scalar; received shape \(2,\)"),
        (
            {"gamma": 1.0, "formulation": "primal"},
            r"`SmoothOT\(formulation=...\)` must be 'dual' or 'semi_dual'; received 'primal'",
        ),
        (
            {"gamma": 1.0, "threshold": 0.0},
            r"`SmoothOT\(threshold=...\)` must be positive and finite; received 0\.0",
        ),
        (
            {"gamma": 1.0, "max_iterations": 0},
            r"`SmoothOT\(max_iterations=...\)` must be a positive integer; received 0",
        ),
        (
            {"gamma": 1.0, "memory_size": 2.5},
            r"`SmoothOT\(memory_size=...\)` must be a positive integer; received 2\.5",
        ),
        (
            {"gamma": 1.0, "method": "bfgs"},
            r"`SmoothOT\(method=...\)` must be 'newton' or 'lbfgs'; received 'bfgs'",
        ),
    ],
)
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SmoothOT(**kwargs)


def test_bad_problems_raise(data):
    C, a, b = data
    with pytest.raises(ValueError, match="`SmoothOT` solves a monge.LinearProblem; received Cost"):
        SmoothOT(gamma=1.0)(CostMatrix(C))
    unbalanced = LinearProblem(CostMatrix(C), a, b, tau_a=0.5)
    with pytest.raises(ValueError, match=r"balanced problems only, but the problem has tau_a=0\.5"):
        SmoothOT(gamma=1.0)(unbalanced)


def test_traced_bad_gamma_raises_at_run_time(data):
    C, a, b = data
    problem = LinearProblem(CostMatrix(C), a, b)
    solve = jax.jit(lambda gamma: SmoothOT(gamma=gamma)(problem).reg_cost)
    with pytest.raises(Exception, match=r"SmoothOT\(gamma=...\)` must be positive and finite"):
        jax.block_until_ready(solve(-1.0))


def test_point_cloud_geometry(clouds):
    x, y, a, b = clouds
    with jax.enable_x64(True):
        sol = SmoothOT(gamma=1.0, threshold=1e-10)(LinearProblem(PointCloud(x, y), a, b))
        plan = np.asarray(sol.plan)
    np.testing.assert_allclose(plan, pot_plan("semi_dual", a, b, sqdist(x, y), 1.0), atol=2e-6)
