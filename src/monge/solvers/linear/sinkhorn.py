r"""Sinkhorn's algorithm in the log domain, balanced and unbalanced.

Alternating dual updates (Cuturi, 2013; log domain: Schmitzer, 2019; unbalanced:
Chizat et al., 2018; Séjourné et al., 2019)

$$f_i \leftarrow -\tau_a\,\varepsilon \log \sum_j b_j e^{(g_j - C_{ij})/\varepsilon},
\qquad g_j \leftarrow -\tau_b\,\varepsilon \log \sum_i a_i e^{(f_i - C_{ij})/\varepsilon}.$$

After each block of `inner_iterations` updates the solver measures the L1 optimality
error $\|a\,e^{-f/\rho_a} - P\mathbf 1\|_1$ — the marginal error
$\|P\mathbf 1 - a\|_1$ when balanced (the column marginal is exact after a $g$ update)
— and stops when it is below `threshold`. The measurement reuses the log-sum-exp of
the next $f$ update, so it costs nothing. Online (`_Steps.fused_block`) the same error
is read on the other side when that comes first: after a plain $f$ update the rows are
exact and the solver may stop on $\|b\,e^{-g/\rho_b} - P^\top\mathbf 1\|_1$.
"""

from __future__ import annotations

import functools

import equinox as eqx
import jax
import jax.numpy as jnp

from monge import checks
from jaxtyping import Array

from monge.geometry import ONE_PASS_FLOOR, AbstractGeometry, as_float_array, flushed_exp, safe_log
from monge.problems import LinearProblem, default_epsilon
from monge.solution import Solution, Status, fix_gauge
from monge.solvers import driver
from monge.solvers.linear import initializers
from monge.solvers.batching import SEQUENTIAL_ABOVE, one_by_one
from monge.solvers.adjoint import AbstractAdjoint, ImplicitAdjoint

__all__ = ["Sinkhorn", "SEQUENTIAL_ABOVE", "ANDERSON_MEMORY"]

#: Default factor of `anneal_decay` (epsilon per block while annealing).
ANNEAL_DECAY = 0.5


def _optional_float(z):
    return None if z is None else as_float_array(z)


#: Blocks remembered by `acceleration="anderson"`.
ANDERSON_MEMORY = 5

#: Accelerations back off when a block's error exceeds GROWTH x the previous block's
#: (a margin, so that the tiny fluctuations of a plateau do not count as growth).
GROWTH = 1.01


