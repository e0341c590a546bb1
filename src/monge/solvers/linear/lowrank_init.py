r"""Starting points $(Q, R, g)$ for low-rank optimal transport.

Low-rank OT (Scetbon, Cuturi & Peyré, 2021, "Low-rank Sinkhorn factorization")
looks for couplings $P = Q\,\mathrm{diag}(1/g)\,R^\top$ with $Q \in \Pi(a, g)$
(shape `(n, r)`: $Q\mathbf 1 = a$, $Q^\top\mathbf 1 = g$), $R \in \Pi(b, g)$
(shape `(m, r)`) and $g > 0$ of total mass $\sum_i a_i$; then $P\mathbf 1 = a$,
$P^\top\mathbf 1 = b$ and $\mathrm{rank}\,P \le r$. The obvious start
$Q = a g^\top/\textstyle\sum g$, $R = b g^\top/\sum g$ is a saddle point: its $r$
components are identical, and the mirror-descent iterations keep them identical.
Each start here has components that differ:

- `rank2`: deterministic, $\mathrm{rank}\,Q, \mathrm{rank}\,R \le 2$, exact marginals
  (Scetbon et al., 2021, §3);
- `random`: random, exact marginals;
- `kmeans_init`: entropic plans to the k-means centroids of `x` (Scetbon & Cuturi,
  2022; OTT-JAX's `KMeansInitializer`), rows exact, columns to the Sinkhorn
  threshold; `kmeans` is the weighted Lloyd algorithm it uses.

Shared conventions. `(Q, R, g)` have shapes `(n, r)`, `(m, r)`, `(r,)` and the dtype
of `a`. Rows of zero weight are exactly 0 and every other entry is positive, so
$\log Q$ and $\log R$ are finite where the weights are positive (the mirror steps of
the solver work on them). "Exact" means up to float rounding. `b` is rescaled to the
total of `a` (their masses must agree within `checks.MASS_RTOL`, as in
`LinearProblem`), so `R @ 1` is `b * sum(a) / sum(b)`. No gradient flows through a
start (`lax.stop_gradient`, as for Sinkhorn's initializers). Every function is
jit-able with `r` (and `k`, `n_iter`) static and vmap-able over the weights (and the
points).

Example:
    >>> import jax.numpy as jnp
    >>> from monge.solvers.linear import lowrank_init
    >>> a, b = jnp.full(13, 1 / 13), jnp.full(9, 1 / 9)
    >>> Q, R, g = lowrank_init.rank2(a, b, 3)
    >>> Q.shape, R.shape, g.shape
    ((13, 3), (9, 3), (3,))
    >>> bool(jnp.allclose(Q.sum(1), a) & jnp.allclose(Q.sum(0), g) & jnp.allclose(R.sum(0), g))
    True
    >>> centres = jnp.array([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0]])
    >>> x = jnp.repeat(centres, jnp.array([20, 13, 7]), axis=0, total_repeat_length=40)
    >>> centroids, labels = lowrank_init.kmeans(x, 3)
    >>> jnp.bincount(labels, length=3).sort().tolist(), jnp.abs(centroids).max().item()
    ([7, 13, 20], 5.0)
"""

from __future__ import annotations

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Float, Int

from monge import checks
from monge.geometry import PointCloud, safe_log
from monge.problems import LinearProblem
from monge.solvers.linear.sinkhorn import Sinkhorn

__all__ = ["rank2", "random", "kmeans", "kmeans_init", "SINKHORN_THRESHOLD"]

#: L1 marginal threshold of the Sinkhorn solves of `kmeans_init`, relative to the mass:
#: a start, which the solver projects onto the constraints anyway; 1e-4 took 10x
#: longer (3.2 s against 0.31 s at n = 200 000, a target cloud off the centroids).
SINKHORN_THRESHOLD = 1e-3

#: Default key of the random starts that take `key=None`.
DEFAULT_SEED = 0

#: Defaults of `kmeans` (`n_iter`, `tol`), also used by `kmeans_init`.
KMEANS_ITERATIONS = 100
KMEANS_TOL = 1e-6


