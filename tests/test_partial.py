"""Partial OT (`monge.solvers.linear.partial`) against POT's `ot.partial` (float64) and
finite differences."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import ot
import pytest
from conftest import sqdist

import monge
from monge.solvers.linear.exact import Exact
from monge.problems import PartialProblem
from monge.solvers.linear.partial import PartialExact, PartialSinkhorn

RUNTIME = (eqx.EquinoxRuntimeError, jax.errors.JaxRuntimeError)


@pytest.fixture(scope="module")
def data(clouds):
    """Unequal masses: a sums to 1, b to 1.3."""
    x, y, a, b = clouds
    return x, y, a, 1.3 * b, sqdist(x, y)


def _problem(C, a, b, mass, epsilon=None):
    return PartialProblem(monge.CostMatrix(C), a, b, mass=mass, epsilon=epsilon)


@pytest.mark.parametrize("mass", [0.35, 1.0])
def test_exact_matches_partial_wasserstein2(data, mass):
    x, y, a, b, C = data
    ref = ot.partial.partial_wasserstein2(a, b, C, m=mass)
    with jax.enable_x64(True):
        sol = PartialExact()(_problem(C, a, b, mass))
        plan = np.asarray(sol.plan)
        assert bool(sol.converged)
        assert abs(float(sol.cost) - ref) <= 1e-8 * ref
        assert abs(float(sol.reg_cost) - ref) <= 1e-8 * ref
        front = monge.solve_matrix(C, a=a, b=b, epsilon=0, mass=mass)
        assert abs(float(front.cost) - ref) <= 1e-8 * ref
        points = monge.solve(x, y, a=a, b=b, epsilon=0, mass=mass)
        assert abs(float(points.cost) - ref) <= 1e-8 * ref
    np.testing.assert_allclose(plan.sum(), mass, rtol=1e-12)
    assert np.all(plan.sum(1) <= a + 1e-12) and np.all(plan.sum(0) <= b + 1e-12)
    np.testing.assert_allclose(plan, ot.partial.partial_wasserstein(a, b, C, m=mass), atol=1e-12)


def test_exact_gradients_match_finite_differences(data):
    x, y, a, b, C = data
    mass, h = 0.6, 1e-6
    rng = np.random.default_rng(4)
    dx = rng.normal(size=x.shape)
    pw2 = lambda x, m: ot.partial.partial_wasserstein2(a, b, sqdist(x, y), m=m)  # noqa: E731
    with jax.enable_x64(True):
        fn = lambda x, m: PartialExact()(  # noqa: E731
            PartialProblem(monge.PointCloud(x, y), a, b, mass=m)
        ).reg_cost
        gx, gm = jax.grad(fn, argnums=(0, 1))(x, mass)
    fd_x = (pw2(x + h * dx, mass) - pw2(x - h * dx, mass)) / (2 * h)
    fd_m = (pw2(x, mass + h) - pw2(x, mass - h)) / (2 * h)
    np.testing.assert_allclose(np.sum(np.asarray(gx) * dx), fd_x, rtol=1e-6)
    np.testing.assert_allclose(float(gm), fd_m, rtol=1e-6)


def test_exact_pure_jax_is_certified(data):
    _, _, a, b, C = data
    mass = 0.6
    ref = ot.partial.partial_wasserstein2(a, b, C, m=mass)
    # the augmented balanced problem, built independently, gives the scale of `error`
    a_ext, b_ext = np.r_[a, b.sum() - mass], np.r_[b, a.sum() - mass]
    C_ext = np.pad(C, ((0, 1), (0, 1)))
    C_ext[-1, -1] = 2 * C.max()
    unit = a_ext @ np.abs(C_ext) @ b_ext / b_ext.sum()
    solver = PartialExact(Exact(method="sinkhorn_rounding", threshold=1e-3))
    with jax.enable_x64(True):
        sol = jax.jit(lambda C: solver(_problem(C, a, b, mass)))(C)
        assert bool(sol.converged) and float(sol.error) <= 1e-3
        assert ref - 1e-10 <= float(sol.reg_cost) <= ref + float(sol.error) * unit + 1e-10


def test_entropic_matches_entropic_partial_wasserstein(data):
    _, _, a, b, C = data
    mass, reg = 0.6, 0.5
    ref = ot.partial.entropic_partial_wasserstein(a, b, C, reg, m=mass, numItermax=100000, stopThr=1e-15)
    objective = np.sum(ref * C) + reg * np.sum(ref * np.log(ref))
    with jax.enable_x64(True):
        sol = PartialSinkhorn(threshold=1e-11)(_problem(C, a, b, mass, reg))
        assert bool(sol.converged)
        np.testing.assert_allclose(np.asarray(sol.plan), ref, atol=1e-10)
        np.testing.assert_allclose(float(sol.reg_cost), objective, rtol=1e-9)
        front = monge.solve_matrix(C, a=a, b=b, epsilon=reg, mass=mass, threshold=1e-11)
        np.testing.assert_allclose(np.asarray(front.plan), ref, atol=1e-10)
        plan, f, g = (np.asarray(z) for z in (sol.plan, sol.f, sol.g))
    np.testing.assert_allclose(plan, np.exp((f[:, None] + g[None, :] - C) / reg), rtol=1e-10)


def test_entropic_reg_cost_gradient(data):
    """Envelope theorem, checked by finite differences of POT's objective."""
    _, _, a, b, C = data
    mass, reg, h = 0.6, 0.5, 1e-5

    def pot_objective(C, m):
        P = ot.partial.entropic_partial_wasserstein(a, b, C, reg, m=m, numItermax=100000, stopThr=1e-15)
        return np.sum(P * C) + reg * np.sum(P * np.log(P))

    rng = np.random.default_rng(6)
    dC = rng.normal(size=C.shape)
    with jax.enable_x64(True):
        fn = lambda C, m: PartialSinkhorn(threshold=1e-11)(_problem(C, a, b, m, reg)).reg_cost  # noqa: E731
        gC, gm = jax.grad(fn, argnums=(0, 1))(C, mass)
    fd_C = (pot_objective(C + h * dC, mass) - pot_objective(C - h * dC, mass)) / (2 * h)
    fd_m = (pot_objective(C, mass + h) - pot_objective(C, mass - h)) / (2 * h)
    np.testing.assert_allclose(np.sum(np.asarray(gC) * dC), fd_C, rtol=1e-6)
    np.testing.assert_allclose(float(gm), fd_m, rtol=1e-6)