class Sinkhorn(driver.AbstractIterativeSolver):
    r"""Log-domain Sinkhorn solver for `LinearProblem`s.

    Args:
        threshold: stop when the L1 marginal (optimality) error is below this; traced.
        max_iterations: at most this many iterations (rounded up to a multiple of
            `inner_iterations`); static.
        inner_iterations: iterations per block: the unit of annealing, relaxation
            and Anderson decisions, of kernel-mode plan rebuilding and of `errors`.
            Within a block at the target epsilon with plain updates the error is
            checked after every iteration (it is free) and the solver stops as soon as
            it is below `threshold`; `n_iters` counts the iterations run. Static.
        adjoint: `ImplicitAdjoint()` (default) or `UnrolledAdjoint()`.
        progress: print the iteration count and error to stderr after every check
            (through `jax.debug.callback`); static.
        mode: ``"log"`` runs every update as a log-sum-exp (two passes per line:
            maximum, then sum). ``"kernel"`` (alias ``"auto"``, the default) runs the
            same iterates with cheaper arithmetic: on a stored cost matrix, as
            matrix-vector products on the plan of the previous block
            (`_Steps.kernel_block`); online, as one fused pass over the cost per
            iteration, one-pass log-sum-exps shifted by the previous potentials
            (`_Steps.fused_block`). A block whose values are not finite (float32
            under/overflow) is redone in the log domain. With `UnrolledAdjoint`
            every block runs in the log domain: reverse mode differentiates a failed
            kernel block too, and its overflows made every gradient NaN. Static.
        anneal: epsilon scaling (Kosowsky & Yuille, 1994; Schmitzer, 2019): one
            block at each of $\varepsilon\,\text{decay}^{-K}, \dots,
            \varepsilon\,\text{decay}^{-1}$, then the target $\varepsilon$, with $K$
            the largest integer that keeps the start at or below the default epsilon
            $0.05\,\bar c$ (`_anneal_levels`); convergence is only checked at the
            target. It changes nothing for epsilon above half the default (with the
            default decay), and saves iterations below it. The fixed point, hence the
            implicit gradient, is the same. Static; `errors` records the error at the
            epsilon of each block.
        anneal_decay: factor in (0, 1) per block of `inner_iterations`; traced. None
            (default) is `ANNEAL_DECAY` = 0.5: halving epsilon per block keeps each
            block's start within a few iterations of its fixed point. Giving it with
            `anneal=False` or `initializer="sorting"` (which skips annealing) is an
            error, since it would be ignored.
        initializer: the start $f_0$ (Thornton & Cuturi, 2022; see
            `monge.solvers.linear.initializers`); $g_0$ comes from one update, and the fixed
            point, hence the implicit gradient, is the same for every start.
            ``"auto"`` (default): ``"sorting"`` where it applies, else ``"zeros"``.
            ``"sorting"``: the exact unregularised dual of 1-D OT from the monotone
            coupling (point clouds with d = 1 and cost 'sqeuclidean', 'euclidean' or
            PNorm), in $O((n + m)\log(n + m))$; annealing is skipped after it.
            ``"gaussian"``: the dual potential of the Brenier map between Gaussian fits
            of the two clouds (point clouds, squared Euclidean cost), for clouds
            roughly an affine image of each other. ``"subsample"``: the c-transform of
            the potential of a solve on `initializers.SUBSAMPLE` evenly strided points
            of each cloud (any point cloud and cost). The last two are opt-in: with
            annealing and relaxation on they rarely save time
            (`benchmarks/bench_init.py`). Static.
        acceleration: ``"relaxation"`` (default): adaptive successive over-relaxation
            (`_next_omega`): once two blocks at the target epsilon have shown the rate
            of plain Sinkhorn, updates are extrapolated by the optimal factor for that
            rate; it backs off (one plain block, then a new measurement) if the error
            grows by more than `GROWTH`.
            ``"anderson"``: Anderson mixing of the last `ANDERSON_MEMORY` blocks at the
            target epsilon (`_anderson`). ``None``: plain Sinkhorn. All keep the fixed
            point, hence the implicit gradient. Static.

    Example:
        >>> import jax.numpy as jnp, monge
        >>> from monge.geometry import PointCloud
        >>> x, y = jnp.zeros((3, 2)), jnp.ones((4, 2))
        >>> problem = monge.LinearProblem(PointCloud(x, y), epsilon=0.1)
        >>> sol = monge.Sinkhorn(threshold=1e-4)(problem)
        >>> bool(sol.converged), round(float(sol.cost), 4)
        (True, 2.0)
    """

    threshold: float = eqx.field(default=1e-3, converter=as_float_array)
    max_iterations: int = eqx.field(default=2000, static=True)
    inner_iterations: int = eqx.field(default=10, static=True)
    adjoint: AbstractAdjoint = eqx.field(default_factory=ImplicitAdjoint)
    progress: bool = eqx.field(default=False, static=True)
    mode: str = eqx.field(default="auto", static=True)
    anneal: bool = eqx.field(default=True, static=True)
    anneal_decay: float | None = eqx.field(default=None, converter=_optional_float)
    initializer: str = eqx.field(default="auto", static=True)
    acceleration: str | None = eqx.field(default="relaxation", static=True)

    def __post_init__(self):
        # `anneal_decay` is None unless given: reject it where it would be ignored,
        # then resolve it (the loop reads a number)
        if self.anneal_decay is not None and (not self.anneal or self.initializer == "sorting"):
            why = ("with anneal=False" if not self.anneal else
                   "with initializer='sorting', which starts at the exact potential and "
                   "skips annealing")
            raise ValueError(
                f"`anneal_decay={checks.concrete(self.anneal_decay)!r}` has no effect {why}; "
                "drop it, or use anneal=True (and another initializer) to anneal."
            )
        if self.anneal_decay is None:
            self.anneal_decay = as_float_array(ANNEAL_DECAY)

    def __check_init__(self):
        initializers.check_name(self.initializer)
        if self.acceleration not in ("relaxation", "anderson", None):
            raise ValueError(
                "`acceleration` must be 'relaxation', 'anderson' or None; received "
                f"{self.acceleration!r}."
            )
        if self.mode not in ("auto", "log", "kernel"):
            raise ValueError(
                f"`mode` must be 'auto', 'log' or 'kernel'; received {self.mode!r}."
            )
        for name in ("max_iterations", "inner_iterations"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"`{name}` must be a positive integer; received {value!r}.")
        checks.check_positive("threshold", self.threshold, "Typical values: 1e-2 to 1e-6.")
        decay = checks.concrete(self.anneal_decay)
        if decay is not None and not 0 < decay < 1:
            raise ValueError(f"`anneal_decay` must lie in (0, 1); received {decay!r}.")
        if not isinstance(self.adjoint, AbstractAdjoint):
            raise ValueError(
                "`adjoint` must be monge.ImplicitAdjoint() or monge.UnrolledAdjoint(); "
                f"received {type(self.adjoint).__name__}."
            )

    @property
    def error_label(self) -> tuple[str, str]:
        return ("marginal error", "optimality residual (tau < 1)")

    def __call__(self, problem: LinearProblem, *, init=None, throw: bool = False) -> Solution:
        """Solve `problem`.

        Args:
            problem: a `LinearProblem`.
            init: a warm start: a previous `Solution` (of a problem of the same shape,
                e.g. the last iterate of an outer loop) or potentials `(f, g)` of
                shapes `(n,)`, `(m,)`. The solve starts from them instead of the
                initializer, without annealing; the fixed point, hence the result to
                the threshold and the implicit gradient, is the same (no gradient flows
                into `init`).
            throw: raise an `EquinoxRuntimeError` carrying the status message instead of
                returning a run that did not converge.
        """
        if not isinstance(problem, LinearProblem):
            raise ValueError(
                f"`Sinkhorn` solves a monge.LinearProblem; received {type(problem).__name__}."
            )
        initializers.check_applicable(self.initializer, problem.geom)
        return _solve(self, problem, driver.warm_start(init, problem.geom.shape), throw)

    # -- iterations (run by the shared driver) ----------------------------------------
    def uses_kernel(self, geom) -> bool:
        """Whether blocks run in kernel (scaling) mode on this geometry (static)."""
        return self.mode in ("auto", "kernel")

    def iterate(self, theta, unrolled: bool, init=None):
        """Run the iterations on `theta = (geom, a, b, eps, tau_a, tau_b)` from the warm
        start `init` (`(f, g)` or `None`). Returns `(f, g, trace)` (`driver.Trace`).

        Under `jax.vmap` a `while_loop` runs every problem of the batch until the
        slowest has converged, and a batched `lax.cond` (the kernel mode's fallback)
        evaluates both branches. So vmapped problems are solved one after the other
        (`lax.map`, through a `jax.custom_batching.custom_vmap` rule), each stopping at
        its own iteration count with the cheap kernel arithmetic; on accelerators,
        problems below `SEQUENTIAL_ABOVE` cost entries are batched instead. Reverse
        mode through the iterations (`UnrolledAdjoint`) always batches.
        """
        if unrolled:
            return self._iterate(theta, True, init)
        n, m = theta[0].shape
        return one_by_one(lambda st: st[0]._iterate(st[1], False, st[2]), (self, theta, init), size=n * m)

    def _iterate(self, theta, unrolled: bool, init):
        geom, a, b, eps, tau_a, tau_b = theta
        data = (geom, geom.precompute(), a, b, eps, tau_a, tau_b, unrolled)
        state = self.init(data, init)
        state, trace = driver.fixed_point(self, data, state, unrolled=unrolled)
        f, g, _ = state[0]
        return f, g, trace

    def _schedule(self, data, levels):
        """`(at_target(k), epsilon_at(k))` for block index k."""
        eps = data[4]

        def at_target(k):  # whether block k runs at eps
            return k >= levels

        def epsilon_at(k):  # eps / decay**left, left = the levels left: exactly eps at the target
            left = jnp.maximum(levels - k, 0)
            return jnp.where(left > 0, eps * self.anneal_decay.astype(eps.dtype) ** -left, eps)

        return at_target, epsilon_at

    def init(self, data, init):
        """The first state: potentials `(f, g, f_hat)`, the relaxation factor, the
        Anderson history, the previous block's error and the number of annealing
        levels. A warm start `init = (f, g)` replaces the initializer and annealing."""
        geom, pre, a, b, eps, tau_a, tau_b, unrolled = data
        n, m = pre.shape
        dtype = a.dtype
        kernel = self.uses_kernel(pre) and not unrolled
        stored = pre.materialized
        resolved = initializers.resolve(self.initializer, geom)
        if init is None and self.anneal and resolved not in initializers.EXACT:
            levels = _anneal_levels(default_epsilon(geom, a, b), eps, self.anneal_decay)
        else:
            levels = jnp.asarray(0, jnp.int32)
        start = self._schedule(data, levels)[1](0)
        steps = _Steps(pre, a, b, start, tau_a, tau_b, self.inner_iterations, jnp.ones((), dtype))
        if init is not None:  # a warm start: the fixed point, hence the gradient, is the same
            f0, g0 = (jax.lax.stop_gradient(z.astype(dtype)) for z in init)
            potentials = (f0, g0, steps.f_hat(g0))
        else:
            f0 = initializers.initial_potential(self.initializer, geom, a, b, start)
            if f0 is None and stored:  # the stored-matrix kernel block absorbs a rough start
                f0, g0 = jnp.zeros((n,), dtype), jnp.zeros((m,), dtype)
            elif f0 is None and kernel:  # online: f0 = f_hat(0), g0 = g_hat(f0) in one pass
                f0, g0 = steps.fused_start()
            else:
                if f0 is None:  # one log-domain f update from g = 0
                    f0 = tau_a * steps.f_hat(jnp.zeros((m,), dtype))
                else:  # the start only changes the path, never the fixed point or its gradient
                    f0 = jax.lax.stop_gradient(f0.astype(dtype))
                # online, the fused block's one-pass sums need g consistent with f from the start
                g0 = -tau_b * start * steps.geom.lse(f0, start, 0, w=a)
            if kernel and not stored:  # the fused block recomputes f_hat(g0), shifted by this
                potentials = (f0, g0, f0 / tau_a)
            else:
                potentials = (f0, g0, steps.f_hat(g0))
        memory = ANDERSON_MEMORY if self.acceleration == "anderson" else 0
        history = (jnp.zeros((memory, m), dtype), jnp.zeros((memory, m), dtype), jnp.asarray(0))
        return (potentials, jnp.ones((), dtype), history, -jnp.ones((), dtype), levels)

    def step(self, data, state, k):
        """One block of `inner_iterations` updates (annealed, relaxed or mixed)."""
        _, pre, a, b, eps, tau_a, tau_b, unrolled = data
        potentials, omega, history, prev, levels = state
        at_target, epsilon_at = self._schedule(data, levels)
        # Unrolled, a kernel block that fails (and is redone in the log domain) is still
        # differentiated with a zero cotangent: 0 * inf = NaN poisons every gradient.
        kernel, stored = self.uses_kernel(pre) and not unrolled, pre.materialized
        plain = at_target(k) & (omega <= 1.0)
        stop_below = jnp.where(plain, self.threshold, -1.0)  # early exit within the block
        steps = _Steps(pre, a, b, epsilon_at(k), tau_a, tau_b, self.inner_iterations,
                       jnp.maximum(omega, 1.0), stop_below)

        def measured(out):
            return *out, steps.error(out[0])

        if kernel:  # fast arithmetic; a block that is not finite is redone exactly
            out = measured(steps.kernel_block(potentials)) if stored else steps.fused_block(potentials)
            ok = jnp.all(jnp.array([jnp.all(jnp.isfinite(z)) for z in out[0]]))
            new, n_run, err = jax.lax.cond(ok, lambda: out, lambda: measured(steps.log_block(potentials)))
        else:
            new, n_run, err = measured(steps.log_block(potentials))
        if self.acceleration == "relaxation":
            omega = _next_omega(omega, err, prev, k, self.inner_iterations, at_target=at_target(k - 1))
        elif self.acceleration == "anderson":
            go_on = (err > self.threshold) & (k + 1 < self.n_blocks)
            new, history = _anderson(steps, potentials, new, history, go_on, at_target(k), err <= GROWTH * prev)
        block = driver.Block(error=err, n_run=n_run, final=at_target(k),
                             label=jnp.where((tau_a == 1) & (tau_b == 1), 0, 1))
        return (new, omega, history, err, levels), block


