r"""The shared fixed-point driver: one loop, one status, one `throw`, for every
iterative solver.

An iterative solver is a small immutable object (`AbstractIterativeSolver`) that says
how to start and how to run one *block* of iterations; this module runs the blocks:

```
state = solver.init(data, init)          # a start, warm (`init=`) or cold
repeat:                                  # lax.while_loop (or a masked scan, unrolled)
    state, block = solver.step(data, state, k)   # k = block index
    errors[k] = block.error; n_iters += block.n_run
until block.final and block.error <= threshold, or the error is not finite,
      or block.stalled, or the budget of `max_iterations` is spent
status = status_of(...)                  # CONVERGED / MAX_ITERATIONS / DIVERGED
```

`data` is whatever the solver iterates on (Sinkhorn: the tuple $\theta$ = (geometry,
weights, epsilon, tau) its adjoint differentiates), `state` any pytree of fixed shapes.
The error a block reports is the solver's own optimality measure (its docstring says
which); it must be measured so that inf, NaN and underflow cannot pass (a NaN is
turned into inf here). A block may report `final=False` when its error is not yet the
solver's error (Sinkhorn's annealing blocks above the target epsilon): the loop never
stops on such a block, and `converged` needs a final one.

References: diffrax's single `_integrate` loop driving `init`/`step` solver objects
(Kidger, 2021) and OTT-JAX's `fixed_point_loop` (Cuturi et al., 2022) — read, not
copied.
"""

from __future__ import annotations

import abc
import functools
import math
import sys
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from monge.geometry import as_float_array
from monge.solution import MESSAGES, Status

__all__ = [
    "AbstractIterativeSolver",
    "Block",
    "Trace",
    "fixed_point",
    "status_of",
    "status_from",
    "finish",
    "warm_start",
]


class Block(NamedTuple):
    """What one block of iterations reports to the driver.

    Attributes:
        error: the solver's optimality error after the block (a NaN counts as inf).
        n_run: iterations run in the block (a block may stop early, within itself).
        final: whether `error` is the solver's error (False: keep going, e.g. an
            annealing block above the target epsilon).
        stalled: the solver cannot improve further (e.g. a step size at its floor);
            the loop stops, and the status is `MAX_ITERATIONS` unless the error is
            below the threshold.
        label: which of the solver's `error_label`s names the error in progress lines
            (traced: e.g. Sinkhorn's error is a marginal error when balanced, an
            optimality residual when tau < 1).
    """

    error: Float[Array, ""]
    n_run: Int[Array, ""]
    final: Bool[Array, ""] | bool = True
    stalled: Bool[Array, ""] | bool = False
    label: Int[Array, ""] | int = 0


class Trace(NamedTuple):
    """What the driver returns beside the last state.

    Attributes:
        n_iters: iterations run (the sum of the blocks' `n_run`).
        errors: the error after each block; -1 for blocks not run.
        error: the last block's error (inf if it was NaN).
        final: whether the last block's error is the solver's error.
    """

    n_iters: Int[Array, ""]
    errors: Float[Array, " blocks"]
    error: Float[Array, ""]
    final: Bool[Array, ""]


class AbstractIterativeSolver(eqx.Module):
    """A solver that the driver runs block by block.

    Subclasses are immutable configurations (equinox modules, final). They define the
    fields `threshold` (traced), `max_iterations`, `inner_iterations` and `progress`
    (static), and two methods:

    - `init(data, init)`: the first state; `init` is a warm start (the solver's
      docstring says what it accepts: potentials, or a previous solution) or `None`.
    - `step(data, state, k)`: one block of `inner_iterations` iterations, the `k`-th;
      returns `(state, Block)`.

    `name` and `error_label` (a string, or a tuple of them that `Block.label` picks
    from) label progress lines.
    """

    threshold: eqx.AbstractVar[Array]
    max_iterations: eqx.AbstractVar[int]
    inner_iterations: eqx.AbstractVar[int]
    progress: eqx.AbstractVar[bool]

    @property
    def name(self) -> str:
        return type(self).__name__

    @property
    def error_label(self) -> str | tuple[str, ...]:
        return "error"

    @property
    def n_blocks(self) -> int:
        """Blocks at most: `max_iterations` rounded up to whole blocks."""
        return math.ceil(self.max_iterations / self.inner_iterations)

    @abc.abstractmethod
    def init(self, data, init) -> Any:
        """The first state, from a warm start `init` (or a cold start if `None`)."""

    @abc.abstractmethod
    def step(self, data, state, k: Int[Array, ""]) -> tuple[Any, Block]:
        """One block of iterations from `state`; `k` is the block's index."""


