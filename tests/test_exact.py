"""Exact OT (`monge.solvers.linear.exact`) against POT's network simplex, scipy's
`linear_sum_assignment` and finite differences of POT's `emd2`/`emd` (float64)."""

import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import ot
import pytest
from conftest import sqdist, compile_log
from scipy.optimize import linear_sum_assignment

import monge
from monge.solvers.linear.exact import Exact

RUNTIME = (eqx.EquinoxRuntimeError, jax.errors.JaxRuntimeError)


def _exact(C, a=None, b=None, **kwargs):
    return Exact(**kwargs)(monge.LinearProblem(monge.CostMatrix(C), a, b))


def _check_certificate(C, a, b, plan, f, g, cost, atol):
    """Primal feasibility, dual feasibility and zero duality gap (up to atol)."""
    np.testing.assert_allclose(plan.sum(1), a, atol=atol)
    np.testing.assert_allclose(plan.sum(0), b, atol=atol)
    assert plan.min() >= -atol
    assert np.max(f[:, None] + g[None, :] - C) <= atol
    np.testing.assert_allclose(f @ a + g @ b, cost, atol=atol * max(1.0, abs(cost)))
    slack = (C - f[:, None] - g[None, :])[plan > 1e-12]  # complementary slackness
    assert np.max(np.abs(slack)) <= atol * 10


def test_network_simplex_matches_emd2(clouds):
    x, y, a, b = clouds
    C = sqdist(x, y)
    ref = ot.emd2(a, b, C)
    with jax.enable_x64(True):
        sol = _exact(C, a, b)
        plan, f, g = (np.asarray(z) for z in (sol.plan, sol.f, sol.g))
        cost = float(sol.cost)
        assert plan.dtype == np.float64
        assert abs(cost - ref) <= 1e-8 * ref
        assert abs(float(sol.reg_cost) - ref) <= 1e-8 * ref
        assert bool(sol.converged) and int(sol.status) == monge.Status.CONVERGED
        assert 0 <= float(sol.error) <= 1e-12
        assert int(sol.n_iters) == -1
    _check_certificate(C, a, b, plan, f, g, ref, atol=1e-12)
    np.testing.assert_allclose(f @ a, g @ b, atol=1e-12)  # the documented gauge
    np.testing.assert_allclose(plan, ot.emd(a, b, C), atol=1e-14)  # unique solution


def test_front_door_epsilon_zero(clouds):
    x, y, a, b = clouds
    ref = ot.emd2(a, b, sqdist(x, y))
    with jax.enable_x64(True):
        sol = monge.solve(x, y, a=a, b=b, epsilon=0)
        assert isinstance(sol, monge.solution.PlanSolution)
        assert abs(float(sol.cost) - ref) <= 1e-8 * ref
        by_matrix = monge.solve_matrix(sqdist(x, y), a=a, b=b, epsilon=0.0)
        assert abs(float(by_matrix.cost) - ref) <= 1e-8 * ref
    # float32 by default, still exact up to float32 rounding of the costs
    sol32 = monge.solve(x.astype(np.float32), y.astype(np.float32), epsilon=0)
    assert sol32.plan.dtype == jnp.float32 and bool(sol32.converged)
    ref_uniform = ot.emd2(np.ones(7) / 7, np.ones(11) / 11, sqdist(x, y))
    assert abs(float(sol32.cost) - ref_uniform) <= 1e-5 * ref_uniform


def test_zero_weights_and_unnormalised_masses(clouds):
    x, y, a, b = clouds
    C = sqdist(x, y)
    a = np.where(np.arange(7) == 2, 0.0, a) * 3.0
    b = np.where(np.arange(11) == 5, 0.0, b)
    b = b * a.sum() / b.sum()
    ref = ot.emd2(a, b, C)
    with jax.enable_x64(True):
        sol = _exact(C, a, b)
        plan, f, g = (np.asarray(z) for z in (sol.plan, sol.f, sol.g))
        assert abs(float(sol.cost) - ref) <= 1e-8 * ref
    _check_certificate(C, a, b, plan, f, g, ref, atol=1e-11)