class _Steps(eqx.Module):
    r"""One block of Sinkhorn updates, in the log domain or in kernel (scaling) mode.

    A block maps `(f, g, f_hat)` — `f_hat` the untempered f update for `g` — to the
    same triple after `inner` iterations (each: f update, g update, new `f_hat`). All
    modes compute the same iterates; only the arithmetic differs.

    Updates are over-relaxed by `omega` (1: plain Sinkhorn): $f \leftarrow f +
    \omega(\tau_a \hat f - f)$, likewise $g$, except the block's last $g$ update,
    which is plain so that the column marginal is exact and `error` measures the
    whole optimality error.
    """

    geom: AbstractGeometry
    a: Array
    b: Array
    eps: Array
    tau_a: Array
    tau_b: Array
    inner: int = eqx.field(static=True)
    omega: Array = eqx.field(default=1.0, converter=as_float_array)
    stop_below: Array = eqx.field(default=-1.0, converter=as_float_array)

    def relaxed(self, old, target, k, last_plain: bool = False):
        """`old + omega (target - old)`, plain on the block's last step if asked."""
        omega = jnp.where(k == self.inner - 1, 1.0, self.omega) if last_plain else self.omega
        return old + omega * (target - old)

    def scan(self, one, potentials):
        """Run `one(potentials, k)` for k < inner; returns `(potentials, n_run)`.

        The optimality error is free after each iteration (`error` reuses the last
        update), so once it is at most `stop_below` the remaining iterations of the
        block are skipped (`lax.cond`). The solver sets `stop_below` to the threshold
        only where the per-iteration error is the solver's error (target epsilon,
        plain updates), else to -1.
        """

        def step(carry, k):
            potentials, done, n_run = carry

            def run():
                new, _ = one(potentials, k)
                return new, self.error(new) <= self.stop_below, n_run + 1

            return jax.lax.cond(done, lambda: carry, run), None

        start = (potentials, jnp.asarray(False), jnp.asarray(0))
        potentials, _, n_run = jax.lax.scan(step, start, jnp.arange(self.inner))[0]
        return potentials, n_run

    def f_hat(self, g):
        return -self.eps * self.geom.lse(g, self.eps, 1, w=self.b)

    def log_block(self, potentials):
        def one(carry, k):
            f, g, f_hat = carry
            f = self.relaxed(f, self.tau_a * f_hat, k)
            g_hat = -self.eps * self.geom.lse(f, self.eps, 0, w=self.a)
            g = self.relaxed(g, self.tau_b * g_hat, k, last_plain=True)
            return (f, g, self.f_hat(g)), None

        return self.scan(one, potentials)

    def kernel_block(self, potentials):
        r"""Scaling iterations on the plan of the current potentials.

        With $K^0 = e^{(f^0 \oplus g^0 - C)/\varepsilon}$ (the plan of the current
        potentials without the weights) and $f = f^0 + \varepsilon\log u$, $g = g^0 +
        \varepsilon\log v$, the log-domain updates become matrix-vector products:
        $\hat f = f^0 - \varepsilon\log K^0 (b \odot v)$, likewise for $g$. The weights
        multiply the vectors, not $K^0$, so a point of zero weight still gets its soft
        c-transform (a plan row of zeros would leave it stale). Building
        $P^0$ costs one exp pass (as one log-sum-exp); each iteration then costs two
        matrix-vector products. Since $P^0$ is the plan of the previous block, $u, v$
        stay near 1 and float32 is safe; a non-finite block is redone in the log domain.
        """
        _, g0, f_hat0 = potentials
        eps, a, b = self.eps, self.a, self.b
        f0 = self.tau_a * f_hat0  # reference point of the block: u, v stay near 1
        C = self.geom.cost_matrix()
        # K0 = P0 / (a b^T): the weights go into the vectors, so a zero-weight point's
        # row (column) still gives its soft c-transform instead of a stale value.
        K0 = flushed_exp((f0[:, None] + g0[None, :] - C) / eps)
        dot = functools.partial(jnp.dot, precision=jax.lax.Precision.HIGHEST)

        def floored_log(sums, total):
            # A sum below e^ONE_PASS_FLOOR of its weights' total is made of clamped
            # (flushed) entries of K0, not of the plan: NaN, and the block is redone in
            # the log domain. Otherwise a K0 flushed to a constant (epsilon far below
            # the cost scale) is self-consistent and the error would read 0.
            # Double where: unrolled, the unselected kernel block is still differentiated
            # (with a zero cotangent), and log's derivative at 0 would make it NaN.
            ok = jax.lax.stop_gradient(jnp.log(sums) - jnp.log(total) > ONE_PASS_FLOOR)
            return jnp.where(ok, jnp.log(jnp.where(ok, sums, 1.0)), jnp.nan)

        def one(carry, k):
            f, g, f_hat = carry
            f = self.relaxed(f, self.tau_a * f_hat, k)
            u = a * jnp.exp((f - f0) / eps)
            g_hat = g0 - eps * floored_log(dot(u, K0), jnp.sum(u))
            g = self.relaxed(g, self.tau_b * g_hat, k, last_plain=True)
            v = b * jnp.exp((g - g0) / eps)
            f_hat = f0 - eps * floored_log(dot(K0, v), jnp.sum(v))
            return (f, g, f_hat), None

        return self.scan(one, potentials)

    def fused_block(self, potentials):
        r"""The log-domain iterates with one pass over $C$ per iteration: the kernel
        mode of geometries that do not store $C$ (online point clouds).

        One sweep over blocks of rows (`AbstractGeometry.scan_blocks`) computes, for
        each row, $E_{ij} = e^{(g_j - C_{ij} + s_i)/\varepsilon}$ with the shift $s$
        the previous $\hat f$, the update $\hat f_i = s_i - \varepsilon\log\sum_j b_j
        E_{ij}$ (a one-pass log-sum-exp: one exponential per entry, no maximum) and the
        relaxed $f_i$; and it accumulates the column sums $\sum_i w_i E_{ij}$ with
        $w_i = a_i e^{(f_i - s_i)/\varepsilon}$, which equal $e^{g_j/\varepsilon}
        \sum_i a_i e^{(f_i - C_{ij})/\varepsilon}$, so that the $g$ update is
        $\hat g_j = g_j - \varepsilon \log \sum_i w_i E_{ij}$. The cost entries and the
        exponentials are computed once per iteration instead of twice (once per
        update). Near the fixed point $w_i \approx a_i$ and $\sum_i a_i E_{ij} \approx
        1$, so float32 is safe; a sum that overflows or falls below
        $e^{\text{ONE\_PASS\_FLOOR}}$ gives NaN and the block is redone in the log
        domain.

        After a plain $f$ update the rows of $(f, g)$ are exact and the column sums
        are those of its plan, $b_j \sum_i w_i E_{ij}$: the sweep measures the whole
        optimality error $\|b\,e^{-g/\rho_b} - P^\top\mathbf 1\|_1$ for free, and the
        block stops there, returning $(f, g)$ before the $g$ update, once it is at
        most `stop_below`. Otherwise a block of `inner` iterations ends with one more
        pass that completes $\hat f$ for its last $g$: `inner + 1` passes, against
        `2 inner` for two one-pass log-sum-exps per iteration.

        Returns `(potentials, n_run, error)`, the error measured on rows (`error`) or,
        on an early stop, on columns.
        """
        eps, a, b = self.eps, self.a, self.b

        def sweep(f, g, shift, k):
            def fn(c, acc, f_i, s_i, a_i):
                E = flushed_exp((g[None, :] - c + s_i[:, None]) / eps)
                log_r = jnp.log(jnp.sum(E * b[None, :], axis=1))  # fused: no dot on CPU
                f_hat = s_i - eps * jnp.where(log_r > ONE_PASS_FLOOR, log_r, jnp.nan)
                f_new = self.relaxed(f_i, self.tau_a * f_hat, k)
                w = a_i * jnp.exp((f_new - s_i) / eps)
                return acc + jnp.sum(w[:, None] * E, axis=0), (f_hat, f_new)

            acc, (f_hat, f_new) = self.geom.scan_blocks(fn, 1, jnp.zeros_like(g), f, shift, a)
            log_acc = jnp.log(acc)
            g_hat = g - eps * jnp.where(log_acc > ONE_PASS_FLOOR, log_acc, jnp.nan)
            return f_hat, f_new, self.relaxed(g, self.tau_b * g_hat, k, last_plain=True), acc

        def column_error(g, acc):  # of (f_new, g) when f_new is a plain update (rows exact)
            tau_b = self.tau_b
            err = jnp.sum(jnp.abs(b * (jnp.exp(-(1 - tau_b) / (tau_b * eps) * g) - acc)))
            return jax.lax.stop_gradient(jnp.where(jnp.isnan(err), jnp.inf, err))  # as `error`

        def step(carry, k):
            (f, g, shift), done, n_run, err = carry

            def run():
                f_hat, f_new, g_new, acc = sweep(f, g, shift, k)
                # (f_new, g) has exact rows; stop there if its columns are good enough
                col_err = column_error(g, acc)
                stop = col_err <= self.stop_below
                return jax.lax.cond(
                    stop,
                    lambda: ((f_new, g, f_hat), True, n_run + 1, col_err),
                    lambda: ((f_new, g_new, f_hat), False, n_run + 1, err),
                )

            return jax.lax.cond(done, lambda: carry, run), None

        start = (potentials, jnp.asarray(False), jnp.asarray(0), jnp.asarray(jnp.inf, a.dtype))
        (f, g, shift), done, n_run, err = jax.lax.scan(step, start, jnp.arange(self.inner))[0]

        def complete():  # the block's last g needs its f update (for the error, the next block)
            new = (f, g, -eps * self.geom.lse(g, eps, 1, w=b, shift=shift))
            return new, self.error(new)

        new, err = jax.lax.cond(done, lambda: ((f, g, shift), err), complete)
        return new, n_run, err

    def fused_start(self):
        r"""`(f0, g0)`: $f_0 = \tau_a \hat f(0)$ and $g_0 = \tau_b \hat g(f_0)$, one
        Sinkhorn iteration from $g = 0$, in one pass over $C$ instead of two.

        Each row block computes $E_{ij} = e^{-C_{ij}/\varepsilon - t_i}$ with $t_i =
        \max_j (\log b_j - C_{ij}/\varepsilon)$ (a two-pass log-sum-exp over the rows,
        which are in cache), so $\hat f_i = -\varepsilon(t_i + \log\sum_j b_j E_{ij})$
        exactly; the same exponentials give the column sums $\sum_i w_i E_{ij} =
        \sum_i a_i e^{(f_{0,i} - C_{ij})/\varepsilon}$ with $w_i = a_i e^{f_{0,i}
        /\varepsilon + t_i}$ ($a_i / \sum_j b_j E_{ij}$ when balanced), accumulated
        over the blocks. Where a value is not finite or a column sum is below
        $e^{\text{ONE\_PASS\_FLOOR}}$ (a target point far from every source, a very
        unbalanced problem), both come from two-pass log-sum-exps instead.
        """
        eps, a, b = self.eps, self.a, self.b
        log_b = safe_log(b)

        def fn(c, acc, a_i):
            z = -c / eps
            top = jax.lax.stop_gradient(jnp.max(z + log_b[None, :], axis=1))
            E = flushed_exp(z - top[:, None])
            f = self.tau_a * -eps * (top + jnp.log(jnp.sum(E * b[None, :], axis=1)))
            w = a_i * jnp.exp(f / eps + top)
            return acc + jnp.sum(w[:, None] * E, axis=0), f

        acc, f0 = self.geom.scan_blocks(fn, 1, jnp.zeros_like(b), a)
        log_acc = jnp.log(acc)
        ok = jnp.all(jnp.isfinite(log_acc) & (log_acc > ONE_PASS_FLOOR)) & jnp.all(jnp.isfinite(f0))

        def two_pass():
            f = self.tau_a * self.f_hat(jnp.zeros_like(b))
            return f, -self.tau_b * eps * self.geom.lse(f, eps, 0, w=a)

        return jax.lax.cond(ok, lambda: (f0, -self.tau_b * eps * log_acc), two_pass)

    def error(self, potentials):
        r"""L1 optimality error $\|a e^{-f/\rho_a} - P\mathbf 1\|_1$ of `(f, g)`."""
        f, _, f_hat = potentials
        eps, tau_a = self.eps, self.tau_a
        residual = self.a * (jnp.exp(-(1 - tau_a) / (tau_a * eps) * f) - jnp.exp((f - f_hat) / eps))
        err = jnp.sum(jnp.abs(jnp.where(self.a > 0, residual, 0.0)))  # 0 * inf is not an error
        # A diagnostic, never differentiated: unrolled, the scan carries a zero
        # cotangent for it, and zero times an overflowed exponential's derivative is NaN.
        return jax.lax.stop_gradient(jnp.where(jnp.isnan(err), jnp.inf, err))


