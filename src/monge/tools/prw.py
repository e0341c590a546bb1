r"""Projection-robust Wasserstein: the $k$-dimensional subspace where two clouds differ most.

$$\mathrm{PRW}_k^2(\mu, \nu) = \max_{U \in \mathrm{St}(d, k)}\ \min_{\pi \in \Pi(a, b)}
\sum_{ij} \pi_{ij}\,\|U^\top(x_i - y_j)\|^2,$$

over the Stiefel manifold $\mathrm{St}(d, k) = \{U \in \mathbb{R}^{d\times k}: U^\top U =
I_k\}$. The inner problem is entropic OT on the projected clouds $(x U, y U)$; its value is
a smooth function of $U$ whose Euclidean gradient is $2 V_\pi U$ (Danskin), with the
displacement second moment

$$V_\pi = \sum_{ij}\pi_{ij}(x_i - y_j)(x_i - y_j)^\top = X^\top \mathrm{diag}(\pi\mathbf 1)X
+ Y^\top\mathrm{diag}(\pi^\top\mathbf 1) Y - X^\top \pi Y - Y^\top\pi^\top X,$$

a $d\times d$ matrix built from plan products (no $n\times m\times d$ tensor). For $k = 1$
this is max-sliced Wasserstein; for $k = d$ every $U$ is optimal and the value is
$W_2^2$ (entropic).

Reference: Lin, Fan, Ho, Cuturi & Jordan, *Projection robust Wasserstein distance and
Riemannian optimization*, NeurIPS 2020 (Algorithm RGAS); Paty & Cuturi, *Subspace
robust Wasserstein distances*, ICML 2019.
"""

from __future__ import annotations

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from monge import checks
from monge.checks import concrete
from monge.front import solve
from monge.geometry import PointCloud
from monge.problems import default_epsilon
from monge.solution import Solution

__all__ = ["PRWResult", "projection_robust_wasserstein"]

_FN = "projection_robust_wasserstein"


class PRWResult(eqx.Module):
    r"""The result of `projection_robust_wasserstein`.

    Attributes:
        value: $\mathrm{PRW}_k^2$, the transport cost $\sum_{ij}\pi_{ij}\|U^\top(x_i -
            y_j)\|^2$ of the entropic plan between the clouds projected on `U`.
            Differentiable w.r.t. `x`, `y`, `a`, `b` at fixed `U` (Danskin).
        U: the optimised orthonormal basis, shape `(d, k)`; only the subspace
            $UU^\top$ is meaningful. No gradient flows through it.
        solution: the entropic OT `Solution` between `x @ U` and `y @ U` (plan,
            potentials, status).
        values: the value at the start of each ascent step, shape `(n_steps,)`.
        grad_norms: $\|\mathrm{grad}\|_F$, the norm of the Riemannian gradient at the
            start of each step, shape `(n_steps,)`; small at a stationary subspace.
    """

    value: Float[Array, ""]
    U: Float[Array, "d k"]
    solution: Solution
    values: Float[Array, " n_steps"]
    grad_norms: Float[Array, " n_steps"]


def second_moment(sol: Solution, x: Array, y: Array) -> Float[Array, "d d"]:
    r"""$V_\pi = \sum_{ij}\pi_{ij}(x_i - y_j)(x_i - y_j)^\top$ for the plan of `sol`,
    from $\pi\mathbf 1$, $\pi^\top\mathbf 1$ and $\pi Y$ (memory $O((n + m)d + d^2)$)."""
    rows, cols = sol.marginals()
    cross = x.T @ sol.apply(y, axis=1)  # X^T pi Y
    V = (x.T * rows) @ x + (y.T * cols) @ y - cross - cross.T
    return 0.5 * (V + V.T)


@functools.partial(jax.jit, static_argnames="k")
def _default_epsilon(x, y, a, b, k: int) -> Array:
    r"""$\frac{k}{d}$ times the default epsilon of `monge.solve` on the full clouds
    (`problems.default_epsilon`: $0.05$ times the typical squared distance, in
    $O((n + m)d)$), scaled to a $k$-dimensional projection of isotropic data, and fixed
    during the ascent so that the objective does not move with $U$."""
    return k / x.shape[1] * default_epsilon(PointCloud(x, y), a, b)


def _retract(U: Array, step: Array) -> Array:
    """QR retraction onto the Stiefel manifold, with the sign fixed (diag(R) > 0)."""
    Q, R = jnp.linalg.qr(U + step)
    signs = jnp.where(jnp.diagonal(R) < 0, -1.0, 1.0).astype(Q.dtype)
    return Q * signs


