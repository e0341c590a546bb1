r"""Initial dual potentials for Sinkhorn (Thornton & Cuturi, 2022, "Rethinking
initialization of the Sinkhorn algorithm").

An initializer proposes a starting $f_0$; Sinkhorn computes $g_0$ from it by one
update. The start changes how many iterations are needed, never the fixed point, and
the solver stops gradients through it, so gradients are those of the optimum.

Each initializer is one function `potential(geom, a, b, eps) -> f0` registered in
`_POTENTIALS`, plus a rule in `check_applicable` saying which problems it accepts.
`eps` is the epsilon the solve starts at (above the target when annealing).

Example:
    >>> import jax.numpy as jnp, monge
    >>> x, y = jnp.linspace(0, 1, 7)[:, None], jnp.linspace(0.5, 2, 11)[:, None]
    >>> problem = monge.LinearProblem(monge.PointCloud(x, y), epsilon=1e-3)
    >>> sol = monge.Sinkhorn(initializer="sorting", anneal=False)(problem)
    >>> bool(sol.converged), int(sol.n_iters)  # "zeros": 1270 iterations
    (True, 30)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from monge.costs import Euclidean, PNorm, SqEuclidean

__all__ = [
    "NAMES",
    "SUBSAMPLE",
    "check_name",
    "check_applicable",
    "initial_potential",
    "gaussian_potential",
    "sorting_potential",
    "subsample_potential",
]

#: Points kept from each cloud by ``initializer="subsample"``: the small problem costs
#: $O(k^2)$ per iteration against $O(nm)$ for the full one, and its potential, extended
#: by a c-transform, is a rough start. See `benchmarks/bench_init.py`.
SUBSAMPLE = 1024

#: Costs $h(x - y)$ with $h$ convex on the line, for which sorting gives the optimum.
_CONVEX_1D = (SqEuclidean, Euclidean, PNorm)


def gaussian_potential(x, y, a, b):
    r"""Dual potential $f_0(x) = \|x\|^2 - (x - m_0)^\top A (x - m_0) - 2\langle m_1,
    x\rangle$ of the Brenier map $T(x) = m_1 + A(x - m_0)$ between Gaussian fits
    $N(m_0, \Sigma_0)$, $N(m_1, \Sigma_1)$ of the weighted clouds, for the cost
    $\|x - y\|^2$, with $A = \Sigma_0^{-1/2}(\Sigma_0^{1/2}\Sigma_1\Sigma_0^{1/2})^{1/2}
    \Sigma_0^{-1/2}$ (Thornton & Cuturi, 2022). Computed on points centred at the mean of
    `y` (the cost is translation invariant; float32 does not cancel). $\Sigma_0$ gets a
    small ridge, so fewer points than dimensions are fine.
    """
    centre = jnp.mean(y, axis=0)
    x, y = x - centre, y - centre
    a, b = a / jnp.sum(a), b / jnp.sum(b)
    m0, m1 = a @ x, b @ y
    d = x.shape[1]
    s0 = (x - m0).T @ ((x - m0) * a[:, None])
    s1 = (y - m1).T @ ((y - m1) * b[:, None])
    s0 = s0 + 1e-6 * (jnp.trace(s0) / d + 1e-12) * jnp.eye(d, dtype=x.dtype)

    def sym_power(s, power):
        w, v = jnp.linalg.eigh(s)
        return (v * jnp.maximum(w, 0.0) ** power) @ v.T

    root0, inv_root0 = sym_power(s0, 0.5), sym_power(s0, -0.5)
    A = inv_root0 @ sym_power(root0 @ s1 @ root0, 0.5) @ inv_root0
    z = x - m0
    return jnp.sum(x**2, axis=1) - jnp.sum((z @ A) * z, axis=1) - 2 * x @ m1


def _gaussian(geom, a, b, eps):
    return gaussian_potential(*geom.supports, a, b)


def sorting_potential(x, y, a, b, cost):
    r"""Exact dual potential $f$ of unregularised 1-D OT, from the monotone coupling.

    For $c(x, y) = h(x - y)$ with $h$ convex, $C$ on sorted points is a Monge matrix
    ($C_{ij} + C_{i'j'} \le C_{ij'} + C_{i'j}$ for $i < i'$, $j < j'$), so the
    north-west corner coupling of the sorted points is optimal. Its support is a
    staircase of $n + m - 1$ pairs, a spanning tree on which $f_i + g_j = C_{ij}$ fixes
    the duals up to a constant; the Monge property makes them feasible ($f_i + g_j \le
    C_{ij}$ everywhere), hence optimal. The walk entering row $i$ from row $i - 1$ in
    column $j(i)$ gives $f_i = f_{i-1} + C_{i,j(i)} - C_{i-1,j(i)}$, with $j(i)$ the
    number of column breakpoints $\sum_{l \le j} b_l$ (sorted) at or below $\sum_{k
    < i} a_k$ (likewise $g$): a `searchsorted` and a `cumsum`, $O((n + m)\log(n +
    m))$, no cost matrix (Thornton & Cuturi, 2022, §3; Peyré & Cuturi, 2019, §2.6 and
    §3.4). The constant is set so that $\sum_i a_i f_i = \sum_j b_j g_j$ (weights
    normalised): balanced problems ignore it, unbalanced ones with near-equal masses
    need it (their optimum has $\sum a e^{-f/\rho} = \sum b e^{-g/\rho}$).

    Args:
        x: source points, shape `(n, 1)`; y: target points, shape `(m, 1)`.
        a, b: non-negative weights (normalised here, so any masses work).
        cost: a `monge.costs` cost $h(x - y)$ with $h$ convex (not checked here).

    Returns:
        $f$, shape `(n,)`, in the order of `x`.
    """
    order_x, order_y = jnp.argsort(x[:, 0]), jnp.argsort(y[:, 0])
    xs, ys = x[order_x], y[order_y]
    a, b = a[order_x] / jnp.sum(a), b[order_y] / jnp.sum(b)
    cu, cv = jnp.cumsum(a), jnp.cumsum(b)
    cu, cv = cu / cu[-1], cv / cv[-1]  # both end at exactly 1
    pair = jax.vmap(cost)
    # column in which the walk enters row i, row in which it enters column j (at
    # equal breakpoints the column moves first)
    j = jnp.searchsorted(cv[:-1], cu[:-1], side="right")
    i = jnp.searchsorted(cu[:-1], cv[:-1], side="left")
    f = _cumsum0(pair(xs[1:], ys[j]) - pair(xs[:-1], ys[j]))
    g = cost(xs[0], ys[0]) + _cumsum0(pair(xs[i], ys[1:]) - pair(xs[i], ys[:-1]))
    f = f + (b @ g - a @ f) / 2  # centred: sum a f = sum b g
    return jnp.zeros_like(f).at[order_x].set(f)


def _cumsum0(steps):
    return jnp.concatenate([jnp.zeros((1,), steps.dtype), jnp.cumsum(steps)])


def _sorting(geom, a, b, eps):
    return sorting_potential(*geom.supports, a, b, geom.ground_cost)


def subsample_potential(geom, a, b, eps, k=None):
    r"""Entropic potential of a subsampled problem, extended to every point.

    Keeps $k = \min(n, m, \texttt{SUBSAMPLE})$ evenly strided points $y'$ (and $x'$)
    of each cloud with renormalised weights $b'$ (and $a'$), solves that problem with
    `monge.Sinkhorn` at the same epsilon for its potential $g'$, and returns the
    c-transform $f_i = -\varepsilon \log \sum_j b'_j e^{(g'_j - c(x_i, y'_j))/
    \varepsilon}$ at every $x_i$, shifted so that $\sum_i a_i f_i = \sum_j b'_j g'_j$
    (see `sorting_potential`): $O(nk)$, online when `geom` is (Thornton & Cuturi, 2022;
    the `SubsampleInitializer` of OTT-JAX).

    When $n = m \le$ `SUBSAMPLE` nothing is dropped: the start is then the problem's
    own solution to the small solve's threshold ($10^{-3}$), and the outer solve's
    `n_iters` does not count the small solve's iterations.

    Args:
        geom: a geometry with `supports` (a point cloud); a, b: its weights; eps: the epsilon the solve starts at.
        k: points per cloud; default `min(n, m, SUBSAMPLE)`.

    Returns:
        $f$, shape `(n,)`; zeros if the small solve produced non-finite values.
    """
    from monge.problems import LinearProblem  # monge.solvers imports this module
    from monge.solvers.linear.sinkhorn import Sinkhorn

    n, m = geom.shape
    k = min(n, m, SUBSAMPLE) if k is None else k
    x, y, a, b, eps = jax.lax.stop_gradient((*geom.supports, a, b, eps))

    def take(z, w):
        index = (np.arange(k) * z.shape[0]) // k  # evenly strided, static
        w = w[index]
        total = jnp.sum(w)
        w = jnp.where(total > 0, w / jnp.where(total > 0, total, 1), 1 / k)
        return z[index], w

    (x_sub, a_sub), (y_sub, b_sub) = take(x, a), take(y, b)
    small = LinearProblem(geom.with_supports(x_sub, y_sub), a_sub, b_sub, epsilon=eps)
    g_sub = Sinkhorn()(small).g
    f = -eps * geom.with_supports(x, y_sub).lse(g_sub, eps, 1, w=b_sub)
    f = f + (b_sub @ g_sub - a @ f / jnp.sum(a)) / 2  # centred, as in sorting_potential
    return jnp.where(jnp.all(jnp.isfinite(f)), f, jnp.zeros_like(f))


_POTENTIALS = {"gaussian": _gaussian, "sorting": _sorting, "subsample": subsample_potential}

#: Accepted names; ``"zeros"`` is the plain start $f_0 = 0$, ``"auto"`` picks one
#: (`resolve`).
NAMES = ("auto", "zeros", *_POTENTIALS)

#: Starts that are already the unregularised optimum: annealing from a larger epsilon
#: would only move away from them, so the solver does not anneal after them.
EXACT = ("sorting",)


def resolve(name, geom) -> str:
    """The initializer ``"auto"`` stands for on `geom`: ``"sorting"`` where it applies
    (1-D point clouds, convex cost; it saves most iterations, see
    `benchmarks/bench_init.py`), else ``"zeros"``. Other names are returned as is."""
    if name != "auto":
        return name
    if _is_1d_convex(geom):
        return "sorting"
    return "zeros"


def _is_1d_convex(geom) -> bool:
    """Points on a line with a convex cost of the difference: the monotone coupling is
    optimal."""
    return (geom.supports is not None and geom.supports[0].shape[1] == 1
            and isinstance(geom.ground_cost, _CONVEX_1D))


def check_name(name) -> None:
    if name not in NAMES:
        raise ValueError(
            f"`initializer` must be one of {', '.join(map(repr, NAMES))}; received {name!r}."
        )


def check_applicable(name, geom) -> None:
    """Raise a ValueError if initializer `name` cannot start a problem on `geom`."""
    name = resolve(name, geom)
    cloud = geom.supports is not None
    if name == "sorting" and not _is_1d_convex(geom):
        what = (
            f"a PointCloud in dimension d={geom.supports[0].shape[1]} with cost "
            f"{type(geom.ground_cost).__name__}"
            if cloud
            else f"a {type(geom).__name__}"
        )
        raise ValueError(
            "`initializer='sorting'` needs 1-D point clouds (x and y of shape (n, 1)) and "
            f"the cost 'sqeuclidean', 'euclidean' or PNorm(p); received {what}. Use "
            "initializer='zeros' (or 'subsample' for other point clouds)."
        )
    if name == "subsample" and not cloud:
        raise ValueError(
            "`initializer='subsample'` needs a point-cloud problem (it subsamples the "
            f"points); received a {type(geom).__name__}. Use initializer='zeros'."
        )
    if name == "gaussian" and not (cloud and isinstance(geom.ground_cost, SqEuclidean)):
        cost = f" with cost {type(geom.ground_cost).__name__}" if cloud else ""
        raise ValueError(
            "`initializer='gaussian'` needs a point-cloud problem with the squared "
            f"Euclidean cost; received a {type(geom).__name__}{cost}. Use "
            "initializer='zeros'."
        )


def initial_potential(name, geom, a, b, eps):
    """The initial $f_0$ of initializer `name`, or None for ``"zeros"``."""
    name = resolve(name, geom)
    return None if name == "zeros" else _POTENTIALS[name](geom, a, b, eps)
