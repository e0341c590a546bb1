"""Tests of `wasserstein_1d` against scipy and POT (independent oracles)."""

import logging

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import ot
import pytest
import scipy.stats

from monge.tools.univariate import wasserstein_1d

N, M, K = 7, 11, 3


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return dict(
        u=rng.normal(size=N), v=rng.normal(size=M) * 1.5 + 0.3,
        a=rng.uniform(0.1, 1.0, size=N), b=rng.uniform(0.1, 1.0, size=M),
        U=rng.normal(size=(N, K)), V=rng.normal(size=(M, K)) + 0.5,
    )


def _emd2(u, v, a, b, p):
    """W_p^p by exact LP (POT) on the |x - y|^p cost matrix, float64."""
    a = np.full(len(u), 1 / len(u)) if a is None else a / a.sum()
    b = np.full(len(v), 1 / len(v)) if b is None else b / b.sum()
    cost = np.abs(u[:, None] - v[None, :]) ** p
    return ot.emd2(a, b, cost)


def test_p1_matches_scipy_weighted(data):
    d = data
    got = wasserstein_1d(d["u"], d["v"], a=d["a"], b=d["b"], p=1)
    want = scipy.stats.wasserstein_distance(d["u"], d["v"], d["a"], d["b"])
    assert got.dtype == jnp.float32 and got.shape == ()
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("p, weighted", [(2.0, True), (1.5, True), (3.0, False)])
def test_matches_emd2_x64(data, p, weighted):
    d = data
    a, b = (d["a"], d["b"]) if weighted else (None, None)
    with jax.enable_x64(True):
        got = wasserstein_1d(d["u"], d["v"], a=a, b=b, p=p)
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(got, _emd2(d["u"], d["v"], a, b, p), rtol=1e-10)


def test_p2_matches_pot_wasserstein_1d(data):
    d = data
    a, b = d["a"] / d["a"].sum(), d["b"] / d["b"].sum()
    want = ot.wasserstein_1d(d["u"], d["v"], a, b, p=2)
    got = wasserstein_1d(d["u"], d["v"], a=d["a"], b=d["b"], p=2)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_weights_are_normalised(data):
    d = data
    got = wasserstein_1d(d["u"], d["v"], a=3.0 * d["a"], b=d["b"] / 7.0, p=2)
    want = wasserstein_1d(d["u"], d["v"], a=d["a"], b=d["b"], p=2)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_closed_form_uniform_equal_sizes():
    u = np.array([3.0, -1.0, 0.5, 2.0])
    v = np.array([1.0, 0.0, 4.0, -2.0])
    want = np.mean(np.abs(np.sort(u) - np.sort(v)) ** 2.5)
    np.testing.assert_allclose(wasserstein_1d(u, v, p=2.5), want, rtol=1e-6)


def test_zero_weight_points_are_ignored():
    u, v = np.array([0.0, 100.0, 1.0]), np.array([2.0, -50.0])
    got = wasserstein_1d(u, v, a=np.array([0.5, 0.0, 0.5]), b=np.array([1.0, 0.0]))
    np.testing.assert_allclose(got, 0.5 * 4 + 0.5 * 1, rtol=1e-6)


def test_ties_signed_zeros_and_negative_points():
    """Repeated points (weights pooled by the sort), -0.0 next to 0.0, negatives."""
    u = np.array([1.0, -2.0, 0.0, 1.0, -0.0, -2.0, 1.0, 3.5])
    v = np.array([-0.0, 1.0, 1.0, -3.0, 2.0])
    a = np.array([0.3, 0.1, 0.2, 0.05, 0.1, 0.05, 0.1, 0.1])
    b = np.array([0.2, 0.3, 0.1, 0.25, 0.15])
    got = wasserstein_1d(u, v, a=a, b=b, p=1)
    np.testing.assert_allclose(got, scipy.stats.wasserstein_distance(u, v, a, b), rtol=1e-5)
    with jax.enable_x64(True):
        for p in (1.0, 2.0):
            np.testing.assert_allclose(
                wasserstein_1d(u, v, a=a, b=b, p=p), _emd2(u, v, a, b, p), rtol=1e-12)
        np.testing.assert_allclose(
            wasserstein_1d(u, v[:4], p=2.0), _emd2(u, v[:4], None, None, 2), rtol=1e-12)


def test_batched_uniform_equal_sizes_sorts_each_column(data):
    U, V = data["U"], data["V"][:N]
    want = np.mean(np.abs(np.sort(U, axis=0) - np.sort(V, axis=0)) ** 1.5, axis=0)
    np.testing.assert_allclose(wasserstein_1d(U, V, p=1.5), want, rtol=1e-5)


