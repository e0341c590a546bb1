"""Semi-discrete OT against closed forms and an independent quadrature solve of the semi-dual.

Oracle problem: uniform source on [0, 1], atoms y = (0.1, 0.5, 0.8) with weights
b = (0.3, 0.5, 0.2), squared Euclidean cost. For epsilon = 0 the optimal map is monotone:
the Laguerre cells are [0, 0.3], [0.3, 0.8], [0.8, 1], and the cost is
sum_j int_{cell j} (x - y_j)^2 dx. For epsilon > 0 the semi-dual is maximised by BFGS
(scipy) on a 20 000-point midpoint quadrature of [0, 1], in float64.
"""


import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize
from scipy.special import logsumexp

from monge.tools.semidiscrete import semidiscrete
from conftest import compile_log

Y = np.array([0.1, 0.5, 0.8])
B = np.array([0.3, 0.5, 0.2])
EDGES = np.array([0.0, 0.3, 0.8, 1.0])  # cumulative weights: the monotone cells
EXACT_COST = sum(((EDGES[j + 1] - Y[j]) ** 3 - (EDGES[j] - Y[j]) ** 3) / 3 for j in range(3))


def uniform(key, n):
    return jax.random.uniform(key, (n, 1))


def boundaries(g):
    """Cell boundaries t_j where (t - y_j)^2 - g_j = (t - y_{j+1})^2 - g_{j+1}."""
    g = np.asarray(g, np.float64)
    return (Y[1:] ** 2 - Y[:-1] ** 2 + g[:-1] - g[1:]) / (2 * (Y[1:] - Y[:-1]))


def quadrature_semidual(eps, N=20_000):
    """Maximise the entropic semi-dual on a midpoint grid: (g - g_0, value, <c, pi>)."""
    x = (np.arange(N) + 0.5) / N
    C = (x[:, None] - Y[None]) ** 2

    def probs(g):
        s = np.log(B) + (g - C) / eps
        lse = logsumexp(s, axis=1)
        return lse, np.exp(s - lse[:, None])

    def neg(g):
        lse, chi = probs(g)
        return -(np.mean(-eps * lse) + g @ B), -(B - chi.mean(0))

    res = optimize.minimize(neg, np.zeros(3), jac=True, method="BFGS", options=dict(gtol=1e-12))
    _, chi = probs(res.x)
    return res.x - res.x[0], -res.fun, np.mean(np.sum(chi * C, axis=1))


@pytest.fixture(scope="module")
def hard():
    return semidiscrete(uniform, Y[:, None], b=B, key=jax.random.key(0), n_steps=2000,
                        n_eval=50_000)


def test_unregularised_cells_are_the_monotone_intervals(hard):
    np.testing.assert_allclose(boundaries(hard.g), EDGES[1:-1], atol=5e-3)
    x = np.asarray(jax.random.uniform(jax.random.key(7), (2000, 1)))
    expected = np.searchsorted(EDGES[1:-1], x[:, 0])
    assert np.mean(np.asarray(hard.assign(x)) == expected) > 0.99
    mapped = Y[np.asarray(hard.assign(x))][:, None].astype(np.float32)
    np.testing.assert_array_equal(np.asarray(hard.transport(x)), mapped)


def test_unregularised_cost_matches_closed_form(hard):
    np.testing.assert_allclose(float(hard.cost), EXACT_COST, rtol=0.02)
    np.testing.assert_allclose(float(hard.reg_cost), EXACT_COST, rtol=0.02)
    # The history is the semi-dual of the averaged iterate on each minibatch.
    assert hard.objective.shape == (2000,)
    np.testing.assert_allclose(np.mean(np.asarray(hard.objective)[-200:]), EXACT_COST, rtol=0.03)


def test_evaluate_on_a_grid_matches_closed_form(hard):
    x = ((np.arange(10_000) + 0.5) / 10_000)[:, None]
    cost, reg_cost = hard.evaluate(x)
    np.testing.assert_allclose([float(cost), float(reg_cost)], EXACT_COST, rtol=0.01)


def test_gradient_wrt_atoms_matches_closed_form():
    # d W2^2 / d y_j = 2 int_{cell j} (y_j - x) dx = 2 b_j (y_j - centre of cell j).
    def value(y):
        return semidiscrete(uniform, y, b=B, key=jax.random.key(3), n_steps=2000,
                            n_eval=50_000).reg_cost

    grad = jax.grad(value)(jnp.asarray(Y[:, None], jnp.float32))
    expected = 2 * B * (Y - 0.5 * (EDGES[:-1] + EDGES[1:]))
    np.testing.assert_allclose(np.asarray(grad)[:, 0], expected, atol=4e-3)


@pytest.mark.parametrize("eps", [0.01, 0.002])
def test_entropic_matches_quadrature_semidual(eps):
    g_ref, value_ref, cost_ref = quadrature_semidual(eps)
    sol = semidiscrete(uniform, Y[:, None], b=B, epsilon=eps, key=jax.random.key(1),
                       n_steps=2000, n_eval=50_000)
    g = np.asarray(sol.g, np.float64)
    np.testing.assert_allclose(g - g[0], g_ref, atol=1e-3)
    np.testing.assert_allclose(float(sol.reg_cost), value_ref, rtol=0.01)
    np.testing.assert_allclose(float(sol.cost), cost_ref, rtol=0.01)
    rows = np.asarray(sol.probabilities(np.array([[0.0], [0.55], [1.0]])))
    np.testing.assert_allclose(rows.sum(1), 1.0, rtol=1e-5)
    assert rows[:, 0].argmax() == 0 and rows[:, 2].argmax() == 2


