"""Where the time of monge.LowRankSinkhorn goes at large n (a profile, not a benchmark).

Runs the solver's own pieces one at a time on the bench_lowrank problem (x ~ N(0, I),
y ~ 0.7 N(0, I) + 1, float32, uniform weights), default settings, initializer "auto":

1. the start (`solver.init`: k-means + two Sinkhorn solves for "kmeans"), compiled
   then timed;
2. blocks of `inner_iterations` mirror steps (`solver.step`), each timed, with the
   Dykstra sweeps of every projection counted (the solver's `_sweeps` is wrapped, in
   this process only, by a copy that reports its sweep count and final violation
   through `jax.debug.callback`), until the driver's stopping rule holds, `--max-blocks`
   blocks or `--time-box` seconds.

Usage: python benchmarks/profile_lowrank.py --n 100000 --d 2 [--max-blocks 200] [--time-box 600]
"""

from __future__ import annotations

import argparse
import resource
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import monge
from monge.solvers.linear import lowrank

RECORD = []
TRACE = []  # (projection index, sweep, change) when --trace-sweeps
TRACING = False


def counting_sweeps(ops, xi_g, a, b, log_alpha, c, duals, tol, max_sweeps):
    """`lowrank._sweeps`, plus a callback with (sweeps run, final change, tol)."""
    (rows_q, cols_q), (rows_r, cols_r) = ops
    c_a, c_b = c
    log_a, log_b = lowrank.safe_log(a), lowrank.safe_log(b)

    def floor(psi_q, psi_r):
        return jnp.maximum(0.0, log_alpha - (xi_g - psi_q - psi_r))

    def sweep(carry):
        (_, _, psi_q, psi_r, eta), (s_q, s_r), _, it = carry
        phi_q, phi_r = c_a * (log_a - s_q), c_b * (log_b - s_r)
        eta = floor(psi_q, psi_r)
        S_q, S_r = cols_q(phi_q), cols_r(phi_r)
        log_h = (xi_g + eta + S_q + S_r) / 3.0
        psi_q, psi_r = log_h - S_q, log_h - S_r
        s_q, s_r = rows_q(psi_q), rows_r(psi_r)
        change = (lowrank._row_change(phi_q, s_q, log_a, c_a) + lowrank._row_change(phi_r, s_r, log_b, c_b)
                  + jnp.sum(jnp.abs(jnp.exp(log_h) - jnp.exp(xi_g - psi_q - psi_r + floor(psi_q, psi_r)))))
        change = jnp.where(jnp.isnan(change), jnp.inf, change)
        if TRACING:
            jax.debug.callback(lambda i, ch: TRACE.append((len(RECORD), int(i), float(ch))), it, change)
        return (phi_q, phi_r, psi_q, psi_r, eta), (s_q, s_r), change, it + 1

    def going(carry):
        *_, change, it = carry
        return (it == 0) | ((it < max_sweeps) & (change > tol) & jnp.isfinite(change))

    _, _, psi_q, psi_r, _ = duals
    start = (duals, (rows_q(psi_q), rows_r(psi_r)), jnp.asarray(jnp.inf, a.dtype), jnp.asarray(0))
    duals, _, change, it = jax.lax.while_loop(going, sweep, start)
    jax.debug.callback(lambda i, ch, t: RECORD.append((int(i), float(ch), float(t))), it, change, tol)
    return duals, change


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--d", type=int, default=2)
    p.add_argument("--rank", type=int, default=10)
    p.add_argument("--max-blocks", type=int, default=200)
    p.add_argument("--time-box", type=float, default=600.0)
    p.add_argument("--no-count", action="store_true", help="time the blocks without the sweep counter")
    p.add_argument("--trace-sweeps", action="store_true",
                   help="print the violation after each sweep of the first block's projections (slow)")
    p.add_argument("--dykstra-threshold", type=float, default=None, help="instead of the default")
    args = p.parse_args()

    import sys
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from bench_lowrank import data
    x, y = data(args.n, args.d)
    global TRACING
    TRACING = args.trace_sweeps
    if not args.no_count:
        lowrank._sweeps = counting_sweeps
    extra = {} if args.dykstra_threshold is None else {"dykstra_threshold": args.dykstra_threshold}
    solver = monge.LowRankSinkhorn(rank=args.rank, **extra)
    geom = monge.PointCloud(jnp.asarray(x), jnp.asarray(y))
    a = jnp.full(args.n, 1.0 / args.n, jnp.float32)
    inf = jnp.asarray(jnp.inf, jnp.float32)
    data_ = (geom, a, a, inf, inf)
    print(f"n = {args.n}, d = {args.d}, rank {args.rank}, initializer {solver.resolved_initializer(geom)}, "
          f"dykstra_iterations {solver.dykstra_iterations}, dykstra_threshold {float(solver.dykstra_threshold)}, "
          f"threshold {float(solver.threshold)}, inner_iterations {solver.inner_iterations}", flush=True)

    init = eqx.filter_jit(lambda data: solver.init(data, None))
    t0 = time.perf_counter()
    init_c = init.lower(data_).compile()
    t_c = time.perf_counter() - t0
    t0 = time.perf_counter()
    state = jax.block_until_ready(init_c(data_))
    print(f"start: compile {t_c:.1f} s, run {time.perf_counter() - t0:.1f} s, objective {float(state[2]):.5f}", flush=True)

    step = eqx.filter_jit(solver.step)
    t0 = time.perf_counter()
    step_c = step.lower(data_, state, jnp.asarray(0)).compile()
    print(f"block (step): compile {time.perf_counter() - t0:.1f} s", flush=True)

    t_start = time.perf_counter()
    err_prev = None
    total_sweeps = 0
    for k in range(args.max_blocks):
        RECORD.clear()
        t0 = time.perf_counter()
        state, block = jax.block_until_ready(step_c(data_, state, jnp.asarray(k)))
        dt = time.perf_counter() - t0
        err = float(block.error)
        if TRACE:
            for j in sorted({j for j, _, _ in TRACE}):
                changes = {i: ch for jj, i, ch in TRACE if jj == j}
                marks = [i for i in (0, 1, 2, 4, 9, 19, 49, 99, 199, 299) if i in changes]
                print(f"  projection {j}: violation after sweep " + ", ".join(
                    f"{i + 1}: {changes[i]:.2e}" for i in marks) + f" (tol {RECORD[j][2]:.1e})", flush=True)
            TRACE.clear()
        if TRACING:
            TRACING = False
            step_c = step.lower(data_, state, jnp.asarray(0)).compile()  # without the trace
        sweeps = [s for s, _, _ in RECORD]
        total_sweeps += sum(sweeps)
        missed = sum(ch > t for _, ch, t in RECORD)
        extra = f", projections {len(sweeps)} (fallback {len(sweeps) - solver.inner_iterations}), sweeps/projection " \
                f"min {min(sweeps)} median {int(np.median(sweeps))} max {max(sweeps)}, missed tol {missed}" if sweeps else ""
        print(f"block {k}: {dt:.2f} s, objective {float(state[2]):.6f}, step scale {float(state[3]):g}, "
              f"error {err:.2e}, final {bool(block.final)}{extra}", flush=True)
        go_on = (not bool(block.final)) or err > float(solver.threshold)
        if not (go_on and np.isfinite(err) and not bool(block.stalled)):
            print(f"stopping rule met after {k + 1} blocks", flush=True)
            break
        if time.perf_counter() - t_start > args.time_box:
            print(f"time box: {k + 1} blocks", flush=True)
            break
    elapsed = time.perf_counter() - t_start
    print(f"blocks: {k + 1} ({(k + 1) * solver.inner_iterations} steps) in {elapsed:.1f} s, "
          f"{elapsed / (k + 1):.2f} s/block; sweeps in all {total_sweeps}; "
          f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB", flush=True)


if __name__ == "__main__":
    main()
