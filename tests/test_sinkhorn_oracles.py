"""Sinkhorn against independent references: POT (float64), scipy, closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import ot
import pytest
from conftest import sqdist
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist

import monge

EPS = 0.5


def pot_plan(a, b, M, eps):
    return ot.sinkhorn(a, b, M, eps, method="sinkhorn_log", stopThr=1e-13, numItermax=100_000)


@pytest.mark.parametrize(
    "cost, reference",
    [
        ("sqeuclidean", sqdist),
        ("euclidean", lambda x, y: cdist(x, y)),
        ("cityblock", lambda x, y: cdist(x, y, "cityblock")),
        ("cosine", lambda x, y: cdist(x, y, "cosine")),
        (monge.costs.PNorm(3.0), lambda x, y: cdist(x, y, "minkowski", p=3)),
        (
            lambda u, v: jnp.sum(jnp.abs(u - v) ** 1.5),
            lambda x, y: (np.abs(x[:, None] - y[None]) ** 1.5).sum(-1),
        ),
    ],
    ids=["sqeuclidean", "euclidean", "cityblock", "cosine", "pnorm3", "callable"],
)
def test_cost_matches_pot_x64(clouds, cost, reference):
    x, y, a, b = clouds
    M = reference(x, y)
    eps = 0.1 * M.mean()
    expected = np.sum(pot_plan(a, b, M, eps) * M)
    with jax.enable_x64(True):
        sol = monge.solve(x, y, a=a, b=b, cost=cost, epsilon=eps, threshold=1e-10)
        assert bool(sol.converged)
        np.testing.assert_allclose(float(sol.cost), expected, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(sol.problem.geom.cost_matrix()), M, rtol=1e-6, atol=1e-9)


def test_default_epsilon_is_five_percent_of_the_mean_cost(clouds):
    """0.05 x the a⊗b-mean of |C| (NumPy float64), for the squared Euclidean closed form
    (float32, clouds far from the origin), a pass over other costs and a matrix."""
    x, y, a, b = clouds
    for cost, reference in (("sqeuclidean", sqdist), ("cityblock", lambda x, y: cdist(x, y, "cityblock"))):
        for shift in (0.0, 1000.0):
            xs, ys = np.float32(x + shift), np.float32(y + shift)
            M = reference(xs.astype(np.float64), ys.astype(np.float64))
            geom = monge.PointCloud(jnp.asarray(xs), jnp.asarray(ys), cost=cost)
            got = monge.LinearProblem(geom, jnp.float32(a), jnp.float32(b)).resolved_epsilon()
            np.testing.assert_allclose(float(got), 0.05 * (a @ M @ b) / (a.sum() * b.sum()), rtol=1e-5)
    C = np.asarray(cdist(x, y)) - 0.7  # signed costs: the mean of |C|
    got = monge.LinearProblem(monge.CostMatrix(jnp.float32(C)), a, b).resolved_epsilon()
    np.testing.assert_allclose(float(got), 0.05 * (a @ np.abs(C) @ b) / (a.sum() * b.sum()), rtol=1e-5)


def test_cost_matches_pot_float32(clouds):
    x, y, a, b = clouds
    M = sqdist(x, y)
    expected = np.sum(pot_plan(a, b, M, EPS) * M)
    sol = monge.solve(x.astype(np.float32), y.astype(np.float32), a=a, b=b, epsilon=EPS)
    assert sol.f.dtype == jnp.float32
    assert bool(sol.converged)
    np.testing.assert_allclose(float(sol.cost), expected, rtol=1e-3)


def test_solve_matrix_and_reg_cost_vs_pot_primal(clouds):
    x, y, a, b = clouds
    M = sqdist(x, y)
    P = pot_plan(a, b, M, EPS)
    # primal <C,P> + eps KL(P || a b^T), computed from POT's plan
    primal = np.sum(P * M) + EPS * np.sum(P * np.log(P / np.outer(a, b)) - P + np.outer(a, b))
    with jax.enable_x64(True):
        sol = monge.solve_matrix(M, a=a, b=b, epsilon=EPS, threshold=1e-10)
        np.testing.assert_allclose(np.asarray(sol.plan), P, atol=1e-10)
        np.testing.assert_allclose(float(sol.reg_cost), primal, rtol=1e-8)
        r, c = sol.marginals()
        np.testing.assert_allclose(np.asarray(r), a, atol=1e-10)
        np.testing.assert_allclose(np.asarray(c), b, atol=1e-12)


def test_far_from_origin_float32(clouds):
    """Centred costs: points near 1000 keep float32 accuracy."""
    x, y, a, b = clouds
    expected = np.sum(pot_plan(a, b, sqdist(x, y), EPS) * sqdist(x, y))
    shift = 1000.0
    sol = monge.solve((x + shift).astype(np.float32), (y + shift).astype(np.float32), a=a, b=b, epsilon=EPS)
    np.testing.assert_allclose(float(sol.cost), expected, rtol=1e-3)
    C32 = monge.PointCloud((x + shift).astype(np.float32), (y + shift).astype(np.float32)).cost_matrix()
    np.testing.assert_allclose(np.asarray(C32), sqdist(x, y), atol=2e-3)


def test_small_epsilon_recovers_assignment():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(9, 2)), rng.normal(size=(9, 2))
    M = sqdist(x, y)
    _, perm = linear_sum_assignment(M)
    with jax.enable_x64(True):
        # Plain Sinkhorn is slow at this epsilon (annealing is the cure); 3000
        # iterations already put the plan within 1e-3 of the permutation.
        sol = monge.solve(x, y, epsilon=1e-3 * M.mean(), threshold=1e-5, max_iterations=3000)
        np.testing.assert_allclose(np.asarray(sol.plan) * 9, np.eye(9)[perm], atol=2e-3)
        np.testing.assert_allclose(float(sol.cost), M[np.arange(9), perm].mean(), rtol=1e-3)


@pytest.mark.parametrize("tau_a, tau_b", [(0.8, 0.8), (0.6, 1.0)])
def test_unbalanced_matches_pot(clouds, tau_a, tau_b):
    """tau = rho / (rho + eps)  <=>  POT's reg_m = rho = eps * tau / (1 - tau)."""
    x, y, a, b = clouds
    b = 1.4 * b  # unequal masses
    M = sqdist(x, y)
    rho = lambda tau: np.inf if tau == 1 else EPS * tau / (1 - tau)  # noqa: E731
    P = ot.unbalanced.sinkhorn_unbalanced(
        a, b, M, EPS, (rho(tau_a), rho(tau_b)), method="sinkhorn", reg_type="kl",
        stopThr=1e-14, numItermax=100_000,
    )
    with jax.enable_x64(True):
        sol = monge.solve(x, y, a=a, b=b, epsilon=EPS, tau_a=tau_a, tau_b=tau_b, threshold=1e-11)
        assert bool(sol.converged)
        np.testing.assert_allclose(np.asarray(sol.plan), P, atol=1e-10)
        np.testing.assert_allclose(float(sol.cost), np.sum(P * M), rtol=1e-8)
        kl = lambda p, q: np.sum(p * np.log(p / q) - p + q)  # noqa: E731
        primal = np.sum(P * M) + EPS * kl(P, np.outer(a, b)) + rho(tau_a) * kl(P.sum(1), a)
        if tau_b < 1:
            primal += rho(tau_b) * kl(P.sum(0), b)
        np.testing.assert_allclose(float(sol.reg_cost), primal, rtol=1e-7)


