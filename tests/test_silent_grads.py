"""Issue #10 B.7 (second part): gradients of entropic partial OT and of the exact
potentials are right or raise, never silently zero or wrong.

References are independent of the code under test: finite differences of POT's
`ot.partial.entropic_partial_wasserstein` plan (float64, converged to 1e-15) and of
duals rebuilt from it in NumPy; finite differences of POT's `ot.emd` duals, gauge-fixed
and c-transformed in NumPy as the docstring of `monge.solvers.linear.exact` says.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import ot
import pytest
from conftest import sqdist

import monge
from monge.solvers.linear.exact import Exact
from monge.problems import PartialProblem
from monge.solvers.linear.partial import PartialExact, PartialSinkhorn

_GRAD_RUNTIME = (eqx.EquinoxRuntimeError, jax.errors.JaxRuntimeError)
_GRAD_ARGS = ("C", "a", "b", "mass", "eps")


# -- helpers -------------------------------------------------------------------------------
def _grad_data(n, m, seed, b_total=1.3):
    """Uneven clouds, weights in general position; a sums to 1, b to `b_total`."""
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=(n, 2)), rng.normal(size=(m, 2)) + 0.5
    a, b = rng.uniform(0.5, 1.5, n), rng.uniform(0.5, 1.5, m)
    return sqdist(x, y), a / a.sum(), b_total * b / b.sum()


def _grad_directions(shapes, seed):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=s) for s in shapes]


def _grad_pot_partial(C, a, b, mass, eps):
    """POT's entropic partial plan and the duals rebuilt from it in NumPy, in monge's
    convention P_ij = exp((f_i + g_j - C_ij)/eps): f = 0 on rows whose capacity is not
    used up, g alike, so f_i + g_j = eps log P_ij + C_ij fixes them both (float64)."""
    P = ot.partial.entropic_partial_wasserstein(a, b, C, eps, m=mass, numItermax=200_000, stopThr=1e-15)
    S = eps * np.log(P) + C  # = f_i + g_j + c, with the returned f, g holding c/2 each
    i0 = np.argmax((a - P.sum(1)) / a)  # an inactive row: its f is 0
    j0 = np.argmax((b - P.sum(0)) / b)  # an inactive column
    c = S[i0, j0]
    f, g = S[:, j0] - c, S[i0, :] - c
    return P, f + c / 2, g + c / 2


def _grad_partial_outputs(W, wf, wg):
    def outputs(sol):
        return jnp.stack([sol.cost, sol.reg_cost, jnp.sum(sol.plan * W), sol.f @ wf, sol.g @ wg])

    return outputs


def _grad_pot_outputs(C, a, b, mass, eps, W, wf, wg):
    P, f, g = _grad_pot_partial(C, a, b, mass, eps)
    return np.array([np.sum(P * C), np.sum(P * C) + eps * np.sum(P * np.log(P)), np.sum(P * W), f @ wf, g @ wg])


def _grad_fd(fun, theta, k, d, h):
    plus, minus = list(theta), list(theta)
    plus[k], minus[k] = theta[k] + h * d, theta[k] - h * d
    return (fun(*plus) - fun(*minus)) / (2 * h)


# -- entropic partial OT -------------------------------------------------------------------
@pytest.mark.parametrize("n, m, seed", [(5, 6, 0), (8, 7, 1)])
def test_grad_partial_entropic_matches_pot_finite_differences(n, m, seed):
    """Issue: the gradient of `cost` was 0.114 against 0.153 by finite differences and
    the gradients of `plan`, `f`, `g` were zero. Every output against every input."""
    C, a, b = _grad_data(n, m, seed, b_total=0.9)
    mass, eps = 0.7, 0.2 * C.mean()
    rng = np.random.default_rng(seed + 10)
    W, wf, wg = rng.normal(size=(n, m)), rng.normal(size=n), rng.normal(size=m)
    theta = [C, a, b, np.float64(mass), np.float64(eps)]
    dirs = _grad_directions([C.shape, a.shape, b.shape, (), ()], seed + 20)
    P, _, _ = _grad_pot_partial(C, a, b, mass, eps)
    # the problem exercises both kinds of rows and columns: capacity used up or not
    assert 0 < np.sum(P.sum(1) > a * (1 - 1e-9)) < n and 0 < np.sum(P.sum(0) > b * (1 - 1e-9)) < m
    solver = PartialSinkhorn(threshold=1e-13, max_iterations=200_000)
    outputs = _grad_partial_outputs(*(jnp.asarray(z) for z in (W, wf, wg)))
    with jax.enable_x64(True):
        def ours(C, a, b, mass, eps):
            sol = solver(PartialProblem(monge.CostMatrix(C), a, b, mass=mass, epsilon=eps))
            return outputs(sol)

        jac = jax.jit(jax.jacrev(ours, argnums=tuple(range(5))))(*(jnp.asarray(z) for z in theta))
    ref_fn = lambda *th: _grad_pot_outputs(*th, W, wf, wg)  # noqa: E731
    for k, name in enumerate(_GRAD_ARGS):
        ref = _grad_fd(ref_fn, theta, k, dirs[k], 1e-6)
        got = np.tensordot(np.asarray(jac[k]), dirs[k], axes=dirs[k].ndim)
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7 * np.max(np.abs(ref)), err_msg=name)


def test_grad_partial_entropic_float32():
    """float32 (the default dtype): the cost's gradient against POT's float64 finite
    differences. (The epsilon is given: whether the default's gradient flows is #10 B.8.)"""
    C, a, b = _grad_data(9, 7, 2)
    mass, eps = 0.5, 0.05 * C.mean()
    dC, da = _grad_directions([C.shape, a.shape], 3)
    solver = PartialSinkhorn(threshold=1e-6, max_iterations=100_000)

    def ours(C, a):
        problem = PartialProblem(monge.CostMatrix(C), a, b.astype(np.float32), mass=mass, epsilon=eps)
        return solver(problem).cost

    gC, ga = jax.jit(jax.grad(ours, argnums=(0, 1)))(jnp.asarray(C, jnp.float32), jnp.asarray(a, jnp.float32))
    assert gC.dtype == jnp.float32

    def ref(C, a):
        P = ot.partial.entropic_partial_wasserstein(a, b, C, eps, m=mass, numItermax=200_000, stopThr=1e-15)
        return np.sum(P * C)

    fd_C = _grad_fd(ref, [C, a], 0, dC, 1e-6)
    fd_a = _grad_fd(ref, [C, a], 1, da, 1e-6)
    np.testing.assert_allclose(np.sum(np.asarray(gC) * dC), fd_C, rtol=2e-3)
    np.testing.assert_allclose(np.asarray(ga) @ da, fd_a, rtol=2e-3)


def test_grad_partial_entropic_under_jit_and_vmap():
    """A vmapped batch of jitted gradients, each against POT's finite differences."""
    Cs, a, b = zip(*(_grad_data(6, 5, s) for s in (4, 5, 6)))
    a, b = a[0], b[0]
    Cs = np.stack(Cs)
    mass, eps = 0.5, 0.3
    (dC,) = _grad_directions([Cs.shape[1:]], 7)
    solver = PartialSinkhorn(threshold=1e-13, max_iterations=200_000)
    wf = np.linspace(-1.0, 1.0, 6)
    with jax.enable_x64(True):
        def ours(C):
            sol = solver(PartialProblem(monge.CostMatrix(C), a, b, mass=mass, epsilon=eps))
            return sol.cost + sol.f @ wf

        grads = np.asarray(jax.vmap(jax.jit(jax.grad(ours)))(jnp.asarray(Cs)))

    def ref(C):
        P, f, _ = _grad_pot_partial(C, a, b, mass, eps)
        return np.sum(P * C) + f @ wf

    for C, gC in zip(Cs, grads):
        np.testing.assert_allclose(np.sum(gC * dC), _grad_fd(ref, [C], 0, dC, 1e-6), rtol=1e-6)


def test_grad_partial_entropic_potentials_at_full_mass_raise():
    """At mass = min(sum a, sum b) f and g are not unique: differentiating them raises;
    the plan (unique) keeps its gradient (checked against POT)."""
    C, a, b = _grad_data(5, 6, 8)
    mass, eps = 1.0, 0.3  # sum a = 1 < sum b = 1.3: every row's capacity is used up
    (W,) = _grad_directions([C.shape], 9)
    (dC,) = _grad_directions([C.shape], 10)
    solver = PartialSinkhorn(threshold=1e-13, max_iterations=200_000)
    with jax.enable_x64(True):
        sol_of = lambda C: solver(PartialProblem(monge.CostMatrix(C), a, b, mass=mass, epsilon=eps))  # noqa: E731
        with pytest.raises(_GRAD_RUNTIME, match="not differentiable when `mass` equals"):
            jax.block_until_ready(jax.jit(jax.grad(lambda C: sol_of(C).f[0]))(jnp.asarray(C)))
        gC = np.asarray(jax.jit(jax.grad(lambda C: jnp.sum(sol_of(C).plan * W)))(jnp.asarray(C)))

    def ref(C):
        P = ot.partial.entropic_partial_wasserstein(a, b, C, eps, m=mass, numItermax=200_000, stopThr=1e-15)
        return np.sum(P * W)

    np.testing.assert_allclose(np.sum(gC * dC), _grad_fd(ref, [C], 0, dC, 1e-6), rtol=1e-6)


# -- exact OT: the potentials ----------------------------------------------------------------
def _grad_emd_duals(C, a, b, support=None):
    """Optimal duals from POT's network simplex, made canonical in NumPy: b rescaled to
    sum(a), g the c-transform of f over rows of positive weight, f that of g (so a
    zero-weight row gets its c-transform), gauge <f, a> = <g, b>. With `support` (a
    basis held fixed), u solves u_i + v_j = C_ij there by least squares instead: exact
    finite differences of a function linear in C (no basis change within the step)."""
    b = b * a.sum() / b.sum()
    if support is None:
        _, log = ot.emd(a, b, C, log=True)
        u = np.asarray(log["u"])
    else:
        rows, cols = np.nonzero(support)
        A = np.zeros((rows.size, C.shape[0] + C.shape[1]))
        A[np.arange(rows.size), rows] = 1.0
        A[np.arange(rows.size), C.shape[0] + cols] = 1.0
        u = np.linalg.lstsq(A, C[rows, cols], rcond=None)[0][: C.shape[0]]
    g = np.min(np.where(a[:, None] > 0, C - u[:, None], np.inf), axis=0)
    f = np.min(C - g[None, :], axis=1)
    t = (g @ b - f @ a) / (a.sum() + b.sum())
    return f + t, g - t


@pytest.mark.parametrize("n, m, seed, zero_row", [(5, 6, 11, False), (8, 7, 12, True)])
def test_grad_exact_potentials_match_finite_differences(n, m, seed, zero_row):
    """Exact f, g had no gradient (zero); the weight gradient of the cost was right only
    along sum-keeping directions (b is rescaled to sum(a): a single weight's
    perturbation changes b too). Against POT's duals and emd2, every direction."""
    C, a, b = _grad_data(n, m, seed, b_total=1.0)
    if zero_row:
        a[2] = 0.0
        a /= a.sum()
    rng = np.random.default_rng(seed + 1)
    wf, wg = rng.normal(size=n), rng.normal(size=m)
    dC, da, db = _grad_directions([C.shape, a.shape, b.shape], seed + 2)
    if zero_row:
        da[2] = 0.0  # a one-sided point: stay at a[2] = 0
    with jax.enable_x64(True):
        def ours(C, a, b):
            sol = monge.solve_matrix(C, a=a, b=b, epsilon=0)
            return jnp.stack([sol.f @ wf, sol.g @ wg, sol.cost, sol.reg_cost])

        jac = jax.jit(jax.jacrev(ours, argnums=(0, 1, 2)))(*(jnp.asarray(z) for z in (C, a, b)))

    def ref(C, a, b):
        f, g = _grad_emd_duals(C, a, b)
        cost = ot.emd2(a, b * a.sum() / b.sum(), C)
        return np.array([f @ wf, g @ wg, cost, cost])

    for k, d in enumerate((dC, da, db)):
        expected = _grad_fd(ref, [C, a, b], k, d, 1e-7)
        got = np.tensordot(np.asarray(jac[k]), d, axes=d.ndim)
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-9, err_msg=_GRAD_ARGS[k])