def fixed_point(solver: AbstractIterativeSolver, data, state, *, unrolled: bool = False):
    """Run `solver.step` from `state` until converged, stalled, diverged or out of
    budget. Returns `(state, Trace)`.

    `unrolled=False` runs a `lax.while_loop` (reverse-mode differentiation needs an
    implicit adjoint around it). `unrolled=True` runs all `solver.n_blocks` blocks in a
    `lax.scan`, each rematerialised (`jax.checkpoint`) and masked once the loop would
    have stopped: reverse mode differentiates through every iteration actually run.
    """
    n_blocks = solver.n_blocks
    dtype = jnp.result_type(*[z.dtype for z in jax.tree_util.tree_leaves(state)
                              if jnp.issubdtype(z.dtype, jnp.floating)] or [float])
    threshold = jnp.asarray(solver.threshold, dtype)

    def block(carry):
        state, k, errors, n_iters, _, _, _ = carry
        state, out = solver.step(data, state, k)
        err = jnp.asarray(out.error, dtype)
        err = jnp.where(jnp.isnan(err), jnp.inf, err)
        n_iters = n_iters + out.n_run
        if solver.progress:
            labels = solver.error_label
            labels = (labels,) if isinstance(labels, str) else tuple(labels)
            report = functools.partial(_report, solver.name, labels, solver.max_iterations)
            jax.debug.callback(report, n_iters, err, out.label)
        return (state, k + 1, errors.at[k].set(err), n_iters, err,
                jnp.asarray(out.final), jnp.asarray(out.stalled))

    def running(carry):
        _, k, _, _, err, final, stalled = carry
        go_on = ~final | (err > threshold)
        return (k == 0) | ((k < n_blocks) & go_on & jnp.isfinite(err) & ~stalled)

    inf = jnp.asarray(jnp.inf, dtype)
    carry = (state, jnp.asarray(0), -jnp.ones((n_blocks,), dtype), jnp.asarray(0), inf,
             jnp.asarray(False), jnp.asarray(False))
    if unrolled:
        def masked(carry, _):
            new = jax.checkpoint(block)(carry)
            keep = running(carry)
            return jax.tree_util.tree_map(lambda u, v: jnp.where(keep, u, v), new, carry), None

        carry, _ = jax.lax.scan(masked, carry, None, n_blocks)
    else:
        carry = jax.lax.while_loop(running, block, carry)
    state, _, errors, n_iters, err, final, _ = carry
    return state, Trace(n_iters, errors, err, final)


def status_of(trace: Trace, threshold) -> tuple[Bool[Array, ""], Int[Array, ""]]:
    """`(converged, status)` of a run: `status_from(trace.error, ...)`."""
    return status_from(trace.error, threshold, trace.final)


def status_from(error, threshold, final=True) -> tuple[Bool[Array, ""], Int[Array, ""]]:
    """`(converged, status)`: converged when the error is final, finite and at most
    `threshold`; `DIVERGED` when it is not finite (NaN included); else
    `MAX_ITERATIONS`. The one place where an error becomes a status."""
    converged = final & jnp.isfinite(error) & (error <= threshold)
    status = jnp.where(
        converged,
        Status.CONVERGED,
        jnp.where(jnp.isfinite(error), Status.MAX_ITERATIONS, Status.DIVERGED),
    )
    return converged, status.astype(jnp.int32)


def finish(value, status, throw: bool):
    """`value`, or, with `throw=True`, an `EquinoxRuntimeError` carrying the status
    message whenever `status` is not `CONVERGED` (also under `jit`; the check is
    threaded through `value`, which the caller must use)."""
    if not throw:
        return value
    messages = tuple(MESSAGES[s] for s in Status)
    return eqx.branched_error_if(value, status != Status.CONVERGED, status, messages)


def warm_start(init, shape) -> tuple | None:
    """`init` as potentials `(f, g)`: from a previous solution (anything with `f` and
    `g`) or a pair of arrays, checked against the problem's `shape` `(n, m)`."""
    if init is None:
        return None
    pair = (init.f, init.g) if hasattr(init, "f") and hasattr(init, "g") else init
    n, m = shape
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
        raise ValueError(
            "`init` must be a previous solution or a pair of potentials (f, g) of shapes "
            f"({n},) and ({m},); received {type(init).__name__}."
        )
    f, g = (as_float_array(z) for z in pair)
    if f.shape != (n,) or g.shape != (m,):
        raise ValueError(
            f"`init` potentials must have shapes ({n},) and ({m},), one per point of the "
            f"problem; received {tuple(f.shape)} and {tuple(g.shape)}."
        )
    return f, g


def _report(name, labels, max_iterations, it, err, label):
    line = (f"{name.lower()}: iteration {int(it):>6d}/{max_iterations}, "
            f"{labels[int(label)]} {float(err):.3e}")
    if sys.stderr.isatty():  # redraw one line on a terminal, one line per check in a log
        print("\r" + line, end="", file=sys.stderr, flush=True)
    else:
        print(line, file=sys.stderr, flush=True)
