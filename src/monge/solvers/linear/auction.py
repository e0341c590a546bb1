r"""Bertsekas' auction algorithm with $\varepsilon$-scaling for the assignment problem

$$\min_{\sigma \in S_n} \sum_i C_{i\sigma(i)}
= \max_{f_i + g_j \le C_{ij}} \sum_i f_i + \sum_j g_j,$$

in pure JAX (runs under `jit` and `vmap`, on any device, in float32 or float64).

Persons (rows) bid for objects (columns). In the min-cost form used here an object's
price is $-g_j$: person $i$ sees the reduced costs $w_{ij} = C_{ij} - g_j$, takes its
best object $j_1 = \arg\min_j w_{ij}$ and bids it down to $g_{j_1} - (w_2 - w_1) -
\varepsilon$, where $w_1 \le w_2$ are its best and second-best reduced costs (equal
on ties). Each object goes to its lowest bid (the highest price; the smallest index
among equal bids) and its previous owner becomes unassigned. Every assigned pair then
satisfies $\varepsilon$-complementary slackness, $w_{i\sigma(i)} \le \min_j w_{ij} +
\varepsilon$. This is the Jacobi (synchronous parallel) variant of Bertsekas &
Castañon (1989): all unassigned persons bid in the same round, one $O(n^2)$ pass (the
best and second-best of each bidding row by two reductions, the conflicting bids for
an object resolved by a scatter-min). Late in a phase only a few persons bid, so their
rows are gathered first (into a buffer of 4, 16, 64, ... rows): such a round costs
$O(kn)$ for $k$ bidders. Under `vmap` the problems of a batch are solved one after
the other (`lax.map`; on accelerators small problems are batched, see
`monge.solvers.batching`): batched, every problem would run the slowest one's rounds
and every buffer size would be computed each round. On CPU, one by one was 8x faster
for 256 problems of n = 32 and 40x for 64 problems of n = 128 (float32).

$\varepsilon$-scaling (Bertsekas, 1988): the costs are first shifted by their row
minima (which changes no assignment's rank) and divided by their largest entry, so
that they lie in $[0, 1]$ and every tolerance is relative. $\varepsilon$ starts at
`epsilon_start` ($0.1$) and is divided by `epsilon_factor` ($5$) after each phase (a
phase ends when everybody is assigned); the prices carry over, and only the persons
whose pair violates the new, smaller $\varepsilon$-slackness are unassigned.

Certificate. With the prices $g$ and the $c$-transform $f_i = \min_j C_{ij} - g_j$ the
pair $(f, g)$ is dual feasible, so by weak duality

$$\sum_i C_{i\sigma(i)} - \min_{\tau} \sum_i C_{i\tau(i)} \le
\sum_i C_{i\sigma(i)} - \sum_i f_i - \sum_j g_j = \sum_i \Big(w_{i\sigma(i)} -
\min_j w_{ij}\Big) \le n \varepsilon.$$

The gap is computed as a sum of non-negative slacks (no cancellation), and `error` is
the gap of the plan $P = \frac1n \sigma$, $\frac1n \sum_i (\ldots)$, divided by the
mean cost $\frac1{n^2} \sum_{ij} |C_{ij}|$: the `error` of `Exact` for uniform
weights. The algorithm stops after the first phase whose `error` is at most
`threshold`, once $\varepsilon$ reaches its floor (4 units in the last place of the
largest price: below it the bids would round away), or when the budget of bidding
rounds is spent. Precision: the floor is $\sim 10^{-15}$ of the cost range in float64,
so the gap can be driven to $10^{-12}$ of the mean cost and below. In float32 it is
$5 \times 10^{-7}$ of the range, and float32 certifies a gap of $10^{-6}$ to
$10^{-5}$ of the mean cost (more for costs whose range is much larger than their
mean). An assignment is optimal (for the costs as rounded to the dtype) as soon as
its total gap $n \times$ `error` $\times$ mean cost is below the smallest non-zero
difference between the total costs of two assignments, e.g. below 1 for integer
costs.

References: D. P. Bertsekas (1988), "The auction algorithm: a distributed relaxation
method for the assignment problem", Annals of Operations Research 14; D. P. Bertsekas
& D. A. Castañon (1989), "Parallel synchronous and asynchronous implementations of the
auction algorithm", Parallel Computing 17.

Example:
    >>> import jax.numpy as jnp
    >>> from monge.solvers.linear.auction import auction
    >>> C = jnp.array([[4.0, 1.0, 3.0], [2.0, 0.0, 5.0], [3.0, 2.0, 2.0]])
    >>> out = auction(C, threshold=1e-6, max_iterations=1000)
    >>> out.cols.tolist(), float(C[jnp.arange(3), out.cols].sum()), int(out.status)
    ([1, 0, 2], 5.0, 0)
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from monge.solution import Status
from monge.solvers import driver
from monge.solvers.batching import one_by_one

__all__ = ["AuctionResult", "auction"]

#: Units in the last place of the largest price below which epsilon is not lowered.
_ULPS = 4


class AuctionResult(NamedTuple):
    """What `auction` returns.

    Attributes:
        cols: the assignment, person $i$ gets object `cols[i]` (a permutation).
        f: row potentials $f_i = \\min_j C_{ij} - g_j$.
        g: column potentials (minus the prices); $f_i + g_j \\le C_{ij}$.
        n_iters: bidding rounds run.
        error: the certified gap $\\sum_i C_{i\\sigma(i)} - \\sum_i f_i - \\sum_j g_j$
            divided by $\\sum_{ij}|C_{ij}| / n$.
        status: `Status.CONVERGED` when `error <= threshold`, else
            `Status.MAX_ITERATIONS` (budget spent or $\\varepsilon$ at its floor) or
            `Status.DIVERGED` (non-finite values).
    """

    cols: Int[Array, " n"]
    f: Float[Array, " n"]
    g: Float[Array, " n"]
    n_iters: Int[Array, ""]
    error: Float[Array, ""]
    status: Int[Array, ""]


def auction(
    C: Float[Array, "n n"],
    threshold,
    max_iterations: int,
    *,
    epsilon_start: float = 0.1,
    epsilon_factor: float = 5.0,
    init=None,
    progress: bool = False,
) -> AuctionResult:
    r"""Min-cost assignment of the square matrix `C` by the $\varepsilon$-scaled auction.

    The $\varepsilon$-scaling phases run on the shared driver (`monge.solvers.driver`):
    one block is one phase (its bidding rounds are the block's iterations), its error
    the certified relative gap, and a phase whose $\varepsilon$ is at its floor stalls
    the loop.

    Args:
        C: the costs, shape `(n, n)`, float32 or float64 (integers become floats).
        threshold: stop once the certified relative gap (see `AuctionResult.error`) is
            at most this. Traced.
        max_iterations: the budget of bidding rounds, over all phases. Static.
        epsilon_start: the first $\varepsilon$, relative to the range of the
            row-reduced costs. Static.
        epsilon_factor: $\varepsilon$ is divided by this after each phase. Static.
        init: a warm start: starting column potentials $g$ (minus the prices), shape
            `(n,)`, e.g. `AuctionResult.g` of a previous run (no gradient flows into
            it). The first phase then starts at the $\varepsilon$ whose single phase
            would certify `threshold` ($\varepsilon = $ `threshold` $\times$ mean
            cost, relative to the cost range; at least its floor, at most
            `epsilon_start`), not at `epsilon_start`: near-optimal prices need no
            coarse phases. The answer meets the same certificate as a cold start.
        progress: print one line per phase (rounds so far, relative gap). Static.

    Returns:
        An `AuctionResult`. When the budget runs out mid-phase, the persons still
        unassigned get the free objects in index order: `cols` is a permutation in
        every case, and `error` certifies whatever it is worth.

    Raises:
        ValueError: `C` is not a square matrix; `init` is not a vector of `n` prices.
    """
    C = jnp.asarray(C)
    if C.ndim != 2 or C.shape[0] != C.shape[1]:
        raise ValueError(
            f"`C` must be a square (n, n) cost matrix; received shape {C.shape}. The "
            "auction solves assignment problems, with as many rows as columns."
        )
    if not jnp.issubdtype(C.dtype, jnp.inexact):
        C = C.astype(jnp.result_type(float))
    n, dtype = C.shape[0], C.dtype
    if init is not None:
        init = jnp.asarray(init)
        if init.shape != (n,):
            raise ValueError(
                f"`init` must be the column potentials g of shape ({n},), one per column "
                f"of `C` (e.g. a previous run's `g`); received shape {tuple(init.shape)}."
            )
        init = jax.lax.stop_gradient(init.astype(dtype))
    if n == 1:
        status = jnp.where(jnp.isfinite(C[0, 0]), Status.CONVERGED, Status.DIVERGED)
        zero = jnp.zeros((), dtype)
        return AuctionResult(jnp.zeros(1, int), C[0], jnp.zeros(1, dtype), jnp.asarray(0),
                             zero, status.astype(jnp.int32))
    solver = _Auction(threshold, max_iterations, progress=progress, epsilon_start=epsilon_start,
                      epsilon_factor=epsilon_factor,
                      phases=_phases(epsilon_start, epsilon_factor, max_iterations, dtype))
    # vmapped: problem by problem (a batched while loop runs the slowest one's rounds
    # everywhere, and every bidder-buffer size of `lax.switch` each round)
    return one_by_one(lambda args: args[0].solve(*args[1:]), (solver, C, init), size=n * n)


def _phases(epsilon_start: float, epsilon_factor: float, max_iterations: int, dtype) -> int:
    """Phases at most: $\varepsilon$ falls from `epsilon_start` to its floor (at least
    `_ULPS` machine epsilons) by `epsilon_factor` per phase, and the phase at the floor
    is the last; every phase runs at least one round."""
    eps = jnp.finfo(dtype).eps
    if epsilon_factor > 1 and epsilon_start > 0:
        lowerings = math.ceil(max(0.0, math.log(epsilon_start / (_ULPS * eps))) / math.log(epsilon_factor))
        return min(max_iterations, lowerings + 2)
    return max_iterations


class _Auction(driver.AbstractIterativeSolver):
    """The auction's options, as the driver runs them: one block is one
    $\varepsilon$-scaling phase (`step`), its `n_run` the phase's bidding rounds."""

    threshold: Array = eqx.field(converter=jnp.asarray)
    max_iterations: int = eqx.field(static=True)  # bidding rounds, over all phases
    inner_iterations: int = eqx.field(default=1, static=True)
    progress: bool = eqx.field(default=False, static=True)
    epsilon_start: float = eqx.field(default=0.1, static=True)
    epsilon_factor: float = eqx.field(default=5.0, static=True)
    phases: int = eqx.field(default=1, static=True)

    @property
    def name(self) -> str:
        return "auction"

    @property
    def error_label(self) -> str:
        return "relative gap"

    @property
    def n_blocks(self) -> int:
        return self.phases  # the budget of rounds is enforced in `step`

    def solve(self, C, init) -> AuctionResult:
        """`auction` on a validated float matrix with n >= 2 (`init`: prices or None)."""
        data = _data(C)
        D, shift, scale, unit = data
        state = self.init(data, init)
        state, trace = driver.fixed_point(self, data, state)
        owner, g, _, rounds, _ = state
        owner = _complete(owner)
        slack, f = _slacks(D, owner, g)
        # the gap of the completed assignment (when the budget ran out, some were not)
        error = jnp.sum(slack) / unit
        error = jnp.where(jnp.isnan(error), jnp.inf, error)
        _, status = driver.status_of(trace._replace(error=error), jnp.asarray(self.threshold, D.dtype))
        return AuctionResult(_assigned(owner), shift + scale * f, scale * g, rounds, error, status)

    def init(self, data, init):
        """`(owner, g, eps, rounds, slack)`: nobody assigned, prices zero (or `init`,
        in units of the scaled costs), $\varepsilon$ at `epsilon_start` (warm: the
        one-phase $\varepsilon$, see `auction`)."""
        D, _, scale, unit = data
        n, dtype = D.shape[0], D.dtype
        eps = jnp.asarray(self.epsilon_start, dtype)
        if init is None:
            g = jnp.zeros(n, dtype)
        else:
            g = init / scale
            one_phase = jnp.asarray(self.threshold, dtype) * unit / n
            eps = jnp.clip(one_phase, _floor(g), eps)
        return (jnp.full(n, n), g, eps, jnp.asarray(0), jnp.zeros(n, dtype))

    def step(self, data, state, k):
        """One phase: (after the first) lower $\varepsilon$ and unassign the pairs that
        violate its slackness, then bid until everybody is assigned."""
        D, _, _, unit = data
        n = D.shape[0]
        owner, g, eps, rounds, slack = state
        # the next phase keeps the pairs that satisfy the smaller epsilon's slackness
        lower = k > 0
        eps = jnp.where(lower, jnp.maximum(eps / self.epsilon_factor, _floor(g)), eps)
        owner = jnp.where(~lower | (slack[owner % n] <= eps), owner, n)
        sizes = tuple(4**j for j in range(1, 16) if 2 * 4**j <= n) + (n,)
        rounds_of = [functools.partial(_bid, D, size=size) for size in sizes]

        def bid(carry):
            owner, g, rounds = carry
            free = _assigned(owner) == n
            branch = jnp.searchsorted(jnp.asarray(sizes), jnp.sum(free))
            owner, g = jax.lax.switch(branch, rounds_of, owner, free, g, eps)
            return owner, g, rounds + 1

        def bidding(carry):
            owner, g, rounds = carry
            return jnp.any(owner == n) & (rounds < self.max_iterations) & jnp.all(jnp.isfinite(g))

        start = rounds
        owner, g, rounds = jax.lax.while_loop(bidding, bid, (owner, g, rounds))
        slack, _ = _slacks(D, owner, g)
        spent = rounds >= self.max_iterations
        block = driver.Block(error=jnp.sum(slack) / unit, n_run=rounds - start,
                             stalled=(eps <= _floor(g)) | spent)
        return (owner, g, eps, rounds, slack), block


def _data(C):
    """`(D, shift, scale, unit)`: the costs shifted by their row minima and divided by
    their range (in [0, 1]; the same optimal assignments as C), and n times the mean
    cost in units of D."""
    n = C.shape[0]
    shift = jnp.min(C, axis=1)
    scale = jnp.max(C - shift[:, None])
    scale = jnp.where(scale > 0, scale, 1.0)
    D = (C - shift[:, None]) / scale
    unit = jnp.sum(jnp.abs(C)) / (n * scale)
    unit = jnp.where(unit > 0, unit, 1.0)
    return D, shift, scale, unit


def _floor(g):
    """The smallest $\varepsilon$: a bid must lower a price by a few units in the last
    place, or it rounds away."""
    return _ULPS * jnp.finfo(g.dtype).eps * jnp.maximum(1.0, jnp.max(jnp.abs(g)))


def _assigned(owner: Int[Array, " n"]) -> Int[Array, " n"]:
    """Person -> object (n where unassigned), from object -> person (n where free)."""
    n = owner.shape[0]
    return jnp.full(n, n).at[owner].set(jnp.arange(n), mode="drop")


def _bid(D, owner, free, g, eps, *, size: int):
    r"""One Jacobi bidding round of the first `size` unassigned persons (all of them
    when `size` is at least their number): returns the new `(owner, g)`.

    Person $i$ bids for $j_1 = \arg\min_j w_{ij}$, $w_{ij} = D_{ij} - g_j$, the offer
    $g_{j_1} - (w_2 - w_1) - \varepsilon$ (ties: $w_2 = w_1$); each object takes the
    lowest offer (the smallest index among equal ones) and drops its owner."""
    n = D.shape[0]
    cols = jnp.arange(n)
    if size == n:
        who, active, W = cols, free, D - g[None, :]
    else:  # gather the bidders' rows: O(size n) instead of O(n^2)
        who = jnp.nonzero(free, size=size, fill_value=n)[0]
        active = who < n
        W = D[jnp.minimum(who, n - 1)] - g[None, :]
    w1 = jnp.min(W, axis=1)
    j1 = jnp.min(jnp.where(W == w1[:, None], cols[None, :], n), axis=1)
    w2 = jnp.min(jnp.where(cols[None, :] == j1[:, None], jnp.inf, W), axis=1)
    offer = g[j1] - ((w2 - w1) + eps)
    g = g.at[jnp.where(active, j1, n)].min(offer, mode="drop")
    won = active & (offer == g[j1])
    winner = jnp.full(n, n).at[jnp.where(won, j1, n)].min(who, mode="drop")
    return jnp.where(winner < n, winner, owner), g


def _slacks(D, owner, g):
    r"""$(w_{i\sigma(i)} - \min_j w_{ij})_i$ ($\infty$ for the unassigned) and
    $(\min_j w_{ij})_i$, with $w_{ij} = D_{ij} - g_j$."""
    n = D.shape[0]
    cols = _assigned(owner)
    W = D - g[None, :]
    f = jnp.min(W, axis=1)
    mine = jnp.take_along_axis(W, jnp.minimum(cols, n - 1)[:, None], axis=1)[:, 0]
    return jnp.where(cols < n, mine - f, jnp.inf), f


def _complete(owner: Int[Array, " n"]) -> Int[Array, " n"]:
    """Give the unassigned persons the free objects, both in index order."""
    n = owner.shape[0]
    taken = jnp.zeros(n, bool).at[owner].set(True, mode="drop")
    free_objects = jnp.argsort(owner < n, stable=True)
    free_persons = jnp.argsort(taken, stable=True)
    slot = jnp.where(jnp.arange(n) < jnp.sum(owner == n), free_objects, n)
    return owner.at[slot].set(free_persons, mode="drop")