def test_grad_exact_potentials_under_jit_and_vmap():
    """A vmapped batch (one host call) of jitted potential gradients against POT."""
    Cs, a, b = zip(*(_grad_data(6, 5, s, b_total=1.0) for s in (13, 14, 15)))
    a, b, Cs = a[0], b[0], np.stack(Cs)
    (dC,) = _grad_directions([Cs.shape[1:]], 16)
    wf, wg = np.linspace(-1.0, 2.0, 6), np.linspace(1.0, -1.0, 5)
    with jax.enable_x64(True):
        def ours(C):
            sol = monge.solve_matrix(C, a=a, b=b, epsilon=0)
            return sol.f @ wf + sol.g @ wg

        grads = np.asarray(jax.jit(jax.vmap(jax.grad(ours)))(jnp.asarray(Cs)))

    def ref(C):
        f, g = _grad_emd_duals(C, a, b)
        return f @ wf + g @ wg

    for C, gC in zip(Cs, grads):
        np.testing.assert_allclose(np.sum(gC * dC), _grad_fd(ref, [C], 0, dC, 1e-7), rtol=1e-6)


def test_grad_exact_potentials_float32():
    """The default dtype: float32 gradients of f and g against POT's float64 duals."""
    C, a, b = _grad_data(7, 9, 22, b_total=1.0)
    dC, db = _grad_directions([C.shape, b.shape], 23)
    wf, wg = np.linspace(-1.0, 1.0, 7), np.linspace(2.0, 0.0, 9)

    def ours(C, b):
        sol = monge.solve_matrix(C, a=a.astype(np.float32), b=b, epsilon=0)
        return sol.f @ wf + sol.g @ wg

    gC, gb = jax.jit(jax.grad(ours, argnums=(0, 1)))(jnp.asarray(C, jnp.float32), jnp.asarray(b, jnp.float32))
    assert gC.dtype == jnp.float32

    def ref(C, b):
        f, g = _grad_emd_duals(C, a, b)
        return f @ wf + g @ wg

    np.testing.assert_allclose(np.sum(np.asarray(gC) * dC), _grad_fd(ref, [C, b], 0, dC, 1e-7), rtol=1e-4)
    np.testing.assert_allclose(np.asarray(gb) @ db, _grad_fd(ref, [C, b], 1, db, 1e-7), rtol=1e-4)


