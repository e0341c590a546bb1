"""Starts (Q, R, g) of low-rank OT and the k-means they use (`lowrank_init`).

Oracles: marginals and ranks recomputed with NumPy in float64, the true blobs and
their NumPy (weighted) means, scipy's `kmeans2` for the k-means objective, POT's
log-domain Sinkhorn (float64) for the k-means start's plans.
"""

import doctest
import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import ot
import pytest
from conftest import sqdist
from scipy.cluster.vq import kmeans2

from monge.solvers.linear import lowrank_init

N, M, R, D = 13, 9, 3, 2
DTYPES = [np.float64, np.float32]
KEY = jax.random.key(7)
RUNTIME = (eqx.EquinoxRuntimeError, jax.errors.JaxRuntimeError)


def weights(rng, n):
    w = rng.uniform(0.5, 1.5, n)
    return w / w.sum()


@pytest.fixture(scope="module")
def case():
    """Uneven clouds and weights (float64 NumPy): x (13, 2), y (9, 2), a, b."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(N, D)), rng.normal(size=(M, D)) + 1.0
    return x, y, weights(rng, N), weights(rng, M)


def all_starts(x, y, a, b, dtype):
    """Every start of `case` in `dtype`, as float64 NumPy (Q, R, g) triples."""
    with jax.enable_x64(dtype == np.float64):
        a, b = jnp.asarray(a, dtype), jnp.asarray(b, dtype)
        out = {
            "rank2": lowrank_init.rank2(a, b, R),
            "random": lowrank_init.random(a, b, R, KEY),
            "kmeans": lowrank_init.kmeans_init(x, y, a, b, R),
        }
        assert all(z.dtype == dtype for start in out.values() for z in start)
        return {k: tuple(np.asarray(z, np.float64) for z in v) for k, v in out.items()}


@pytest.fixture(scope="module", params=DTYPES, ids=["float64", "float32"])
def starts(request, case):
    return request.param, all_starts(*case, request.param)


#: Centres of the blobs of the k-means tests (d = 2).
CENTRES = 10.0 * np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])


def blobs(sizes, spread=0.5, seed=0, centres=CENTRES):
    """Gaussian blobs around `centres` (well separated by default): points (float64)
    and true labels."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(sizes)), sizes)
    return centres[labels] + spread * rng.normal(size=(len(labels), centres.shape[1])), labels


def same_partition(labels, truth):
    """Labels equal the truth up to a permutation of the cluster names."""
    labels, truth = np.asarray(labels), np.asarray(truth)
    pairs = set(zip(labels.tolist(), truth.tolist()))
    return len(pairs) == len(set(labels.tolist())) == len(set(truth.tolist()))


def objective(x, w, centroids):
    return float(np.sum(w * sqdist(x, centroids).min(axis=1)))


# -- the three starts ------------------------------------------------------------
@pytest.mark.parametrize("name", ["rank2", "random", "kmeans"])
def test_feasible_and_positive(starts, case, name):
    dtype, out = starts
    _, _, a, b = case
    Q, R_, g = out[name]
    assert Q.shape == (N, R) and R_.shape == (M, R) and g.shape == (R,)
    u = np.finfo(dtype).eps
    np.testing.assert_allclose(g.sum(), a.sum(), rtol=10 * u)
    assert np.all(g > 0) and np.all(Q > 0) and np.all(R_ > 0)
    # rows: exact for every start (k-means: a last row update)
    np.testing.assert_allclose(Q.sum(1), a, rtol=20 * u)
    np.testing.assert_allclose(R_.sum(1), b, rtol=20 * u)
    if name == "kmeans":  # columns: to the Sinkhorn threshold (L1, relative to the mass)
        tol = 2 * lowrank_init.SINKHORN_THRESHOLD
        assert np.abs(Q.sum(0) - g).sum() <= tol and np.abs(R_.sum(0) - g).sum() <= tol
        assert Q.min() >= a.min() * np.sqrt(np.finfo(dtype).tiny) * 0.99
    else:
        np.testing.assert_allclose(Q.sum(0), g, rtol=20 * u)
        np.testing.assert_allclose(R_.sum(0), g, rtol=20 * u)