def test_transport_is_barycentric_projection_of_pot_plan(clouds):
    x, y, a, b = clouds
    P = pot_plan(a, b, sqdist(x, y), EPS)
    with jax.enable_x64(True):
        sol = monge.solve(x, y, a=a, b=b, epsilon=EPS, threshold=1e-11)
        np.testing.assert_allclose(np.asarray(sol.transport(x)), (P @ y) / a[:, None], atol=1e-8)
        np.testing.assert_allclose(np.asarray(sol.apply(y, axis=1)), P @ y, atol=1e-10)
        np.testing.assert_allclose(np.asarray(sol.apply(x, axis=0)), P.T @ x, atol=1e-10)


def test_transport_recovers_translation():
    """y = x + v: as epsilon -> 0 the entropic map of the cloud is the translation."""
    rng = np.random.default_rng(5)
    x = rng.uniform(size=(30, 2))
    v = np.array([0.3, -0.2])
    sol = monge.solve(x, x + v, epsilon=1e-3, threshold=1e-5, max_iterations=5000)
    np.testing.assert_allclose(np.asarray(sol.transport(x[:5])), x[:5] + v, atol=1e-2)


def test_transport_rejects_cost_without_map(clouds):
    x, y, _, _ = clouds
    sol = monge.solve(x, y, cost="euclidean", epsilon=EPS)
    with pytest.raises(ValueError, match="has no transport map"):
        sol.transport(x)
    with pytest.raises(ValueError, match="needs a point-cloud problem"):
        monge.solve_matrix(sqdist(x, y), epsilon=EPS).transport(x)