@pytest.mark.parametrize("method", ["network_simplex", "assignment", "auction", "sinkhorn_rounding"])
def test_grad_exact_potentials_raise_where_not_unique(method):
    """Uniform weights, n = m (an assignment: a degenerate LP whose duals are not
    unique), or a method whose plan is not a vertex: differentiating f or g raises
    instead of returning a silent zero; the cost's gradient (the plan) is unaffected."""
    rng = np.random.default_rng(17)
    # n = 7: test_exact's host-batch test counts host calls by monkeypatching and breaks
    # when an earlier test in the process has traced the same (6 x 6, float64) problem
    C = rng.uniform(size=(7, 7))
    with jax.enable_x64(True):
        sol_of = lambda C: Exact(method=method)(monge.LinearProblem(monge.CostMatrix(C)))  # noqa: E731
        with pytest.raises(_GRAD_RUNTIME, match="not differentiable at this problem"):
            jax.block_until_ready(jax.jit(jax.grad(lambda C: sol_of(C).f[1]))(jnp.asarray(C)))
        gC = np.asarray(jax.jit(jax.grad(lambda C: sol_of(C).reg_cost))(jnp.asarray(C)))
    np.testing.assert_allclose(gC, ot.emd(np.full(7, 1 / 7), np.full(7, 1 / 7), C), atol=2e-3)


