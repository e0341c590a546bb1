"""The factored cost geometry `LowRankCost` (C = A B^T) and its factorisations of
point-cloud costs.

References are independent of the code under test: dense float64 NumPy costs and
reductions, scipy's log-sum-exp, POT's float64 log-domain Sinkhorn, closed-form
gradients.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import ot
import pytest
from scipy.special import logsumexp

import monge
from monge.geometry import LowRankCost, PointCloud

from conftest import sqdist


def dist(x, y):
    """Independent Euclidean distances in float64."""
    return np.sqrt(sqdist(x, y))


def cosine(x, y):
    """Independent cosine distances in float64."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    y = y / np.linalg.norm(y, axis=1, keepdims=True)
    return 1.0 - x @ y.T


def rel_fro(approx, exact):
    return np.linalg.norm(np.asarray(approx, np.float64) - exact) / np.linalg.norm(exact)


@pytest.fixture(scope="module")
def factors():
    """Random float64 factors, n=13, m=9, k=4 (uneven: blocks of 4 lines leave 1)."""
    rng = np.random.default_rng(7)
    return rng.normal(size=(13, 4)), rng.normal(size=(9, 4))


@pytest.fixture(scope="module")
def small():
    """Small uneven float64 clouds (n=13, m=9, d=3) and weights."""
    rng = np.random.default_rng(11)
    x, y = rng.normal(size=(13, 3)), rng.normal(size=(9, 3)) + 0.5
    a, b = rng.uniform(0.5, 1.5, 13), rng.uniform(0.5, 1.5, 9)
    return x, y, a / a.sum(), b / b.sum()


