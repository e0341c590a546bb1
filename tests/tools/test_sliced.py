"""Tests of sliced and max-sliced Wasserstein against POT (independent oracles)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import ot
import pytest

from monge.tools.sliced import max_sliced_wasserstein, sliced_wasserstein
from monge.tools.univariate import wasserstein_1d

N, M, D, K = 7, 11, 3, 5


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(K, D))
    return dict(
        x=rng.normal(size=(N, D)), y=rng.normal(size=(M, D)) * [1.0, 2.0, 0.5] + 0.4,
        a=rng.uniform(0.1, 1.0, size=N), b=rng.uniform(0.1, 1.0, size=M),
        theta=z / np.linalg.norm(z, axis=1, keepdims=True),
    )


def _emd2(x, y, a, b, p):
    """W_p^p between point clouds by exact LP (POT), Euclidean ground distance ** p."""
    a = np.full(len(x), 1 / len(x)) if a is None else a / a.sum()
    b = np.full(len(y), 1 / len(y)) if b is None else b / b.sum()
    return ot.emd2(a, b, ot.dist(x, y, metric="euclidean") ** p)


def test_d1_is_wasserstein_1d_of_raw_data(data):
    x, y = data["x"][:, :1], data["y"][:, :1]
    got = sliced_wasserstein(x, y, a=data["a"], n_projections=4, key=jax.random.key(0))
    want = wasserstein_1d(x[:, 0], y[:, 0], a=data["a"])  # directions are +-1
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("p", [2.0, 1.5])
def test_given_directions_match_mean_of_projected_emd2_x64(data, p):
    x, y, a, b, theta = (data[k] for k in ("x", "y", "a", "b", "theta"))
    with jax.enable_x64(True):
        got = sliced_wasserstein(x, y, a=a, b=b, p=p, directions=theta)
        assert got.dtype == jnp.float64
    want = np.mean([_emd2(x @ t[:, None], y @ t[:, None], a, b, p) for t in theta])
    np.testing.assert_allclose(got, want, rtol=1e-10)


def test_matches_pot_sliced_with_same_projections(data):
    x, y, a, b, theta = (data[k] for k in ("x", "y", "a", "b", "theta"))
    # POT returns SW_p = (mean W_p^p) ** (1 / p); monge returns SW_p^p.
    want = ot.sliced_wasserstein_distance(
        x, y, a / a.sum(), b / b.sum(), p=2, projections=theta.T)
    got = sliced_wasserstein(x, y, a=a, b=b, p=2, directions=theta)
    np.testing.assert_allclose(got, want ** 2, rtol=1e-5)


def test_uniform_equal_sizes_match_pot(data):
    x, theta = data["x"], data["theta"]
    y = data["y"][:N]
    want = ot.sliced_wasserstein_distance(x, y, p=2, projections=theta.T)
    got = sliced_wasserstein(x, y, p=2, directions=theta)
    np.testing.assert_allclose(got, want ** 2, rtol=1e-5)


def test_random_directions_bounded_by_wasserstein_and_key_dependent(data):
    x, y = data["x"], data["y"]
    s0 = sliced_wasserstein(x, y, n_projections=32, key=jax.random.key(0))
    s1 = sliced_wasserstein(x, y, n_projections=32, key=jax.random.key(1))
    assert 0 < s0 <= _emd2(x, y, None, None, 2) and s0 != s1


@pytest.mark.slow
def test_max_sliced_bounds(data):
    x, y, a, b = (data[k] for k in ("x", "y", "a", "b"))
    key = jax.random.key(3)
    value, theta = max_sliced_wasserstein(x, y, a=a, b=b, key=key)
    sliced = sliced_wasserstein(x, y, a=a, b=b, n_projections=64, key=key)
    np.testing.assert_allclose(jnp.linalg.norm(theta), 1.0, rtol=1e-6)
    # The value is W_2^2 along theta (recomputed by POT) and lies between SW and W.
    projected = _emd2(x @ np.asarray(theta)[:, None], y @ np.asarray(theta)[:, None],
                      a, b, 2)
    np.testing.assert_allclose(value, projected, rtol=1e-5)
    assert sliced < value <= _emd2(x, y, a, b, 2) * (1 + 1e-6)


def test_max_sliced_finds_shift_direction(data):
    x = data["x"]
    y = x + np.array([3.0, 0.0, 0.0])
    value, theta = max_sliced_wasserstein(x, y, key=jax.random.key(0), n_init=4)
    np.testing.assert_allclose(jnp.abs(theta), [1.0, 0.0, 0.0], atol=1e-3)
    np.testing.assert_allclose(value, 9.0, rtol=1e-4)  # = W_2^2 for a translation


def _central_fd(f, x, h=1e-6):
    grad = np.zeros_like(x)
    for i in range(x.size):
        e = np.zeros_like(x)
        e.flat[i] = h
        grad.flat[i] = (f(x + e) - f(x - e)) / (2 * h)
    return grad


def test_gradient_fixed_directions_matches_finite_differences_x64(data):
    x, y, a, theta = (data[k] for k in ("x", "y", "a", "theta"))
    with jax.enable_x64(True):
        def f(x, y):
            return sliced_wasserstein(x, y, a=a, p=1.5, directions=theta)

        gx, gy = jax.grad(f, argnums=(0, 1))(x, y)
        fdx = _central_fd(lambda t: float(f(t, y)), x)
        fdy = _central_fd(lambda t: float(f(x, t)), y)
    np.testing.assert_allclose(gx, fdx, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(gy, fdy, rtol=1e-5, atol=1e-8)


def test_gradients_finite_random_and_max_sliced(data):
    x, y = jnp.asarray(data["x"]), jnp.asarray(data["y"])
    key = jax.random.key(0)
    g_sw = jax.grad(lambda x: sliced_wasserstein(x, y, n_projections=8, key=key))(x)
    g_max = jax.grad(lambda x: max_sliced_wasserstein(x, y, key=key, n_steps=10)[0])(x)
    assert g_sw.shape == g_max.shape == (N, D)
    assert np.all(np.isfinite(g_sw)) and np.all(np.isfinite(g_max))
    assert np.any(g_max != 0)


def test_max_sliced_gradient_is_gradient_at_fixed_direction(data):
    x, y = jnp.asarray(data["x"]), jnp.asarray(data["y"])
    key = jax.random.key(0)
    g_max = jax.grad(lambda x: max_sliced_wasserstein(x, y, key=key, n_steps=10)[0])(x)
    _, theta = max_sliced_wasserstein(x, y, key=key, n_steps=10)
    g_fixed = jax.grad(lambda x: wasserstein_1d(x @ theta, y @ theta))(x)
    np.testing.assert_allclose(g_max, g_fixed, rtol=1e-5, atol=1e-7)


def test_jit_with_traced_key_and_p_does_not_retrace(data):
    x, y = data["x"], data["y"]

    @jax.jit
    @eqx.debug.assert_max_traces(max_traces=1)
    def f(key, p):
        return sliced_wasserstein(x, y, n_projections=8, key=key, p=p)

    out = [f(jax.random.key(i), p) for i, p in enumerate((1.0, 2.0, 2.5))]
    eager = sliced_wasserstein(x, y, n_projections=8, key=jax.random.key(2), p=2.5)
    np.testing.assert_allclose(out[-1], eager, rtol=1e-5)


@pytest.mark.parametrize(
    "fn, kwargs, match",
    [
        (sliced_wasserstein, dict(), r"sliced_wasserstein\(key=...\)` is required.*"
                                     r"jax\.random\.key\(0\)"),
        (max_sliced_wasserstein, dict(),
         r"max_sliced_wasserstein\(key=...\)` is required"),
        (sliced_wasserstein, dict(x=np.zeros(N), key=0),
         r"x=...\)` must be a non-empty \(n, d\) array.*got shape \(7,\)"
         r".*x\[:, None\]"),
        (sliced_wasserstein, dict(y=np.zeros((M, 2)), key=0),
         r"x has shape \(7, 3\) but y has shape \(11, 2\)"),
        (sliced_wasserstein, dict(directions=np.ones((2, 2))),
         r"directions=...\)` must have shape \(k, 3\).*got shape \(2, 2\)"),
        (sliced_wasserstein, dict(directions=np.ones((2, 3)), key=0),
         r"got both `key` and `directions`"),
        (sliced_wasserstein, dict(n_projections=0, key=0),
         r"n_projections=...\)` must be a positive int, got 0"),
        (sliced_wasserstein, dict(a=np.ones(M), directions=np.eye(3)),
         r"sliced_wasserstein\(a=...\)` has shape \(11,\) but x has 7 points"),
        (sliced_wasserstein, dict(b=-np.ones(M), key=0),
         r"sliced_wasserstein\(b=...\)` has negative or NaN entries"),
        (sliced_wasserstein, dict(p=0.5, key=0),
         r"sliced_wasserstein\(p=...\)` must be a number >= 1, got 0.5"),
        (max_sliced_wasserstein, dict(a=np.ones(M), key=0),
         r"a=...\)` has shape \(11,\) but x has 7 points"),
        (max_sliced_wasserstein, dict(p=0.9, key=0),
         r"max_sliced_wasserstein\(p=...\)` must be a number >= 1, got 0.9"),
        (max_sliced_wasserstein, dict(n_init=0, key=0),
         r"n_init=...\)` must be an int >= 1"),
        (max_sliced_wasserstein, dict(n_steps=2.5, key=0),
         r"n_steps=...\)` must be an int >= 0"),
        (max_sliced_wasserstein, dict(learning_rate=0.0, key=0),
         r"learning_rate=...\)` must be a positive scalar"),
    ],
)
def test_bad_input_raises(fn, kwargs, match):
    args = dict(x=np.zeros((N, D)), y=np.ones((M, D))) | kwargs
    if "key" in args:
        args["key"] = jax.random.key(args["key"])
    x, y = args.pop("x"), args.pop("y")
    with pytest.raises(ValueError, match=match):
        fn(x, y, **args)