def precision_floor(f, g, a, b, eps):
    r"""The smallest optimality error the dtype can resolve for potentials `(f, g)`:
    $u\,(\langle |f|\rangle_a + \langle |g|\rangle_b)/\varepsilon \cdot \sum a$, with
    $u$ the machine epsilon and $\langle |f|\rangle_a$ the $a$-weighted mean of $|f|$.

    A plan entry is $e^{(f_i + g_j - C_{ij})/\varepsilon}$; rounding $f_i$, $g_j$ and
    their sum to the dtype moves its exponent by about $u(|f_i| + |g_j|)/\varepsilon$,
    hence the marginals by that relative amount. Below this floor the measured error is
    rounding noise (it read exactly 0.0 on a wrong plan: potentials of size $10^6$ at
    $\varepsilon = 1$ in float32), so the reported error is at least this, and a floor
    above the threshold is `Status.IMPRECISE`, never `CONVERGED`. For Gaussian clouds
    at the default $\varepsilon = 0.05\,\bar c$ in float32 it is about $10^{-5}$."""
    f, g, a, b, eps = jax.lax.stop_gradient((f, g, a, b, eps))
    u = jnp.finfo(f.dtype).eps

    def mean_abs(v, w):
        return jnp.sum(jnp.where(w > 0, jnp.abs(v), 0.0) * w) / jnp.sum(w)

    return u * (mean_abs(f, a) + mean_abs(g, b)) / eps * jnp.sum(a)