@pytest.mark.parametrize("m", [N, M])
def test_uniform_gradients_match_finite_differences_x64(data, m):
    u, v = data["u"], data["v"][:m]
    with jax.enable_x64(True):
        gu, gv = jax.grad(lambda u, v: wasserstein_1d(u, v, p=2.5), argnums=(0, 1))(u, v)
        fdu = _central_fd(lambda t: float(wasserstein_1d(t, v, p=2.5)), u)
        fdv = _central_fd(lambda t: float(wasserstein_1d(u, t, p=2.5)), v)
    np.testing.assert_allclose(gu, fdu, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(gv, fdv, rtol=1e-5, atol=1e-8)


def test_batched_equals_loop_over_columns(data):
    d = data
    with jax.enable_x64(True):
        got = wasserstein_1d(d["U"], d["V"], a=d["a"], b=d["b"], p=1.5)
        assert got.shape == (K,)
        want = [_emd2(d["U"][:, k], d["V"][:, k], d["a"], d["b"], 1.5)
                for k in range(K)]
        np.testing.assert_allclose(got, want, rtol=1e-10)


def _central_fd(f, x, h=1e-6):
    grad = np.zeros_like(x)
    for i in range(x.size):
        e = np.zeros_like(x)
        e.flat[i] = h
        grad.flat[i] = (f(x + e) - f(x - e)) / (2 * h)
    return grad


@pytest.mark.parametrize("p", [1.0, 1.5, 2.0])
def test_gradients_match_finite_differences_x64(data, p):
    d = data
    u, v, a, b = d["u"], d["v"], d["a"], d["b"]
    with jax.enable_x64(True):
        grads = jax.grad(
            lambda u, v, a, b: wasserstein_1d(u, v, a=a, b=b, p=p), argnums=(0, 1, 2, 3)
        )(u, v, a, b)
        fds = [
            _central_fd(lambda t: float(wasserstein_1d(t, v, a=a, b=b, p=p)), u),
            _central_fd(lambda t: float(wasserstein_1d(u, t, a=a, b=b, p=p)), v),
            _central_fd(lambda t: float(wasserstein_1d(u, v, a=t, b=b, p=p)), a),
            _central_fd(lambda t: float(wasserstein_1d(u, v, a=a, b=t, p=p)), b),
        ]
    for g, fd in zip(grads, fds):
        assert np.all(np.isfinite(g))
        np.testing.assert_allclose(g, fd, rtol=1e-5, atol=1e-8)


def test_jit_and_vmap(data):
    d = data
    rng = np.random.default_rng(1)
    us = rng.normal(size=(4, N))
    f = jax.jit(lambda u, v, a, b, p: wasserstein_1d(u, v, a=a, b=b, p=p))
    np.testing.assert_allclose(
        f(d["u"], d["v"], d["a"], d["b"], 1.5),
        wasserstein_1d(d["u"], d["v"], a=d["a"], b=d["b"], p=1.5), rtol=1e-6)
    batched = jax.vmap(lambda u, p: wasserstein_1d(u, d["v"], a=d["a"], p=p))(
        us, jnp.array([1.0, 1.5, 2.0, 3.0]))
    loop = [wasserstein_1d(u, d["v"], a=d["a"], p=p)
            for u, p in zip(us, [1, 1.5, 2, 3])]
    np.testing.assert_allclose(batched, loop, rtol=1e-5)


def test_new_p_does_not_recompile(data, caplog):
    d = data

    @jax.jit
    @eqx.debug.assert_max_traces(max_traces=1)
    def f(u, v, p):
        return wasserstein_1d(u, v, p=p)

    for p in (1.0, 1.5, 2.0, 3.7):
        f(d["u"], d["v"], p)
    # The direct (un-jitted) call does not recompile for a new Python float p either.
    wasserstein_1d(d["U"], d["V"], p=1.25)
    with jax.log_compiles(), caplog.at_level(logging.WARNING):
        for p in (1.5, 2, 4.25):
            wasserstein_1d(d["U"], d["V"], p=p)
    assert not [r for r in caplog.records if "Compiling" in r.getMessage()]


def test_traced_bad_p_raises_under_jit(data):
    f = jax.jit(lambda p: wasserstein_1d(data["u"], data["v"], p=p))
    with pytest.raises(Exception, match=r"wasserstein_1d\(p=...\)` must be >= 1"):
        jax.block_until_ready(f(0.5))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(u=np.zeros((2, 3, 4))), r"u=...\)` must have shape \(n,\) or \(n, k\), "
                                      r"got shape \(2, 3, 4\)"),
        (dict(v=np.zeros(())),
         r"v=...\)` must have shape \(n,\) or \(n, k\), got shape \(\)"),
        (dict(u=np.zeros(0)), r"u=...\)` has no points"),
        (dict(v=np.zeros((M, 2))), r"u has shape \(7,\) but v has shape \(11, 2\)"),
        (dict(u=np.zeros((N, 2)), v=np.zeros((M, 3))),
         r"u has shape \(7, 2\) but v has shape \(11, 3\).*same number k"),
        (dict(a=np.ones(N - 1)), r"a=...\)` has shape \(6,\) but u has 7 points"),
        (dict(b=np.ones((M, 1))), r"b=...\)` has shape \(11, 1\) but v has 11 points"),
        (dict(a=-np.ones(N)), r"a=...\)` has negative or NaN entries \(min -1.0\)"),
        (dict(b=np.full(M, np.nan)),
         r"b=...\)` has negative or NaN entries \(min nan\)"),
        (dict(a=np.zeros(N)), r"a=...\)` sums to 0.0: pass at least one positive"),
        (dict(p=0.5), r"p=...\)` must be a number >= 1, got 0.5"),
        (dict(p=float("nan")), r"p=...\)` must be a number >= 1, got nan"),
        (dict(p=np.array([1.0, 2.0])),
         r"p=...\)` must be a scalar, got an array of shape \(2,\)"),
    ],
)
def test_bad_input_raises(kwargs, match):
    args = dict(u=np.zeros(N), v=np.ones(M)) | kwargs
    u, v = args.pop("u"), args.pop("v")
    with pytest.raises(ValueError, match=match):
        wasserstein_1d(u, v, **args)