@pytest.mark.parametrize("name", ["rank2", "random", "kmeans"])
def test_components_differ(starts, name):
    """The saddle point Q = a g^T / sum g has every normalised column Q[:, k] / g_k
    equal to a / sum a; these starts do not."""
    _, out = starts
    for F, g in ((out[name][0], out[name][2]), (out[name][1], out[name][2])):
        cols = F / g  # conditional distributions, one per component
        gaps = [np.abs(cols[:, k] - cols[:, l]).sum() for k in range(R) for l in range(k)]
        assert min(gaps) > 0.05, gaps


def test_rank2_has_rank_two(starts):
    """Third singular value at rounding level: numerically rank 2 (matrix_rank in
    float64, whose default tolerance float32 rounding exceeds)."""
    dtype, out = starts
    Q, R_, _ = out["rank2"]
    for F in (Q, R_):
        s = np.linalg.svd(F, compute_uv=False)
        assert s[1] > 1e-3 * s[0] and s[2] <= 20 * np.finfo(dtype).eps * s[0], s
        if dtype == np.float64:
            assert np.linalg.matrix_rank(F) == 2


def test_rank2_deterministic_and_not_a_saddle_for_index_weights():
    """a proportional to (1, ..., n) would make the paper's x_i ∝ i give the saddle."""
    a = np.arange(1.0, N + 1)
    a /= a.sum()
    b = np.full(M, 1.0 / M)
    Q, _, g = map(np.asarray, lowrank_init.rank2(a, b, R))
    Q2 = np.asarray(lowrank_init.rank2(a, b, R)[0])
    np.testing.assert_array_equal(Q, Q2)
    cols = Q / g
    assert min(np.abs(cols[:, k] - cols[:, l]).sum() for k in range(R) for l in range(k)) > 0.05


def test_random_depends_on_key(case):
    _, _, a, b = case
    Q1 = np.asarray(lowrank_init.random(a, b, R, jax.random.key(0))[0])
    Q2 = np.asarray(lowrank_init.random(a, b, R, jax.random.key(1))[0])
    assert np.abs(Q1 - Q2).max() > 1e-3


def test_zero_weights(case):
    """Zero weights give zero rows; every other entry is positive; still feasible."""
    x, y, a, b = case
    a, b = a.copy(), b.copy()
    a[[0, 5]], b[3] = 0.0, 0.0
    a, b = a / a.sum(), b / b.sum()
    out = all_starts(x, y, a, b, np.float32)
    for name, (Q, R_, g) in out.items():
        for F, w in ((Q, a), (R_, b)):
            assert np.all(F[w == 0] == 0), name
            assert np.all(F[w > 0] > 0), name
            np.testing.assert_allclose(F.sum(1), w, rtol=1e-5, atol=0, err_msg=name)
            np.testing.assert_allclose(F.sum(0), g, rtol=1e-5 if name != "kmeans" else 1e-3, err_msg=name)


def test_kmeans_init_is_the_entropic_plan_to_the_centroids(case):
    """Q and R against POT's log-domain Sinkhorn (float64) between the points and the
    centroids of `kmeans` (same default key), at the Sinkhorn default epsilon."""
    x, y, a, b = case
    g_ref = np.full(R, 1.0 / R)
    with jax.enable_x64(True):
        Q, R_, g = map(np.asarray, lowrank_init.kmeans_init(x, y, a, b, R))
        z = np.asarray(lowrank_init.kmeans(x, R, a=a)[0])
    # the Sinkhorn default: 0.05 times the mean cost (below 4 medians here)
    eps = [0.05 * w @ sqdist(p, z) @ g_ref for p, w in ((x, a), (y, b))]
    np.testing.assert_allclose(g, g_ref, rtol=1e-12)
    for F, pts, w, e in ((Q, x, a, eps[0]), (R_, y, b, eps[1])):
        plan = ot.sinkhorn(w, g_ref, sqdist(pts, z), e, method="sinkhorn_log", stopThr=1e-12,
                           numItermax=100_000)
        np.testing.assert_allclose(F, plan, atol=2 * lowrank_init.SINKHORN_THRESHOLD * w.max())