def _anneal_levels(start, eps, decay):
    r"""The number $K \ge 0$ of annealing blocks above the target: the largest $K$
    with $\varepsilon\,\text{decay}^{-K} \le$ `start` (the default epsilon). The
    schedule $\varepsilon\,\text{decay}^{-K}, \dots, \varepsilon\,\text{decay}^{-1},
    \varepsilon$ is anchored at the target, so the last block is exactly at
    $\varepsilon$ and a target within one decay factor of the start is not annealed
    (a start one rounding error above $\varepsilon$ would otherwise cost a block)."""
    ratio = jnp.log(jnp.maximum(start / eps, 1.0)) / -jnp.log(decay)
    return jnp.floor(ratio + 1e-4).astype(jnp.int32)  # 1e-4: exact powers of decay


def _anderson(steps, old, new, history, go_on, at_target, improved, ridge=1e-6):
    r"""Anderson acceleration (type II) of the block map $T: g \mapsto g'$ (Anderson,
    1965; Walker & Ni, 2011; for Sinkhorn: Chizat, 2023; OTT-JAX).

    With the last $k \le$ `ANDERSON_MEMORY` pairs $(g_i, T(g_i))$ at the target epsilon
    and residuals $r_i = T(g_i) - g_i$, the next start is $\sum_i \alpha_i T(g_i)$ with
    $\alpha = \arg\min \|\sum_i \alpha_i r_i\|^2 + \lambda\|\alpha\|^2$ subject to
    $\sum_i \alpha_i = 1$ ($\lambda$ = `ridge` times the mean squared residual). The
    history restarts whenever epsilon is not yet the target or the error grew by more
    than `GROWTH` in a block; a
    block that ends the solve is returned unmixed (so the reported error is its own),
    and $\hat f$ is recomputed for the mixed $g$.
    """
    G_in, G_out, filled = history
    memory = G_in.shape[0]
    filled = jnp.where(at_target & improved, filled, 0)  # restart the history
    slot = filled % memory
    G_in, G_out = G_in.at[slot].set(old[1]), G_out.at[slot].set(new[1])
    filled = jnp.where(at_target, filled + 1, 0)
    valid = jnp.arange(memory) < filled
    R = jnp.where(valid[:, None], G_out - G_in, 0.0)
    gram = R @ R.T
    scale = jnp.trace(gram) / jnp.maximum(jnp.minimum(filled, memory), 1)
    gram = gram + jnp.diag(jnp.where(valid, ridge * scale + jnp.finfo(gram.dtype).tiny, 1.0))
    z = jnp.linalg.solve(gram, valid.astype(gram.dtype))
    alpha = z / jnp.sum(z)
    g_mix = alpha @ G_out
    use = go_on & (filled >= 2) & jnp.all(jnp.isfinite(g_mix))

    def mixed():
        return new[0], g_mix, -steps.eps * steps.geom.lse(g_mix, steps.eps, 1, w=steps.b)

    return jax.lax.cond(use, mixed, lambda: new), (G_in, G_out, filled)


