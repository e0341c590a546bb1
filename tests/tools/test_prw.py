"""Projection-robust Wasserstein against closed forms and POT (float64).

Oracles: the fragmented hypercube of Paty & Cuturi (2019) / Lin et al. (2020), whose
PRW_k*^2 is 4 k* on span(e_1..e_k*); k = d, where every basis is optimal and the value is
the entropic transport cost <C, P> of POT's `ot.sinkhorn2`; k = 1, which bounds every
fixed 1-D projection's exact OT (`ot.emd2`) from above.
"""


import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import ot
import pytest

from monge.tools.prw import projection_robust_wasserstein as prw
from monge.tools.prw import second_moment
from conftest import compile_log
from scipy.spatial.distance import cdist


def sqdist(x, y):
    return cdist(x, y, "sqeuclidean")


def hypercube(n, d, k_star, seed):
    """X ~ U[-1, 1]^d and Y = T(X') with T(x) = x + 2 sign(x) * (1_k*, 0)."""
    rng = np.random.default_rng(seed)
    x, x2 = rng.uniform(-1, 1, (n, d)), rng.uniform(-1, 1, (n, d))
    y = x2.copy()
    y[:, :k_star] += 2 * np.sign(x2[:, :k_star])
    return x, y


@pytest.fixture(scope="module")
def cube():
    return hypercube(100, 5, 2, seed=0)


def projector_gap(U, k_star):
    U = np.asarray(U, np.float64)
    E = np.diag([1.0] * k_star + [0.0] * (U.shape[0] - k_star))
    return np.linalg.norm(U @ U.T - E)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow)])  # a second seed: slow
def test_fragmented_hypercube_value_and_subspace(cube, seed):
    x, y = cube
    res = prw(x, y, k=2, key=jax.random.key(seed), n_steps=50)
    # 4 k* in the population; 100 samples add a few per cent of matching noise.
    assert 0.97 * 8.0 < float(res.value) < 1.1 * 8.0
    assert projector_gap(res.U, 2) < 0.2
    np.testing.assert_allclose(np.asarray(res.U.T @ res.U), np.eye(2), atol=1e-5)
    # The start is random (far from the answer) and the ascent converges.
    start = np.linalg.qr(np.asarray(jax.random.normal(jax.random.key(seed), (5, 2))))[0]
    assert projector_gap(start, 2) > 0.8
    assert float(res.grad_norms[-1]) < 1e-2 * float(res.values[-1])
    # Larger than the exact OT of the projection on the true subspace, up to entropy.
    exact_on_e = ot.emd2(np.full(100, 0.01), np.full(100, 0.01), sqdist(x[:, :2], y[:, :2]))
    assert float(res.value) > exact_on_e - 1e-3


@pytest.mark.slow
def test_k_equal_d_is_entropic_w2_of_pot():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(17, 3)), rng.normal(size=(23, 3)) + [1.0, 0.0, -0.5]
    a, b = rng.uniform(0.5, 1.5, 17), rng.uniform(0.5, 1.5, 23)
    a, b = a / a.sum(), b / b.sum()
    eps = 0.5
    expected = ot.sinkhorn2(a, b, sqdist(x, y), reg=eps, stopThr=1e-13, numItermax=100_000)
    with jax.enable_x64(True):
        res = prw(x, y, k=3, a=a, b=b, epsilon=eps, key=jax.random.key(0), n_steps=5,
                  threshold=1e-10, max_iterations=10_000)
        assert res.value.dtype == jnp.float64
        np.testing.assert_allclose(float(res.value), expected, rtol=1e-8)
        np.testing.assert_allclose(np.asarray(res.values), expected, rtol=1e-8)
        # V_pi in d x d form equals the explicit sum over pairs with POT's plan.
        P = ot.sinkhorn(a, b, sqdist(x, y), reg=eps, stopThr=1e-13, numItermax=100_000)
        diff = x[:, None, :] - y[None, :, :]
        V_ref = np.einsum("ij,ijk,ijl->kl", P, diff, diff)
        sol = res.solution  # the plan on x U, y U with U orthogonal is the plan on x, y
        np.testing.assert_allclose(np.asarray(second_moment(sol, jnp.asarray(x), jnp.asarray(y))),
                                   V_ref, rtol=1e-7, atol=1e-10)


