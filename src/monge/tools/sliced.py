"""Sliced and max-sliced Wasserstein: 1-D optimal transport along directions.

Projects both point clouds onto unit directions $\\theta \\in S^{d-1}$ and solves the
1-D problems exactly by sorting (:func:`monge.tools.univariate.wasserstein_1d`).
Like there, values are $p$-th powers: $SW_p^p$ and $\\max_\\theta W_p^p$, not their
$p$-th roots.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from monge import checks

from monge.tools.univariate import (
    check_p,
    wasserstein_1d,
    wasserstein_1d_checked,
    wasserstein_1d_rows,
)

__all__ = ["sliced_wasserstein", "max_sliced_wasserstein"]


def _check_key(key, fn: str):
    """Raises unless a PRNG key was given (no silent fixed seed)."""
    if key is None:
        raise ValueError(
            f"`monge.{fn}(key=...)` is required to draw random directions: pass "
            "e.g. key=jax.random.key(0) (a new key gives new directions).")
    return key


def _random_directions(key, n: int, d: int, dtype) -> Float[Array, "n d"]:
    """`n` directions drawn uniformly on the unit sphere $S^{d-1}$."""
    z = jax.random.normal(key, (n, d), dtype=dtype)
    return z / jnp.linalg.norm(z, axis=1, keepdims=True)


def sliced_wasserstein(
    x: Float[ArrayLike, "n d"],
    y: Float[ArrayLike, "m d"],
    *,
    a: Float[ArrayLike, " n"] | None = None,
    b: Float[ArrayLike, " m"] | None = None,
    n_projections: int | None = None,
    key: PRNGKeyArray | None = None,
    p: float | Float[ArrayLike, ""] = 2.0,
    directions: Float[ArrayLike, "k d"] | None = None,
) -> Float[Array, ""]:
    """Sliced Wasserstein $SW_p^p$, the mean of 1-D $W_p^p$ over projections.

    $SW_p^p = \\frac{1}{k}\\sum_{l=1}^k W_p^p(\\theta_l^\\top\\#\\mu,
    \\theta_l^\\top\\#\\nu)$, a Monte-Carlo estimate of
    $\\int_{S^{d-1}} W_p^p(\\theta^\\top\\#\\mu,
    \\theta^\\top\\#\\nu)\\,d\\sigma(\\theta)$ with `n_projections` directions drawn
    uniformly on the sphere from `key`, or with the given `directions`. Each 1-D
    problem is solved exactly by sorting. Differentiable w.r.t. `x`, `y`, `a`, `b`
    (and `directions`); `p` and `key` are traced, `n_projections` recompiles.

    Args:
        x: first point cloud, shape (n, d).
        y: second point cloud, shape (m, d).
        a: non-negative weights of `x`, shape (n,); uniform if None (normalised).
        b: non-negative weights of `y`, shape (m,); uniform if None (normalised).
        n_projections: number of random directions; None (default) is 64, a
            Monte-Carlo error of about $1/8$ of the spread of the 1-D costs over
            directions. Not with `directions` (an error: it would be ignored).
        key: `jax.random.key(...)` to draw the directions; required unless
            `directions` is given.
        p: exponent of the ground cost $|s - t|^p$, a scalar $\\ge 1$.
        directions: your own directions, shape (k, d), one per row, used as given
            (not normalised: pass unit vectors for $SW_p$ proper).

    Returns:
        $SW_p^p$, a scalar (take ``** (1 / p)`` for $SW_p$; POT's
        ``ot.sliced_wasserstein_distance`` returns that root).

    Raises:
        ValueError: `x`/`y` not (n, d)/(m, d) with the same d, neither or both of
            `key` and `directions`, `n_projections` with `directions`, `directions`
            not (k, d), `n_projections` < 1, or
            the checks of :func:`~monge.tools.univariate.wasserstein_1d` (weights, p,
            complex or non-numeric arrays, NaN or infinite points: eagerly a
            `ValueError`, under `jax.jit` a NaN result).

    References:
        Rabin, Peyré, Delon & Bernot, *Wasserstein barycenter and its application
        to texture mixing*, SSVM 2011. Bonneel et al., *Sliced and Radon
        Wasserstein barycenters of measures*, JMIV 2015.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from monge.tools.sliced import sliced_wasserstein
        >>> x = jnp.zeros((5, 3)); y = x.at[:, 0].add(2.0)
        >>> float(sliced_wasserstein(x, y, directions=jnp.eye(3)))  # (4 + 0 + 0) / 3
        1.3333333730697632
    """
    fn = "sliced_wasserstein"
    x, y = checks.tool_clouds(x, y, fn)
    d = x.shape[1]
    if directions is None:
        n_projections = 64 if n_projections is None else n_projections
        if not (isinstance(n_projections, (int, np.integer)) and n_projections >= 1):
            raise ValueError(
                f"`monge.{fn}(n_projections=...)` must be a positive int, got "
                f"{n_projections!r}: pass e.g. n_projections=64.")
        directions = _random_directions(_check_key(key, fn), n_projections, d, x.dtype)
    else:
        if key is not None or n_projections is not None:
            given = "`key`" if n_projections is None else "`n_projections`"
            raise ValueError(
                f"`monge.{fn}` got both {given} and `directions`: pass `directions` to "
                "use your own, or `key` (and `n_projections`) to draw random ones, not "
                "both.")
        shape = np.shape(directions)
        if len(shape) != 2 or shape[1] != d or shape[0] == 0:
            raise ValueError(
                f"`monge.{fn}(directions=...)` must have shape (k, {d}) (one direction "
                f"per row, k >= 1, in the dimension of x), got shape {shape}.")
        directions = checks.as_real_array("directions", directions, fn).astype(x.dtype)
        checks.check_points(f"monge.{fn}(directions=...)", directions)
    a = None if a is None else checks.tool_weights(a, x.shape[0], "a", "x", fn, x.dtype)
    b = None if b is None else checks.tool_weights(b, y.shape[0], "b", "y", fn, x.dtype)
    p = jnp.asarray(check_p(p, fn), dtype=x.dtype)
    # One matmul per cloud gives every projection as a row: (k, n), sorted row-wise.
    costs = wasserstein_1d_checked(directions @ x.T, directions @ y.T, a, b, p)
    return jnp.mean(costs)


@functools.partial(jax.jit, static_argnames=("n_steps", "n_init"))
def _ascend_direction(x, y, a, b, p, key, learning_rate, n_steps: int, n_init: int):
    """Riemannian gradient ascent of $\\theta \\mapsto W_p^p$ on the sphere."""

    def objective(theta):
        return wasserstein_1d_rows((x @ theta)[None], (y @ theta)[None], a, b, p)[0]

    value_and_grad = jax.value_and_grad(objective)
    starts = _random_directions(key, n_init, x.shape[1], x.dtype)
    theta = starts[jnp.argmax(wasserstein_1d_rows(starts @ x.T, starts @ y.T, a, b, p))]
    value, grad = value_and_grad(theta)

    def step(_, state):
        theta, value, grad, angle = state
        tangent = grad - (grad @ theta) * theta  # projection onto the tangent space
        norm = jnp.linalg.norm(tangent)
        unit = tangent / jnp.where(norm > 0, norm, 1.0)
        # Move `angle` radians along the great circle in the ascent direction.
        trial = jnp.cos(angle) * theta + jnp.sin(angle) * unit
        trial = trial / jnp.linalg.norm(trial)
        trial_value, trial_grad = value_and_grad(trial)
        accept = trial_value > value
        return (
            jnp.where(accept, trial, theta),
            jnp.where(accept, trial_value, value),
            jnp.where(accept, trial_grad, grad),
            jnp.where(accept, jnp.minimum(1.5 * angle, jnp.pi / 2), 0.5 * angle),
        )

    angle = jnp.asarray(learning_rate, x.dtype)
    theta, *_ = jax.lax.fori_loop(0, n_steps, step, (theta, value, grad, angle))
    return theta


def max_sliced_wasserstein(
    x: Float[ArrayLike, "n d"],
    y: Float[ArrayLike, "m d"],
    *,
    a: Float[ArrayLike, " n"] | None = None,
    b: Float[ArrayLike, " m"] | None = None,
    key: PRNGKeyArray | None = None,
    p: float | Float[ArrayLike, ""] = 2.0,
    n_steps: int = 100,
    learning_rate: float | Float[ArrayLike, ""] = 0.1,
    n_init: int = 16,
) -> tuple[Float[Array, ""], Float[Array, " d"]]:
    """Max-sliced Wasserstein: the largest 1-D $W_p^p$ over directions $\\theta$.

    Estimates $\\max_{\\|\\theta\\| = 1} W_p^p(\\theta^\\top\\#\\mu,
    \\theta^\\top\\#\\nu)$.
    Starts from the best of `n_init` random unit directions (drawn from `key`) and
    runs `n_steps` of Riemannian gradient ascent on the sphere: each step moves
    along the great circle in the direction of the projected gradient by an angle
    that starts at `learning_rate` radians, grows by 1.5 after an improving step and
    halves otherwise (so the step does not depend on the scale of the data, and the
    value never decreases). The value is differentiable w.r.t. `x`, `y`, `a`, `b` by
    Danskin's theorem: its gradient is that of $W_p^p$ at the optimised direction,
    held fixed. `p`, `key` and `learning_rate` are traced; `n_steps`, `n_init`
    recompile.

    Args:
        x: first point cloud, shape (n, d).
        y: second point cloud, shape (m, d).
        a: non-negative weights of `x`, shape (n,); uniform if None (normalised).
        b: non-negative weights of `y`, shape (m,); uniform if None (normalised).
        key: `jax.random.key(...)` for the starting directions (required).
        p: exponent of the ground cost $|s - t|^p$, a scalar $\\ge 1$.
        n_steps: number of ascent steps.
        learning_rate: initial step, an angle in radians (> 0).
        n_init: number of random starting directions; the best one is refined.

    Returns:
        `(value, direction)`: the $p$-th power $\\max_\\theta W_p^p$ (a lower bound of
        it, reached by the optimiser) and the unit direction attaining it, shape (d,)
        (defined up to sign; no gradient flows through it).

    Raises:
        ValueError: no `key`, `x`/`y` not (n, d)/(m, d) with the same d,
            `n_steps` < 0, `n_init` < 1, `learning_rate` <= 0, or the checks of
            :func:`~monge.tools.univariate.wasserstein_1d` (weights, p).

    References:
        Deshpande, Hu, Sun, Pyrros, Siddiqui, Koyejo, Zhao, Forsyth & Schwing,
        *Max-sliced Wasserstein distance and its use for GANs*, CVPR 2019.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from monge.tools.sliced import max_sliced_wasserstein
        >>> x = jax.random.normal(jax.random.key(0), (7, 3)); y = x.at[:, 0].add(3.0)
        >>> value, theta = max_sliced_wasserstein(x, y, key=jax.random.key(1))
        >>> round(float(value), 3), round(abs(float(theta[0])), 3)
        (9.0, 1.0)
    """
    fn = "max_sliced_wasserstein"
    key = _check_key(key, fn)
    x, y = checks.tool_clouds(x, y, fn)
    for name, value, low in (("n_steps", n_steps, 0), ("n_init", n_init, 1)):
        if not (isinstance(value, (int, np.integer)) and value >= low):
            raise ValueError(
                f"`monge.{fn}({name}=...)` must be an int >= {low}, got {value!r}.")
    if np.shape(learning_rate) != () or (
            (checks.concrete(learning_rate) is not None)
            and not float(np.asarray(learning_rate)) > 0):
        raise ValueError(
            f"`monge.{fn}(learning_rate=...)` must be a positive scalar (an angle in "
            f"radians), got {learning_rate!r}: pass e.g. learning_rate=0.1.")
    a_ = checks.tool_weights(a, x.shape[0], "a", "x", fn, x.dtype)
    b_ = checks.tool_weights(b, y.shape[0], "b", "y", fn, x.dtype)
    p = jnp.asarray(check_p(p, fn), dtype=x.dtype)
    theta = _ascend_direction(
        *jax.lax.stop_gradient((x, y, a_ / jnp.sum(a_), b_ / jnp.sum(b_), p)),
        key, learning_rate, n_steps=int(n_steps), n_init=int(n_init))
    value = wasserstein_1d(x @ theta, y @ theta, a=a_, b=b_, p=p)
    return value, theta