def test_kmeans_init_default_epsilon_follows_the_clusters():
    """Blobs of equal mass around the same centres for x and y, r = 3: the default
    epsilon sends (almost all of) every point to the centroid of its own blob."""
    x, truth = blobs([5, 4, 4], seed=3)
    y, truth_y = blobs([3, 3, 3], seed=4)
    a = 1 / (3 * np.bincount(truth)[truth])  # blobs of mass 1/3 each, as g
    b = np.full(M, 1 / M)
    Q, R_, _ = map(np.asarray, lowrank_init.kmeans_init(x, y, a.astype(np.float32), b.astype(np.float32), R))
    assert same_partition(Q.argmax(1), truth) and same_partition(R_.argmax(1), truth_y)
    assert np.all(Q.max(1) > 0.999 * a) and np.all(R_.max(1) > 0.999 * b)


# -- k-means ---------------------------------------------------------------------
# Every test below runs k = 3 on 40 points in float32 (one compilation).
def assert_means(centroids, x, labels, w=None):
    """Every centroid is the (weighted) mean of one true blob."""
    means = np.stack([np.average(x[labels == k], axis=0, weights=None if w is None else w[labels == k])
                      for k in range(3)])
    for c in np.asarray(centroids):
        assert np.abs(means - c).sum(1).min() < 1e-4, (c, means)


def test_kmeans_recovers_blobs():
    x, truth = blobs([20, 13, 7])
    centroids, labels = lowrank_init.kmeans(x.astype(np.float32), 3)
    assert same_partition(labels, truth)
    assert_means(centroids, x, truth)


def test_kmeans_weighted():
    """Weighted means of the blobs; a far point of weight zero moves no centroid."""
    x, truth = blobs([20, 13, 6], seed=1)
    x = np.vstack([x, [[100.0, -100.0]]])
    rng = np.random.default_rng(1)
    w = np.append(rng.uniform(0.1, 2.0, 39), 0.0)
    centroids, labels = lowrank_init.kmeans(x, 3, a=w)
    assert same_partition(np.asarray(labels)[:39], truth)
    assert_means(centroids, x[:39], truth, w[:39])


def test_kmeans_reseeds_empty_clusters():
    """A centroid that wins no point is moved to the farthest point: from a start
    with one centroid far away and two on blobs 0 and 1, blob 2 is found."""
    x, truth = blobs([20, 13, 7], seed=2)
    init = np.vstack([CENTRES[:2], [[1e3, 1e3]]])
    centroids, labels = lowrank_init.kmeans(x, 3, init=init)
    assert same_partition(labels, truth)
    assert_means(centroids, x, truth)


def test_kmeans_fewer_distinct_points_than_clusters():
    x = np.repeat(np.array([[0.0, 0.0], [1.0, 3.0]]), 20, axis=0)
    centroids, labels = lowrank_init.kmeans(x, 3)
    centroids = np.asarray(centroids)
    assert np.all(np.isfinite(centroids)) and set(np.asarray(labels).tolist()) <= {0, 1, 2}
    assert objective(x, np.ones(40), centroids) < 1e-10


def test_kmeans_objective_against_scipy():
    """Overlapping blobs (several local minima): the objective is at most the median
    of scipy's `kmeans2` (k-means++, 7 seeds) plus 1 %."""
    x, _ = blobs([20, 13, 7], spread=4.0, seed=5)
    ours = objective(x, np.ones(len(x)), np.asarray(lowrank_init.kmeans(x, 3)[0]))
    theirs = [objective(x, np.ones(len(x)), kmeans2(x, 3, iter=50, minit="++", seed=s)[0])
              for s in range(7)]
    assert ours <= 1.01 * np.median(theirs), (ours, theirs)


# -- jit and vmap ----------------------------------------------------------------
def batch(case, size=3):
    """A batch of problems: weights (and points) perturbed per problem."""
    x, y, a, b = case
    rng = np.random.default_rng(9)
    A = np.stack([weights(rng, N) for _ in range(size)])
    B = np.stack([weights(rng, M) for _ in range(size)])
    X = np.stack([x + 0.3 * k for k in range(size)])
    Y = np.stack([y - 0.2 * k for k in range(size)])
    return [z.astype(np.float32) for z in (X, Y, A, B)]