def test_assignment_matches_linear_sum_assignment():
    rng = np.random.default_rng(3)
    C = rng.uniform(size=(9, 9))
    rows, cols = linear_sum_assignment(C)
    with jax.enable_x64(True):
        sol = _exact(C, method="assignment")
        plan, f, g = (np.asarray(z) for z in (sol.plan, sol.f, sol.g))
        assert bool(sol.converged)
        np.testing.assert_allclose(float(sol.cost), C[rows, cols].mean(), rtol=1e-12)
    expected = np.zeros((9, 9))
    expected[rows, cols] = 1 / 9
    np.testing.assert_allclose(plan, expected, atol=1e-15)
    uniform = np.ones(9) / 9
    _check_certificate(C, uniform, uniform, plan, f, g, C[rows, cols].mean(), atol=1e-12)
    np.testing.assert_allclose(C[rows, cols].mean(), ot.emd2(uniform, uniform, C), rtol=1e-12)


def test_assignment_rejects_general_problems(clouds):
    x, y, a, b = clouds
    with pytest.raises(ValueError, match=r"needs as many sources as targets; received n=7, m=11"):
        _exact(sqdist(x, y), method="assignment")
    C = sqdist(x, x)
    with pytest.raises(ValueError, match=r"needs uniform weights, but `a` ranges from"):
        _exact(C, a, np.ones(7) / 7, method="assignment")


def test_sinkhorn_rounding_under_jit_and_vmap_is_certified():
    rng = np.random.default_rng(5)
    xs, ys = rng.normal(size=(3, 7, 2)), rng.normal(size=(3, 11, 2)) + 0.5
    Cs = np.stack([sqdist(x, y) for x, y in zip(xs, ys)])
    a = rng.uniform(0.5, 1.5, 7)
    b = rng.uniform(0.5, 1.5, 11)
    a, b = a / a.sum(), b / b.sum()
    solver = Exact(method="sinkhorn_rounding", threshold=1e-3)

    def fields(C):
        sol = solver(monge.LinearProblem(monge.CostMatrix(C), a, b))
        return sol.plan, sol.f, sol.g, sol.cost, sol.error, sol.converged

    batched = jax.jit(jax.vmap(fields))
    jaxpr = str(jax.make_jaxpr(jax.vmap(fields))(Cs.astype(np.float32)))
    assert "_host_call" not in jaxpr and "_host_call" in str(jax.make_jaxpr(lambda C: _exact(C).cost)(Cs[0]))
    for dtype, atol in ((np.float32, 2e-6), (np.float64, 1e-12)):
        with jax.enable_x64(dtype == np.float64):
            out = [np.asarray(z) for z in batched(jnp.asarray(Cs, dtype))]
        for k, (plan, f, g, cost, error, converged) in enumerate(zip(*out)):
            C = Cs[k]
            ref = ot.emd2(a, b, C)
            unit = a @ C @ b  # the documented scale of `error` (unit masses)
            assert converged and error <= 1e-3
            assert ref - atol <= cost <= ref + error * unit + atol * 10
            np.testing.assert_allclose(plan.sum(1), a, atol=atol)
            np.testing.assert_allclose(plan.sum(0), b, atol=atol)
            assert np.max(f[:, None] + g[None, :] - C) <= atol * 10
            assert f @ a + g @ b <= ref + atol * 10  # weak duality: a certified lower bound


def test_network_simplex_under_vmap(clouds):
    x, y, a, b = clouds
    Cs = np.stack([sqdist(x, y), sqdist(x + 0.3, y)])
    with jax.enable_x64(True):
        costs = jax.jit(jax.vmap(lambda C: _exact(C, a, b).cost))(Cs)
    np.testing.assert_allclose(np.asarray(costs), [ot.emd2(a, b, C) for C in Cs], rtol=1e-10)


