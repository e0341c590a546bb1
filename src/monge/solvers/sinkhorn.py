r"""Sinkhorn's algorithm in the log domain, balanced and unbalanced.

Alternating dual updates (Cuturi, 2013; log domain: Schmitzer, 2019; unbalanced:
Chizat et al., 2018; Séjourné et al., 2019)

$$f_i \leftarrow -\tau_a\,\varepsilon \log \sum_j b_j e^{(g_j - C_{ij})/\varepsilon},
\qquad g_j \leftarrow -\tau_b\,\varepsilon \log \sum_i a_i e^{(f_i - C_{ij})/\varepsilon}.$$

After each block of `inner_iterations` updates the solver measures the L1 optimality
error $\|a\,e^{-f/\rho_a} - P\mathbf 1\|_1$ — the marginal error
$\|P\mathbf 1 - a\|_1$ when balanced (the column marginal is exact after a $g$ update)
— and stops when it is below `threshold`. The measurement reuses the log-sum-exp of
the next $f$ update, so it costs nothing.
"""

from __future__ import annotations

import math
import sys

import equinox as eqx
import jax
import jax.numpy as jnp

from monge import _checks
from monge.geometry import as_float_array
from monge.problems import LinearProblem
from monge.solution import MESSAGES, Solution, Status
from monge.solvers.adjoint import AbstractAdjoint, ImplicitAdjoint

__all__ = ["Sinkhorn"]


class Sinkhorn(eqx.Module):
    r"""Log-domain Sinkhorn solver for `LinearProblem`s.

    Args:
        threshold: stop when the L1 marginal (optimality) error is below this; traced.
        max_iterations: at most this many iterations (rounded up to a multiple of
            `inner_iterations`); static.
        inner_iterations: iterations between two convergence checks; static.
        adjoint: `ImplicitAdjoint()` (default) or `UnrolledAdjoint()`.
        progress: print the iteration count and error to stderr after every check
            (through `jax.debug.callback`); static.

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

    def __check_init__(self):
        for name in ("max_iterations", "inner_iterations"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"`{name}` must be a positive integer; received {value!r}.")
        _checks.check_positive("threshold", self.threshold, "Typical values: 1e-2 to 1e-6.")
        if not isinstance(self.adjoint, AbstractAdjoint):
            raise ValueError(
                "`adjoint` must be monge.ImplicitAdjoint() or monge.UnrolledAdjoint(); "
                f"received {type(self.adjoint).__name__}."
            )

    @property
    def n_blocks(self) -> int:
        return math.ceil(self.max_iterations / self.inner_iterations)

    def __call__(self, problem: LinearProblem, *, throw: bool = False) -> Solution:
        """Solve `problem`. With `throw=True`, a run that does not converge raises an
        `EquinoxRuntimeError` carrying the status message instead of returning."""
        if not isinstance(problem, LinearProblem):
            raise ValueError(
                f"`Sinkhorn` solves a monge.LinearProblem; received {type(problem).__name__}."
            )
        return _solve(self, problem, throw)

    # -- iterations -------------------------------------------------------------------
    def iterate(self, theta, unrolled: bool):
        """Run the iterations on `theta = (geom, a, b, eps, tau_a, tau_b)`.

        Returns `(f, g, (n_iters, errors, error))`.
        """
        geom, a, b, eps, tau_a, tau_b = theta
        geom = geom.precompute()
        n, m = geom.shape
        dtype = a.dtype

        def f_hat_of(g):  # the untempered f update
            return -eps * geom.lse(g, eps, 1, w=b)

        def one(carry, _):
            f, g, f_hat = carry
            f = tau_a * f_hat
            g = -tau_b * eps * geom.lse(f, eps, 0, w=a)
            return (f, g, f_hat_of(g)), None

        def block(state):
            (f, g, f_hat), it, errors = state
            (f, g, f_hat), _ = jax.lax.scan(one, (f, g, f_hat), None, self.inner_iterations)
            err = jnp.sum(
                jnp.abs(a * (jnp.exp(-(1 - tau_a) / (tau_a * eps) * f) - jnp.exp((f - f_hat) / eps)))
            )
            err = jnp.where(jnp.isnan(err), jnp.inf, err)
            errors = errors.at[it // self.inner_iterations].set(err)
            it = it + self.inner_iterations
            if self.progress:
                jax.debug.callback(_report, it, err, self.max_iterations)
            return (f, g, f_hat), it, errors

        def running(state):
            _, it, errors = state
            err = errors[jnp.maximum(it // self.inner_iterations - 1, 0)]
            first = it == 0
            return first | ((it < self.n_blocks * self.inner_iterations) & (err > self.threshold) & jnp.isfinite(err))

        g0 = jnp.zeros((m,), dtype)
        state = ((jnp.zeros((n,), dtype), g0, f_hat_of(g0)), jnp.asarray(0), -jnp.ones((self.n_blocks,), dtype))
        if unrolled:
            def masked(state, _):
                new = jax.checkpoint(block)(state)
                keep = running(state)
                return jax.tree_util.tree_map(lambda u, v: jnp.where(keep, u, v), new, state), None

            state, _ = jax.lax.scan(masked, state, None, self.n_blocks)
        else:
            state = jax.lax.while_loop(running, block, state)
        (f, g, _), it, errors = state
        error = errors[jnp.maximum(it // self.inner_iterations - 1, 0)]
        return f, g, (it, errors, error)


def _report(it, err, max_iterations):
    line = f"sinkhorn: iteration {int(it):>6d}/{max_iterations}, marginal error {float(err):.3e}"
    if sys.stderr.isatty():  # redraw one line on a terminal, one line per check in a log
        print("\r" + line, end="", file=sys.stderr, flush=True)
    else:
        print(line, file=sys.stderr, flush=True)


@eqx.filter_jit
def _solve(solver: Sinkhorn, problem: LinearProblem, throw: bool) -> Solution:
    eps = problem.resolved_epsilon()
    a, b = _checks.traced_checks(problem, eps)
    theta = (problem.geom, a, b, eps.astype(a.dtype), problem.tau_a, problem.tau_b)
    f, g, (n_iters, errors, error) = solver.adjoint.fixed_point(solver, theta)
    converged = jnp.isfinite(error) & (error <= solver.threshold)
    status = jnp.where(
        converged, Status.CONVERGED, jnp.where(jnp.isfinite(error), Status.MAX_ITERATIONS, Status.DIVERGED)
    )
    if throw:
        messages = tuple(MESSAGES[s] for s in Status)
        f = eqx.branched_error_if(f, status != Status.CONVERGED, status, messages)
    return Solution(problem, f, g, eps, n_iters, error, errors, converged, status)