@pytest.mark.parametrize("mode", ["log", "kernel"])
@pytest.mark.parametrize("tau", [1.0, 0.7])
def test_modes_match_pot_with_zero_weights(clouds, mode, tau):
    """Zero weights drop their points: compare with POT on the reduced problem."""
    x, y, a, b = clouds
    a = a.copy()
    b = b.copy()
    a[2] = 0.0
    b[[0, 5]] = 0.0
    a, b = a / a.sum(), b / b.sum()
    keep_a, keep_b = a > 0, b > 0
    M = sqdist(x, y)[np.ix_(keep_a, keep_b)]
    if tau == 1:
        P = pot_plan(a[keep_a], b[keep_b], M, EPS)
    else:
        rho = EPS * tau / (1 - tau)
        P = ot.unbalanced.sinkhorn_unbalanced(
            a[keep_a], b[keep_b], M, EPS, rho, reg_type="kl", stopThr=1e-14, numItermax=100_000
        )
    with jax.enable_x64(True):
        problem = monge.LinearProblem(monge.PointCloud(x, y), a, b, epsilon=EPS, tau_a=tau, tau_b=tau)
        sol = monge.Sinkhorn(threshold=1e-11, mode=mode)(problem)
        assert bool(sol.converged)
        plan = np.asarray(sol.plan)
        np.testing.assert_allclose(plan[np.ix_(keep_a, keep_b)], P, atol=1e-10)
        assert np.all(plan[~keep_a] == 0) and np.all(plan[:, ~keep_b] == 0)


def test_kernel_mode_float32_small_epsilon_matches_log_mode(clouds):
    """Kernel blocks start from the previous plan, so tiny epsilon stays stable."""
    x, y, a, b = clouds
    x, y = x.astype(np.float32) * 10, y.astype(np.float32) * 10
    M = sqdist(x, y)
    eps = 2e-3 * M.mean()
    sols = {
        mode: monge.Sinkhorn(threshold=1e-3, max_iterations=20_000, mode=mode)(
            monge.LinearProblem(monge.PointCloud(x, y), a, b, epsilon=eps)
        )
        for mode in ("log", "kernel")
    }
    exact = ot.emd2(a, b, M)
    for sol in sols.values():
        assert bool(sol.converged) and np.all(np.isfinite(np.asarray(sol.f)))
        np.testing.assert_allclose(float(sol.cost), exact, rtol=2e-2)
    np.testing.assert_allclose(float(sols["kernel"].cost), float(sols["log"].cost), rtol=1e-3)


def test_annealing_same_answer_fewer_iterations(clouds):
    x, y, a, b = clouds
    M = sqdist(x, y)
    eps = 0.005 * M.mean()
    P = pot_plan(a, b, M, eps)
    with jax.enable_x64(True):
        problem = monge.LinearProblem(monge.PointCloud(x, y), a, b, epsilon=eps)
        # annealing alone (relaxation is tested on its own)
        plain = monge.Sinkhorn(threshold=1e-9, max_iterations=20_000, anneal=False, acceleration=None)(problem)
        annealed = monge.Sinkhorn(threshold=1e-9, max_iterations=20_000, acceleration=None)(problem)
        for sol in (plain, annealed):
            assert bool(sol.converged)
            np.testing.assert_allclose(np.asarray(sol.plan), P, atol=1e-9)
        assert int(annealed.n_iters) < int(plain.n_iters)