def test_grad_partial_exact_potentials():
    """Exact partial OT inherits the potentials' gradient (dummy-point reduction):
    finite differences of the (exact, host) solver's own output, float64."""
    C, a, b = _grad_data(5, 6, 18)
    rng = np.random.default_rng(19)
    wf, wg = rng.normal(size=5), rng.normal(size=6)
    dC, dm = rng.normal(size=C.shape), 1.0
    with jax.enable_x64(True):
        def ours(C, mass):
            sol = PartialExact()(PartialProblem(monge.CostMatrix(C), a, b, mass=mass))
            return sol.f @ wf + sol.g @ wg

        gC, gm = jax.jit(jax.grad(ours, argnums=(0, 1)))(jnp.asarray(C), jnp.asarray(0.6))
        ours_jit = jax.jit(ours)
        fd = lambda *th: float(ours_jit(*(jnp.asarray(z) for z in th)))  # noqa: E731
        fd_C = _grad_fd(fd, [C, np.float64(0.6)], 0, dC, 1e-7)
        fd_m = _grad_fd(fd, [C, np.float64(0.6)], 1, dm, 1e-7)
    assert abs(fd_C) > 1e-3  # not a trivially zero derivative
    np.testing.assert_allclose(np.sum(np.asarray(gC) * dC), fd_C, rtol=1e-6)
    np.testing.assert_allclose(float(gm), fd_m, rtol=1e-6, atol=1e-9)


