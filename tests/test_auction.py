"""`Exact(method="auction")` (`monge.solvers.linear.auction`) against scipy's
`linear_sum_assignment` in float64, and its certificate (float32 and float64)."""


import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import compile_log, sqdist
from scipy.optimize import linear_sum_assignment

import monge
from monge.solvers.linear.auction import auction
from monge.solvers.linear.exact import Exact
from monge.solvers.linear.partial import PartialExact

RUNTIME = (eqx.EquinoxRuntimeError, jax.errors.JaxRuntimeError)
FIELDS = ("plan", "f", "g", "cost", "reg_cost", "error", "status", "n_iters")


def _fields(C, a=None, b=None, **kwargs):
    sol = Exact(method="auction", **kwargs)(monge.LinearProblem(monge.CostMatrix(C), a, b))
    return tuple(getattr(sol, name) for name in FIELDS)


def _clouds(n, seed):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 3)), rng.normal(size=(n, 3)) + 0.5


def _scipy(C):
    """The optimal permutation matrix and total cost, in float64."""
    C = np.asarray(C, np.float64)
    rows, cols = linear_sum_assignment(C)
    perm = np.zeros_like(C)
    perm[rows, cols] = 1.0
    return perm, C[rows, cols].sum()


@pytest.fixture(scope="module")
def solved64():
    """Auction results in float64: point clouds (n = 33, 120), integer costs with many
    ties (n = 33) and a uniform random matrix (n = 120), masses 2 (not 1)."""
    problems = {
        "cloud33": sqdist(*_clouds(33, 0)),
        "cloud120": sqdist(*_clouds(120, 1)),
        # integers 0..3 from distances: many ties and a non-zero optimum
        "ties33": np.minimum(np.floor(sqdist(*_clouds(33, 2)) / 2), 3),
        "uniform120": np.random.default_rng(3).uniform(size=(120, 120)),
    }
    run = jax.jit(lambda C, w: _fields(C, w, w))
    out = {}
    with jax.enable_x64(True):
        for name, C in problems.items():
            w = np.full(C.shape[0], 2.0 / C.shape[0])
            out[name] = (C, *(np.asarray(z) for z in run(jnp.asarray(C), jnp.asarray(w))))
    return out


@pytest.mark.parametrize("name", ["cloud33", "cloud120", "ties33", "uniform120"])
def test_float64_matches_linear_sum_assignment(solved64, name):
    C, plan, f, g, cost, reg_cost, error, status, n_iters = solved64[name]
    n = C.shape[0]
    perm, ref = _scipy(C)
    mass = 2.0
    assert plan.dtype == np.float64 and status == monge.Status.CONVERGED and n_iters > 0
    # the plan is (mass / n) times a permutation matrix
    np.testing.assert_allclose(plan[plan > 0], mass / n, rtol=1e-14)
    np.testing.assert_array_equal((plan > 0).sum(0), np.ones(n))
    np.testing.assert_array_equal((plan > 0).sum(1), np.ones(n))
    np.testing.assert_allclose(cost, mass / n * ref, rtol=1e-9)
    np.testing.assert_allclose(reg_cost, mass / n * ref, rtol=1e-9)
    assert error <= 1e-12
    # dual feasibility, and complementary slackness on the plan up to the certified gap
    unit = mass / n**2 * np.abs(C).sum()  # the scale of `error`
    reduced = C - f[:, None] - g[None, :]
    assert reduced.min() >= -1e-12 * np.abs(C).max()
    assert np.max(reduced[plan > 0]) <= n * error * unit / mass + 1e-12 * np.abs(C).max()
    np.testing.assert_allclose(f.sum() * mass / n, g.sum() * mass / n, atol=1e-12)  # gauge
    assert mass / n * (ref - f.sum() - g.sum()) <= error * unit + 1e-12  # weak duality


def test_ties_give_an_optimal_permutation(solved64):
    C, plan, *_ = solved64["ties33"]
    _, ref = _scipy(C)
    assert len(np.unique(C)) <= 4 and ref > 0
    assert np.sum(C[plan > 0]) == ref  # integer costs: exactly optimal


def test_jit_and_vmap_over_a_batch():
    n = 33
    clouds = [_clouds(n, seed) for seed in (10, 11, 12)]
    Cs = np.stack([sqdist(x, y) for x, y in clouds])
    with jax.enable_x64(True):
        out = jax.jit(jax.vmap(lambda C: _fields(C)))(jnp.asarray(Cs))
        plans, costs, status = (np.asarray(out[FIELDS.index(k)]) for k in ("plan", "cost", "status"))
    for C, plan, cost, s in zip(Cs, plans, costs, status):
        perm, ref = _scipy(C)
        assert s == monge.Status.CONVERGED
        np.testing.assert_allclose(cost, ref / n, rtol=1e-9)
        np.testing.assert_array_equal(plan > 0, perm > 0)  # continuous costs: unique optimum
    jaxpr = str(jax.make_jaxpr(jax.vmap(lambda C: _fields(C)[0]))(Cs.astype(np.float32)))
    assert "_host_call" not in jaxpr  # pure JAX: no host solver
    if jax.default_backend() == "cpu":  # a loop over the 3 problems, not a batched one
        assert "length=3" in jaxpr
        assert "length=3" not in str(jax.make_jaxpr(lambda C: _fields(C)[0])(Cs[0].astype(np.float32)))


