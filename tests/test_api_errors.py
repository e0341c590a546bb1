"""Bad input is a ValueError that says what to do; solver failure is data."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import sqdist

import monge
from monge import costs

X = np.random.default_rng(0).normal(size=(7, 3)).astype(np.float32)
Y = np.random.default_rng(1).normal(size=(11, 3)).astype(np.float32)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(x=X[:, 0]), r"`x` must be a 2-D array of points, shape \(n, d\); received shape \(7,\)\. Use z\.reshape"),
        (dict(y=Y[:, :2]), r"`x` and `y` must have the same dimension d; received x of shape \(7, 3\) and y of shape \(11, 2\)"),
        (dict(a=np.ones(6) / 6), r"`a` must be a 1-D array of 7 weights, one per point of the source"),
        (dict(b=np.ones((11, 1))), r"`b` must be a 1-D array of 11 weights"),
        (dict(a=np.r_[-0.1, np.ones(6) * 1.1 / 6]), r"`a` has negative weights \(smallest -0\.1\)"),
        (dict(b=np.r_[np.nan, np.ones(10) / 10]), r"`b` has non-finite weights"),
        (dict(a=np.zeros(7)), r"`a` sums to 0"),
        (dict(a=np.ones(7)), r"balanced problem needs equal masses, but `a` sums to 7 and `b` to 1"),
        (dict(x=np.where(np.arange(21).reshape(7, 3) == 4, np.nan, X)), r"`x` has 1 non-finite value\(s\)"),
        (dict(y=np.where(np.arange(33).reshape(11, 3) == 0, np.inf, Y)), r"`y` has 1 non-finite value"),
        (dict(epsilon=np.inf), r"`epsilon` must be positive and finite; received"),
        (dict(epsilon=-1.0), r"`epsilon` must be positive"),
        (dict(tau_a=0.0), r"`tau_a` must lie in \(0, 1\]"),
        (dict(tau_b=1.5), r"`tau_b` must lie in \(0, 1\]"),
        (dict(cost="manhattan"), r"`cost` must be one of \['cityblock', 'cosine', 'euclidean', 'sqeuclidean'\]"),
        (dict(cost=3), r"`cost` must be a name such as 'sqeuclidean'"),
        (dict(threshold=0.0), r"`threshold` must be positive and finite"),
        (dict(max_iterations=0), r"`max_iterations` must be a positive integer; received 0"),
    ],
)
def test_solve_rejects_bad_input(kwargs, match):
    args = dict(x=X, y=Y)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        monge.solve(args.pop("x"), args.pop("y"), **args)


def test_other_constructors_reject_bad_input():
    with pytest.raises(ValueError, match=r"A cost matrix must be 2-D, of shape \(n, m\); received shape \(3,\)"):
        monge.solve_matrix(np.ones(3))
    with pytest.raises(ValueError, match=r"`C` has 1 NaN or -inf value"):
        monge.solve_matrix(np.array([[0.0, np.nan], [1.0, 0.0]]))
    with pytest.raises(ValueError, match=r"`PNorm\(p=\.\.\.\)` needs a number p >= 1"):
        costs.PNorm(0.5)
    with pytest.raises(ValueError, match=r"`chunk_size` must be a positive integer"):
        monge.PointCloud(X, Y, chunk_size=0)
    with pytest.raises(ValueError, match=r"`Sinkhorn` solves a monge.LinearProblem"):
        monge.Sinkhorn()(X)
    with pytest.raises(ValueError, match=r"`initializer` must be one of 'auto', 'zeros', 'gaussian', 'sorting', 'subsample'; received 'nope'"):
        monge.Sinkhorn(initializer="nope")
    with pytest.raises(ValueError, match=r"`initializer='gaussian'` needs a point-cloud problem with the squared Euclidean cost; received a CostMatrix"):
        monge.Sinkhorn(initializer="gaussian")(monge.LinearProblem(monge.CostMatrix(np.ones((2, 3)))))
    with pytest.raises(ValueError, match=r"received a PointCloud with cost Euclidean"):
        monge.Sinkhorn(initializer="gaussian")(monge.LinearProblem(monge.PointCloud(X, Y, "euclidean")))
    with pytest.raises(ValueError, match=r"`anneal_decay` must lie in \(0, 1\); received"):
        monge.Sinkhorn(anneal_decay=1.0)
    with pytest.raises(ValueError, match=r"`mode` must be 'auto', 'log' or 'kernel'; received 'fast'"):
        monge.Sinkhorn(mode="fast")
    with pytest.raises(ValueError, match=r"`adjoint` must be monge.ImplicitAdjoint\(\)"):
        monge.Sinkhorn(adjoint="implicit")
    with pytest.raises(ValueError, match=r"`epsilon` must be a scalar"):
        monge.solve(X, Y, epsilon=np.ones(2))
    sol = monge.solve(X, Y, epsilon=1.0)
    with pytest.raises(ValueError, match=r"`sol.apply\(v, axis=0\)` needs v of shape \(7,\) or \(7, k\)"):
        sol.apply(np.ones(11), axis=0)
    with pytest.raises(ValueError, match=r"`axis` must be 0 or 1"):
        sol.apply(np.ones(11), axis=2)
    with pytest.raises(ValueError, match=r"`transport\(z\)` needs z of shape \(k, 3\)"):
        sol.transport(np.ones((2, 2)))


RUNTIME = (eqx.EquinoxRuntimeError, jax.errors.JaxRuntimeError)


def test_traced_bad_values_raise_at_runtime():
    """Under jit the values are unknown at the door: the solver checks them (under a
    plain `jax.jit` equinox's error surfaces as a JaxRuntimeError with our message)."""
    bad_a = jnp.r_[-0.5, jnp.ones(6) * 1.5 / 6]
    with pytest.raises(RUNTIME, match="non-negative weights"):
        jax.jit(lambda a: monge.solve(X, Y, a=a).f)(bad_a)
    with pytest.raises(RUNTIME, match="equal masses"):
        jax.jit(lambda a: monge.solve(X, Y, a=a).f)(jnp.ones(7))
    with pytest.raises(RUNTIME, match="`epsilon` must be positive"):
        jax.jit(lambda e: monge.solve(X, Y, epsilon=e).f)(-1.0)


def test_non_convergence_is_reported_not_raised():
    sol = monge.solve(X, Y, epsilon=1e-3, max_iterations=20)
    assert not bool(sol.converged)
    assert int(sol.status) == monge.Status.MAX_ITERATIONS
    assert int(sol.n_iters) == 20
    assert "max_iterations was reached" in sol.message
    errors = np.asarray(sol.errors)
    assert errors.shape == (2,) and np.all(errors > 1e-3)
    assert np.all(np.isfinite(np.asarray(sol.f)))
    with pytest.raises(eqx.EquinoxRuntimeError, match="max_iterations was reached"):
        monge.solve(X, Y, epsilon=1e-3, max_iterations=20, throw=True)


def test_converged_status_and_error_history():
    sol = monge.solve(X, Y, epsilon=1.0, threshold=1e-4)
    assert bool(sol.converged) and int(sol.status) == monge.Status.CONVERGED
    assert sol.message.startswith("converged")
    errors = np.asarray(sol.errors)
    done = -(-int(sol.n_iters) // 10)  # blocks run (the last may stop early)
    assert errors[done - 1] <= 1e-4 < errors[0]
    assert np.all(errors[done:] == -1)


def test_nan_from_a_custom_cost_is_reported_as_diverged():
    nan_cost = lambda x, y: jnp.sum((x - y) ** 2) * jnp.where(x[0] > 1.0, jnp.nan, 1.0)  # noqa: E731
    sol = monge.solve(X, Y, cost=nan_cost, epsilon=1.0)
    assert int(sol.status) == monge.Status.DIVERGED and "diverged" in sol.message
    assert not bool(sol.converged)


def test_progress_prints_to_stderr(capfd):
    monge.solve(X, Y, epsilon=0.5, progress=True)
    err = capfd.readouterr().err
    assert "sinkhorn: iteration" in err and "marginal error" in err
    # with tau < 1 the error is an optimality residual, and the line says so
    monge.solve(X, Y, epsilon=0.5, tau_a=0.8, progress=True)
    err = capfd.readouterr().err
    assert "optimality residual (tau < 1)" in err and "marginal error" not in err


def test_importing_monge_leaves_jax_config_alone():
    import subprocess
    import sys

    code = "import jax; before = jax.config.jax_enable_x64; import monge; print(before == jax.config.jax_enable_x64, jax.numpy.ones(1).dtype)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "float32"]


def test_sqeuclidean_is_centred_far_from_origin():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(5, 4)) + 1e3
    y = rng.normal(size=(6, 4)) + 1e3
    C = np.asarray(costs.SqEuclidean().all_pairs(x.astype(np.float32), y.astype(np.float32)))
    np.testing.assert_allclose(C, sqdist(x, y), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("cost", [costs.Euclidean(), costs.PNorm(1.0), costs.PNorm(3.0), costs.Cosine()])
def test_costs_have_finite_gradients_at_coincident_points(cost):
    x = jnp.array([1.0, -2.0, 0.5])
    grad = jax.grad(lambda z: cost(z, x))(x)
    assert np.all(np.isfinite(np.asarray(grad)))
    all_pairs = jax.grad(lambda z: jnp.sum(cost.all_pairs(z, z)))(jnp.stack([x, 2 * x]))
    assert np.all(np.isfinite(np.asarray(all_pairs)))


def test_euclidean_gradient_away_from_zero_matches_closed_form():
    x, y = jnp.array([1.0, 2.0]), jnp.array([4.0, 6.0])
    np.testing.assert_allclose(np.asarray(jax.grad(costs.Euclidean())(x, y)), [-0.6, -0.8], rtol=1e-6)
