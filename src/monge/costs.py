r"""Ground costs $c(x, y)$ between two points.

A cost is defined on **one pair** of points (`__call__(x, y)` with `x`, `y` of shape
`(d,)`); `all_pairs(x, y)` evaluates it on every pair of two point clouds and is derived
from `__call__` by `vmap`. Costs only specialise `all_pairs` where it pays, e.g. the
squared Euclidean cost through a matrix product (centred, so that float32 does not
cancel for points far from the origin).

Costs hold no arrays of points and no epsilon: they are small immutable modules.
"""

from __future__ import annotations

import abc
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

__all__ = [
    "AbstractCost",
    "SqEuclidean",
    "Euclidean",
    "PNorm",
    "Cosine",
    "CustomCost",
    "as_cost",
]


class AbstractCost(eqx.Module):
    r"""A ground cost $c(x, y)$ on $\mathbb{R}^d \times \mathbb{R}^d$."""

    @abc.abstractmethod
    def __call__(self, x: Float[Array, " d"], y: Float[Array, " d"]) -> Float[Array, ""]:
        """The cost between one pair of points."""

    def all_pairs(self, x: Float[Array, "n d"], y: Float[Array, "m d"]) -> Float[Array, "n m"]:
        """The `(n, m)` matrix $[c(x_i, y_j)]_{ij}$."""
        return jax.vmap(lambda xi: jax.vmap(lambda yj: self(xi, yj))(y))(x)

    def mean_abs(self, x, y, a, b) -> Array | None:
        r"""$\sum_{ij} a_i b_j |c(x_i, y_j)| / (\sum a \sum b)$ in closed form, in
        $O((n + m) d)$, or None where there is none (then a pass over the cost)."""
        return None

    def apply_all_pairs(self, x, y, v, axis: int) -> Array | None:
        r"""$C v$ (`axis=1`) or $C^\top v$ (`axis=0`) for $C$ = `all_pairs(x, y)` in
        $O((n + m) d)$ without forming $C$, or None where there is no such form (then
        the geometry applies $C$ block by block)."""
        return None

    def h_star_grad(self, w: Float[Array, " d"]) -> Float[Array, " d"]:
        r"""$\nabla h^*(w)$ for a translation-invariant cost $c(x, y) = h(x - y)$ with $h$
        strictly convex; used by entropic maps $T(x) = x - \nabla h^*(\nabla f(x))$."""
        raise ValueError(
            f"The cost {type(self).__name__} has no transport map: entropic maps need a cost "
            "h(x - y) with h strictly convex (e.g. cost='sqeuclidean'). Use "
            "`sol.apply(y, axis=1)` for the barycentric projection instead."
        )


def _safe_root(s: Array, p: float) -> Array:
    """`s ** (1/p)` for `s >= 0`, with gradient 0 (not inf/NaN) at `s == 0`."""
    positive = s > 0
    s_safe = jnp.where(positive, s, 1.0)
    return jnp.where(positive, s_safe ** (1.0 / p), 0.0)


class SqEuclidean(AbstractCost):
    r"""Squared Euclidean cost $c(x, y) = \|x - y\|_2^2$ (no factor $\tfrac12$).

    `all_pairs` uses $\|x\|^2 + \|y\|^2 - 2\langle x, y\rangle$ on points centred at
    the mean of `y`: the cost is translation invariant, and centring removes the
    float32 cancellation that otherwise appears for clouds far from the origin
    (points near 1000 with unit spread keep ~7 significant digits). Products use the
    highest matmul precision so accelerators do not round them to bfloat16/TF32.
    """

    def __call__(self, x, y):
        z = x - y
        return jnp.dot(z, z)

    def all_pairs(self, x, y):
        centre = jnp.mean(y, axis=0)
        x = x - centre
        y = y - centre
        cross = jnp.matmul(x, y.T, precision=jax.lax.Precision.HIGHEST)
        sq = jnp.sum(x**2, axis=1)[:, None] + jnp.sum(y**2, axis=1)[None, :] - 2.0 * cross
        return jnp.maximum(sq, 0.0)

    def mean_abs(self, x, y, a, b):
        r"""$\mathbb E_a\|x - o\|^2 + \mathbb E_b\|y - o\|^2 - 2\,\mathbb E_a(x - o)
        \cdot \mathbb E_b(y - o)$ for any origin $o$; $o \approx \mathbb E_b\, y$ keeps
        float32 accurate far from the origin. The cost is non-negative, so this is also
        the mean of $|c|$."""
        a, b = a / jnp.sum(a), b / jnp.sum(b)
        x, y = x - b @ y, y - b @ y
        return a @ jnp.sum(x**2, axis=1) + b @ jnp.sum(y**2, axis=1) - 2.0 * (a @ x) @ (b @ y)

    def apply_all_pairs(self, x, y, v, axis):
        r"""$C v = \|x\|^2 (\mathbf 1^\top v) + \mathbf 1 (\|y\|^2)^\top v - 2 x (y^\top
        v)$ (likewise $C^\top v$), on points centred as in `all_pairs`."""
        centre = jnp.mean(y, axis=0)
        x, y = x - centre, y - centre
        if axis == 0:  # C^T v = (all_pairs(y, x)) v
            x, y = y, x
        dot = lambda p, q: jnp.tensordot(p, q, axes=1, precision=jax.lax.Precision.HIGHEST)  # noqa: E731
        sx, sy = jnp.sum(x**2, axis=1), jnp.sum(y**2, axis=1)
        total = jnp.sum(v, axis=0)
        ones = jnp.ones((x.shape[0],) + (1,) * (v.ndim - 1), v.dtype)
        return sx.reshape(ones.shape) * total + ones * dot(sy, v) - 2.0 * dot(x, dot(y.T, v))

    def h_star_grad(self, w):
        # h(z) = |z|^2  =>  h*(w) = |w|^2 / 4  =>  grad h*(w) = w / 2.
        return 0.5 * w