def _next_omega(omega, err, prev, k, inner, at_target):
    r"""Adaptive over-relaxation (Lehmann, von Renesse, Sambale & Uschmajew, 2021;
    Thibault, Chizat, Dossal & Papadakis, 2021).

    Plain Sinkhorn converges linearly; near the fixed point it is a Gauss–Seidel sweep
    whose error contracts by some $\rho < 1$ per iteration, and successive
    over-relaxation with $\omega = 2 / (1 + \sqrt{1 - \rho})$ contracts by about
    $\omega - 1$ instead ($\rho = 0.99$: $\omega \approx 1.82$, about 20× fewer
    iterations asymptotically). $\rho$ is measured once, from two consecutive plain
    blocks at the target epsilon (block `k`, error `err`, and `k - 1`, error `prev`), and capped at 0.99. If the
    error grows by more than `GROWTH` in a relaxed block, the next block is plain
    (stored as omega = -1, applied as 1) and the rate is measured again after it.
    States: omega > 1 relaxed, 1 measuring, -1 one plain block before measuring.
    """
    measuring = omega == 1.0
    measured = measuring & (k >= 1) & at_target & (prev > 0) & jnp.isfinite(err) & (err < prev)
    rate = jnp.minimum(jnp.where(measured, err / jnp.where(prev > 0, prev, 1.0), 0.0) ** (1.0 / inner), 0.99)
    new = jnp.where(measured, 2.0 / (1.0 + jnp.sqrt(1.0 - rate)), omega)
    new = jnp.where(omega < 0, 1.0, new)  # the plain block after a reset is done
    grew = (omega > 1.0) & ~(err <= GROWTH * prev)
    return jax.lax.stop_gradient(jnp.where(grew, -1.0, new))


