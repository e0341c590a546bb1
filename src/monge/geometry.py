r"""Geometries: lazy operators over the cost matrix between two supports.

A geometry knows the cost $C_{ij}$ between the points of two supports, and nothing of
weights, epsilon or solvers. Every reduction a solver needs is written once, in
`AbstractGeometry`, on top of a single primitive, `scan_blocks(fn, axis, carry, *args)`,
which runs a function over blocks of whole lines (rows or columns) of $C$ in order,
threading a carry (e.g. column sums accumulated over row blocks); `map_blocks` is the
carry-free case. A `CostMatrix` passes the stored matrix as one block; an online
`PointCloud` computes blocks of `chunk_size` lines and never stores the $n \times m$
matrix (memory $O((n + m)\cdot$ chunk$)$, backward pass included, thanks to
rematerialisation). Blocks, rather than
single lines, let XLA fuse the cost, the exponential and the reduction of a whole block
into one loop; blocks keep the orientation of $C$ (columns are never transposed, which
would make XLA read a fused, row-major producer column by column).

Convention: `axis` is the axis of $C$ that is **reduced**, as in NumPy. `axis=1`
sums over $j$ and returns one value per row $i$; `axis=0` sums over $i$.
"""

from __future__ import annotations

import abc
import functools
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from monge import checks
from monge.checks import as_float_array
from monge.costs import AbstractCost, SqEuclidean, as_cost

__all__ = [
    "AbstractGeometry", "CostMatrix", "PointCloud", "ONLINE_ABOVE", "ONE_PASS_FLOOR",
    "SCALE_SAMPLE", "ROBUST_FACTOR",
]

#: A point cloud with more than this many cost entries (n * m) is handled online by
#: default: 2**25 entries is 128 MiB of float32, beyond which storing the matrix costs
#: more memory than recomputing blocks of it costs time.
ONLINE_ABOVE = 2**25

#: Cost entries per block in online mode (rows * columns), 8 MiB of float32.
_BLOCK_ENTRIES = 2**21

#: A one-pass (shifted) log-sum-exp whose sum falls below exp(ONE_PASS_FLOOR) is
#: reported as NaN: terms below exp(`log_floor`) (about exp(-75) in float32) are
#: flushed to zero, and up to 1e6 of them must stay below float32 rounding of the sum.
ONE_PASS_FLOOR = -40.0

#: `cost_scale`: at most this many evenly strided rows (and columns) are sampled for
#: the median of the costs: 64 x 64 = 4096 entries, enough to place a median within a
#: few percent, far closer than `ROBUST_FACTOR` needs.
SCALE_SAMPLE = 64

#: `cost_scale` is the mean of |C| unless that exceeds this many medians.
ROBUST_FACTOR = 4.0