@eqx.filter_jit
def _ascend(x, y, a, b, epsilon, U0, step_size, n_steps: int, threshold, max_iterations: int):
    r"""Riemannian gradient ascent (RGAS): $U \leftarrow \mathrm{qr}(U + \tau\,
    P_U(2V_\pi U))$ with $\tau$ = `step_size` / $\lambda_{\max}(V_\pi)$."""

    def step(U, init):
        sol = solve(x @ U, y @ U, a=a, b=b, epsilon=epsilon, threshold=threshold,
                    max_iterations=max_iterations, init=init)
        V = second_moment(sol, x, y)
        VU = V @ U
        grad = 2.0 * (VU - U @ (U.T @ VU))  # P_U(2 V U); U^T V U is symmetric
        tau = step_size / jnp.maximum(jnp.linalg.eigvalsh(V)[-1], jnp.finfo(x.dtype).tiny)
        value = jnp.trace(U.T @ VU)
        return (_retract(U, tau * grad), (sol.f, sol.g)), (value, jnp.linalg.norm(grad))

    # each Sinkhorn solve starts from the last one's potentials (the subspace moves little)
    carry, first = step(U0, None)
    (U, _), rest = jax.lax.scan(lambda c, _: step(*c), carry, None, length=n_steps - 1)
    values, grad_norms = (jnp.concatenate([f[None], r]) for f, r in zip(first, rest))
    return U, values, grad_norms


def _check_int(name: str, value, low: int, high: int | None, hint: str) -> int:
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not ok or value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"`monge.{_FN}({name}=...)` must be an int {bound}; received "
                         f"{value!r}. {hint}")
    return int(value)


def _check_positive(name: str, value, hint: str) -> None:
    vc = concrete(value) if value is not None else None
    if np.shape(value) != () or (vc is not None and not (np.isfinite(vc) and vc > 0)):
        raise ValueError(f"`monge.{_FN}({name}=...)` must be a positive finite scalar; "
                         f"received {value!r}. {hint}")


def _initial_basis(init, key, d: int, k: int, dtype) -> Array:
    """The starting point on St(d, k): `init` checked, or a uniformly random basis."""
    if init is None:
        if key is None:
            raise ValueError(
                f"`monge.{_FN}(key=...)` is required to draw a random starting subspace: "
                "pass e.g. key=jax.random.key(0), or your own `init` basis.")
        return _retract(jnp.zeros((d, k), dtype), jax.random.normal(key, (d, k), dtype))
    if key is not None:
        raise ValueError(
            f"`monge.{_FN}` got both `key` and `init`: `key` only draws a random start, "
            "which `init` replaces; pass one of them.")
    init = checks.as_real_array("init", init, _FN)
    if np.shape(init) != (d, k):
        raise ValueError(
            f"`monge.{_FN}(init=...)` must have shape (d, k) = ({d}, {k}); received "
            f"shape {np.shape(init)}.")
    U = jnp.asarray(init, dtype)
    Uc = concrete(U)
    if Uc is not None and not np.allclose(Uc.T @ Uc, np.eye(k), atol=1e-4):
        raise ValueError(
            f"`monge.{_FN}(init=...)` must have orthonormal columns (U^T U = I); "
            "orthonormalise it first, e.g. init = jnp.linalg.qr(init)[0].")
    return U