#: A run is `Status.IMPRECISE` when the plan's exponents carry rounding errors above this.
RESOLUTION = 1.0


def _status(f, g, a, b, eps, floor, trace, threshold):
    r"""The `Status` of a run: `CONVERGED` only when the error is final, finite and at
    most the threshold, the potentials are finite, and the dtype resolves the answer.

    `IMPRECISE` when either (a) the error that float arithmetic can resolve,
    `precision_floor`, is above the threshold, or (b) epsilon is too small for the
    potentials: the plan's exponents $(f_i + g_j - C_{ij})/\varepsilon$ are computed
    from rounded potentials, with a rounding error of about $2\,\mathrm{eps}_\text{mach}
    (\max|f| + \max|g|)/\varepsilon$ on the plan's support (where $C_{ij} \approx f_i
    + g_j$). Above `RESOLUTION` (1: entries off by a factor $e$) the potentials cannot
    represent the plan even when the solver's own arithmetic is consistent: in float32
    with $\varepsilon = 10^{-9}\bar c$ the iteration reaches a fixed point of the hard
    c-transform whose measured error is exactly 0, while the plan recomputed in float64
    from the returned $f, g$ misses its marginals by $10^{130}$. Non-finite potentials
    of points with positive weight are `DIVERGED`.
    """
    _, status = driver.status_of(trace, threshold)
    # zero-weight points carry no mass: their potential may be +inf (every pair forbidden)
    f, g = jnp.where(a > 0, f, 0.0), jnp.where(b > 0, g, 0.0)
    scale = jnp.max(jnp.abs(f)) + jnp.max(jnp.abs(g))
    rounding = 2 * jnp.finfo(f.dtype).eps * scale / eps
    imprecise = (floor > threshold) | (rounding > RESOLUTION)
    status = jnp.where(imprecise & jnp.isfinite(trace.error), Status.IMPRECISE, status)
    finite = jnp.all(jnp.isfinite(f)) & jnp.all(jnp.isfinite(g))
    return jnp.where(finite, status, Status.DIVERGED).astype(jnp.int32)


@eqx.filter_jit
def _solve(solver: Sinkhorn, problem: LinearProblem, init, throw: bool) -> Solution:
    eps = problem.resolved_epsilon()
    a, b = checks.traced_checks(problem, eps)
    theta = (problem.geom, a, b, eps.astype(a.dtype), problem.tau_a, problem.tau_b)
    f, g, trace = solver.adjoint.fixed_point(solver, theta, init)
    # balanced: potentials up to (f + t, g - t); return one gauge, differentiably
    f_fixed, g_fixed = fix_gauge(f, g, a, b)
    balanced = problem.is_balanced
    f, g = jnp.where(balanced, f_fixed, f), jnp.where(balanced, g_fixed, g)
    floor = precision_floor(f, g, a, b, theta[3])  # the error float arithmetic can resolve
    trace = trace._replace(error=jnp.maximum(trace.error, floor))
    status = _status(f, g, a, b, theta[3], floor, trace, solver.threshold)
    f = driver.finish(f, status, throw)
    return Solution(problem, f, g, eps, trace.n_iters, trace.error, trace.errors,
                    status == Status.CONVERGED, status)