# -- checks ------------------------------------------------------------------------
def _check_int(name: str, value, low: int, high: int, what: str, fix: str) -> None:
    """`value` must be a Python (or NumPy) int in [low, high]: a static shape."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(
            f"{what} must be a Python int (static under jax.jit: use static_argnums or "
            f"functools.partial); received {value!r} of type {type(value).__name__}."
        )
    if not low <= value <= high:
        raise ValueError(
            f"{what} must satisfy {low} <= {name} <= {high}; received {name} = {value}. {fix}"
        )


def _check_rank(r, n: int, m: int) -> None:
    _check_int(
        "r", r, 1, min(n, m), "The rank `r`",
        f"Pass r <= min(n, m) = {min(n, m)} (n = {n}, m = {m}): a coupling of n x m points "
        "has rank at most min(n, m), so a larger rank adds nothing.",
    )


def _weights(name: str, w, length: int | None = None, points: str = "") -> Array:
    """A 1-D array of finite non-negative weights with a positive sum (checked when
    concrete)."""
    w = checks.as_real_array(name, w)
    if length is None:
        if w.ndim != 1 or w.shape[0] == 0:
            raise ValueError(
                f"`{name}` must be a non-empty 1-D array of weights; received shape "
                f"{tuple(w.shape)}."
            )
        length = w.shape[0]
    checks.check_weights(name, w, length, points)
    return w


def _marginals(a, b, n: int | None = None, m: int | None = None) -> tuple[Array, Array]:
    """Checked `(a, b)` in the dtype of `a`, `b` rescaled to the total of `a`, gradients
    stopped. Traced weights are checked through `eqx.error_if`."""
    a = _weights("a", a, n, "x")
    b = _weights("b", b, m, "y").astype(a.dtype)
    ac, bc = checks.concrete(a), checks.concrete(b)
    if ac is not None and bc is not None:
        sa, sb = float(ac.sum()), float(bc.sum())
        if abs(sa - sb) > checks.MASS_RTOL * max(sa, sb):
            raise ValueError(
                f"Low-rank couplings need equal masses, but `a` sums to {sa:.6g} and `b` to "
                f"{sb:.6g}. Normalise both (a / a.sum(), b / b.sum())."
            )
    a, b = checks.traced_weights(a, b, True, " (a / a.sum(), b / b.sum()).")
    a, b = lax.stop_gradient((a, b))
    return a, b * (jnp.sum(a) / jnp.sum(b))


def _key(key):
    return jax.random.key(DEFAULT_SEED) if key is None else key


# -- rank 2 ------------------------------------------------------------------------
def _tilted(w: Array) -> tuple[Array, Array]:
    r"""$x = w \odot (1, 2, \dots)/\sum_i w_i i$ and the bound $\mu/i_{\max}$ with $\mu
    = \sum_i \hat w_i i$ the mean index under $\hat w = w/\sum w$ and $i_{\max}$ the
    last index of positive weight: $\hat w_i - \lambda x_i = \hat w_i(1 - \lambda
    i/\mu) \ge \hat w_i/2$ for every $\lambda \le \mu/(2 i_{\max})$."""
    index = jnp.arange(1, w.shape[0] + 1, dtype=w.dtype)
    moment = jnp.sum(w * index)
    last = jnp.max(jnp.where(w > 0, index, 0))
    return w * index / moment, moment / jnp.sum(w) / last


def _rank2_factor(w: Array, r: int) -> Array:
    r"""$\lambda s\,x g_1^\top + (w - \lambda s\,x)(\hat g - \lambda g_1)^\top/(1 -
    \lambda)$ with $s = \sum w$, $\hat g = \mathbf 1/r$, $x, g_1$ the tilted vectors of
    $w$ and $\hat g$, and $\lambda$ half the smaller bound (see `rank2`)."""
    s = jnp.sum(w)
    x, bound_w = _tilted(w)
    g_hat = jnp.full((r,), 1.0 / r, w.dtype)
    g1, bound_g = _tilted(g_hat)  # g1 = (1, ..., r) / (r (r + 1) / 2), bound (r + 1) / (2r)
    lam = 0.5 * jnp.minimum(bound_w, bound_g)
    y = w - lam * s * x  # (1 - lam) s times the paper's y, >= w / 2
    g2 = (g_hat - lam * g1) / (1 - lam)  # the paper's g2 (mass 1), >= g_hat / 2
    return lam * s * x[:, None] * g1[None, :] + y[:, None] * g2[None, :]


def rank2(a: Float[Array, " n"], b: Float[Array, " m"], r: int):
    r"""The deterministic rank-2 start of Scetbon, Cuturi & Peyré (2021, §3).

    $g = (\sum_i a_i / r)\,\mathbf 1_r$ and, with $s = \sum_i a_i$, $\hat a = a/s$,
    $\hat g = g/s$,
    $$Q = s\,[\lambda\, x g_1^\top + (1 - \lambda)\, y g_2^\top], \quad
    y = \frac{\hat a - \lambda x}{1 - \lambda}, \quad
    g_2 = \frac{\hat g - \lambda g_1}{1 - \lambda},$$
    where $x, g_1 \ge 0$ sum to 1, so that $Q\mathbf 1 = s(\lambda x + \hat a - \lambda
    x) = a$ and $Q^\top\mathbf 1 = s(\lambda g_1 + \hat g - \lambda g_1) = g$ exactly;
    $R$ likewise with $b$ (its own $x$ and $\lambda$, the same $g_1$).

    Choices. $g_1 = (1, 2, \dots, r)/\sum_k k$ as in the paper. The paper takes $x_i
    \propto i$; here $x_i = \hat a_i\, i/\mu$ with $\mu = \sum_k \hat a_k k$, which is
    $\propto i$ for uniform weights but never proportional to $\hat a$ unless a single
    weight is positive: with $x \propto \hat a$ we get $y = \hat a$ and $Q = a g^\top /
    s$, the saddle point (it happens to the paper's $x$ when $a \propto (1, \dots, n)$).
    It also puts zero rows where $a_i = 0$.

    Feasibility. $Q \ge 0$ needs $y \ge 0$ and $g_2 \ge 0$, i.e. $\lambda x_i \le
    \hat a_i$ and $\lambda (g_1)_k \le \hat g_k$ (and $\lambda < 1$). With the tilted
    vectors, $\hat a_i - \lambda x_i = \hat a_i(1 - \lambda i/\mu)$, which is $\ge
    \hat a_i/2$ when $\lambda \le \mu/(2 i_{\max})$, $i_{\max}$ the last index of positive
    weight; likewise $\hat g_k - \lambda (g_1)_k \ge \hat g_k/2$ when $\lambda \le
    (r + 1)/(4r)$. So $\lambda = \frac12 \min(\mu/i_{\max}, (r + 1)/(2r)) \in (0,
    \frac12]$ ($\mu \le i_{\max}$). Then every entry of a row with $a_i > 0$ is at
    least $s\lambda x_i (g_1)_k > 0$, and rows with $a_i = 0$ are 0.

    Symmetry. Columns $k \ne l$ differ by $\lambda((g_1)_k - (g_1)_l)(s x - a)/(1 -
    \lambda) \ne 0$ unless a single weight is positive (or $r = 1$).

    Args:
        a, b: non-negative weights, shapes `(n,)`, `(m,)`, equal totals.
        r: the rank, an int with $1 \le r \le \min(n, m)$; static.

    Returns:
        `(Q, R, g)` of shapes `(n, r)`, `(m, r)`, `(r,)`, dtype of `a`. $O((n + m) r)$.

    Raises:
        ValueError: bad weights, unequal masses, or `r` not an int in $[1, \min(n, m)]$.
    """
    a, b = _marginals(a, b)
    _check_rank(r, a.shape[0], b.shape[0])
    return _rank2(a, b, r)


@functools.partial(jax.jit, static_argnums=2)
def _rank2(a, b, r):
    g = jnp.full((r,), 1.0 / r, a.dtype) * jnp.sum(a)
    return _rank2_factor(a, r), _rank2_factor(b, r), g


# -- random ------------------------------------------------------------------------
def _perturbed(w: Array, g: Array, key) -> Array:
    r"""$Q_{ij} = w_i \hat g_j (1 + t Z_{ij})$ with $Z$ uniform on $[-1, 1]$ centred
    twice ($Z\hat g = 0$, $\hat w^\top Z = 0$) and $t = 1/(2\max|Z|)$: $Q \in \Pi(w,
    g\sum w/\sum g)$ exactly, $\frac12 w_i \hat g_j \le Q_{ij} \le \frac32 w_i \hat
    g_j$."""
    w_hat, g_hat = w / jnp.sum(w), g / jnp.sum(g)
    z = jax.random.uniform(key, (w.shape[0], g.shape[0]), w.dtype, -1.0, 1.0)
    z = z - jnp.sum(z * g_hat[None, :], axis=1, keepdims=True)
    z = z - jnp.sum(z * w_hat[:, None], axis=0, keepdims=True)
    top = jnp.max(jnp.where(w[:, None] > 0, jnp.abs(z), 0.0))
    t = 0.5 / jnp.maximum(top, jnp.finfo(w.dtype).tiny)
    return w[:, None] * g_hat[None, :] * (1 + t * z)


def random(a: Float[Array, " n"], b: Float[Array, " m"], r: int, key):
    r"""A random start with exact marginals.

    $g = s\,u/\sum_k u_k$ with $u_k \sim U(0.5, 1.5)$ and $s = \sum_i a_i$;
    $Q_{ij} = a_i \hat g_j (1 + t Z_{ij})$ with $\hat g = g/s$ and $Z$ drawn uniform on
    $[-1, 1]$, then centred twice, $Z \leftarrow Z - (Z\hat g)\mathbf 1^\top$ and $Z
    \leftarrow Z - \mathbf 1(\hat a^\top Z)$, so that $Z\hat g = 0$ and $\hat a^\top Z =
    0$; $t = 1/(2 \max_{a_i > 0} |Z_{ij}|)$. Hence $Q\mathbf 1 = a$ and $Q^\top\mathbf
    1 = g$ exactly by construction (no scaling iterations), and $\frac12 a_i \hat g_j
    \le Q_{ij} \le \frac32 a_i \hat g_j$: positive where $a_i > 0$, 0 where $a_i = 0$.
    $R$ likewise with $b$ and an independent $Z$. A multiplicative perturbation of the
    saddle point by up to ±50 %, independent of $n$ (uniform, not Gaussian, so that
    one large draw does not shrink $t$).

    Args:
        a, b: non-negative weights, shapes `(n,)`, `(m,)`, equal totals.
        r: the rank, an int with $1 \le r \le \min(n, m)$; static.
        key: a `jax.random` key (required: the start is random).

    Returns:
        `(Q, R, g)` of shapes `(n, r)`, `(m, r)`, `(r,)`, dtype of `a`. $O((n + m) r)$.

    Raises:
        ValueError: bad weights, unequal masses, `r` out of range, or no `key`.
    """
    a, b = _marginals(a, b)
    _check_rank(r, a.shape[0], b.shape[0])
    if key is None:
        raise ValueError("`key` is required by `random`: pass e.g. key=jax.random.key(0).")
    return _random(a, b, r, key)


@functools.partial(jax.jit, static_argnums=2)
def _random(a, b, r, key):
    key_g, key_q, key_r = jax.random.split(key, 3)
    u = jax.random.uniform(key_g, (r,), a.dtype, 0.5, 1.5)
    g = jnp.sum(a) * u / jnp.sum(u)
    return _perturbed(a, g, key_q), _perturbed(b, g, key_r), g


# -- k-means -----------------------------------------------------------------------
def _sqdist(x: Array, sq: Array, c: Array) -> Array:
    r"""$\|x_i - c_k\|^2 = \|x_i\|^2 - 2 x_i\cdot c_k + \|c_k\|^2$ (clamped at 0), shape
    `(n, k)`; `sq` holds $\|x_i\|^2$. Full-precision products (no TF32 on GPUs)."""
    cross = jnp.dot(x, c.T, precision=lax.Precision.HIGHEST)
    return jnp.maximum(sq[:, None] - 2 * cross + jnp.sum(c * c, axis=1)[None, :], 0.0)


@functools.partial(jax.jit, static_argnums=3)
def _seed(x: Array, sq: Array, w: Array, k: int, key) -> Array:
    r"""Greedy k-means++ (Arthur & Vassilvitskii, 2007): the first centre drawn with
    probability $\propto w_i$, each next one the best (lowest $\sum_i w_i D_i^2$) of
    $2 + \lfloor\log k\rfloor$ candidates drawn $\propto w_i D_i^2$, $D_i$ the distance
    to the nearest centre so far (the candidates of the authors' implementation and
    scikit-learn's). $O(n k d \log k)$ time, $O(n \log k)$ memory."""
    trials = 2 + int(np.log(k))
    log_w = safe_log(w)
    key, sub = jax.random.split(key)
    first = x[jax.random.categorical(sub, log_w)]
    d2 = _sqdist(x, sq, first[None, :])[:, 0]
    centres = jnp.zeros((k, x.shape[1]), x.dtype).at[0].set(first)

    def add(j, state):
        centres, d2, key = state
        key, sub = jax.random.split(key)
        p = w * d2
        # every point already a centre (fewer distinct points than k): draw by weight
        logits = jnp.where(jnp.any(p > 0), safe_log(p), log_w)
        candidates = jax.random.categorical(sub, logits, shape=(trials,))
        new_d2 = jnp.minimum(d2[:, None], _sqdist(x, sq, x[candidates]))
        best = jnp.argmin(jnp.sum(w[:, None] * new_d2, axis=0))
        return centres.at[j].set(x[candidates[best]]), new_d2[:, best], key

    return lax.fori_loop(1, k, add, (centres, d2, key))[0]


def _assign(x: Array, sq: Array, c: Array) -> tuple[Array, Array]:
    """Nearest centroid of every point and the squared distance to it."""
    d2 = _sqdist(x, sq, c)
    labels = jnp.argmin(d2, axis=1)
    return labels, jnp.take_along_axis(d2, labels[:, None], axis=1)[:, 0]


def _lloyd_step(x: Array, sq: Array, w: Array, c: Array) -> Array:
    """One Lloyd iteration: assign, then weighted means; a centroid whose cluster has
    no weight moves to one of the points farthest from their centroids."""
    k = c.shape[0]
    labels, d2 = _assign(x, sq, c)
    mass = jax.ops.segment_sum(w, labels, k)
    sums = jax.ops.segment_sum(w[:, None] * x, labels, k)
    new = jnp.where(mass[:, None] > 0, sums / jnp.where(mass > 0, mass, 1)[:, None], c)
    far_d2, far = lax.top_k(jnp.where(w > 0, d2, -1.0), k)  # O(n k) at most
    empty = mass <= 0
    slot = jnp.cumsum(empty) - 1  # the e-th empty cluster takes the e-th farthest point
    reseed = empty & (far_d2[slot] > 0)
    return jnp.where(reseed[:, None], x[far[slot]], new)


@functools.partial(jax.jit, static_argnums=4)
def _lloyd(x: Array, sq: Array, w: Array, c: Array, n_iter: int, tol) -> tuple[Array, Array]:
    """Lloyd iterations from centroids `c` on centred points (see `kmeans`)."""
    variance = jnp.sum(w * sq)

    def go_on(state):
        i, _, shift = state
        return (i < n_iter) & (shift > tol * variance)

    def step(state):
        i, c, _ = state
        new = _lloyd_step(x, sq, w, c)
        return i + 1, new, jnp.sum((new - c) ** 2)

    _, c, _ = lax.while_loop(go_on, step, (0, c, jnp.asarray(jnp.inf, x.dtype)))
    return c, _assign(x, sq, c)[0]


def _kmeans(x: Array, w: Array, k: int, key, n_iter: int, tol, init) -> tuple[Array, Array]:
    """k-means on checked inputs (see `kmeans`): seeding (unless `init`), then Lloyd."""
    w = w / jnp.sum(w)
    mean = jnp.sum(w[:, None] * x, axis=0)
    x = x - mean  # centred: float32 distances do not cancel far from the origin
    sq = jnp.sum(x * x, axis=1)
    c = _seed(x, sq, w, k, key) if init is None else init - mean
    c, labels = _lloyd(x, sq, w, c, n_iter, tol)
    return c + mean, labels


def kmeans(x: Float[Array, "n d"], k: int, key=None, n_iter: int = KMEANS_ITERATIONS,
           a: Float[Array, " n"] | None = None, *, tol: float = KMEANS_TOL,
           init: Float[Array, "k d"] | None = None) -> tuple[Float[Array, "k d"], Int[Array, " n"]]:
    r"""Weighted k-means: Lloyd's algorithm from a greedy k-means++ seeding.

    Minimises $\sum_i a_i \min_l \|x_i - c_l\|^2$ (Lloyd, 1982): alternately assigns
    every point to its nearest centroid and moves every centroid to the $a$-weighted
    mean of its points. Seeding (Arthur & Vassilvitskii, 2007): the first centroid is
    drawn with probability $\propto a_i$, each next one is the best of $2 + \lfloor\log
    k\rfloor$ candidates drawn $\propto a_i D_i^2$ ($D_i$: distance to the nearest
    centroid so far). A centroid whose cluster has no weight is re-seeded at a point
    of positive weight farthest from its own centroid (distinct points for distinct
    empty clusters; kept where every point sits on a centroid, e.g. fewer distinct
    points than $k$). Stops after `n_iter` iterations or when the centroids moved by
    $\sum_l \|\Delta c_l\|^2 \le$ `tol` times the total variance $\sum_i \hat a_i
    \|x_i - \bar x\|^2$ (0 once the labels stop changing). Runs on points centred at
    their weighted mean. Zero-weight points get labels but never move a centroid.

    Args:
        x: points, shape `(n, d)`.
        k: number of clusters, an int with $1 \le k \le n$; static.
        key: a `jax.random` key for the seeding; None: `jax.random.key(0)`.
        n_iter: at most this many Lloyd iterations; static.
        a: non-negative weights, shape `(n,)`; None: uniform.
        tol: relative tolerance on the squared centroid moves (above).
        init: starting centroids, shape `(k, d)`, instead of the seeding.

    Returns:
        `(centroids, labels)`: shapes `(k, d)` (dtype of `x`) and `(n,)` (int), the
        labels those of the nearest returned centroid.

    Complexity: $O(nkd)$ per iteration ($O(nkd\log k)$ for the seeding), memory
    $O(n(k + d))$: the $(n, k)$ distances, never $n \times n$.

    Raises:
        ValueError: bad `x`, `a`, `init` or `tol`, or `k`, `n_iter` out of range.
    """
    x = checks.as_real_array("x", x)
    checks.check_cloud("x", x)
    checks.check_points("x", x)
    n, d = x.shape
    _check_int("k", k, 1, n, "The number of clusters `k`",
               f"Pass k <= n = {n}, the number of points of x.")
    _check_int("n_iter", n_iter, 1, np.iinfo(np.int32).max, "`n_iter`",
               "Pass at least one iteration.")
    tol_value = checks.concrete(tol)
    if tol_value is not None and not (tol_value.ndim == 0 and 0 <= tol_value < np.inf):
        raise ValueError(f"`tol` must be a finite number >= 0; received {tol!r}.")
    w = jnp.full((n,), 1.0 / n, x.dtype) if a is None else _weights("a", a, n, "x").astype(x.dtype)
    if a is not None:
        w = eqx.error_if(w, jnp.any(~jnp.isfinite(w)) | jnp.any(w < 0) | ~(jnp.sum(w) > 0),
                         "`a` must be finite, non-negative weights with a positive sum.")
    if init is not None:
        init = checks.as_real_array("init", init).astype(x.dtype)
        if init.shape != (k, d):
            raise ValueError(
                f"`init` must hold k = {k} centroids in dimension d = {d}, shape ({k}, "
                f"{d}); received shape {tuple(init.shape)}. Or leave it None for the "
                "k-means++ seeding."
            )
        checks.check_points("init", init)
    x, w, init = lax.stop_gradient((x, w, init))
    return _kmeans(x, w, k, _key(key), n_iter, jnp.asarray(tol, x.dtype), init)


# -- k-means start -----------------------------------------------------------------
def _floor(dtype) -> float:
    """$\\sqrt{\\text{tiny}}$ of `dtype` ($10^{-19}$ in float32, $10^{-154}$ in float64):
    $w_i$ times it is a normal float for every $w_i \\ge$ it, so its logarithm is
    finite even where the hardware flushes subnormals to 0."""
    return float(np.sqrt(np.finfo(dtype).tiny))


@jax.jit
def _entropic_factor(x: Array, z: Array, w: Array, epsilon) -> Array:
    r"""The entropic plan between $(x, w)$ and $(z, \mathbf 1/r \cdot \sum w)$, its rows
    recomputed from the column potential $g$: $Q_{ij} = w_i \max(\mathrm{softmax}_j((g_j
    - C_{ij})/\varepsilon), \delta)$."""
    s = jnp.sum(w)
    r = z.shape[0]
    geom = PointCloud(x, z)
    uniform = jnp.full((r,), 1.0 / r, w.dtype)
    problem = LinearProblem(geom, w / s, uniform, epsilon=epsilon)
    solution = Sinkhorn(threshold=SINKHORN_THRESHOLD)(problem)
    logits = (solution.g[None, :] - geom.cost_matrix()) / solution.epsilon
    log_rows = jnp.maximum(jax.nn.log_softmax(logits, axis=1), np.log(_floor(w.dtype)))
    return w[:, None] * jnp.exp(log_rows)


def kmeans_init(x: Float[Array, "n d"], y: Float[Array, "m d"], a: Float[Array, " n"],
                b: Float[Array, " m"], r: int, key=None, epsilon=None):
    r"""The k-means start of Scetbon & Cuturi (2022) (OTT-JAX's `KMeansInitializer`).

    $z$: the $r$ centroids of `kmeans(x, r, key, a=a)`; $g = (\sum_i a_i/r)\,
    \mathbf 1_r$; $Q$ the entropic OT plan between $(x, a)$ and $(z, g)$ and $R$ the
    plan between $(y, b)$ and $(z, g)$, both for the squared Euclidean cost, solved by
    `monge.Sinkhorn` on `PointCloud(x, z)` (an $n \times r$ cost, stored) with an L1
    threshold `SINKHORN_THRESHOLD` $\cdot \sum a$. Each plan is rebuilt from the
    solution's column potential $g^\star$ by a last row update,
    $$Q_{ij} = a_i \max\Big(\mathrm{softmax}_j\big((g^\star_j - \|x_i -
    z_j\|^2)/\varepsilon\big), \delta\Big),\qquad \delta = \sqrt{\text{tiny}}$$
    ($10^{-19}$ in float32, $10^{-154}$ in float64), so that $Q\mathbf 1 = a$ exactly
    (to a relative $r\delta$), $Q^\top\mathbf 1 = g$ to about the threshold, in L1,
    when the solve converged, and $Q_{ij} \ge a_i\delta > 0$ where $a_i > 0$: an
    entropic plan's entries far from a point underflow to 0, and the mirror steps of
    the low-rank solver need $\log Q$ finite. $\delta$ is far below the float rounding
    of any row. Under `jit`, non-finite points give NaN factors (Sinkhorn diverges).

    Args:
        x, y: points, shapes `(n, d)`, `(m, d)`; a, b: their non-negative weights,
            equal totals.
        r: the rank, an int with $1 \le r \le \min(n, m)$; static.
        key: the k-means seeding key; None: `jax.random.key(0)`.
        epsilon: of both entropic problems; None (default): the Sinkhorn default of
            each (`problems.default_epsilon`), $0.05$ times the mean cost between the
            points and the centroids under $a g^\top$ (capped at 4 weighted medians):
            points near one centroid go (almost) entirely to it, points between
            centroids are split.

    Returns:
        `(Q, R, g)` of shapes `(n, r)`, `(m, r)`, `(r,)`, dtype of `a`. Complexity: the
        k-means ($O(n r d)$ per iteration) and two Sinkhorn solves of $O((n + m) r)$
        per iteration.

    Raises:
        ValueError: bad points or weights, unequal masses, `epsilon` not positive, or
        `r` out of range.
    """
    x, y = checks.as_real_array("x", x), checks.as_real_array("y", y)
    checks.check_clouds(x, y)
    a, b = _marginals(a, b, x.shape[0], y.shape[0])
    x, y = x.astype(a.dtype), y.astype(a.dtype)
    _check_rank(r, x.shape[0], y.shape[0])
    if epsilon is not None:
        checks.check_positive("epsilon", epsilon, "Pass epsilon > 0, or None for the Sinkhorn "
                              "default (0.05 times the mean cost to the centroids).")
    x, y = lax.stop_gradient((x, y))
    z, _ = _kmeans(x, a, r, _key(key), KMEANS_ITERATIONS, jnp.asarray(KMEANS_TOL, a.dtype), None)
    g = jnp.full((r,), 1.0 / r, a.dtype) * jnp.sum(a)
    return _entropic_factor(x, z, a, epsilon), _entropic_factor(y, z, b, epsilon), g