# -- realistic size --------------------------------------------------------------------------
@pytest.mark.slow
def test_grad_partial_entropic_float32_n500_directional():
    """n = 500 x 400 float32: directional derivatives of the cost along random
    directions of C and of the mass against central differences of POT (float64)."""
    rng = np.random.default_rng(20)
    x, y = rng.normal(size=(500, 2)), rng.normal(size=(400, 2)) + 0.5
    C = sqdist(x, y)
    a, b = np.full(500, 1 / 500), np.full(400, 1.2 / 400)
    mass, eps = 0.7, 0.1
    solver = PartialSinkhorn(threshold=1e-6, max_iterations=100_000)

    def ours(C, mass):
        return solver(PartialProblem(monge.CostMatrix(C), a, b, mass=mass, epsilon=eps)).cost

    gC, gm = jax.jit(jax.grad(ours, argnums=(0, 1)))(jnp.asarray(C, jnp.float32), jnp.float32(mass))
    assert gC.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(gC)))

    def ref(C, mass):
        P = ot.partial.entropic_partial_wasserstein(a, b, C, eps, m=mass, numItermax=100_000, stopThr=1e-13)
        return np.sum(P * C)

    for d in _grad_directions([C.shape, C.shape], 21):
        np.testing.assert_allclose(
            np.sum(np.asarray(gC, np.float64) * d), _grad_fd(ref, [C, mass], 0, d, 1e-5), rtol=1e-4
        )  # measured: 2e-6 and 8e-7
    np.testing.assert_allclose(float(gm), _grad_fd(ref, [C, mass], 1, 1.0, 1e-5), rtol=1e-4)


@pytest.mark.slow
def test_grad_exact_potentials_float32_n300_directional():
    """n = 300 x 250 float32, network simplex: the directional derivative of a linear
    read-out of f and g along a random direction of C against central differences of
    the duals of POT's optimal basis (float64, NumPy least squares on its support: plain
    differences of POT's duals are noisy at this size, 1e-4, as the basis can change
    within the step). Measured: 3.7e-4 (float32), 1e-9 (float64)."""
    rng = np.random.default_rng(24)
    x, y = rng.normal(size=(300, 2)), rng.normal(size=(250, 2)) + 0.5
    C = sqdist(x, y)
    a, b = rng.uniform(0.5, 1.5, 300), rng.uniform(0.5, 1.5, 250)
    a, b = a / a.sum(), b / b.sum()
    wf, wg, dC = rng.normal(size=300), rng.normal(size=250), rng.normal(size=C.shape)

    def ours(C):
        sol = monge.solve_matrix(C, a=a.astype(np.float32), b=b.astype(np.float32), epsilon=0)
        return sol.f @ wf + sol.g @ wg

    gC = np.asarray(jax.jit(jax.grad(ours))(jnp.asarray(C, jnp.float32)), np.float64)

    support = ot.emd(a, b, C) > 0
    assert support.sum() == 300 + 250 - 1  # a non-degenerate vertex

    def ref(C):
        f, g = _grad_emd_duals(C, a, b, support)
        return f @ wf + g @ wg

    np.testing.assert_allclose(np.sum(gC * dC), _grad_fd(ref, [C], 0, dC, 1e-6), rtol=1e-3)