class AbstractGeometry(eqx.Module):
    """The cost between two supports, as an operator."""

    @property
    @abc.abstractmethod
    def shape(self) -> tuple[int, int]:
        """`(n, m)`: the number of points of the two supports."""

    @property
    @abc.abstractmethod
    def dtype(self):
        """The floating dtype of the cost."""

    @abc.abstractmethod
    def cost_matrix(self) -> Float[Array, "n m"]:
        """The dense `(n, m)` cost matrix (materialised)."""

    @property
    def materialized(self) -> bool:
        """Whether `cost_matrix()` returns a stored matrix (cheap to read, static).
        Solvers use it to pick their arithmetic (Sinkhorn's matrix-vector kernel blocks
        on a stored matrix, one fused pass over blocks otherwise); default False."""
        return False

    @abc.abstractmethod
    def precompute(self) -> AbstractGeometry:
        """The geometry a solver iterates on: the same operator, with the cost matrix
        stored where this geometry allows it (point clouds that are not online)."""

    @abc.abstractmethod
    def scan_blocks(self, fn: Callable, axis: int, carry, *args):
        """`fn(block, carry, *arg_blocks) -> (carry, out)` over blocks of whole lines of
        $C$, in order; returns the last carry and the outputs concatenated.

        A block is a sub-matrix of $C$ made of k whole lines, in $C$'s orientation:
        with `axis=1` the lines are rows, a `(k, m)` block; with `axis=0` columns, an
        `(n, k)` block. `fn` reduces the block along `axis` (use `along` and `across`
        to broadcast vectors) into `out`, arrays with k leading entries, and may fold
        it along the other axis into `carry` (a pytree of fixed shapes). `args` are
        arrays indexed along the kept axis; `fn` gets their k matching entries. The
        blocking (one block, or chunks) is the geometry's choice.
        """

    def check_values(self) -> None:
        """A `ValueError` if the geometry's own arrays hold values no solver accepts
        (NaN points, NaN or -inf costs), when they are concrete; nothing by default."""

    # -- what solvers ask of a geometry (defaults built on `scan_blocks`) --------------
    @property
    def supports(self) -> tuple[Array, Array] | None:
        """The points `(x, y)` of the two supports, or `None` for a geometry given by
        its costs alone (solvers that need points, e.g. initializers and entropic maps,
        ask this instead of a geometry's type)."""
        return None

    @property
    def ground_cost(self) -> AbstractCost | None:
        """The pointwise cost $c(x, y)$ between the supports, or `None`."""
        return None

    @property
    def frame_origin(self) -> Array | None:
        """`None`, or the shift $o$ of supports stored centred: the user's points are
        `supports` plus $o$ (new points are moved into that frame and maps back)."""
        return None

    def with_supports(self, x: Array, y: Array) -> AbstractGeometry:
        """The same kind of geometry on new points (same cost and memory options)."""
        raise ValueError(
            f"A {type(self).__name__} has no points to replace; this needs a point-cloud "
            "geometry (monge.geometry.PointCloud, or monge.solve(x, y, ...))."
        )

    def apply_cost(self, v: Array, axis: int) -> Array:
        r"""$C v$ (`axis=1`, `v` of shape `(m,)` or `(m, k)`) or $C^\top v$ (`axis=0`,
        `v` of shape `(n,)` or `(n, k)`), one block at a time (never more than a block
        of $C$ in memory). Geometries with structure override it: a squared-Euclidean
        point cloud in $O((n + m)d)$, factors $C = A B^\top$ in $O((n + m)r)$."""
        return self.map_blocks(lambda c: jnp.tensordot(c, v, axes=([axis], [0])), axis)

    def plan(self, f: Array, g: Array, eps, a: Array, b: Array) -> Float[Array, "n m"]:
        r"""The coupling $P_{ij} = a_i b_j e^{(f_i + g_j - C_{ij})/\varepsilon}$ of
        potentials `(f, g)`, materialised (memory $nm$), rows computed block by block.
        Zero weights and infinite costs give exact zeros."""
        log_a, log_b = safe_log(a), safe_log(b)

        def fn(c, f_i, log_a_i):
            return jnp.exp(log_a_i[:, None] + log_b[None, :] + (f_i[:, None] + g[None, :] - c) / eps)

        return self.map_blocks(fn, 1, f, log_a)

    def map_blocks(self, fn: Callable, axis: int, *args) -> Array:
        """`fn(block, *arg_blocks)` over blocks of whole lines of $C$, concatenated
        (`scan_blocks` without a carry)."""
        return self.scan_blocks(lambda c, carry, *xs: (carry, fn(c, *xs)), axis, (), *args)[1]

    def map_lines(self, fn: Callable, axis: int, *args) -> Array:
        """`out[k] = fn(line_k, *(arg[k] for arg in args))` for every line of $C$
        (rows for `axis=1`, columns for `axis=0`)."""
        return self.map_blocks(jax.vmap(fn, in_axes=(1 - axis,) + (0,) * len(args)), axis, *args)

    def lse(self, h: Float[Array, " l"], eps, axis: int, w=None, shift=None) -> Float[Array, " k"]:
        r"""$\log \sum_l w_l \exp((h_l - C_{kl}) / \varepsilon)$ for each $k$.

        With `axis=1`, $h$ and the optional non-negative weights $w$ have length m and
        the result length n; `axis=0` transposes. Zero weights drop their terms (with
        finite gradients).

        By default each line is stabilised by its largest exponent (two passes over the
        line, `jax.nn.logsumexp`). With `shift` $s_k$ given, one pass computes $\log\sum_l
        \exp((h_l - C_{kl} + s_k)/\varepsilon + \log w_l) - s_k/\varepsilon$ without
        the maximum: about twice as fast online, and exact when $s_k$ is near the
        result's $-\varepsilon\,\cdot$ (a Sinkhorn potential of the previous iterate).
        If $s_k$ is too far off the sum overflows (inf) or falls below
        $e^{\text{ONE\_PASS\_FLOOR}}$ (returned as NaN): callers check and redo with
        `shift=None`.
        """
        log_w = None if w is None else safe_log(w)
        if shift is None:
            def fn(c):
                z = (along(h, axis) - c) / eps
                return jax.nn.logsumexp(z, axis=axis, b=None if w is None else along(w, axis))

            return self.map_blocks(fn, axis)

        def fn(c, s):
            z = (along(h, axis) - c + across(s, axis)) / eps
            if log_w is not None:
                z = z + along(log_w, axis)
            log_total = jnp.log(jnp.sum(flushed_exp(z), axis=axis))
            log_total = jnp.where(log_total > ONE_PASS_FLOOR, log_total, jnp.nan)
            return log_total - s / eps

        return self.map_blocks(fn, axis, shift)

    def apply_kernel(self, h, eps, v, axis: int) -> tuple[Array, Array]:
        r"""$\sum_l \exp((h_l - C_{kl})/\varepsilon)\, v_l$ as a pair `(log_scale, w)`.

        The value is $e^{\text{log\_scale}_k} w_k$: the largest exponent of each line is
        factored out, so the products never overflow or underflow in float32. `v` has
        shape `(l,)` or `(l, p)`; signs are allowed.
        """

        def fn(c):
            s = (along(h, axis) - c) / eps
            top = jax.lax.stop_gradient(jnp.max(s, axis=axis))
            top = jnp.where(jnp.isfinite(top), top, 0.0)
            return top, jnp.tensordot(flushed_exp(s - across(top, axis)), v, axes=([axis], [0]))

        return self.map_blocks(fn, axis)

    def mean_abs_cost(self, a: Float[Array, " n"], b: Float[Array, " m"]) -> Float[Array, ""]:
        r"""$\sum_{ij} a_i b_j |C_{ij}| / \sum_{ij} a_i b_j$ over the finite entries
        (forbidden pairs, $C_{ij} = +\infty$, are left out): the mean cost under the
        independent coupling (one pass; point clouds use their cost's closed form where
        it has one)."""

        def fn(c):
            finite = jnp.isfinite(c)
            return jnp.stack([jnp.where(finite, jnp.abs(c), 0.0) @ b, finite.astype(b.dtype) @ b])

        total, weight = a @ self.map_blocks(lambda c: fn(c).T, 1)
        return total / jnp.where(weight > 0, weight, 1.0)

    def sub_costs(self, rows: np.ndarray, cols: np.ndarray) -> Float[Array, "k l"]:
        """The costs $C_{ij}$ for `i` in `rows`, `j` in `cols` (static index arrays),
        from one pass over row blocks (no stored matrix needed); a stored matrix, or
        points, index directly."""
        if self.materialized:
            return self.cost_matrix()[rows][:, cols]
        return self.map_blocks(lambda c: c[:, cols], 1)[rows]

    def cost_scale(self, a: Float[Array, " n"], b: Float[Array, " m"]) -> Float[Array, ""]:
        r"""The typical size of the costs, robust to a few outlying or forbidden ones:

        $$s = \min(\bar c,\ \text{ROBUST\_FACTOR}\cdot q),$$

        with $\bar c$ the mean of $|C|$ under $a b^\top$ (`mean_abs_cost`, finite entries)
        and $q$ the weighted median of $|C_{ij}|$ (weights $a_i b_j$, finite entries) on
        at most `SCALE_SAMPLE` evenly strided rows and columns (all of them on small
        problems); $s = \bar c$ where $q = 0$.

        Why: the mean is what epsilon was always relative to, and it is kept wherever it
        describes the data (for Gaussian clouds and the squared Euclidean cost the mean
        is 1.4x the median in 2-D, 2.2x in 1-D, under `ROBUST_FACTOR` = 4). But a mean
        is dominated by a few huge entries: in `C = [[0, 1, B], [1, 0, B], [B, B, 0]]`
        it is $4B/9$, and an epsilon or an annealing start relative to it blurs the
        plan across the costs of order 1 that decide it, then leaves potentials of
        size $B$ that float32 cannot resolve. A median ignores up to half the mass of
        outlying costs; a strided sample of $64 \times 64$ entries costs $O(d)$ for point
        clouds and a negligible gather for a stored matrix (no pass over $C$, no sort
        of $nm$ entries). Gradients are stopped (a default, not a parameter).
        """
        n, m = self.shape
        rows = _strided(n, SCALE_SAMPLE)
        cols = _strided(m, SCALE_SAMPLE)
        c = jnp.abs(self.sub_costs(rows, cols)).ravel()
        w = (a[rows][:, None] * b[cols][None, :]).ravel()
        finite = jnp.isfinite(c)
        w = jnp.where(finite, w, 0.0)
        c = jnp.where(finite, c, jnp.inf)
        order = jnp.argsort(c)
        cum = jnp.cumsum(w[order])
        # the smallest value whose cumulative weight exceeds half the total
        k = jnp.minimum(jnp.sum(cum <= 0.5 * cum[-1]), c.shape[0] - 1)
        median = c[order][k]
        mean = self.mean_abs_cost(a, b)
        ok = (median > 0) & jnp.isfinite(median)
        robust = jnp.where(ok, jnp.minimum(mean, ROBUST_FACTOR * jnp.where(ok, median, 0.0)), mean)
        return jax.lax.stop_gradient(robust)

    def mean_cost(self, a: Float[Array, " n"], b: Float[Array, " m"]) -> Float[Array, ""]:
        r"""$a^\top C b$: the cost of the independent coupling $a b^\top$ (for weights
        summing to one, the average cost between the two supports)."""
        return a @ self.map_blocks(lambda c: c @ b, 1)