@pytest.mark.parametrize("name", ["rank2", "random", "kmeans_init"])
def test_jit_vmap_equals_loop(case, name):
    X, Y, A, B = batch(case)
    fns = {
        "rank2": (lambda x, y, a, b: lowrank_init.rank2(a, b, R)),
        "random": (lambda x, y, a, b: lowrank_init.random(a, b, R, KEY)),
        "kmeans_init": (lambda x, y, a, b: lowrank_init.kmeans_init(x, y, a, b, R)),
    }
    batched = jax.jit(jax.vmap(fns[name]))(X, Y, A, B)
    for i in range(len(A)):
        for got, want in zip(batched, fns[name](X[i], Y[i], A[i], B[i])):
            np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-7)


def test_kmeans_jit_vmap_equals_loop():
    x, truth = blobs([20, 13, 7], seed=6)
    X = np.stack([x, 2 * x[::-1], x + 5]).astype(np.float32)
    fn = jax.jit(jax.vmap(functools.partial(lowrank_init.kmeans, k=3)))
    centroids, labels = fn(X)
    for i in range(3):
        c, lab = lowrank_init.kmeans(X[i], 3)
        np.testing.assert_allclose(centroids[i], c, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(labels[i], lab)
    assert same_partition(labels[0], truth) and same_partition(labels[1], truth[::-1])


# -- errors ----------------------------------------------------------------------
def test_rank_errors(case):
    x, y, a, b = case
    with pytest.raises(ValueError, match=r"rank `r` must satisfy 1 <= r <= 9; received r = 10. Pass r <= min\(n, m\) = 9"):
        lowrank_init.rank2(a, b, 10)
    with pytest.raises(ValueError, match=r"rank `r` must satisfy 1 <= r <= 9; received r = 0"):
        lowrank_init.random(a, b, 0, KEY)
    with pytest.raises(ValueError, match=r"rank `r` must satisfy .* r = 10"):
        lowrank_init.kmeans_init(x, y, a, b, 10)
    for bad in (2.0, True, jnp.asarray(2)):
        with pytest.raises(ValueError, match="The rank `r` must be a Python int .*static under jax.jit"):
            lowrank_init.rank2(a, b, bad)


def test_weight_errors(case):
    x, y, a, b = case
    with pytest.raises(ValueError, match=r"`a` must be a non-empty 1-D array of weights; received shape \(13, 1\)"):
        lowrank_init.rank2(a[:, None], b, R)
    with pytest.raises(ValueError, match=r"`b` must be a non-empty 1-D array of weights; received shape \(0,\)"):
        lowrank_init.rank2(a, b[:0], R)
    with pytest.raises(ValueError, match="`a` has negative weights"):
        lowrank_init.rank2(a - 0.1, b, R)
    with pytest.raises(ValueError, match="`b` sums to 0"):
        lowrank_init.random(a, 0 * b, R, KEY)
    with pytest.raises(ValueError, match="`a` is complex"):
        lowrank_init.rank2(a + 0j, b, R)
    with pytest.raises(ValueError, match=r"equal masses, but `a` sums to 1 and `b` to 2\. Normalise"):
        lowrank_init.rank2(a, 2 * b, R)
    with pytest.raises(ValueError, match=r"`a` must be a 1-D array of 13 weights, one per point of x"):
        lowrank_init.kmeans_init(x, y, a[:-1], b, R)
    with pytest.raises(ValueError, match=r"`b` must be a 1-D array of 9 weights, one per point of y"):
        lowrank_init.kmeans_init(x, y, a, b[:-1], R)
    with pytest.raises(ValueError, match="`key` is required by `random`"):
        lowrank_init.random(a, b, R, None)


def test_traced_weight_errors(case):
    _, _, a, b = case
    with pytest.raises(RUNTIME, match="`a` must be finite, non-negative weights"):
        jax.jit(lowrank_init.rank2, static_argnums=2)(a - 0.1, b, R)
    with pytest.raises(RUNTIME, match="needs equal masses"):
        jax.jit(lowrank_init.rank2, static_argnums=2)(a, 2 * b, R)
    with pytest.raises(RUNTIME, match="`a` must be finite, non-negative weights"):
        jax.jit(lowrank_init.kmeans, static_argnums=1)(np.zeros((N, 2)), 2, a=a - 0.1)


def test_kmeans_errors(case):
    x, y, a, b = case
    with pytest.raises(ValueError, match=r"number of clusters `k` must satisfy 1 <= k <= 13; received k = 14. Pass k <= n = 13"):
        lowrank_init.kmeans(x, 14)
    with pytest.raises(ValueError, match=r"number of clusters `k` must be a Python int"):
        lowrank_init.kmeans(x, 2.5)
    with pytest.raises(ValueError, match=r"`n_iter` must satisfy 1 <= n_iter"):
        lowrank_init.kmeans(x, 2, n_iter=0)
    with pytest.raises(ValueError, match=r"`tol` must be a finite number >= 0; received -1"):
        lowrank_init.kmeans(x, 2, tol=-1.0)
    with pytest.raises(ValueError, match=r"`init` must hold k = 2 centroids in dimension d = 2, shape \(2, 2\); received shape \(3, 2\)"):
        lowrank_init.kmeans(x, 2, init=np.zeros((3, 2)))
    with pytest.raises(ValueError, match=r"`init` has 1 non-finite value"):
        lowrank_init.kmeans(x, 2, init=np.array([[0.0, np.nan], [1.0, 1.0]]))
    with pytest.raises(ValueError, match=r"`n_iter` must be a Python int"):
        lowrank_init.kmeans(x, 2, n_iter=10.0)
    with pytest.raises(ValueError, match=r"`x` must be a 2-D array of points"):
        lowrank_init.kmeans(x[:, 0], 2)
    with pytest.raises(ValueError, match=r"`x` has 2 non-finite value"):
        lowrank_init.kmeans(np.where(np.arange(N)[:, None] == 3, np.nan, x), 2)
    with pytest.raises(ValueError, match=r"`a` must be a 1-D array of 13 weights, one per point of x"):
        lowrank_init.kmeans(x, 2, a=b)


def test_kmeans_init_errors(case):
    x, y, a, b = case
    with pytest.raises(ValueError, match=r"`x` and `y` must have the same dimension d"):
        lowrank_init.kmeans_init(x, np.hstack([y, y]), a, b, R)
    with pytest.raises(ValueError, match=r"`epsilon` must be positive and finite; received .*-1.*Pass epsilon > 0"):
        lowrank_init.kmeans_init(x, y, a, b, R, epsilon=-1.0)
    with pytest.raises(ValueError, match=r"`y` has 2 non-finite value"):
        lowrank_init.kmeans_init(x, np.where(np.arange(M)[:, None] == 0, np.inf, y), a, b, R)


def test_docstring_examples():
    result = doctest.testmod(lowrank_init, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


# -- large -----------------------------------------------------------------------
@pytest.mark.slow
def test_large_kmeans_and_kmeans_init():
    """k-means at n = 200 000, d = 30, k = 10 (float32) recovers the blobs;
    kmeans_init at n = 20 000 is feasible."""
    rng = np.random.default_rng(11)
    k, d, n = 10, 30, 200_000
    centres = 10.0 * rng.normal(size=(k, d))
    truth = rng.integers(0, k, n)
    x = (centres[truth] + rng.normal(size=(n, d))).astype(np.float32)
    centroids, labels = lowrank_init.kmeans(x, k)
    assert same_partition(labels, truth)
    nearest = centres[sqdist(centroids, centres).argmin(1)]
    assert np.abs(np.asarray(centroids) - nearest).max() < 0.1
    xs, ys = x[:20_000], x[20_000:35_000] + 1.0
    a, b = np.full(20_000, 1 / 20_000, np.float32), np.full(15_000, 1 / 15_000, np.float32)
    Q, R_, g = (np.asarray(z, np.float64) for z in lowrank_init.kmeans_init(xs, ys, a, b, k))
    np.testing.assert_allclose(Q.sum(1), a, rtol=1e-5)
    np.testing.assert_allclose(R_.sum(1), b, rtol=1e-5)
    tol = 2 * lowrank_init.SINKHORN_THRESHOLD
    assert np.abs(Q.sum(0) - g).sum() <= tol and np.abs(R_.sum(0) - g).sum() <= tol
    assert np.all(Q > 0) and np.all(R_ > 0)