def test_host_methods_solve_a_vmapped_batch_in_one_call(monkeypatch):
    """Nested vmap over costs and weights (a 2 x 3 batch, weights batched along one
    axis only): one host round trip for the whole batch, and every problem's cost,
    duals and status as if solved alone (POT, scipy)."""
    from monge.solvers.linear import exact

    rng = np.random.default_rng(5)
    n = 6
    Cs = rng.uniform(size=(2, 3, n, n))
    As = rng.uniform(0.5, 1.5, size=(3, n))
    As = As / As.sum(1, keepdims=True)
    b = np.full(n, 1 / n)
    # `_host_batch` is looked up when the callback runs (not when it is traced, which
    # an earlier test may have done already): it records each round trip's batch shape
    trips = []
    original = exact._host_batch
    monkeypatch.setattr(exact, "_host_batch",
                        lambda host, C, *z, **k: trips.append(C.shape[:-2]) or original(host, C, *z, **k))
    with jax.enable_x64(True):
        def cost(C, a, method):
            sol = Exact(method=method)(monge.LinearProblem(monge.CostMatrix(C), a, b))
            return sol.cost, sol.f, sol.status

        inner = jax.vmap(cost, in_axes=(0, 0, None))  # over the 3: costs and weights
        simplex = jax.jit(jax.vmap(inner, in_axes=(0, None, None)), static_argnums=2)
        costs, fs, status = simplex(Cs, As, "network_simplex")
        assert trips == [(2, 3)]  # six problems, one round trip
        for i in range(2):
            for k in range(3):
                np.testing.assert_allclose(float(costs[i, k]), ot.emd2(As[k], b, Cs[i, k]), rtol=1e-10)
        assert np.all(np.asarray(status) == monge.Status.CONVERGED)
        uniform = jax.jit(jax.vmap(lambda C: cost(C, b, "assignment")[0]))(Cs[0])
        for k in range(3):
            rows, cols = linear_sum_assignment(Cs[0, k])
            np.testing.assert_allclose(float(uniform[k]), Cs[0, k][rows, cols].mean(), rtol=1e-12)


def test_pivot_budget_is_reported_not_silent():
    rng = np.random.default_rng(0)
    C = rng.uniform(size=(30, 40))
    sol = _exact(C, max_iterations=2)
    assert not bool(sol.converged) and int(sol.status) == monge.Status.MAX_ITERATIONS
    with pytest.raises(eqx.EquinoxRuntimeError, match="not converged"):
        Exact(max_iterations=2)(monge.LinearProblem(monge.CostMatrix(C)), throw=True)


def _fd(fun, z, dz, h=1e-6):
    return (fun(z + h * dz) - fun(z - h * dz)) / (2 * h)


def test_gradients_match_finite_differences_of_emd2(clouds):
    x, y, a, b = clouds
    rng = np.random.default_rng(1)
    dx = rng.normal(size=x.shape)
    da = rng.normal(size=7)
    da -= da.mean()  # a tangent direction of the simplex
    db = rng.normal(size=11)
    db -= db.mean()
    emd2 = lambda x, a, b: ot.emd2(a, b, sqdist(x, y))  # noqa: E731
    with jax.enable_x64(True):
        for read in (lambda s: s.reg_cost, lambda s: s.cost):
            fn = lambda x, a, b: read(Exact()(monge.LinearProblem(monge.PointCloud(x, y), a, b)))  # noqa: E731
            gx, ga, gb = (np.asarray(t) for t in jax.grad(fn, argnums=(0, 1, 2))(x, a, b))
            np.testing.assert_allclose(np.sum(gx * dx), _fd(lambda z: emd2(z, a, b), x, dx), rtol=1e-6)
            np.testing.assert_allclose(ga @ da, _fd(lambda z: emd2(x, z, b), a, da), rtol=1e-6)
            np.testing.assert_allclose(gb @ db, _fd(lambda z: emd2(x, a, z), b, db), rtol=1e-6)
            # scaling both masses scales the cost: the gauge keeps a valid dual pair
            np.testing.assert_allclose(ga @ a + gb @ b, emd2(x, a, b), rtol=1e-9)


