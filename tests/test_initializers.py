"""The sorting and subsample initializers (Thornton & Cuturi, 2022).

Oracles: POT's `emd`/`emd2` for the exact 1-D dual, POT's log-domain Sinkhorn for
plans and potentials (float64), the zeros start for implicit gradients (same fixed
point; the zeros gradient is checked against finite differences elsewhere).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import ot
import pytest
from conftest import sqdist

import monge
from monge import costs
from monge.solvers.linear import initializers

#: `initializers.SUBSAMPLE` in this module: 16 of the 40 and 33 points of `make_case`.
SUBSAMPLE = 16


def weights(rng, n):
    w = rng.uniform(0.5, 1.5, n)
    return w / w.sum()


def make_case(init, seed=0):
    """(x, y, a, b, eps) in float64: 1-D for sorting; for subsample, Thornton & Cuturi's
    shifted and sheared clouds in 2-D."""
    rng = np.random.default_rng(seed)
    if init == "sorting":
        x, y = rng.normal(size=(7, 1)), rng.normal(size=(11, 1)) * 0.8 + 0.5
        rel = 0.003
    else:
        x = rng.normal(size=(40, 2)) * [1.0, 2.0] - 5.0
        y = rng.normal(size=(33, 2)) @ np.array([[1.0, 0.5], [0.0, 1.0]])
        rel = 0.01
    a, b = weights(rng, len(x)), weights(rng, len(y))
    return x, y, a, b, rel * (a @ sqdist(x, y) @ b)


def pot_plan(x, y, a, b, eps):
    return ot.sinkhorn(a, b, sqdist(x, y), eps, method="sinkhorn_log", stopThr=1e-13, numItermax=200_000)


@pytest.fixture(scope="module")
def small_subsample():
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(initializers, "SUBSAMPLE", SUBSAMPLE)
        yield
    jax.clear_caches()  # drop solvers traced with the patched size


#: The initializers' runs solve a batch of problems (x + shift), under jit and vmap.
SHIFTS = np.array([0.0, 0.3, -0.5])


def solve_and_grad(init, x, y, a, b, eps, threshold):
    """Gradient of the transport cost w.r.t. x, with the plan, iteration count and
    convergence flag."""

    def loss(x):
        solver = monge.Sinkhorn(
            threshold=threshold, max_iterations=50_000, inner_iterations=1, anneal=False, initializer=init
        )
        sol = solver(monge.LinearProblem(monge.PointCloud(x, y), a, b, epsilon=eps))
        return sol.cost, (sol.plan, sol.n_iters, sol.converged)

    return jax.grad(loss, has_aux=True)(x)


solve_one = jax.jit(solve_and_grad, static_argnums=0)
solve_batch = jax.jit(jax.vmap(solve_and_grad, in_axes=(None, 0, None, None, None, None, None)), static_argnums=0)


@pytest.fixture(scope="module")
def runs(small_subsample):
    """{(case, initializer, threshold): (grad, plan, n_iters, converged)} in float64;
    the initializer's runs have a leading axis, one entry per shift in SHIFTS."""
    out = {}
    with jax.enable_x64(True):
        for case in ("sorting", "subsample"):
            x, *rest = make_case(case)
            rest = [jnp.asarray(v) for v in rest]
            for threshold in (1e-10, 1e-3):  # traced: one compile for both
                grad, aux = solve_one("zeros", jnp.asarray(x), *rest, threshold)
                out[case, "zeros", threshold] = tuple(map(np.asarray, (grad, *aux)))
                xs = jnp.asarray(x[None] + SHIFTS[:, None, None])
                grad, aux = solve_batch(case, xs, *rest, threshold)
                out[case, case, threshold] = tuple(map(np.asarray, (grad, *aux)))
    return out


# -- sorting: an exact dual of 1-D OT -------------------------------------------------


@pytest.mark.parametrize(
    "cost, h",
    [
        (costs.SqEuclidean(), np.square),
        (costs.Euclidean(), np.abs),
        (costs.PNorm(3.0), np.abs),
        ("ties", np.square),  # equal CDF breakpoints, a repeated point, a zero weight
    ],
)
def test_sorting_potential_is_an_exact_dual(cost, h):
    rng = np.random.default_rng(1)
    if cost == "ties":
        cost = costs.SqEuclidean()
        x = np.array([[2.0], [0.0], [1.0], [1.0], [3.0]])
        y = rng.normal(size=(8, 1))
        a, b = np.array([0.25, 0.25, 0.0, 0.25, 0.25]), np.full(8, 1 / 8)
    else:
        x, y = rng.normal(size=(7, 1)), rng.normal(size=(11, 1)) * 0.8 + 0.5
        a, b = weights(rng, 7), weights(rng, 11)
    C = h(x - y.T)
    with jax.enable_x64(True):
        potential = jax.jit(functools.partial(initializers.initial_potential, "sorting", eps=1.0))
        f = np.asarray(potential(monge.PointCloud(x, y, cost), jnp.asarray(a), jnp.asarray(b)))
    P = ot.emd(a, b, C)
    # g from f_i + g_j = C_ij on the support of an optimal plan (POT's)
    rows = np.argmax(P > 0, axis=0)
    g = C[rows, np.arange(len(b))] - f[rows]
    slack = C - f[:, None] - g[None, :]
    assert slack.min() > -1e-12  # feasible: f_i + g_j <= C_ij for every pair
    np.testing.assert_allclose(slack[P > 0], 0.0, atol=1e-12)  # complementary slackness
    np.testing.assert_allclose(a @ f + b @ g, ot.emd2(a, b, C), rtol=1e-8)
    np.testing.assert_allclose(a @ f, b @ g, rtol=1e-10)  # centred