def test_gradient_is_the_plan():
    n = 33
    C = sqdist(*_clouds(n, 4))
    perm, _ = _scipy(C)
    reg_cost = lambda C: Exact(method="auction")(monge.LinearProblem(monge.CostMatrix(C))).reg_cost  # noqa: E731
    with jax.enable_x64(True):
        grad = np.asarray(jax.grad(reg_cost)(jnp.asarray(C)))
    np.testing.assert_allclose(grad, perm / n, atol=1e-15)  # d OT / dC = the optimal plan


def test_float32_is_certified_and_within_its_gap():
    n = 120
    x, y = _clouds(n, 5)
    solver = Exact(method="auction")
    sol = solver(monge.LinearProblem(monge.PointCloud(x.astype(np.float32), y.astype(np.float32))))
    C = np.asarray(sol.problem.geom.cost_matrix(), np.float64)  # the float32 costs, exactly
    _, ref = _scipy(C)
    plan, f, g = (np.asarray(z, np.float64) for z in (sol.plan, sol.f, sol.g))
    error = float(sol.error)
    assert sol.plan.dtype == jnp.float32 and bool(sol.converged)
    assert error <= float(solver.tolerance(jnp.float32)) <= 2e-5
    unit = np.abs(C).mean()
    cost = np.sum(plan * C)
    assert ref / n - 1e-6 * unit <= cost <= ref / n + error * unit + 1e-6 * unit
    assert np.max(f[:, None] + g[None, :] - C) <= 1e-5 * np.abs(C).max()


def test_budget_exhausted_is_reported_not_silent():
    C = sqdist(*_clouds(33, 6))
    with jax.enable_x64(True):
        plan, *_, error, status, n_iters = (np.asarray(z) for z in _fields(C, max_iterations=3))
    assert status == monge.Status.MAX_ITERATIONS and n_iters == 3 and error > 1e-12
    # still a feasible plan (a permutation), with a valid certificate
    np.testing.assert_allclose(plan.sum(0), np.full(33, 1 / 33))
    np.testing.assert_allclose(plan.sum(1), np.full(33, 1 / 33))
    assert _scipy(C)[1] / 33 - 1e-12 <= np.sum(plan * C) <= _scipy(C)[1] / 33 + error * np.abs(C).mean()


def _cloud32(seed, threshold):
    """A float32 point-cloud problem (n = 33) with an explicit threshold: one compilation
    for the next two tests."""
    x, y = (z.astype(np.float32) for z in _clouds(33, seed))
    sol = Exact(method="auction", threshold=threshold)(monge.LinearProblem(monge.PointCloud(x, y)))
    return sol, np.asarray(sol.problem.geom.cost_matrix(), np.float64)


@pytest.mark.slow
def test_threshold_default_and_explicit():
    assert Exact(method="auction").threshold is None
    with jax.enable_x64(True):
        assert float(Exact(method="auction").tolerance(jnp.float64)) == 1e-12
    np.testing.assert_allclose(float(Exact(method="auction").tolerance(jnp.float32)), 1.19e-5, rtol=1e-2)
    assert Exact(method="sinkhorn_rounding").threshold == np.float32(1e-3)  # unchanged default
    with pytest.raises(ValueError, match=r"`threshold` must be positive and finite; received"):
        Exact(method="auction", threshold=0.0)
    sol, C = _cloud32(7, threshold=1e-2)  # a loose threshold stops early, certified
    error = float(sol.error)
    assert bool(sol.converged) and error <= 1e-2
    ref = _scipy(C)[1] / 33
    assert ref * (1 - 1e-6) <= float(sol.cost) <= ref + error * np.abs(C).mean() + 1e-6 * ref


def test_new_data_and_threshold_do_not_recompile():
    _cloud32(8, threshold=1e-3)

    def again():
        for seed, threshold in ((9, 1e-4), (10, 1e-5)):
            _cloud32(seed, threshold)[0].plan.block_until_ready()

    assert not [m for m in compile_log(again) if "Compiling" in m and "_solve" in m]


def test_rejects_what_it_cannot_solve():
    x, y = _clouds(7, 9)
    with pytest.raises(ValueError, match=r"Exact\(method='auction'\) needs as many sources as targets; received n=7, m=6"):
        _fields(sqdist(x, y[:6]))
    a = np.linspace(1, 2, 7)
    with pytest.raises(ValueError, match=r"Exact\(method='auction'\) needs uniform weights, but `a` ranges from 0.0952381 to 0.190476"):
        _fields(sqdist(x, y), a / a.sum(), np.full(7, 1 / 7))
    with pytest.raises(RUNTIME, match=r"Exact\(method='auction'\) needs uniform weights"):
        jax.jit(lambda w: _fields(sqdist(x, y), w, w)[3])(a / a.sum())
    with pytest.raises(ValueError, match=r"`exact` must be an Exact solver with method 'network_simplex' or"):
        PartialExact(Exact(method="auction"))
    with pytest.raises(ValueError, match=r"`C` must be a square \(n, n\) cost matrix; received shape \(7, 6\)"):
        auction(jnp.ones((7, 6)), 1e-6, 10)


def test_one_point():
    out = auction(jnp.array([[3.0]]), 1e-6, 10)
    assert out.cols.tolist() == [0] and float(out.f[0] + out.g[0]) == 3.0
    assert int(out.status) == monge.Status.CONVERGED