def test_plan_derivative(clouds):
    """The plan is piecewise constant in C (zero gradient) and piecewise linear in the
    weights: its VJP matches finite differences of POT's `emd` plan."""
    x, y, a, b = clouds
    C = sqdist(x, y)
    rng = np.random.default_rng(2)
    R = rng.normal(size=C.shape)
    da = rng.normal(size=7)
    da -= da.mean()
    db = rng.normal(size=11)
    db -= db.mean()
    with jax.enable_x64(True):
        plan_of = lambda C, a, b: _exact(C, a, b).plan  # noqa: E731
        _, vjp = jax.vjp(plan_of, jnp.asarray(C), jnp.asarray(a), jnp.asarray(b))
        gC, ga, gb = (np.asarray(t) for t in vjp(jnp.asarray(R)))
    assert np.all(gC == 0)  # (f and g are differentiable: tests/test_silent_grads.py)
    expected = np.sum(R * _fd(lambda t: ot.emd(a + t * da, b + t * db, C), 0.0, 1.0, h=1e-7))
    np.testing.assert_allclose(ga @ da + gb @ db, expected, rtol=1e-6)


def test_exact_rejects_unbalanced_and_bad_config(clouds):
    x, y, a, b = clouds
    with pytest.raises(ValueError, match=r"Exact OT \(epsilon=0\) is only supported for balanced problems, tau_a = tau_b = 1; received tau_a=array\(0\.5"):
        monge.solve(x, y, epsilon=0, tau_a=0.5)
    with pytest.raises(ValueError, match=r"only supported for balanced"):
        Exact()(monge.LinearProblem(monge.PointCloud(x, y), tau_b=0.9, epsilon=1.0))
    with pytest.raises(ValueError, match=r"`method` must be one of \['network_simplex', 'assignment', 'sinkhorn_rounding', 'auction'\]; received 'simplex'"):
        Exact(method="simplex")
    with pytest.raises(ValueError, match=r"`max_iterations` must be a positive integer or None; received 0"):
        Exact(max_iterations=0)
    with pytest.raises(ValueError, match=r"`epsilon_decay` must lie in \(0, 1\); received"):
        Exact(method="sinkhorn_rounding", epsilon_decay=1.0)
    with pytest.raises(ValueError, match=r"`Exact` solves a monge.LinearProblem; received ndarray"):
        Exact()(x)
    with pytest.raises(ValueError, match=r"balanced problem needs equal masses"):
        monge.solve(x, y, a=a * 2, b=b, epsilon=0)
    with pytest.raises(ValueError, match=r"`epsilon` must be positive"):
        monge.solve(x, y, epsilon=-1.0)
    with pytest.raises(RUNTIME, match=r"needs equal masses .* \(exact OT is balanced\)"):
        jax.jit(lambda w: _exact(sqdist(x, y), w, b).cost)(a * 2)


def test_missing_pot_says_how_to_install(clouds, monkeypatch):
    x, y, _, _ = clouds
    monkeypatch.setitem(sys.modules, "ot", None)
    with pytest.raises(ImportError, match=r'pip install pot scipy \(or pip install -e "\.\[exact\]" in a clone of monge\)'):
        monge.solve(x, y, epsilon=0)


def _compiles_during(fn, name):
    return [m for m in compile_log(fn) if "Compiling" in m and name in m]


def test_new_data_and_threshold_do_not_recompile(clouds):
    x, y, _, _ = clouds
    x, y = x.astype(np.float32), y.astype(np.float32)
    monge.solve(x, y, epsilon=0)  # compile
    Exact(method="sinkhorn_rounding")(monge.LinearProblem(monge.PointCloud(x, y)))

    def again():
        for shift in (0.5, 1.0):
            monge.solve(x + shift, y, epsilon=0).plan.block_until_ready()
            solver = Exact(method="sinkhorn_rounding", threshold=1e-2 * shift, epsilon=1e-2 * shift)
            solver(monge.LinearProblem(monge.PointCloud(x + shift, y))).plan.block_until_ready()

    assert not _compiles_during(again, "_solve")


def test_options_exact_ot_cannot_honour_are_errors():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(5, 2)), rng.normal(size=(6, 2))
    with pytest.raises(ValueError, match=r"progress=True has no effect on exact OT \(epsilon=0\)"):
        monge.solve(x, y, epsilon=0, progress=True)
    with pytest.raises(ValueError, match=r"implicit_diff=False, online=True has no effect on partial OT"):
        monge.solve(x, y, epsilon=0.1, mass=0.5, implicit_diff=False, online=True)