# -- subsample: the c-transform of a smaller problem's potential ---------------------


@pytest.mark.slow
def test_subsample_potential_without_subsampling_is_the_entropic_potential():
    """With k = n = m nothing is dropped: f0 is the c-transform of the problem's own g,
    POT's potential up to the inner solve's tolerance (threshold 1e-3), online too."""
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(40, 2)), rng.normal(size=(40, 2)) + 0.5
    a, b = weights(rng, 40), weights(rng, 40)
    eps = 0.05 * (a @ sqdist(x, y) @ b)
    _, log = ot.sinkhorn(a, b, sqdist(x, y), eps, method="sinkhorn_log", stopThr=1e-13, log=True)
    f_pot = eps * (log["log_u"] - np.log(a))
    with jax.enable_x64(True):
        args = (jnp.asarray(a), jnp.asarray(b), jnp.asarray(eps))
        f = initializers.subsample_potential(monge.PointCloud(x, y), *args, k=40)
        f_online = initializers.subsample_potential(monge.PointCloud(x, y, online=True, chunk_size=7), *args, k=40)
    # the online start solves its subsample online too (other arithmetic, same tolerance)
    for f in (np.asarray(f), np.asarray(f_online)):
        np.testing.assert_allclose(f - a @ f, f_pot - a @ f_pot, atol=1e-2 * eps)


# -- both: same fixed point, same gradient, fewer iterations --------------------------


@pytest.mark.slow
@pytest.mark.parametrize("init", ["sorting", "subsample"])
def test_same_plan_as_pot_and_same_gradient_as_zeros_under_jit_and_vmap(runs, init):
    grads, plans, _, converged = runs[init, init, 1e-10]
    x, y, a, b, eps = make_case(init)
    assert np.all(converged)
    for plan, shift in zip(plans, SHIFTS):
        np.testing.assert_allclose(plan, pot_plan(x + shift, y, a, b, eps), atol=1e-9)
    np.testing.assert_allclose(grads[0], runs[init, "zeros", 1e-10][0], rtol=1e-6, atol=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("init, ratio", [("sorting", 0.1), ("subsample", 0.9)])
def test_fewer_iterations_than_zeros(runs, init, ratio):
    # anneal=False, threshold 1e-3, inner_iterations=1 (over-relaxation on), measured:
    # sorting (7x1, 11x1, eps = 0.003 mean cost) 98 iterations vs 2834 for zeros
    # (gaussian: 2132); subsample (16 of the 40 and 33 points of shifted, sheared
    # clouds, eps = 0.01 mean cost) 38 vs 46 (gaussian: 21).
    n_iters = {"zeros": int(runs[init, "zeros", 1e-3][2]), init: int(runs[init, init, 1e-3][2][0])}
    assert runs[init, "zeros", 1e-3][3] and np.all(runs[init, init, 1e-3][3])
    assert n_iters[init] < ratio * n_iters["zeros"], n_iters


# -- bad inputs and the module example -------------------------------------------------


def test_inapplicable_problems_raise():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(7, 2)), rng.normal(size=(11, 2))
    cases = [
        ("sorting", monge.PointCloud(x, y), r"needs 1-D point clouds .* received a PointCloud in dimension d=2 with cost SqEuclidean\. Use initializer='zeros'"),
        ("sorting", monge.PointCloud(x[:, :1], y[:, :1], "cosine"), r"or PNorm\(p\); received a PointCloud in dimension d=1 with cost Cosine"),
        ("sorting", monge.CostMatrix(sqdist(x, y)), r"`initializer='sorting'` needs 1-D point clouds .* received a CostMatrix\. Use"),
        ("subsample", monge.CostMatrix(sqdist(x, y)), r"`initializer='subsample'` needs a point-cloud problem \(it subsamples the points\); received a CostMatrix\. Use initializer='zeros'"),
    ]
    for init, geom, match in cases:
        with pytest.raises(ValueError, match=match):
            monge.Sinkhorn(initializer=init)(monge.LinearProblem(geom))

