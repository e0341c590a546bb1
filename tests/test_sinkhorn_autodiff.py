"""Gradients (finite differences, implicit vs unrolled) and JAX transformations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import monge
from conftest import compile_log

EPS = 0.7


def loss(x, y, a, b, eps, *, tau=1.0, implicit=True, chunk_size=None):
    if chunk_size is None:
        sol = monge.solve(
            x, y, a=a, b=b, epsilon=eps, tau_a=tau, tau_b=tau, threshold=1e-12,
            max_iterations=5000, implicit_diff=implicit,
        )
    else:  # online, in blocks of chunk_size lines
        geom = monge.PointCloud(x, y, online=True, chunk_size=chunk_size)
        assert geom.is_online
        adjoint = monge.ImplicitAdjoint() if implicit else monge.UnrolledAdjoint()
        solver = monge.Sinkhorn(threshold=1e-12, max_iterations=5000, adjoint=adjoint)
        sol = solver(monge.LinearProblem(geom, a, b, epsilon=eps, tau_a=tau, tau_b=tau))
    # A mix of gauge-invariant outputs: cost, regularised cost, plan, map.
    return sol.cost + 0.5 * sol.reg_cost + jnp.sum(sol.plan**2) + 0.1 * jnp.sum(sol.transport(x[:2]) ** 2)


@pytest.fixture(scope="module", params=[1.0, 0.8], ids=["balanced", "unbalanced"])
def grads(request, clouds):
    tau = request.param
    x, y, a, b = clouds
    b = b if tau == 1 else 1.3 * b
    with jax.enable_x64(True):
        args = tuple(jnp.asarray(v) for v in (x, y, a, b)) + (jnp.asarray(EPS),)
        implicit = jax.grad(lambda *z: loss(*z, tau=tau), argnums=range(5))(*args)
        unrolled = jax.grad(lambda *z: loss(*z, tau=tau, implicit=False), argnums=range(5))(*args)
        fd = {}
        h = 1e-5
        rng = np.random.default_rng(1)
        for k, v in enumerate(args):
            direction = rng.normal(size=np.shape(v))
            if k in (2, 3) and tau == 1:  # balanced: stay on the simplex
                direction -= direction.mean()
            up = list(args)
            down = list(args)
            up[k] = v + h * direction
            down[k] = v - h * direction
            fd[k] = (
                (loss(*up, tau=tau) - loss(*down, tau=tau)) / (2 * h),
                float(np.sum(np.asarray(implicit[k]) * direction)),
                float(np.sum(np.asarray(unrolled[k]) * direction)),
            )
    return implicit, unrolled, fd


@pytest.mark.slow
@pytest.mark.parametrize("k", range(5), ids=["x", "y", "a", "b", "epsilon"])
def test_implicit_gradient_matches_finite_differences(grads, k):
    fd, implicit, _ = grads[2][k]
    np.testing.assert_allclose(implicit, float(fd), rtol=1e-5, atol=1e-8)


@pytest.mark.slow
@pytest.mark.parametrize("k", range(5), ids=["x", "y", "a", "b", "epsilon"])
def test_unrolled_gradient_matches_finite_differences(grads, k):
    fd, _, unrolled = grads[2][k]
    np.testing.assert_allclose(unrolled, float(fd), rtol=1e-6, atol=1e-9)


def test_float32_gradients_are_finite_and_close_to_x64(clouds):
    x, y, a, b = clouds
    g32 = jax.grad(lambda x: monge.solve(x, y, a=a, b=b, epsilon=EPS).reg_cost)(x.astype(np.float32))
    with jax.enable_x64(True):
        g64 = jax.grad(lambda x: monge.solve(x, y, a=a, b=b, epsilon=EPS, threshold=1e-12).reg_cost)(x)
    assert np.all(np.isfinite(np.asarray(g32)))
    np.testing.assert_allclose(np.asarray(g32), np.asarray(g64), atol=2e-3)


@pytest.mark.slow
def test_vmap_equals_loop(clouds):
    x, y, _, _ = clouds
    xs = np.stack([x, 0.5 * x + 1.0, 2.0 * x]).astype(np.float32)
    eps = np.array([0.3, 0.5, 1.0], np.float32)
    batched, costs = jax.vmap(lambda x, e: (lambda s: (s, s.cost))(monge.solve(x, y, epsilon=e)))(xs, eps)
    for i in range(3):
        single = monge.solve(xs[i], y, epsilon=eps[i])
        np.testing.assert_allclose(float(costs[i]), float(single.cost), rtol=1e-5)
        np.testing.assert_allclose(np.asarray(batched.f[i] + batched.g[i][0]), np.asarray(single.f + single.g[0]), atol=1e-4)
        assert int(batched.n_iters[i]) == int(single.n_iters)
    assert isinstance(batched.message, list) and len(batched.message) == 3


def test_jit_of_front_door(clouds):
    x, y, a, b = clouds
    jitted = jax.jit(lambda x, e: monge.solve(x, y, a=a, b=b, epsilon=e).cost)
    np.testing.assert_allclose(
        float(jitted(x, 0.5)), float(monge.solve(x, y, a=a, b=b, epsilon=0.5).cost), rtol=1e-5
    )


@pytest.mark.slow
def test_online_equals_dense(clouds):
    x, y, a, b = clouds
    with jax.enable_x64(True):
        args = (jnp.asarray(x), jnp.asarray(y), jnp.asarray(a), jnp.asarray(b), jnp.asarray(EPS))
        dense = monge.solve(*args[:2], a=a, b=b, epsilon=EPS, threshold=1e-12)
        geom = monge.PointCloud(x, y, online=True, chunk_size=3)  # uneven blocks
        online = monge.Sinkhorn(threshold=1e-12)(monge.LinearProblem(geom, a, b, epsilon=EPS))
        assert geom.is_online and not dense.problem.geom.is_online
        # the two start differently (online: a log-domain start), so compare f up to
        # the balanced gauge (f + t, g - t)
        np.testing.assert_allclose(np.asarray(online.f + online.g[0]), np.asarray(dense.f + dense.g[0]), atol=1e-12)
        np.testing.assert_allclose(float(online.cost), float(dense.cost), rtol=1e-12)
        np.testing.assert_allclose(np.asarray(online.transport(x)), np.asarray(dense.transport(x)), atol=1e-12)
        g_dense = jax.grad(loss)(*args)
        g_online = jax.grad(lambda *z: loss(*z, chunk_size=3))(*args)
        np.testing.assert_allclose(np.asarray(g_online), np.asarray(g_dense), atol=1e-10)


def test_online_switches_on_by_size():
    x = jnp.zeros((6000, 2))
    assert monge.PointCloud(x, x).is_online
    assert not monge.PointCloud(x[:100], x).is_online
    # a matrix that is one block anyway is stored, even when online=True
    assert not monge.PointCloud(x[:300], x, online=True).is_online
    assert monge.PointCloud(x[:400], x, online=True).is_online  # 400 * 6000 > 2**21
    assert monge.PointCloud(x[:100], x[:100], online=True, chunk_size=99).is_online
    assert not monge.PointCloud(x[:100], x[:100], online=True, chunk_size=100).is_online


def test_new_epsilon_does_not_recompile(clouds):
    x, y, _, _ = clouds
    x, y = x.astype(np.float32), y.astype(np.float32)
    monge.solve(x, y, epsilon=0.3)  # compile

    def again():
        for eps in (0.4, 0.9, 1.7):
            monge.solve(x, y, epsilon=eps, tau_a=0.9, tau_b=0.95, threshold=1e-4)

    compiles = [m for m in compile_log(again) if "Compiling" in m and "_solve" in m]
    assert not compiles, compiles