@pytest.fixture(scope="module")
def medium():
    """float32 clouds n=300, m=257, d=3, for the sampled factorisations."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(300, 3)).astype(np.float32)
    y = (rng.normal(size=(257, 3)) + 0.5).astype(np.float32)
    return x, y


@pytest.fixture(scope="module")
def sampled(medium):
    """Adaptive-rank factorisations (default tol) of the medium clouds, built once."""
    x, y = medium
    return {name: LowRankCost.from_points(x, y, name) for name in ("euclidean", "cosine")}


# -- the operator ------------------------------------------------------------------------
@pytest.mark.parametrize("chunk_size", [4, None], ids=["blocks", "one-block"])
def test_operations_match_numpy(factors, chunk_size):
    """Every reduction of a factored geometry against dense float64 NumPy: C, C v and
    C^T v (vector and matrix v), sub-matrices, the mean cost, log-sum-exps with weights
    and the scaled kernel products, in blocks of 4 lines (4 + 4 + 4 + 1 rows, 4 + 4 + 1
    columns) and as one block."""
    A, B = factors
    C = A @ B.T
    rng = np.random.default_rng(0)
    eps = 0.7

    @functools.partial(jax.jit, static_argnums=1)
    def reductions(geom, axis, h, w, v, vs):
        top, scaled = geom.apply_kernel(h, eps, vs, axis)
        return (geom.apply_cost(v, axis), geom.apply_cost(vs, axis), geom.lse(h, eps, axis, w=w),
                jnp.exp(top)[:, None] * scaled)

    with jax.enable_x64(True):
        geom = LowRankCost(A, B, chunk_size=chunk_size)
        assert geom.shape == (13, 9) and geom.rank == 4 and not geom.materialized
        assert geom.precompute() is geom and geom.supports is None and geom.tolerance is None
        np.testing.assert_allclose(np.asarray(geom.cost_matrix()), C, rtol=1e-13)
        for axis in (0, 1):
            length = C.shape[axis]  # the reduced axis
            Ct = C if axis == 1 else C.T
            h, w = rng.normal(size=length), rng.uniform(0.1, 1.0, length)
            v, vs = rng.normal(size=length), rng.normal(size=(length, 3))
            out = reductions(geom, axis, *map(jnp.asarray, (h, w, v, vs)))
            refs = (Ct @ v, Ct @ vs, logsumexp((h[None, :] - Ct) / eps, b=w[None, :], axis=1),
                    np.exp((h[None, :] - Ct) / eps) @ vs)
            for got, ref in zip(out, refs):
                np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-12, atol=1e-12)
        a, b = rng.uniform(size=13), rng.uniform(size=9)
        mean = geom.mean_cost(jnp.asarray(a), jnp.asarray(b))
        np.testing.assert_allclose(float(mean), a @ C @ b, rtol=1e-12)
        np.testing.assert_allclose(float(geom.mean_abs_cost(jnp.asarray(a), jnp.asarray(b))),
                                   a @ np.abs(C) @ b / (a.sum() * b.sum()), rtol=1e-12)
        rows, cols = np.array([12, 0, 5]), np.array([8, 1])
        np.testing.assert_allclose(np.asarray(geom.sub_costs(rows, cols)), C[np.ix_(rows, cols)], rtol=1e-12)


@pytest.mark.parametrize("axis", [0, 1])
def test_scan_blocks_with_a_carry(factors, axis):
    """`scan_blocks` over uneven blocks (chunk 4): the carry folds the block sums along
    the kept axis while each block returns its lines' maxima, and an argument indexed
    along the kept axis arrives block by block; against NumPy on C."""
    A, B = factors
    C = A @ B.T
    Ct = C if axis == 1 else C.T  # lines of C as rows
    offset = np.arange(Ct.shape[0], dtype=np.float64)
    with jax.enable_x64(True):
        geom = LowRankCost(A, B, chunk_size=4)

        def fn(block, carry, off):
            lines = block if axis == 1 else block.T
            count, total = carry
            return (count + lines.shape[0], total + lines.sum(axis=0)), lines.max(axis=1) + off

        (count, total), out = geom.scan_blocks(fn, axis, (0, jnp.zeros(Ct.shape[1])), jnp.asarray(offset))
    assert int(count) == Ct.shape[0]
    np.testing.assert_allclose(np.asarray(total), Ct.sum(axis=0), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(out), Ct.max(axis=1) + offset, rtol=1e-12)


# -- exact factors of the squared Euclidean cost ------------------------------------------
def test_sqeuclidean_factors_are_exact(small):
    """Rank d + 2, no tolerance, C exact to float64 rounding; points, cost and the
    closed-form mean |C| are those of the cloud."""
    x, y, a, b = small
    with jax.enable_x64(True):
        geom = LowRankCost.from_points(x, y)
        assert geom.rank == 3 + 2 and geom.tolerance is None
        C = sqdist(x, y)
        np.testing.assert_allclose(np.asarray(geom.cost_matrix()), C, rtol=1e-12, atol=1e-12)
        assert isinstance(geom.ground_cost, monge.costs.SqEuclidean)
        np.testing.assert_array_equal(np.asarray(geom.supports[0]), x)
        np.testing.assert_allclose(float(geom.mean_abs_cost(jnp.asarray(a), jnp.asarray(b))), a @ C @ b,
                                   rtol=1e-12)


def test_sqeuclidean_factors_far_from_origin_float32():
    """Points near 1e3 with unit spread in float32: centring keeps the digits (an
    uncentred ||x||^2 + ||y||^2 - 2<x, y> would err by ~0.1 on costs of ~6)."""
    rng = np.random.default_rng(2)
    x = (rng.normal(size=(31, 3)) + 1000.0).astype(np.float32)
    y = (rng.normal(size=(17, 3)) + 1000.5).astype(np.float32)
    C = sqdist(x, y)  # float64 reference on the same float32 points
    geom = LowRankCost.from_points(x, y)
    assert geom.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(geom.cost_matrix()), C, atol=2e-5 * C.max())
    v = rng.normal(size=17)
    np.testing.assert_allclose(np.asarray(geom.apply_cost(jnp.asarray(v, jnp.float32), 1)), C @ v,
                               atol=2e-5 * np.abs(C).sum(axis=1).max())


def test_sqeuclidean_gradients_match_closed_form(small):
    """d/dx_i of sum_i w_i (C v)_i = 2 w_i sum_j v_j (x_i - y_j), and likewise in y,
    through the factors (float64)."""
    x, y, w, v = small
    diff = x[:, None, :] - y[None, :, :]
    ref_x = 2.0 * w[:, None] * np.einsum("j,ijk->ik", v, diff)
    ref_y = -2.0 * v[:, None] * np.einsum("i,ijk->jk", w, diff)
    with jax.enable_x64(True):
        def loss(x_, y_):
            return jnp.sum(LowRankCost.from_points(x_, y_).apply_cost(jnp.asarray(v), 1) * w)

        gx, gy = jax.grad(loss, argnums=(0, 1))(jnp.asarray(x), jnp.asarray(y))
    np.testing.assert_allclose(np.asarray(gx), ref_x, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.asarray(gy), ref_y, rtol=1e-10, atol=1e-12)


def test_from_points_under_jit(small):
    """Factorising inside `jax.jit`: exact squared Euclidean factors, and a sampled
    factorisation of fixed rank (the cosine cost, exact at rank d + 1)."""
    x, y, _, v = small
    x32, y32, v32 = (jnp.asarray(z, jnp.float32) for z in (x, y, v))
    out = jax.jit(lambda x_, y_: LowRankCost.from_points(x_, y_).apply_cost(v32, 1))(x32, y32)
    np.testing.assert_allclose(np.asarray(out), sqdist(x, y) @ v, rtol=1e-5, atol=1e-5)
    def cosine_apply(x_, y_):
        return LowRankCost.from_points(x_, y_, "cosine", rank=5).apply_cost(v32, 1)

    out = jax.jit(cosine_apply)(x32, y32)
    np.testing.assert_allclose(np.asarray(out), cosine(x, y) @ v, rtol=1e-5, atol=1e-5)


# -- Sinkhorn on the factored geometry -----------------------------------------------------
def test_sinkhorn_on_factors_matches_pot(small):
    """A full-rank Sinkhorn on the factored geometry (it runs through the protocol:
    blocks of 4 rows, no stored matrix) gives POT's plan and cost on the dense float64
    cost; the entropic map of new points is the barycentric projection in NumPy."""
    x, y, a, b = small
    C = sqdist(x, y)
    eps = 0.1 * C.mean()
    P_ref = ot.sinkhorn(a, b, C, eps, method="sinkhorn_log", stopThr=1e-14, numItermax=100_000)
    with jax.enable_x64(True):
        geom = LowRankCost.from_points(x, y, chunk_size=4)
        sol = monge.Sinkhorn(threshold=1e-10)(monge.LinearProblem(geom, a, b, epsilon=eps))
        assert bool(sol.converged)
        np.testing.assert_allclose(np.asarray(sol.plan), P_ref, atol=1e-9)
        np.testing.assert_allclose(float(sol.cost), np.sum(P_ref * C), rtol=1e-8)
        z = np.random.default_rng(3).normal(size=(4, 3))
        mapped = np.asarray(sol.transport(jnp.asarray(z)))
        g = np.asarray(sol.g)
    logits = np.log(b)[None, :] + (g[None, :] - sqdist(z, y)) / eps
    p = np.exp(logits - logsumexp(logits, axis=1, keepdims=True))
    np.testing.assert_allclose(mapped, p @ y, rtol=1e-8, atol=1e-10)


# -- sampled factorisations --------------------------------------------------------------
@pytest.mark.parametrize("name", ["euclidean", "cosine"])
def test_sampled_factorisation_meets_its_tolerance(medium, sampled, name):
    """The adaptive rank reaches the default tol (1e-2) and the recorded estimate is
    within a factor 2 of the true relative Frobenius error (dense NumPy, float64); the
    cosine cost, of rank d + 1 = 4, is exact to float32 rounding at the first rank."""
    x, y = medium
    geom = sampled[name]
    recorded = float(geom.tolerance)
    true = rel_fro(geom.cost_matrix(), dist(x, y) if name == "euclidean" else cosine(x, y))
    assert recorded <= monge.geometry.LOW_RANK_TOL
    assert geom.supports is not None and geom.chunk_size is None
    if name == "cosine":
        assert geom.rank == 8 and true < 1e-5 and recorded < 1e-5
    else:
        assert 8 < geom.rank <= 257
        assert true / 2 <= recorded <= 2 * true


def test_sampled_rank_too_small_raises(medium, sampled):
    """A fixed rank whose estimated error exceeds `tol` is an error that says the error,
    the rank and the fixes; a larger `tol` accepts it and records its error."""
    x, y = medium
    with pytest.raises(ValueError, match=r"rank-8 factorisation of the Euclidean cost has an "
                                         r"estimated relative error of 0\.\d+ \(RMS over 4096 "
                                         r"sampled entries\), above `tol`=0.01\. Pass a larger "
                                         r"`rank` \(at most min\(n, m\) = 257\)"):
        LowRankCost.from_points(x, y, "euclidean", rank=8)
    geom = LowRankCost.from_points(x, y, "euclidean", rank=8, tol=0.5)
    assert geom.rank == 8 and 1e-2 < float(geom.tolerance) <= 0.5
    assert rel_fro(geom.cost_matrix(), dist(x, y)) <= 2 * float(geom.tolerance)


def test_adaptive_rank_cap_raises():
    """When even the largest rank tried misses `tol` the error says so."""
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(6, 2)), rng.normal(size=(5, 2))
    with pytest.raises(ValueError, match=r"no factorisation of the Euclidean cost up to rank 5 \(the "
                                         r"largest tried, min\(n, m, MAX_RANK=512\)\) is within `tol`=1e-12"):
        LowRankCost.from_points(x, y, "euclidean", tol=1e-12)


def test_full_rank_cur_gradients_are_the_dense_ones():
    """At rank min(n, m) the skeleton is exact (all columns), so gradients through the
    sampled factors are those of the Euclidean cost itself (float64); `with_supports`
    factorises new points at the same rank."""
    rng = np.random.default_rng(8)
    x, y = rng.normal(size=(7, 3)), rng.normal(size=(5, 3)) + 0.3
    w, v = rng.uniform(size=7), rng.normal(size=5)
    diff = x[:, None, :] - y[None, :, :]
    unit = diff / np.linalg.norm(diff, axis=2, keepdims=True)
    ref_x = w[:, None] * np.einsum("j,ijk->ik", v, unit)
    with jax.enable_x64(True):
        def loss(x_):
            geom = LowRankCost.from_points(x_, y, "euclidean", rank=5)
            return jnp.sum(geom.apply_cost(jnp.asarray(v), 1) * w)

        value, grad = jax.value_and_grad(loss)(jnp.asarray(x))
        np.testing.assert_allclose(float(value), w @ dist(x, y) @ v, rtol=1e-10)
        np.testing.assert_allclose(np.asarray(grad), ref_x, rtol=1e-8, atol=1e-10)
        geom = LowRankCost.from_points(x, y, "euclidean", rank=5)
        z = rng.normal(size=(3, 3))
        moved = geom.with_supports(jnp.asarray(z), jnp.asarray(y))
        assert moved.rank == 3 and float(moved.tolerance) < 1e-10
        np.testing.assert_allclose(np.asarray(moved.cost_matrix()), dist(z, y), rtol=1e-10)


# -- protocol and errors -------------------------------------------------------------------
def test_protocol_supports_and_point_cloud_conversion(small):
    """Points, cost and origin are exposed as for a point cloud; `with_supports` keeps
    the kind of factors; `PointCloud.to_low_rank` passes its cost, origin and blocks."""
    x, y, _, _ = small
    origin = np.ones(3)
    cloud = PointCloud(x, y, online=True, chunk_size=4, origin=origin)
    geom = cloud.to_low_rank()
    assert isinstance(geom, LowRankCost) and geom.chunk_size == 4
    np.testing.assert_array_equal(np.asarray(geom.frame_origin), origin)
    moved = geom.with_supports(jnp.zeros((2, 3)), jnp.ones((5, 3)))
    assert moved.shape == (2, 5) and moved.tolerance is None and moved.rank == 5
    np.testing.assert_allclose(np.asarray(moved.cost_matrix()), 3.0, rtol=1e-6)
    bare = LowRankCost(np.ones((2, 1)), np.ones((3, 1)))
    assert bare.supports is None and bare.ground_cost is None and bare.frame_origin is None
    with pytest.raises(ValueError, match=r"has no ground cost \(`cost=None`\), so it cannot factor"):
        bare.with_supports(np.zeros((2, 1)), np.zeros((3, 1)))


def test_errors_name_the_argument():
    ones = np.ones
    with pytest.raises(ValueError, match=r"`A` must be a non-empty 2-D array of factors, shape \(n, k\)"):
        LowRankCost(ones(4), ones((3, 2)))
    with pytest.raises(ValueError, match=r"`B` must be a non-empty 2-D array of factors, shape \(m, k\) "
                                         r"with m, k >= 1; received shape \(3, 0\)"):
        LowRankCost(ones((4, 2)), ones((3, 0)))
    with pytest.raises(ValueError, match=r"same number of columns k \(C = A B\^T\); received A of shape "
                                         r"\(4, 2\) and B of shape \(3, 1\)"):
        LowRankCost(ones((4, 2)), ones((3, 1)))
    with pytest.raises(ValueError, match=r"`A` has 1 non-finite value"):
        LowRankCost(np.array([[np.nan], [1.0]]), ones((3, 1)))
    with pytest.raises(ValueError, match=r"Only `x` was given: pass both points"):
        LowRankCost(ones((4, 2)), ones((3, 2)), x=ones((4, 1)))
    with pytest.raises(ValueError, match=r"`y` has 2 points but `B` has 3 rows"):
        LowRankCost(ones((4, 2)), ones((3, 2)), x=ones((4, 1)), y=ones((2, 1)))
    with pytest.raises(ValueError, match=r"`chunk_size` must be a positive integer; received 0"):
        LowRankCost(ones((4, 2)), ones((3, 2)), chunk_size=0)
    with pytest.raises(ValueError, match=r"`x` and `y` must have the same dimension d"):
        LowRankCost.from_points(ones((4, 2)), ones((3, 3)))
    with pytest.raises(ValueError, match=r"rank=3, tol=0.1 have no effect: the squared Euclidean cost "
                                         r"has exact factors of rank d \+ 2; drop them"):
        LowRankCost.from_points(ones((4, 2)), ones((3, 2)), rank=3, tol=0.1)
    for rank in (0, 4, 2.5, True):
        with pytest.raises(ValueError, match=r"`rank` must be an integer between 1 and min\(n, m\) = 3"):
            LowRankCost.from_points(ones((4, 2)), ones((3, 2)), "euclidean", rank=rank)
    for tol in (0.0, -1.0, float("nan"), "1e-2", True):
        with pytest.raises(ValueError, match=r"`tol` must be a positive number"):
            LowRankCost.from_points(ones((4, 2)), ones((3, 2)), "euclidean", tol=tol)
    with pytest.raises(ValueError, match=r"from_points\(rank=None\)` chooses the rank from measured "
                                         r"errors, which needs concrete points"):
        jax.jit(lambda x: LowRankCost.from_points(x, ones((3, 2)), "euclidean").A)(ones((4, 2)))


# -- realistic size ------------------------------------------------------------------------
def _chunked_apply(x, y, v, rows=1000):
    """C v for the squared Euclidean cost in float64 NumPy, 1000 rows at a time (points
    near the origin: the float64 expansion loses nothing that matters at 1e-5)."""
    x, y, v = (np.asarray(z, np.float64) for z in (x, y, v))
    sy = (y**2).sum(axis=1)
    blocks = []
    for i in range(0, x.shape[0], rows):
        xi = x[i:i + rows]
        blocks.append(((xi**2).sum(axis=1)[:, None] + sy[None, :] - 2.0 * xi @ y.T) @ v)
    return np.concatenate(blocks)


@pytest.mark.slow
def test_realistic_size():
    """n = 20 000, m = 15 000, d = 5, float32: exact factors apply C and C^T to
    relative error below 1e-5 against a chunked float64 reference; a sampled Euclidean
    factorisation of two 5000-point clouds reaches tol and its true error on 300
    random rows (float64) agrees with the estimate within a factor 2."""
    rng = np.random.default_rng(9)
    x = rng.normal(size=(20_000, 5)).astype(np.float32)
    y = (rng.normal(size=(15_000, 5)) + 0.5).astype(np.float32)
    geom = LowRankCost.from_points(x, y)
    v = rng.normal(size=15_000)
    ref = _chunked_apply(x, y, v)
    out = np.asarray(geom.apply_cost(jnp.asarray(v, jnp.float32), 1), np.float64)
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 1e-5  # measured 9e-7
    u = rng.uniform(size=20_000)
    ref_t = _chunked_apply(y, x, u)
    out_t = np.asarray(geom.apply_cost(jnp.asarray(u, jnp.float32), 0), np.float64)
    assert np.linalg.norm(out_t - ref_t) / np.linalg.norm(ref_t) < 1e-5  # measured 2e-7

    xs, ys = x[:5000], y[:5000]
    sampled = LowRankCost.from_points(xs, ys, "euclidean")
    rows = rng.choice(5000, size=300, replace=False)
    approx = np.asarray(sampled.A[rows] @ sampled.B.T, np.float64)
    true = rel_fro(approx, dist(xs[rows], ys))
    recorded = float(sampled.tolerance)
    assert recorded <= monge.geometry.LOW_RANK_TOL
    assert true / 2 <= recorded <= 2 * true