@pytest.mark.slow  # a bound; the k = d and value tests cover the solver by default
def test_k1_bounds_fixed_projections_from_above(cube):
    x, y = cube
    res = prw(x, y, k=1, epsilon=0.05, key=jax.random.key(3), n_steps=60)
    w = np.full(100, 0.01)
    thetas = np.vstack([np.eye(5), np.random.default_rng(2).normal(size=(20, 5))])
    thetas /= np.linalg.norm(thetas, axis=1, keepdims=True)
    best = max(ot.emd2(w, w, sqdist(x @ t[:, None], y @ t[:, None])) for t in thetas)
    assert float(res.value) >= best - 1e-3
    # The maximiser lies in span(e1, e2) (the shifted coordinates).
    assert np.linalg.norm(np.asarray(res.U)[2:, 0]) < 0.15


@pytest.mark.slow
def test_gradient_at_fixed_subspace_matches_finite_differences_of_pot(cube):
    # float32 and the shapes of test_new_numbers_do_not_recompile (one compilation).
    x, y = (np.asarray(v[:20], np.float32) for v in cube)
    eps = 0.5

    def value(x):
        res = prw(x, y, k=2, epsilon=eps, step_size=0.2, threshold=1e-5,
                  key=jax.random.key(2), n_steps=5)
        return res.value, res.U

    grad, U = jax.grad(value, has_aux=True)(jnp.asarray(x))
    U, w = np.asarray(U, np.float64), np.full(20, 0.05)
    x64, y64 = x.astype(np.float64), y.astype(np.float64)

    def pot_value(x):  # U held fixed: the entropic transport cost of the projections
        return ot.sinkhorn2(w, w, sqdist(x @ U, y64 @ U), reg=eps, stopThr=1e-14,
                            numItermax=100_000)

    h, fd = 1e-6, np.zeros_like(x64)
    for i, j in np.ndindex(*x.shape):
        e = np.zeros_like(x64)
        e[i, j] = h
        fd[i, j] = (pot_value(x64 + e) - pot_value(x64 - e)) / (2 * h)
    np.testing.assert_allclose(np.asarray(grad), fd, rtol=1e-3, atol=1e-3)
    assert np.abs(fd).max() > 0.1  # the check is not vacuous


def test_jit_with_traced_numbers_does_not_retrace(cube):
    x, y = (np.asarray(v[:20], np.float32) for v in cube)

    @jax.jit
    @eqx.debug.assert_max_traces(max_traces=1)
    def f(key, eps, step):
        return prw(x, y, k=2, epsilon=eps, step_size=step, key=key, n_steps=5).value

    out = [f(jax.random.key(i), e, s) for i, (e, s) in enumerate([(0.3, 0.2), (0.5, 0.1)])]
    assert all(np.isfinite(float(v)) for v in out)


@pytest.mark.slow
def test_new_numbers_do_not_recompile(cube):
    x, y = (np.asarray(v[:20], np.float32) for v in cube)
    prw(x, y, k=2, epsilon=0.3, step_size=0.2, key=jax.random.key(0), n_steps=5)
    def again():
        prw(x, y, k=2, epsilon=0.5, step_size=0.1, threshold=1e-4, key=jax.random.key(1),
            n_steps=5)

    compiled = [m for m in compile_log(again) if "Compiling" in m]
    assert not compiled, compiled


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(key=None), r"projection_robust_wasserstein\(key=...\)` is required.*init"),
        (dict(x=np.zeros(7)), r"x=...\)` must be a non-empty \(n, d\) array.*\(7,\)"),
        (dict(y=np.ones((11, 2))), r"x has shape \(7, 3\) but y has shape \(11, 2\)"),
        (dict(k=4), r"k=...\)` must be an int in \[1, 3\]; received 4"),
        (dict(k=0), r"k=...\)` must be an int in \[1, 3\]; received 0"),
        (dict(k=1.0), r"k=...\)` must be an int in \[1, 3\]; received 1.0"),
        (dict(n_steps=0), r"n_steps=...\)` must be an int >= 1; received 0"),
        (dict(epsilon=0.0), r"epsilon=...\)` must be a positive finite scalar; received 0.0"),
        (dict(step_size=-1.0), r"step_size=...\)` must be a positive finite scalar"),
        (dict(a=np.ones(11)), r"a=...\)` has shape \(11,\) but x has 7 points"),
        (dict(b=-np.ones(11)), r"b=...\)` has negative or NaN entries"),
        (dict(init=np.ones((3, 1)), key=None), r"init=...\)` must have shape \(d, k\) = \(3, 2\)"),
        (dict(init=np.ones((3, 2)), key=None), r"init=...\)` must have orthonormal columns"),
    ],
)
def test_bad_input_raises(kwargs, match):
    args = dict(x=np.zeros((7, 3)), y=np.ones((11, 3)), k=2, key=jax.random.key(0)) | kwargs
    x, y = args.pop("x"), args.pop("y")
    with pytest.raises(ValueError, match=match):
        prw(x, y, **args)