@pytest.mark.parametrize("ratio, levels", [(1 + 1e-6, 0), (1.0, 0), (1.9, 0), (4.0, 2), (9.0, 3)])
def test_annealing_schedule_ends_exactly_at_the_target(clouds, ratio, levels):
    """eps = default / ratio (the default 0.05 c-bar, in float64 from NumPy): one block
    at each of eps * 2**k, k = levels..1, then eps. A target a rounding error below the
    default runs no annealing block (it used to run a whole block at the default), and
    the recorded block errors count the blocks: `levels` above the target, then one at
    the target, which converges."""
    x, y, a, b = clouds
    default = 0.05 * np.sum(a[:, None] * b[None, :] * sqdist(x, y))
    eps = default / ratio
    problem = monge.LinearProblem(monge.PointCloud(jnp.float32(x), jnp.float32(y)), a, b, epsilon=eps)
    common = dict(threshold=1e-2, inner_iterations=200, acceleration=None)
    annealed = monge.Sinkhorn(**common)(problem)
    plain = monge.Sinkhorn(anneal=False, **common)(problem)
    assert bool(annealed.converged) and bool(plain.converged)
    n_blocks = int(np.sum(np.asarray(annealed.errors) >= 0))
    assert n_blocks == levels + 1
    if levels == 0:  # the same iterations as without annealing
        assert int(annealed.n_iters) == int(plain.n_iters)
    else:  # annealing blocks run whole (no convergence check above the target)
        assert levels * 200 < int(annealed.n_iters) <= (levels + 1) * 200


@pytest.mark.slow
def test_annealing_keeps_implicit_gradients(clouds):
    x, y, a, b = clouds
    eps = 0.01 * sqdist(x, y).mean()

    def loss(x, anneal):
        solver = monge.Sinkhorn(threshold=1e-11, max_iterations=20_000, anneal=anneal)
        return solver(monge.LinearProblem(monge.PointCloud(x, y), a, b, epsilon=eps)).cost

    with jax.enable_x64(True):
        g_annealed = np.asarray(jax.grad(loss)(x, True))
        g_plain = np.asarray(jax.grad(loss)(x, False))
        np.testing.assert_allclose(g_annealed, g_plain, rtol=1e-7, atol=1e-10)
        h = 1e-6
        direction = np.random.default_rng(0).normal(size=x.shape)
        fd = (loss(x + h * direction, False) - loss(x - h * direction, False)) / (2 * h)
        # small epsilon: curvature ~ 1/epsilon limits both CG and finite differences
        np.testing.assert_allclose(np.sum(g_annealed * direction), float(fd), rtol=1e-4)


@pytest.mark.slow
def test_gaussian_initializer_same_plan_fewer_iterations():
    """Thornton & Cuturi's example: shifted, sheared clouds (n=40, d=2)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 2)) * [1.0, 2.0] - 5.0
    y = rng.normal(size=(40, 2)) @ np.array([[1.0, 0.5], [0.0, 1.0]])
    w = np.full(40, 1 / 40)
    P = pot_plan(w, w, sqdist(x, y), 0.5)
    with jax.enable_x64(True):
        # the initializer alone: with relaxation it loses (360 vs 310 iterations)
        runs = {
            init: monge.Sinkhorn(initializer=init, anneal=False, acceleration=None, threshold=1e-4, max_iterations=50_000)(
                monge.LinearProblem(monge.PointCloud(x, y), epsilon=5e-2)
            )
            for init in ("zeros", "gaussian")
        }
        assert all(bool(sol.converged) for sol in runs.values())
        assert int(runs["gaussian"].n_iters) < 0.7 * int(runs["zeros"].n_iters)
        sol = monge.Sinkhorn(initializer="gaussian", threshold=1e-10)(
            monge.LinearProblem(monge.PointCloud(x, y), epsilon=0.5)
        )
        np.testing.assert_allclose(np.asarray(sol.plan), P, atol=1e-10)

        def loss(x, init):
            solver = monge.Sinkhorn(initializer=init, threshold=1e-10, max_iterations=50_000)
            return solver(monge.LinearProblem(monge.PointCloud(x, y), epsilon=0.5)).cost

        np.testing.assert_allclose(
            np.asarray(jax.grad(loss)(x, "gaussian")), np.asarray(jax.grad(loss)(x, "zeros")), rtol=1e-6, atol=1e-9
        )