def test_entropic_float32_small_epsilon_is_stable(data):
    _, _, a, b, C = data
    sol = PartialSinkhorn(max_iterations=20000)(
        _problem(C.astype(np.float32), a.astype(np.float32), b.astype(np.float32), 0.6, 1e-3 * C.mean())
    )
    plan = np.asarray(sol.plan)
    assert plan.dtype == np.float32 and np.all(np.isfinite(plan)) and bool(sol.converged)
    np.testing.assert_allclose(plan.sum(), 0.6, rtol=1e-4)
    ref = ot.partial.partial_wasserstein2(a, b, C, m=0.6)
    assert abs(float(sol.cost) - ref) <= 1e-2 * ref  # small epsilon: close to exact


def test_partial_errors(data):
    x, y, a, b, C = data
    with pytest.raises(ValueError, match=r"`mass` must lie in \(0, min\(sum\(a\), sum\(b\)\)\] = \(0, 1\]; received 1\.5\. Pass the mass"):
        monge.solve_matrix(C, a=a, b=b, epsilon=0, mass=1.5)
    with pytest.raises(ValueError, match=r"`mass` must lie in \(0, .*received 0\."):
        monge.solve(x, y, mass=0.0)
    with pytest.raises(ValueError, match=r"Partial OT \(mass=\.\.\.\) .* needs tau_a = tau_b = 1; received tau_a=0\.5"):
        monge.solve_matrix(C, mass=0.5, tau_a=0.5)
    with pytest.raises(ValueError, match=r"`mass` must be a scalar; received shape \(2,\)"):
        monge.solve_matrix(C, mass=np.ones(2))
    with pytest.raises(ValueError, match=r"`PartialSinkhorn` needs epsilon > 0; received 0\.0\. Use PartialExact"):
        PartialSinkhorn()(_problem(C, a, b, 0.5, 0.0))
    with pytest.raises(ValueError, match=r"`epsilon` must be non-negative and finite; received"):
        _problem(C, a, b, 0.5, -1.0)
    with pytest.raises(ValueError, match=r"`exact` must be an Exact solver with method 'network_simplex' or 'sinkhorn_rounding'"):
        PartialExact(Exact(method="assignment"))
    with pytest.raises(ValueError, match=r"`PartialExact` solves a monge.solvers.linear.partial.PartialProblem"):
        PartialExact()(monge.LinearProblem(monge.CostMatrix(C)))
    with pytest.raises(RUNTIME, match=r"`mass` must lie in \(0, min\(sum\(a\), sum\(b\)\)\]"):
        jax.jit(lambda m: PartialExact()(_problem(C, a, b, m)).cost)(jnp.asarray(2.0))


def test_new_mass_and_epsilon_do_not_recompile(data):
    from test_exact import _compiles_during

    _, _, a, b, C = data
    C = C.astype(np.float32)
    monge.solve_matrix(C, a=a, b=b, epsilon=0, mass=0.3)  # compile
    monge.solve_matrix(C, a=a, b=b, epsilon=0.5, mass=0.3)

    def again():
        for mass in (0.4, 0.8):
            monge.solve_matrix(C, a=a, b=b, epsilon=0, mass=mass).plan.block_until_ready()
            monge.solve_matrix(C, a=a, b=b, epsilon=mass, mass=mass).plan.block_until_ready()

    assert not _compiles_during(again, "_solve")
