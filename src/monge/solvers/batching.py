r"""How a vmapped solver loop is batched: problem by problem, or all at once.

Under `jax.vmap` a `while_loop` runs every problem of the batch until the slowest has
finished, and a batched `lax.cond` evaluates both of its branches. A solver whose
problems stop at different iteration counts, or that switches between cheap and safe
arithmetic with `lax.cond`, therefore pays the worst problem's work everywhere when
batched. `one_by_one` gives such a solver a vmap rule
(`jax.custom_batching.custom_vmap`) that solves the problems one after the other
(`lax.map`) instead: each stops at its own count and keeps its cheap branches.
"""

from __future__ import annotations

from collections.abc import Callable

import equinox as eqx
import jax

__all__ = ["SEQUENTIAL_ABOVE", "one_by_one"]

#: On accelerators, vmapped problems with fewer cost entries than this are batched,
#: larger ones solved one after the other; on CPU they are always solved one after the
#: other, which was faster at every size measured (Sinkhorn, 8 problems, epsilon from
#: 0.05 to 0.002 x mean cost: 12x at n = 64, 18x at n = 1000; the auction, float32:
#: 8x for 256 problems of n = 32, 40x for 64 problems of n = 128). The accelerator
#: threshold is a guess, not yet measured.
SEQUENTIAL_ABOVE = 2**16


def one_by_one(fn: Callable, args, *, size: int):
    """`fn(args)`; under `jax.vmap`, run on the problems of the batch one after the
    other (on accelerators: batched when `size`, the problem's number of cost entries,
    is below `SEQUENTIAL_ABOVE`).

    The arrays in the pytree `args` are the traced inputs (any of them may be batched);
    its other leaves are static. Reverse-mode differentiation does not go through the
    rule: wrap `one_by_one` inside a custom VJP (as the solvers do) to differentiate.
    """
    dynamic, static = eqx.partition(args, eqx.is_array)

    def run(dynamic):
        return fn(eqx.combine(dynamic, static))

    batched_run = jax.custom_batching.custom_vmap(run)

    @batched_run.def_vmap
    def _(axis_size, in_batched, dynamic):
        (in_batched,) = in_batched  # one flag per leaf of the single argument
        if jax.default_backend() != "cpu" and size < SEQUENTIAL_ABOVE:
            axes = jax.tree_util.tree_map(lambda batched: 0 if batched else None, in_batched)
            out = jax.vmap(run, in_axes=(axes,))(dynamic)
        else:
            mapped, shared = eqx.partition(dynamic, in_batched)
            out = jax.lax.map(lambda one: run(eqx.combine(one, shared)), mapped)
        return out, jax.tree_util.tree_map(lambda _: True, out)

    return batched_run(dynamic)