class Euclidean(AbstractCost):
    r"""Euclidean distance $c(x, y) = \|x - y\|_2$.

    Computed from differences (never from a squared expansion) and with a finite
    gradient, 0, where $x = y$ (the subgradient of smallest norm).
    """

    def __call__(self, x, y):
        z = x - y
        return _safe_root(jnp.dot(z, z), 2.0)


class PNorm(AbstractCost):
    r"""$\ell_p$ distance $c(x, y) = \|x - y\|_p = (\sum_k |x_k - y_k|^p)^{1/p}$, $p \ge 1$.

    `PNorm(1.0)` is the cityblock (Manhattan) distance. The gradient is finite at
    $x = y$. Raise the distance to a power with a `CustomCost` if you need
    $\|x - y\|_p^q$.
    """

    p: float = eqx.field(static=True)

    def __check_init__(self):
        if not (isinstance(self.p, (int, float)) and self.p >= 1):
            raise ValueError(
                f"`PNorm(p=...)` needs a number p >= 1 (a norm); received p={self.p!r}."
            )

    def __call__(self, x, y):
        z = jnp.abs(x - y)
        if self.p == 1:
            return jnp.sum(z)
        return _safe_root(jnp.sum(z**self.p), self.p)


class Cosine(AbstractCost):
    r"""Cosine distance $c(x, y) = 1 - \frac{\langle x, y\rangle}{\|x\|\|y\|}$, in $[0, 2]$.

    Zero vectors are treated as having cosine similarity 0 with everything.
    """

    def __call__(self, x, y):
        return 1.0 - jnp.dot(_normalise(x), _normalise(y))

    def all_pairs(self, x, y):
        sim = jnp.matmul(
            jax.vmap(_normalise)(x), jax.vmap(_normalise)(y).T, precision=jax.lax.Precision.HIGHEST
        )
        return 1.0 - sim


def _normalise(v: Array) -> Array:
    norm = _safe_root(jnp.dot(v, v), 2.0)
    return v / jnp.where(norm > 0, norm, 1.0)


class CustomCost(AbstractCost):
    r"""A user cost `fn(x, y)` written for one pair of points, e.g.
    `CustomCost(lambda x, y: jnp.sum(jnp.abs(x - y) ** 1.5))`.

    `fn` must be a JAX-traceable function returning a scalar. It is batched with
    `vmap`; it is part of the compiled structure (a different function recompiles).
    """

    fn: Callable[[Array, Array], Array] = eqx.field(static=True)

    def __call__(self, x, y):
        return self.fn(x, y)


_NAMED: dict[str, Callable[[], AbstractCost]] = {
    "sqeuclidean": SqEuclidean,
    "euclidean": Euclidean,
    "cityblock": lambda: PNorm(1.0),
    "cosine": Cosine,
}


def as_cost(cost: str | AbstractCost | Callable) -> AbstractCost:
    """Turn a cost name, a cost object or a one-pair callable into an `AbstractCost`.

    Names: ``"sqeuclidean"`` ($\\|x-y\\|^2$), ``"euclidean"``, ``"cityblock"`` ($\\ell_1$),
    ``"cosine"``.

    Example:
        >>> import jax.numpy as jnp
        >>> from monge.costs import as_cost
        >>> cost = as_cost("cityblock")
        >>> float(cost(jnp.array([0.0, 0.0]), jnp.array([1.0, -2.0])))
        3.0
        >>> cost.all_pairs(jnp.zeros((2, 2)), jnp.ones((3, 2))).shape
        (2, 3)
    """
    if isinstance(cost, AbstractCost):
        return cost
    if isinstance(cost, str):
        try:
            return _NAMED[cost.lower()]()
        except KeyError:
            raise ValueError(
                f"`cost` must be one of {sorted(_NAMED)}, a monge.costs cost object or a "
                f"function c(x, y) of one pair of points; received the string {cost!r}."
            ) from None
    if callable(cost):
        return CustomCost(cost)
    raise ValueError(
        f"`cost` must be a name such as 'sqeuclidean', a monge.costs cost object or a "
        f"function c(x, y); received an object of type {type(cost).__name__}."
    )