def _strided(n: int, k: int) -> np.ndarray:
    """`min(n, k)` evenly spaced indices in `range(n)`, first and last included."""
    return np.unique(np.round(np.linspace(0, n - 1, min(n, k))).astype(np.intp))


def safe_log(w: Array) -> Array:
    """`log(w)` with `-inf` (and a zero gradient) where `w == 0`: the log-weights of
    every log-domain solver (a zero weight is a point that carries no mass)."""
    positive = w > 0
    return jnp.where(positive, jnp.log(jnp.where(positive, w, 1.0)), -jnp.inf)


def flushed_exp(z: Array) -> Array:
    r"""`exp(max(z, log_floor(z.dtype)))`: no subnormal results.

    Subnormal floats make x86 arithmetic 10-100x slower; a Sinkhorn plan has many
    entries that small (they are negligible: below $e^{-75}$ in float32, $e^{-696}$ in
    float64, against lines of total 1 or more), and summing or multiplying them once
    cost more than all other work of a block. Entries below the floor (zero weights'
    $-\infty$ included) become $e^{\text{floor}}$ ($2\cdot 10^{-33}$ in float32), not 0:
    clamping vectorises, a select per entry was 3x slower than the exponential itself
    (XLA CPU), and a line of $10^6$ such entries adds $2\cdot 10^{-27}$, far below
    the sums the solvers accept ($e^{\text{ONE\_PASS\_FLOOR}} \approx 4\cdot 10^{-18}$).
    Multiply by a weight where an exact zero matters.
    """
    return jnp.exp(jnp.maximum(z, log_floor(z.dtype)))


