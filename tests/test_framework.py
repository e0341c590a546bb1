"""The solver framework: the shared driver, warm starts and the geometry protocol.

References are independent of the code under test: POT's float64 log-domain Sinkhorn
on the dense cost, NumPy products, and a hand-written geometry that stores no matrix.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import ot
import pytest

import monge
from monge.geometry import AbstractGeometry, CostMatrix, PointCloud
from monge.solvers import driver

from conftest import sqdist


class Factored(AbstractGeometry):
    """A cost given by factors, $C = A B^\\top$, never stored: blocks of rows (or
    columns) are products of slices of the factors, and `apply_cost` is two thin
    products. `cost_matrix` refuses, so a solver that reads it fails the test."""

    A: jax.Array
    B: jax.Array
    block: int = eqx.field(static=True, default=3)

    @property
    def shape(self):
        return (self.A.shape[0], self.B.shape[0])

    @property
    def dtype(self):
        return self.A.dtype

    def cost_matrix(self):
        raise AssertionError("the factored geometry must not be materialised")

    def precompute(self):
        return self

    def scan_blocks(self, fn, axis, carry, *args):
        lines, others = (self.A, self.B) if axis == 1 else (self.B, self.A)
        outs = []
        for start in range(0, lines.shape[0], self.block):  # static, uneven last block
            part = slice(start, start + self.block)
            c = lines[part] @ others.T if axis == 1 else others @ lines[part].T
            carry, out = fn(c, carry, *(z[part] for z in args))
            outs.append(out)
        return carry, jax.tree_util.tree_map(lambda *zs: jnp.concatenate(zs), *outs)

    def apply_cost(self, v, axis):
        return self.A @ (self.B.T @ v) if axis == 1 else self.B @ (self.A.T @ v)


@pytest.fixture(scope="module")
def factors():
    rng = np.random.default_rng(3)
    A = rng.uniform(0.0, 1.0, size=(8, 2))
    B = rng.uniform(0.0, 1.0, size=(11, 2))
    a = rng.uniform(0.5, 1.5, 8)
    b = rng.uniform(0.5, 1.5, 11)
    return A, B, a / a.sum(), b / b.sum()


def test_sinkhorn_runs_on_a_geometry_through_its_methods(factors):
    """Sinkhorn, its solution's plan, cost and marginals, and the implicit gradient all
    run on a geometry that only provides blocks (no stored matrix), and match POT on
    the dense product in float64."""
    A, B, a, b = factors
    eps = 0.05
    with jax.enable_x64(True):
        geom = Factored(jnp.asarray(A), jnp.asarray(B))
        sol = monge.Sinkhorn(threshold=1e-10)(monge.LinearProblem(geom, a, b, epsilon=eps))
        assert bool(sol.converged)
        P_ref = ot.sinkhorn(a, b, A @ B.T, eps, method="sinkhorn_log", stopThr=1e-14, numItermax=100_000)
        np.testing.assert_allclose(np.asarray(sol.plan), P_ref, atol=1e-9)
        np.testing.assert_allclose(float(sol.cost), np.sum(P_ref * (A @ B.T)), rtol=1e-8)
        np.testing.assert_allclose(np.asarray(sol.marginals()[0]), a, atol=1e-9)

        # gradient of the regularised cost w.r.t. A: (dC/dA)^T P = P B (envelope theorem)
        def reg(A_):
            return monge.Sinkhorn(threshold=1e-10)(
                monge.LinearProblem(Factored(A_, jnp.asarray(B)), a, b, epsilon=eps)).reg_cost

        np.testing.assert_allclose(np.asarray(jax.grad(reg)(jnp.asarray(A))), P_ref @ B, atol=1e-8)


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("vector", [False, True], ids=["vector", "matrix"])
def test_apply_cost_matches_numpy(axis, vector):
    """`apply_cost` (C v, C^T v) of every geometry kind against NumPy in float64: the
    block default (matrix, online cloud with a cost without closed form) and the
    closed form of the squared Euclidean point cloud (far from the origin too)."""
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(7, 3)) + 100.0, rng.normal(size=(5, 3)) + 100.5
    C = sqdist(x, y)
    length = C.shape[axis]
    v = rng.normal(size=(length, 2) if vector else (length,))
    ref = C @ v if axis == 1 else C.T @ v
    with jax.enable_x64(True):
        geoms = [CostMatrix(jnp.asarray(C)), PointCloud(x, y), PointCloud(x, y, online=True, chunk_size=2),
                 PointCloud(x, y, cost=lambda p, q: jnp.sum((p - q) ** 2), online=True, chunk_size=2)]
        for geom in geoms:
            np.testing.assert_allclose(np.asarray(geom.apply_cost(jnp.asarray(v), axis)), ref, rtol=1e-10)
    # float32: the centred closed form keeps the relative accuracy of the matrix
    out = PointCloud(x.astype(np.float32), y.astype(np.float32)).apply_cost(jnp.asarray(v, jnp.float32), axis)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=2e-4, atol=2e-4 * np.abs(ref).max())


def test_geometry_protocol_supports():
    """Point clouds expose their points and cost; cost matrices have none, and asking
    to replace their points is an error that says what is needed."""
    x, y = np.zeros((3, 2)), np.ones((4, 2))
    cloud = PointCloud(x, y)
    assert cloud.supports[0].shape == (3, 2) and cloud.ground_cost is not None
    moved = cloud.with_supports(jnp.ones((5, 2)), y)
    assert moved.shape == (5, 4)
    matrix = CostMatrix(np.ones((3, 4)))
    assert matrix.supports is None and matrix.materialized and not cloud.materialized
    with pytest.raises(ValueError, match="has no points to replace"):
        matrix.with_supports(x, y)


@pytest.mark.slow
@pytest.mark.parametrize("online, tau", [(False, 1.0), (True, 0.8), (True, 1.0), (False, 0.8)])
def test_warm_start_same_answer_fewer_iterations(clouds, online, tau):
    """A warm start from a solution gives the same coupling (to POT's, float64) in no
    more iterations; from a neighbouring epsilon too; its gradient is the cold one's."""
    x, y, a, b = clouds
    M = sqdist(x, y)
    eps = 0.05 * M.mean()
    with jax.enable_x64(True):
        geom = PointCloud(x, y, online=online, chunk_size=3 if online else None)
        solver = monge.Sinkhorn(threshold=1e-9)
        problem = monge.LinearProblem(geom, a, b, epsilon=eps, tau_a=tau, tau_b=tau)
        cold = solver(problem)
        warm = solver(problem, init=cold)
        near = solver(monge.LinearProblem(geom, a, b, epsilon=1.3 * eps, tau_a=tau, tau_b=tau))
        from_near = solver(problem, init=(near.f, near.g))
        if tau == 1.0:
            ref = ot.sinkhorn(a, b, M, eps, method="sinkhorn_log", stopThr=1e-14, numItermax=100_000)
        else:
            rho = eps * tau / (1 - tau)
            ref = ot.unbalanced.sinkhorn_unbalanced(a, b, M, eps, rho, reg_type="kl", stopThr=1e-14,
                                                     numItermax=100_000)
        for sol in (cold, warm, from_near):
            assert bool(sol.converged)
            np.testing.assert_allclose(np.asarray(sol.plan), ref, atol=1e-7)
        assert int(warm.n_iters) <= 1 < int(cold.n_iters)
        assert int(from_near.n_iters) <= int(cold.n_iters)

        def loss(x_, init):
            p = monge.LinearProblem(PointCloud(x_, y, online=online, chunk_size=3 if online else None),
                                    a, b, epsilon=eps, tau_a=tau, tau_b=tau)
            return solver(p, init=init).reg_cost

        g_cold = jax.grad(loss)(jnp.asarray(x), None)
        g_warm = jax.grad(loss)(jnp.asarray(x), (near.f, near.g))
        np.testing.assert_allclose(np.asarray(g_warm), np.asarray(g_cold), atol=1e-7)


def test_warm_start_under_jit_and_vmap(clouds):
    """`init` is traced (no recompile for new potentials) and may be batched."""
    x, y, a, b = clouds
    problem = monge.LinearProblem(PointCloud(x, y), a, b, epsilon=0.5)
    solver = monge.Sinkhorn(threshold=1e-6)
    cold = solver(problem)
    solve = jax.jit(lambda f, g: solver(problem, init=(f, g)).cost)
    np.testing.assert_allclose(float(solve(cold.f, cold.g)), float(cold.cost), rtol=1e-5)
    batch = jax.vmap(solve)(jnp.stack([cold.f, 0 * cold.f]), jnp.stack([cold.g, 0 * cold.g]))
    np.testing.assert_allclose(np.asarray(batch), float(cold.cost), rtol=1e-5)


def test_warm_start_errors(clouds):
    x, y, a, b = clouds
    problem = monge.LinearProblem(PointCloud(x, y), a, b, epsilon=0.5)
    with pytest.raises(ValueError, match=r"shapes \(7,\) and \(11,\).*received \(11,\) and \(7,\)"):
        monge.Sinkhorn()(problem, init=(np.zeros(11), np.zeros(7)))
    with pytest.raises(ValueError, match="previous solution or a pair of potentials"):
        monge.Sinkhorn()(problem, init=np.zeros(7))


class _Halving(driver.AbstractIterativeSolver):
    """x <- x / 2 per iteration; error |x|: the driver's bookkeeping is checkable by hand."""

    threshold: jax.Array = eqx.field(converter=jnp.asarray, default=1e-3)
    max_iterations: int = eqx.field(static=True, default=40)
    inner_iterations: int = eqx.field(static=True, default=4)
    progress: bool = eqx.field(static=True, default=False)

    def init(self, data, init):
        return jnp.asarray(data if init is None else init, jnp.float32)

    def step(self, data, state, k):
        for _ in range(self.inner_iterations):
            state = state / 2
        return state, driver.Block(error=jnp.abs(state), n_run=jnp.asarray(self.inner_iterations),
                                   final=k >= 1)


def test_driver_counts_stops_and_statuses():
    """Blocks, errors, the final flag, statuses and throw, on a map with a closed form:
    from 1, |x| after k blocks of 4 halvings is 16^-k."""
    solver = _Halving()
    state, trace = driver.fixed_point(solver, 1.0, solver.init(1.0, None))
    # 16^-3 = 2.4e-4 <= 1e-3 at the third block
    assert int(trace.n_iters) == 12 and float(state) == 2.0**-12
    np.testing.assert_allclose(np.asarray(trace.errors[:4]), [16.0**-1, 16.0**-2, 16.0**-3, -1])
    converged, status = driver.status_of(trace, solver.threshold)
    assert bool(converged) and int(status) == monge.Status.CONVERGED
    # a non-final block never stops the loop, even below the threshold
    _, trace = driver.fixed_point(solver, 1e-9, solver.init(1e-9, None))
    assert int(trace.n_iters) == 8
    # out of budget
    short = _Halving(max_iterations=8)
    _, trace = driver.fixed_point(short, 1.0, short.init(1.0, None))
    converged, status = driver.status_of(trace, short.threshold)
    assert int(trace.n_iters) == 8 and not bool(converged) and int(status) == monge.Status.MAX_ITERATIONS
    # NaN is divergence, never convergence
    _, trace = driver.fixed_point(solver, jnp.nan, solver.init(jnp.nan, None))
    converged, status = driver.status_of(trace, solver.threshold)
    assert int(trace.n_iters) == 4 and not bool(converged) and int(status) == monge.Status.DIVERGED
    with pytest.raises(Exception, match="diverged"):
        driver.finish(jnp.zeros(()), status, throw=True)
    # unrolled: the same stop, by masking
    state, trace = driver.fixed_point(solver, 1.0, solver.init(1.0, None), unrolled=True)
    assert int(trace.n_iters) == 12 and float(state) == 2.0**-12


def test_front_door_passes_warm_starts_or_says_why_not(clouds):
    """`monge.solve(init=...)` reaches Sinkhorn and entropic partial OT (same answer as
    cold, against POT), and is an error where the solver takes no warm start."""
    x, y, a, b = clouds
    M = sqdist(x, y)
    with jax.enable_x64(True):
        cold = monge.solve(x, y, a=a, b=b, epsilon=0.5, threshold=1e-9)
        warm = monge.solve(x, y, a=a, b=b, epsilon=0.5, threshold=1e-9, init=cold)
        ref = ot.sinkhorn(a, b, M, 0.5, method="sinkhorn_log", stopThr=1e-14, numItermax=100_000)
        np.testing.assert_allclose(np.asarray(warm.plan), ref, atol=1e-8)
        assert int(warm.n_iters) < int(cold.n_iters)
        part = monge.solve(x, y, a=a, b=b, epsilon=0.5, mass=0.5, threshold=1e-9)
        again = monge.solve(x, y, a=a, b=b, epsilon=0.5, mass=0.5, threshold=1e-9, init=part)
        ref = ot.partial.entropic_partial_wasserstein(a, b, M, 0.5, m=0.5, stopThr=1e-14, numItermax=100_000)
        np.testing.assert_allclose(np.asarray(again.plan), ref, atol=1e-8)
    with pytest.raises(ValueError, match="take no warm start"):
        monge.solve(x, y, epsilon=0, init=cold)
    with pytest.raises(ValueError, match="init=... has no effect on partial OT"):
        monge.solve(x, y, epsilon=0, mass=0.5, init=cold)