def projection_robust_wasserstein(
    x: Float[ArrayLike, "n d"],
    y: Float[ArrayLike, "m d"],
    *,
    k: int,
    a: Float[ArrayLike, " n"] | None = None,
    b: Float[ArrayLike, " m"] | None = None,
    epsilon: float | Float[ArrayLike, ""] | None = None,
    key: PRNGKeyArray | None = None,
    init: Float[ArrayLike, "d k"] | None = None,
    n_steps: int = 50,
    step_size: float | Float[ArrayLike, ""] = 0.25,
    threshold: float = 1e-3,
    max_iterations: int = 2000,
) -> PRWResult:
    r"""Projection-robust Wasserstein $\mathrm{PRW}_k^2$ by Riemannian gradient ascent.

    Maximises over $U \in \mathrm{St}(d, k)$ the entropic OT between the projected
    clouds $x U$ and $y U$ (module docstring). Each of the `n_steps` steps solves
    Sinkhorn on the projected cost (`monge.solve`), forms $V_\pi$ in $d\times d$ form,
    takes the Riemannian gradient $G = P_U(2V_\pi U)$ with $P_U(B) = B -
    U\,\mathrm{sym}(U^\top B)$, and retracts by QR: $U \leftarrow \mathrm{qr}(U + \tau
    G)$ with $\tau$ = `step_size` / $\lambda_{\max}(V_\pi)$ (scale-free). The problem
    is non-concave in $U$: the result is a stationary subspace reached from the start
    (`init`, or a uniformly random basis from `key`). The returned value is
    differentiable w.r.t. `x`, `y`, `a`, `b` with `U` held fixed (Danskin's theorem).
    The ascent is jitted: `epsilon`, `step_size`, `key`, `init` are traced; `k`,
    `n_steps`, `max_iterations` and the shapes recompile.

    Args:
        x: source points, `(n, d)`.
        y: target points, `(m, d)`.
        k: dimension of the subspace, $1 \le k \le d$.
        a, b: non-negative weights, `(n,)` and `(m,)`; uniform if None (normalised).
        epsilon: entropic regularisation of the inner problems, fixed during the
            ascent. Default $0.05\,\frac{k}{d}\sum_{ij}a_ib_j\|x_i - y_j\|^2$ (the
            default of `monge.solve` for a $k$-dimensional projection of isotropic
            data, so it follows the units of the data).
        key: `jax.random.key(...)` for the random starting basis (required without
            `init`).
        init: starting basis with orthonormal columns, `(d, k)` (instead of `key`).
        n_steps: number of ascent steps (each solves one Sinkhorn problem).
        step_size: step relative to $1/\lambda_{\max}(V_\pi)$, > 0.
        threshold, max_iterations: Sinkhorn stopping rule, as in `monge.solve`.

    Returns:
        A `PRWResult` with `value` ($\mathrm{PRW}_k^2$), `U`, the final `solution`, and
        the histories `values` and `grad_norms`.

    Raises:
        ValueError: `x`/`y` not `(n, d)`/`(m, d)` with the same d; `k` not an int in
            [1, d]; bad weights; `epsilon` or `step_size` not positive; `n_steps` < 1;
            neither or both of `key` and `init`; `init` not `(d, k)` with orthonormal columns.

    References:
        Lin, Fan, Ho, Cuturi & Jordan, *Projection robust Wasserstein distance and
        Riemannian optimization*, NeurIPS 2020.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from monge.tools.prw import projection_robust_wasserstein
        >>> x = jax.random.uniform(jax.random.key(0), (40, 3), minval=-1.0)
        >>> y = x.at[:, 0].add(2.0)  # a shift along e1 only
        >>> res = projection_robust_wasserstein(x, y, k=1, key=jax.random.key(1))
        >>> round(float(res.value), 1), round(abs(float(res.U[0, 0])), 2)
        (4.0, 1.0)
    """
    x, y = checks.tool_clouds(x, y, _FN)
    d = x.shape[1]
    k = _check_int("k", k, 1, d, f"Pass the dimension of the subspace, 1 <= k <= d = {d}.")
    n_steps = _check_int("n_steps", n_steps, 1, None, "Pass e.g. n_steps=50.")
    max_iterations = _check_int("max_iterations", max_iterations, 1, None,
                                "Pass e.g. max_iterations=2000.")
    _check_positive("step_size", step_size, "Pass e.g. step_size=0.25.")
    a = checks.tool_weights(a, x.shape[0], "a", "x", _FN, x.dtype)
    b = checks.tool_weights(b, y.shape[0], "b", "y", _FN, x.dtype)
    a, b = a / jnp.sum(a), b / jnp.sum(b)
    if epsilon is None:
        epsilon = _default_epsilon(*jax.lax.stop_gradient((x, y, a, b)), k=k)
    else:
        _check_positive("epsilon", epsilon,
                        "Pass epsilon > 0, or None for the default scaled to the data.")
        epsilon = jnp.asarray(epsilon, x.dtype)
    U0 = _initial_basis(init, key, d, k, x.dtype)
    U, values, grad_norms = _ascend(
        *jax.lax.stop_gradient((x, y, a, b, epsilon, U0)),
        jnp.asarray(step_size, x.dtype), n_steps, jnp.asarray(threshold, x.dtype),
        max_iterations)
    U = jax.lax.stop_gradient(U)
    sol = solve(x @ U, y @ U, a=a, b=b, epsilon=epsilon, threshold=threshold,
                max_iterations=max_iterations)
    return PRWResult(value=sol.cost, U=U, solution=sol, values=values,
                     grad_norms=grad_norms)
