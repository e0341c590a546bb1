r"""Geometries: lazy operators over the cost matrix between two supports.

A geometry knows the cost $C_{ij}$ between the points of two supports, and nothing of
weights, epsilon or solvers. Every reduction a solver needs is written once, in
`AbstractGeometry`, on top of a single primitive, `scan_blocks(fn, axis, carry, *args)`,
which runs a function over blocks of whole lines (rows or columns) of $C$ in order,
threading a carry (e.g. column sums accumulated over row blocks); `map_blocks` is the
carry-free case. A `CostMatrix` passes the stored matrix as one block; an online
`PointCloud` computes blocks of `chunk_size` lines and never stores the $n \times m$
matrix (memory $O((n + m)\cdot$ chunk$)$, backward pass included, thanks to
rematerialisation); a `LowRankCost` computes its blocks from factors $C = A B^\top$ in
the same way (`scan_chunks` is the scan both share). Blocks, rather than
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
    "AbstractGeometry", "CostMatrix", "PointCloud", "LowRankCost", "ONLINE_ABOVE",
    "ONE_PASS_FLOOR", "SCALE_SAMPLE", "ROBUST_FACTOR", "LOW_RANK_TOL", "ERROR_SAMPLE",
    "MAX_RANK",
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



def _check_chunk_size(chunk_size) -> None:
    if chunk_size is not None and not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"`chunk_size` must be a positive integer; received {chunk_size!r}.")


def lines_per_block(chunk_size: int | None, n_lines: int, n_others: int) -> int:
    """Lines per block when blocks are made of `n_lines` lines of length `n_others`:
    `chunk_size` if given, else as many as keep a block near `_BLOCK_ENTRIES` entries."""
    return min(chunk_size or max(1, _BLOCK_ENTRIES // max(n_others, 1)), n_lines)


def scan_chunks(block: Callable, chunk: int, carry, lines: Array, *args):
    """`block(carry, line_chunk, *arg_chunks) -> (carry, out)` over consecutive chunks
    of `chunk` entries of `lines` (and of each of `args`) along their first axis, in
    order; the last chunk may be shorter. Returns the last carry and the outputs
    concatenated. The body of `scan_blocks` for geometries that compute their blocks:
    `lax.scan` over `jax.checkpoint`-ed blocks, so that neither the forward nor the
    backward pass holds more than one block of $C$ (the backward pass recomputes it)."""
    block = jax.checkpoint(block)
    n_lines = lines.shape[0]
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
        checks.check_clouds(self.x, self.y)
        _check_chunk_size(self.chunk_size)
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
        return lines_per_block(self.chunk_size, n_lines, n_others)

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

        def block(carry, points, *block_args):
            if axis == 1:
                c = self.cost.all_pairs(points, others)
            else:
                c = self.cost.all_pairs(others, points)
            return fn(c, carry, *block_args)

        return scan_chunks(block, self._chunk(lines.shape[0], others.shape[0]), carry, lines, *args)

    def precompute(self):
        return self if self.is_online else CostMatrix(self.cost_matrix())

    def mean_abs_cost(self, a, b):
        closed = self.cost.mean_abs(self.x, self.y, a, b)
        return super().mean_abs_cost(a, b) if closed is None else closed

    def sub_costs(self, rows, cols):
        return self.cost.all_pairs(self.x[rows], self.y[cols])

    def to_low_rank(self, *, rank: int | None = None, tol: float | None = None,
                    seed: int | None = None) -> LowRankCost:
        r"""These points and cost as factors $C \approx A B^\top$ (`LowRankCost.from_points`
        with this cloud's `origin` and `chunk_size`; `rank`, `tol`, `seed` as there)."""
        return LowRankCost.from_points(self.x, self.y, self.cost, rank=rank, tol=tol, seed=seed,
                                       origin=self.origin, chunk_size=self.chunk_size)


#: Default `tol` of `LowRankCost.from_points`: the largest relative RMS error of a
#: sampled factorisation (see there for why 1%).
LOW_RANK_TOL = 1e-2

#: Entries of $C$ sampled (uniformly, with replacement) to estimate the relative error
#: of a sampled factorisation; all entries when $nm$ is no larger.
ERROR_SAMPLE = 4096

#: The largest rank `LowRankCost.from_points` tries when it chooses the rank itself
#: (ranks 8, 16, ..., up to min(n, m, MAX_RANK)).
MAX_RANK = 512

_FIRST_RANK = 8


def _optional(convert):
    return lambda z: None if z is None else convert(z)


class LowRankCost(AbstractGeometry):
    r"""A cost matrix given by factors, $C = A B^\top$, never stored.

    $C_{ij} = \langle A_i, B_j\rangle$ with $A$ of shape `(n, k)` and $B$ of shape
    `(m, k)`: $(n + m)k$ numbers instead of $nm$. Solvers use it like any geometry
    (Sinkhorn runs its fused passes over `scan_blocks`); what the factors make cheap
    is overridden:

    | operation | time | memory |
    |---|---|---|
    | `apply_cost` ($Cv$, $C^\top v$, `v` with p columns), `mean_cost` | $O((n + m)kp)$ | $O((n + m)p)$ |
    | `sub_costs(rows, cols)` | $O(\lvert rows\rvert\,\lvert cols\rvert\,k)$ | the result |
    | a pass over $C$ (`scan_blocks`: `lse`, `apply_kernel`, `plan`, ...) | $O(nmk)$ | one block |

    A block of rows is $A_{\text{blk}} B^\top$ and a block of columns $A B_{\text{blk}}^\top$;
    blocks of `chunk_size` lines are computed in a checkpointed `lax.scan`, as in an
    online `PointCloud`, so a pass and its backward pass hold one block
    ($\approx 2^{21}$ entries by default). `cost_matrix()` materialises $A B^\top$
    ($nm$ memory) for whoever asks; `precompute()` never does.

    Build one from factors, or from points with `LowRankCost.from_points` (also
    `PointCloud.to_low_rank`): exact factors of rank $d + 2$ for the squared Euclidean
    cost, sampled (CUR) factors with a measured error for any other cost. Factored
    costs are what makes each iteration of low-rank OT linear in $n + m$ (Scetbon,
    Cuturi & Peyré 2021, "Low-rank Sinkhorn factorization", ICML).

    Args:
        A: the row factor, shape `(n, k)`, $n, k \ge 1$.
        B: the column factor, shape `(m, k)`, same k.
        x, y: `None`, or the points `(n, d)` and `(m, d)` the factors were built from
            (`supports`: initializers and entropic maps use them).
        cost: `None`, or the ground cost $c$ with $C_{ij} \approx c(x_i, y_j)$ (a name, a
            `monge.costs` object or a function of one pair); `with_supports` needs it.
        tolerance: `None` for exact factors, else the estimated relative error
            $\lVert C - AB^\top\rVert_F / \lVert C\rVert_F$ of a sampled factorisation.
        origin: `None`, or the shift $o$ of shape `(d,)` of supports stored centred
            (as `PointCloud.origin`).
        chunk_size: lines per block in `scan_blocks`; default keeps a block near
            $2^{21}$ entries. Static.

    Raises:
        ValueError: factors that are not non-empty 2-D arrays with the same number of
            columns, or hold non-finite values (concrete arrays); points given
            without their partner, or whose counts or dimensions do not match the
            factors; a `chunk_size` that is not a positive integer.

    Example:
        >>> import jax.numpy as jnp, monge
        >>> x, y = jnp.array([[0.0], [2.0]]), jnp.array([[-1.0], [0.0], [1.0]])
        >>> geom = monge.geometry.LowRankCost.from_points(x, y)  # |x - y|^2, rank d + 2
        >>> geom.A.shape, geom.B.shape
        ((2, 3), (3, 3))
        >>> geom.cost_matrix()
        Array([[1., 0., 1.],
               [9., 4., 1.]], dtype=float32)
        >>> geom.apply_cost(jnp.ones(3), axis=1)  # C 1 in O((n + m) k)
        Array([ 2., 14.], dtype=float32)
    """

    A: Float[Array, "n k"] = eqx.field(converter=functools.partial(checks.as_real_array, "A"))
    B: Float[Array, "m k"] = eqx.field(converter=functools.partial(checks.as_real_array, "B"))
    x: Float[Array, "n d"] | None = eqx.field(
        default=None, converter=_optional(functools.partial(checks.as_real_array, "x")))
    y: Float[Array, "m d"] | None = eqx.field(
        default=None, converter=_optional(functools.partial(checks.as_real_array, "y")))
    cost: AbstractCost | None = eqx.field(default=None, converter=_optional(as_cost))
    tolerance: Array | None = eqx.field(default=None, converter=_optional(jnp.asarray))
    origin: Array | None = None
    chunk_size: int | None = eqx.field(default=None, static=True)

    def __check_init__(self):
        for name, z, rows in (("A", self.A, "n"), ("B", self.B, "m")):
            if z.ndim != 2 or 0 in z.shape:
                raise ValueError(
                    f"`{name}` must be a non-empty 2-D array of factors, shape ({rows}, k) "
                    f"with {rows}, k >= 1; received shape {tuple(z.shape)}."
                )
            checks.check_points(name, z)
        if self.A.shape[1] != self.B.shape[1]:
            raise ValueError(
                f"`A` and `B` must have the same number of columns k (C = A B^T); received "
                f"A of shape {tuple(self.A.shape)} and B of shape {tuple(self.B.shape)}."
            )
        if (self.x is None) != (self.y is None):
            given = "x" if self.y is None else "y"
            raise ValueError(
                f"Only `{given}` was given: pass both points `x` and `y` the factors were "
                "built from, or neither."
            )
        if self.x is not None:
            checks.check_clouds(self.x, self.y)
            for name, z, factor in (("x", self.x, "A"), ("y", self.y, "B")):
                rows = getattr(self, factor).shape[0]
                if z.shape[0] != rows:
                    raise ValueError(
                        f"`{name}` has {z.shape[0]} points but `{factor}` has {rows} rows: "
                        f"row i of `{factor}` belongs to point i of `{name}`."
                    )
        _check_chunk_size(self.chunk_size)

    @classmethod
    def from_points(cls, x, y, cost="sqeuclidean", *, rank: int | None = None,
                    tol: float | None = None, seed: int | None = None, origin=None,
                    chunk_size: int | None = None) -> LowRankCost:
        r"""Factors $A B^\top$ of the cost matrix $C_{ij} = c(x_i, y_j)$ of two clouds.

        **Squared Euclidean** (exact, rank $d + 2$, `tolerance=None`): with $o$ the mean
        of `y`,
        $$\lVert x - y\rVert^2 = \lVert x - o\rVert^2 \cdot 1 + 1\cdot\lVert y - o\rVert^2
        - 2\,\langle x - o, y - o\rangle,$$
        so $A = [\lVert x - o\rVert^2, 1, -2(x - o)]$ and $B = [1, \lVert y - o\rVert^2,
        y - o]$. Centring at $o$ keeps float32 digits for clouds far from the origin
        (as `SqEuclidean.all_pairs`). $O((n + m)d)$; traceable and differentiable.
        `rank`, `tol` and `seed` have no effect and are rejected.

        **Any other cost** (sampled, CUR or skeleton approximation): $C \approx C_{:,J}
        W C_{I,:}$ with rows $I$ and columns $J$, $|I| = |J| = k$, chosen by adaptive
        cross approximation with partial pivoting (Bebendorf 2000; deterministic: row
        0 first, then the column of the largest residual entry in the row, the row of
        the largest residual entry in that column, ...), and $W = C_{I,J}^+$ (singular
        values below $10k\,\epsilon_{\text{mach}}\sigma_{\max}$ dropped, which keeps it
        stable where $C$ has rank below $k$). Factors: $A = C_{:,J} W$ `(n, k)`,
        $B = C_{I,:}^\top$ `(m, k)`. Time $O((n + m)k(d + k) + k^3)$, memory
        $O((n + m)k)$; $C$ is never formed. The error is estimated on `ERROR_SAMPLE`
        entries drawn with `seed` (all entries if $nm$ is smaller) as the relative RMS
        error $\lVert C_s - \hat C_s\rVert / \lVert C_s\rVert$, recorded in `tolerance`.
        The pivots carry no gradient (they are piecewise constant); the factors are
        differentiable in `x` and `y`.

        `tol` defaults to `LOW_RANK_TOL` = 1e-2: the transport cost $\min_P\langle P,
        C\rangle$ (P summing to 1) moves by at most $\max_{ij}|C_{ij} - \hat C_{ij}|$, a
        few times the RMS error, so a percent or so of the typical cost: comparable to
        the sampling error of OT between clouds of a few thousand points, which is what
        a low rank is for. Plans at small $\varepsilon$ feel $|C - \hat C|/\varepsilon$:
        pass a smaller `tol` when the plan itself matters. Distances
        $\lVert x - y\rVert$ are not smooth at $x = y$ and need high ranks (in $d = 3$,
        300 points: rank 64 for 1.2%, 128 for 0.3%); the cosine cost has rank $d + 1$.

        Args:
            x: source points, shape `(n, d)`.
            y: target points, shape `(m, d)`.
            cost: a name, a `monge.costs` object or a function of one pair (as
                `PointCloud`); default ``"sqeuclidean"``.
            rank: k for a sampled factorisation, $1 \le k \le \min(n, m)$; static. `None`
                (default) tries $k = 8, 16, 32, \dots$ up to $\min(n, m,$ `MAX_RANK`$)$
                and keeps the first whose estimated error is at most `tol`: this reads
                the errors, so it needs concrete `x`, `y` (not under `jit`); a given
                rank traces (under `jit` the error is recorded, not checked).
            tol: the largest estimated relative error accepted; default `LOW_RANK_TOL`.
            seed: the seed of the entries sampled to estimate the error (NumPy's
                generator, drawn at trace time: they depend on n and m only); default 0.
            origin, chunk_size: as `LowRankCost`.

        Returns:
            A `LowRankCost` with `x`, `y`, `cost` and `tolerance` set.

        References: M. Bebendorf (2000), "Approximation of boundary element matrices",
        Numer. Math. 86 (adaptive cross approximation); P. Indyk, A. Vakilian, T.
        Wagner, D. Woodruff (2019), "Sample-optimal low-rank approximation of distance
        matrices", COLT (why sampled rows and columns suffice for distance matrices).

        Raises:
            ValueError: bad clouds (as `PointCloud`); `rank`, `tol` or `seed` with the
                squared Euclidean cost; a `rank` that is not an integer in
                $[1, \min(n, m)]$ or a `tol` that is not positive; `rank=None` on traced
                points; an estimated error above `tol` (it says the error, the rank
                and what to change).

        Example:
            >>> import jax, monge
            >>> x, y = jax.random.normal(jax.random.key(0), (2, 40, 3))
            >>> geom = monge.geometry.LowRankCost.from_points(x, y, "cosine", rank=8)
            >>> geom.shape, bool(geom.tolerance < 1e-5)  # 1 - cos has rank d + 1 = 4
            ((40, 40), True)
        """
        x, y = checks.as_real_array("x", x), checks.as_real_array("y", y)
        checks.check_clouds(x, y)
        cost = as_cost(cost)
        if isinstance(cost, SqEuclidean):
            checks.reject_unused(
                "LowRankCost.from_points(cost='sqeuclidean')",
                {"rank": rank, "tol": tol, "seed": seed},
                "have no effect: the squared Euclidean cost has exact factors of rank d + 2",
                "drop them.",
            )
            A, B = sqeuclidean_factors(x, y)
            return cls(A, B, x, y, cost, None, origin, chunk_size)
        n, m = x.shape[0], y.shape[0]
        tol = LOW_RANK_TOL if tol is None else tol
        if isinstance(tol, bool) or not (isinstance(tol, (int, float)) and 0 < tol < np.inf):
            raise ValueError(
                f"`tol` must be a positive number (a relative error, e.g. 1e-2); received "
                f"{tol!r}."
            )
        if rank is not None and (isinstance(rank, bool) or not (
                isinstance(rank, (int, np.integer)) and 1 <= rank <= min(n, m))):
            raise ValueError(
                f"`rank` must be an integer between 1 and min(n, m) = {min(n, m)}; received "
                f"{rank!r}. Pass rank=None to grow it until the error is below `tol`."
            )
        seed = 0 if seed is None else seed
        if rank is not None:
            A, B, err = cur_factors(x, y, cost, int(rank), seed)
            _check_error(err, tol, int(rank), cost, fixed=True, n=n, m=m)
            return cls(A, B, x, y, cost, err, origin, chunk_size)
        if checks.concrete(x) is None or checks.concrete(y) is None:
            raise ValueError(
                "`LowRankCost.from_points(rank=None)` chooses the rank from measured errors, "
                "which needs concrete points; under jax.jit (or vmap, grad) pass a fixed "
                "`rank`, or build the factors outside the traced function."
            )
        cap = min(n, m, MAX_RANK)
        k = min(_FIRST_RANK, cap)
        while True:
            A, B, err = cur_factors(x, y, cost, k, seed)
            if float(err) <= tol or k == cap:
                break
            k = min(2 * k, cap)
        _check_error(err, tol, k, cost, fixed=False, n=n, m=m)
        return cls(A, B, x, y, cost, err, origin, chunk_size)

    @property
    def rank(self) -> int:
        """k, the number of columns of the factors (static)."""
        return self.A.shape[1]

    @property
    def shape(self):
        return (self.A.shape[0], self.B.shape[0])

    @property
    def dtype(self):
        return jnp.result_type(self.A.dtype, self.B.dtype)

    def cost_matrix(self):
        return _dot(self.A, self.B.T)

    def precompute(self):
        return self

    def check_values(self):
        checks.check_points("A", self.A)
        checks.check_points("B", self.B)

    def scan_blocks(self, fn, axis, carry, *args):
        lines, others = (self.A, self.B) if axis == 1 else (self.B, self.A)

        def block(carry, factor_rows, *block_args):
            c = _dot(factor_rows, others.T) if axis == 1 else _dot(others, factor_rows.T)
            return fn(c, carry, *block_args)

        chunk = lines_per_block(self.chunk_size, lines.shape[0], others.shape[0])
        return scan_chunks(block, chunk, carry, lines, *args)

    def apply_cost(self, v, axis):
        r"""$A(B^\top v)$ (`axis=1`) or $B(A^\top v)$ (`axis=0`) in $O((n + m)kp)$ for
        `v` of shape `(l,)` or `(l, p)`."""
        first, second = (self.A, self.B) if axis == 1 else (self.B, self.A)
        return _dot(first, _dot(second.T, v))

    def sub_costs(self, rows, cols):
        return _dot(self.A[rows], self.B[cols].T)

    def mean_cost(self, a, b):
        r"""$(a^\top A)(B^\top b)$, in $O((n + m)k)$."""
        return _dot(a, self.A) @ _dot(self.B.T, b)

    def mean_abs_cost(self, a, b):
        closed = None if self.x is None or self.cost is None else self.cost.mean_abs(self.x, self.y, a, b)
        return super().mean_abs_cost(a, b) if closed is None else closed

    @property
    def supports(self):
        return None if self.x is None else (self.x, self.y)

    @property
    def ground_cost(self):
        return self.cost

    @property
    def frame_origin(self):
        return self.origin

    def with_supports(self, x, y):
        r"""Factors of the same cost between new points: exact for the squared Euclidean
        cost; otherwise sampled at this rank (at most $\min(n, m)$ of the new points),
        with the estimated error recorded in `tolerance` and not checked (new points are
        usually traced: entropic maps, initializers)."""
        if self.cost is None:
            raise ValueError(
                "This LowRankCost has no ground cost (`cost=None`), so it cannot factor the "
                "cost between new points; build it with LowRankCost.from_points(x, y, cost) "
                "or pass `cost=`."
            )
        x, y = checks.as_real_array("x", x), checks.as_real_array("y", y)
        if isinstance(self.cost, SqEuclidean):
            A, B, err = *sqeuclidean_factors(x, y), None
        else:
            A, B, err = cur_factors(x, y, self.cost, min(self.rank, x.shape[0], y.shape[0]), 0)
        return LowRankCost(A, B, x, y, self.cost, err, self.origin, self.chunk_size)


def _dot(p, q):
    return jnp.matmul(p, q, precision=jax.lax.Precision.HIGHEST)


def sqeuclidean_factors(x: Float[Array, "n d"], y: Float[Array, "m d"]) -> tuple[Array, Array]:
    r"""Exact factors of $\lVert x_i - y_j\rVert^2 = (A B^\top)_{ij}$, rank $d + 2$:
    $A = [\lVert x - o\rVert^2, 1, -2(x - o)]$, $B = [1, \lVert y - o\rVert^2, y - o]$
    with $o$ the mean of `y` (the cost does not depend on $o$, whose gradient is
    therefore stopped)."""
    o = jax.lax.stop_gradient(jnp.mean(y, axis=0))
    x, y = x - o, y - o
    ones_x, ones_y = jnp.ones((x.shape[0], 1), x.dtype), jnp.ones((y.shape[0], 1), y.dtype)
    A = jnp.concatenate([jnp.sum(x**2, axis=1, keepdims=True), ones_x, -2.0 * x], axis=1)
    B = jnp.concatenate([ones_y, jnp.sum(y**2, axis=1, keepdims=True), y], axis=1)
    return A, B


def cross_pivots(x, y, cost: AbstractCost, rank: int) -> tuple[Array, Array]:
    r"""Rows $I$ and columns $J$ (`rank` each) of $C = c(x_i, y_j)$ for a skeleton
    $C_{:,J} C_{I,J}^{+} C_{I,:}$, by adaptive cross approximation with partial pivoting
    (Bebendorf 2000, "Approximation of boundary element matrices", Numer. Math. 86).

    Step t takes the residual of row $i_t$ ($i_0 = 0$) under the rank-t approximation
    $U V^\top$ built so far, its largest entry (column $j_t$) as pivot $\delta$, adds the
    cross $U_{:,t} = $ residual column $j_t$, $V_{:,t} = $ residual row $/ \delta$, and moves
    to the unused row with the largest entry of $|U_{:,t}|$. A pivot below
    $100\,\epsilon_{\text{mach}}$ times the largest so far (the residual is rounding
    noise: $C$ has rank below `rank`) adds a zero cross, and the next unused row is
    taken. Each step evaluates one row and one column of $C$: time
    $O((n + m)(d + \text{rank}))$, $O(\text{rank}\,(n + m))$ memory. Not differentiated
    (the pivots are integers)."""
    x, y = jax.lax.stop_gradient((x, y))
    n, m = x.shape[0], y.shape[0]
    tiny = 100.0 * jnp.finfo(x.dtype).eps

    def step(t, state):
        U, V, rows, cols, used_rows, used_cols, top, i = state
        r = cost.all_pairs(x[i][None], y)[0] - V @ U[i]
        j = jnp.argmax(jnp.where(used_cols, -1.0, jnp.abs(r))).astype(jnp.int32)
        top = jnp.maximum(top, jnp.abs(r[j]))
        ok = jnp.abs(r[j]) > tiny * top
        c = cost.all_pairs(x, y[j][None])[:, 0] - U @ V[j]
        U = U.at[:, t].set(jnp.where(ok, c, 0.0))
        V = V.at[:, t].set(jnp.where(ok, r / jnp.where(ok, r[j], 1.0), 0.0))
        used_rows, used_cols = used_rows.at[i].set(True), used_cols.at[j].set(True)
        rows, cols = rows.at[t].set(i), cols.at[t].set(j)
        i = jnp.argmax(jnp.where(used_rows, -1.0, jnp.abs(U[:, t]))).astype(jnp.int32)
        return U, V, rows, cols, used_rows, used_cols, top, i

    index = jnp.zeros((rank,), jnp.int32)
    state = (jnp.zeros((n, rank), x.dtype), jnp.zeros((m, rank), x.dtype), index, index,
             jnp.zeros((n,), bool), jnp.zeros((m,), bool), jnp.zeros((), x.dtype), jnp.int32(0))
    state = jax.lax.fori_loop(0, rank, step, state)
    return state[2], state[3]


@eqx.filter_jit
def cur_factors(x, y, cost: AbstractCost, rank: int, seed: int) -> tuple[Array, Array, Array]:
    r"""Sampled factors $A = C_{:,J} C_{I,J}^+$, $B = C_{I,:}^\top$ of $C_{ij} = c(x_i,
    y_j)$ (pivots from `cross_pivots`) and their estimated relative error (see
    `LowRankCost.from_points`)."""
    rows, cols = cross_pivots(x, y, cost, rank)
    core = jnp.linalg.pinv(cost.all_pairs(x[rows], y[cols]))
    A = _dot(cost.all_pairs(x, y[cols]), core)
    B = cost.all_pairs(x[rows], y).T
    return A, B, jax.lax.stop_gradient(sampled_error(x, y, cost, A, B, seed))


def sampled_error(x, y, cost: AbstractCost, A, B, seed: int) -> Array:
    r"""$\lVert C_s - (AB^\top)_s\rVert / \lVert C_s\rVert$ over `ERROR_SAMPLE` entries
    $s$ drawn uniformly (with replacement) by NumPy's generator of `seed`, or all
    entries when $nm$ is no larger, with $C_s$ from the one-pair cost (not `all_pairs`).
    The entries depend on the shapes only: they are constants of a traced function."""
    n, m = x.shape[0], y.shape[0]
    if n * m <= ERROR_SAMPLE:
        i, j = (z.ravel() for z in np.indices((n, m)))
    else:
        rng = np.random.default_rng(seed)
        i, j = rng.integers(n, size=ERROR_SAMPLE), rng.integers(m, size=ERROR_SAMPLE)
    exact = jax.vmap(cost)(x[i], y[j])
    residual = jnp.linalg.norm(exact - jnp.sum(A[i] * B[j], axis=1))
    size = jnp.linalg.norm(exact)
    return jnp.where(size > 0, residual / jnp.where(size > 0, size, 1.0), residual)


def _check_error(err, tol: float, rank: int, cost: AbstractCost, *, fixed: bool, n: int, m: int) -> None:
    value = checks.concrete(err)
    if value is None or float(value) <= tol:
        return
    sample = min(n * m, ERROR_SAMPLE)
    estimate = f"an estimated relative error of {float(value):.3g} (RMS over {sample} sampled entries)"
    dense = "or use a PointCloud (online=True for large clouds), which computes the cost exactly."
    name = type(cost).__name__
    if fixed:
        raise ValueError(
            f"`LowRankCost.from_points`: the rank-{rank} factorisation of the {name} cost has "
            f"{estimate}, above `tol`={tol:g}. Pass a larger `rank` (at most min(n, m) = "
            f"{min(n, m)}), rank=None to grow it until the error is below `tol`, a larger "
            f"`tol`, {dense}"
        )
    raise ValueError(
        f"`LowRankCost.from_points`: no factorisation of the {name} cost up to rank {rank} "
        f"(the largest tried, min(n, m, MAX_RANK={MAX_RANK})) is within `tol`={tol:g}: rank "
        f"{rank} has {estimate}. Pass a larger `tol`, {dense}"
    )