def log_floor(dtype) -> float:
    """The log of the smallest value kept by `flushed_exp`: 12 above the log of the
    smallest normal float, so that products with factors up to $e^{12}$ stay normal."""
    return float(np.log(np.finfo(dtype).tiny)) + 12.0


def along(z, axis: int) -> Array:
    """A vector over the reduced axis, shaped to broadcast against a block."""
    return z[None, :] if axis == 1 else z[:, None]


def across(z, axis: int) -> Array:
    """A vector over the kept axis (one entry per line), shaped to broadcast."""
    return z[:, None] if axis == 1 else z[None, :]


def _check_matrix(C) -> None:
    checks.check_nonempty_matrix("C", C)


class CostMatrix(AbstractGeometry):
    """A geometry given by a dense cost matrix `C` of shape `(n, m)`.

    Example:
        >>> import jax.numpy as jnp, monge
        >>> geom = monge.geometry.CostMatrix(jnp.array([[0.0, 1.0], [1.0, 0.0]]))
        >>> geom.shape
        (2, 2)
    """

    C: Float[Array, "n m"] = eqx.field(converter=functools.partial(checks.as_real_array, "C"))

    def __check_init__(self):
        _check_matrix(self.C)

    @property
    def shape(self):
        return tuple(self.C.shape)

    @property
    def dtype(self):
        return self.C.dtype

    def cost_matrix(self):
        return self.C

    @property
    def materialized(self) -> bool:
        return True

    def check_values(self):
        checks.check_costs("C", self.C)

    def precompute(self):
        return self

    def scan_blocks(self, fn, axis, carry, *args):
        return fn(self.C, carry, *args)