def test_small_epsilon_is_close_to_unregularised():
    sol = semidiscrete(uniform, Y[:, None], b=B, epsilon=1e-3, key=jax.random.key(2),
                       n_steps=2000, n_eval=50_000)
    np.testing.assert_allclose(boundaries(sol.g), EDGES[1:-1], atol=1e-2)
    np.testing.assert_allclose(float(sol.cost), EXACT_COST, rtol=0.02)
    x = np.array([[0.2], [0.5], [0.9]])
    np.testing.assert_allclose(np.asarray(sol.transport(x))[:, 0], Y, atol=0.02)


def test_two_dimensional_quadrants_and_euclidean_cost():
    # Uniform square to the four quadrant centres with equal weights: the cells are the
    # quadrants. sqeuclidean: 2 * (0.5^2 / 12) = 1/24. euclidean: the mean distance to
    # the centre of a square of side s is s (sqrt(2) + asinh(1)) / 6.
    square = lambda key, n: jax.random.uniform(key, (n, 2))  # noqa: E731
    y = np.array([[0.25, 0.25], [0.25, 0.75], [0.75, 0.25], [0.75, 0.75]])
    probe = np.array([[0.1, 0.2], [0.3, 0.9], [0.6, 0.1], [0.9, 0.6]])
    mean_distance = 0.5 * (np.sqrt(2) + np.arcsinh(1)) / 6
    for cost, exact in (("sqeuclidean", 1 / 24), ("euclidean", mean_distance)):
        sol = semidiscrete(square, y, cost=cost, key=jax.random.key(4), n_steps=1500,
                           n_eval=50_000)
        np.testing.assert_array_equal(np.asarray(sol.assign(probe)), [0, 1, 2, 3])
        np.testing.assert_allclose(float(sol.cost), exact, rtol=0.02)


def test_zero_weight_atom_receives_no_mass():
    sol = semidiscrete(uniform, np.array([[0.1], [0.5], [0.9]]), b=np.array([0.5, 0.0, 0.5]),
                       key=jax.random.key(5), n_steps=2000, n_eval=50_000)
    x = np.linspace(0.0, 1.0, 101)[:, None]
    assert 1 not in np.asarray(sol.assign(x)).tolist()
    np.testing.assert_allclose(float(sol.cost), 2 * ((0.4**3 + 0.1**3) / 3), rtol=0.03)


def test_float64_and_jit_with_traced_numbers_do_not_retrace():
    with jax.enable_x64(True):
        sol = semidiscrete(lambda key, n: jax.random.uniform(key, (n, 1), jnp.float64),
                           Y[:, None], b=B, key=jax.random.key(0), n_steps=50)
        assert sol.g.dtype == jnp.float64 and sol.cost.dtype == jnp.float64

    @jax.jit
    @eqx.debug.assert_max_traces(max_traces=1)
    def fit(key, eps, lr):
        return semidiscrete(uniform, Y[:, None], b=B, epsilon=eps, key=key, n_steps=50,
                            learning_rate=lr, n_eval=100).g

    out = [fit(jax.random.key(i), e, lr) for i, (e, lr) in enumerate([(0.0, 0.1), (0.01, 0.2)])]
    assert all(np.all(np.isfinite(np.asarray(g))) for g in out)


def test_new_numbers_do_not_recompile():
    def fit(eps, lr, key):
        return semidiscrete(uniform, Y[:, None], b=B, epsilon=eps, learning_rate=lr,
                            key=jax.random.key(key), n_steps=20, n_eval=100)

    fit(0.0, 0.1, 0)
    compiled = [m for m in compile_log(lambda: fit(0.05, 0.3, 1)) if "Compiling" in m]
    assert not compiled, compiled


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(key=None), r"semidiscrete\(key=...\)` is required.*jax\.random\.key\(0\)"),
        (dict(y=np.zeros(3)), r"y=...\)` must be a non-empty \(m, d\) array.*\(3,\).*y\[:, None\]"),
        (dict(y=np.array([[0.0], [np.nan], [1.0]])), r"y=...\)` has non-finite values"),
        (dict(b=np.ones(2)), r"b=...\)` has shape \(2,\) but y has 3 atoms"),
        (dict(b=np.array([1.0, -1.0, 1.0])), r"b=...\)` must be finite, non-negative"),
        (dict(epsilon=-0.1), r"epsilon=...\)` must be finite and >= 0; received -0.1"),
        (dict(epsilon=np.ones(2)), r"epsilon=...\)` must be a scalar; received shape \(2,\)"),
        (dict(learning_rate=0.0), r"learning_rate=...\)` must be finite and > 0; received 0.0"),
        (dict(n_steps=0), r"n_steps=...\)` must be an int >= 1; received 0"),
        (dict(batch_size=2.5), r"batch_size=...\)` must be an int >= 1; received 2.5"),
        (dict(n_eval=True), r"n_eval=...\)` must be an int >= 1; received True"),
        (dict(cost="manhattan"), r"`cost` must be one of .*received the string 'manhattan'"),
        (dict(sampler=3), r"sampler=...\)` must be a function sampler\(key, n\)"),
        (dict(sampler=lambda key, n: jax.random.uniform(key, (n, 2))),
         r"must return a float array of shape \(n, 1\).*returned float32 of shape \(16, 2\)"),
        (dict(sampler=lambda key, n: np.random.default_rng(0).uniform(size=(n, 1)) + key),
         r"sampler=...\)` failed when called as sampler\(key, n\) under JAX tracing"),
    ],
)
def test_bad_input_raises(kwargs, match):
    args = dict(sampler=uniform, y=Y[:, None], key=jax.random.key(0), batch_size=16) | kwargs
    sampler, y = args.pop("sampler"), args.pop("y")
    with pytest.raises(ValueError, match=match):
        semidiscrete(sampler, y, **args)