class PointCloud(AbstractGeometry):
    r"""Two point clouds `x` `(n, d)` and `y` `(m, d)` and a ground cost.

    Args:
        x: source points, shape `(n, d)`.
        y: target points, shape `(m, d)`.
        cost: a name (``"sqeuclidean"``, ``"euclidean"``, ``"cityblock"``,
            ``"cosine"``), a `monge.costs` object or a function `c(x, y)` of one pair.
        online: if True, never store more of the cost matrix than one block: every
            reduction recomputes it in blocks of `chunk_size` lines (a matrix that is a
            single block anyway is stored, see `is_online`). ``None`` (default)
            switches online mode on when $nm$ exceeds `ONLINE_ABOVE` ($2^{25}$).
            Static: changing it recompiles.
        chunk_size: lines per block in online mode; default keeps a block near
            $2^{21}$ entries.
        origin: `None`, or a shift $o$ of shape `(d,)`: the points are `x + o` and
            `y + o` (the geometry stores them centred). `monge.solve` sets it when it
            centres float64 NumPy points before they are cast to float32 (a
            translation-invariant cost does not see it; `Solution.transport` maps
            points given and returned in the original frame).

    Example:
        >>> import jax.numpy as jnp, monge
        >>> geom = monge.geometry.PointCloud(jnp.zeros((3, 2)), jnp.ones((4, 2)))
        >>> geom.cost_matrix()[0, 0]
        Array(2., dtype=float32)
    """

    x: Float[Array, "n d"] = eqx.field(converter=functools.partial(checks.as_real_array, "x"))
    y: Float[Array, "m d"] = eqx.field(converter=functools.partial(checks.as_real_array, "y"))
    cost: AbstractCost = eqx.field(default_factory=SqEuclidean, converter=as_cost)
    online: bool | None = eqx.field(default=None, static=True)
    chunk_size: int | None = eqx.field(default=None, static=True)
    origin: Array | None = None

    def __check_init__(self):
        for name, z in (("x", self.x), ("y", self.y)):
            checks.check_cloud(name, z)
            checks.check_points(name, z)
        if self.x.shape[1] != self.y.shape[1]:
            raise ValueError(
                f"`x` and `y` must have the same dimension d; received x of shape "
                f"{tuple(self.x.shape)} and y of shape {tuple(self.y.shape)}."
            )
        if self.chunk_size is not None and not (
            isinstance(self.chunk_size, int) and self.chunk_size >= 1
        ):
            raise ValueError(
                f"`chunk_size` must be a positive integer; received {self.chunk_size!r}."
            )
        n, m = self.shape
        if self.chunk_size is not None and (
            self.online is False or (self.online is None and n * m <= ONLINE_ABOVE)
        ):
            mode = ("online=False" if self.online is False else
                    f"online=None with n*m = {n * m} <= ONLINE_ABOVE = {ONLINE_ABOVE}")
            raise ValueError(
                f"`chunk_size={self.chunk_size!r}` has no effect: the cost matrix is stored "
                f"({mode}), and `chunk_size` only sets the block size of online mode. Pass "
                "online=True to compute the cost in blocks, or drop chunk_size."
            )

    @property
    def shape(self):
        return (self.x.shape[0], self.y.shape[0])

    @property
    def dtype(self):
        return self.x.dtype

    @property
    def is_online(self) -> bool:
        r"""Whether reductions recompute the cost in blocks (static): `online`, or by
        default when $nm >$ `ONLINE_ABOVE`; but never when the whole matrix is a single
        block of rows and of columns (by default $nm \le 2^{21}$, 8 MiB of float32):
        storing it then takes no more memory than the one block online mode computes,
        and saves recomputing it at every pass."""
        n, m = self.shape
        if self.online is None:
            return n * m > ONLINE_ABOVE
        return self.online and (self._chunk(n, m) < n or self._chunk(m, n) < m)

    def blocking(self) -> dict:
        """`online` and `chunk_size` for a point cloud of other points built like this one
        (a given `chunk_size` implies online mode, whatever the new shape)."""
        online = True if self.chunk_size is not None else self.online
        return {"online": online, "chunk_size": self.chunk_size}

    def _chunk(self, n_lines: int, n_others: int) -> int:
        """Lines per block when blocks are made of `n_lines` lines of length `n_others`."""
        return min(self.chunk_size or max(1, _BLOCK_ENTRIES // max(n_others, 1)), n_lines)

    def cost_matrix(self):
        return self.cost.all_pairs(self.x, self.y)

    @property
    def supports(self):
        return self.x, self.y

    def check_values(self):
        checks.check_points("x", self.x)
        checks.check_points("y", self.y)

    @property
    def ground_cost(self):
        return self.cost

    @property
    def frame_origin(self):
        return self.origin

    def with_supports(self, x, y):
        return PointCloud(x, y, self.cost, **self.blocking())

    def apply_cost(self, v, axis):
        fast = self.cost.apply_all_pairs(self.x, self.y, v, axis)
        return super().apply_cost(v, axis) if fast is None else fast

    def scan_blocks(self, fn, axis, carry, *args):
        if not self.is_online:
            return CostMatrix(self.cost_matrix()).scan_blocks(fn, axis, carry, *args)
        lines, others = (self.x, self.y) if axis == 1 else (self.y, self.x)
        n_lines = lines.shape[0]
        chunk = self._chunk(n_lines, others.shape[0])

        @jax.checkpoint  # the backward pass recomputes a block's costs: O(chunk) memory
        def block(carry, points, *block_args):
            if axis == 1:
                c = self.cost.all_pairs(points, others)
            else:
                c = self.cost.all_pairs(others, points)
            return fn(c, carry, *block_args)

        full = n_lines - n_lines % chunk
        pieces = []
        if full:
            def split(z):
                return z[:full].reshape(full // chunk, chunk, *z.shape[1:])

            carry, out = jax.lax.scan(lambda c, t: block(c, *t), carry, (split(lines), *map(split, args)))
            pieces.append(jax.tree_util.tree_map(lambda z: z.reshape(full, *z.shape[2:]), out))
        if full < n_lines:
            carry, out = block(carry, lines[full:], *(z[full:] for z in args))
            pieces.append(out)
        return carry, jax.tree_util.tree_map(lambda *zs: jnp.concatenate(zs), *pieces)

    def precompute(self):
        return self if self.is_online else CostMatrix(self.cost_matrix())

    def mean_abs_cost(self, a, b):
        closed = self.cost.mean_abs(self.x, self.y, a, b)
        return super().mean_abs_cost(a, b) if closed is None else closed

    def sub_costs(self, rows, cols):
        return self.cost.all_pairs(self.x[rows], self.y[cols])
