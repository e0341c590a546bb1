"""Sinkhorn initializers: iterations and time to the same target, with and without annealing.

Problems: x ~ N(0, 1), y ~ 0.8 N(0, 1) + 0.5 (float32, uniform weights, n = m, squared
Euclidean cost), epsilon a multiple of the mean cost, target L1 marginal error 1e-3.
Times are medians of `--repeats` jitted runs after compilation and include computing
the initial potential and the g update from it (one column log-sum-exp, which "zeros"
skips). "sorting" runs for d = 1 only; `--subsample K ...` sets `initializers.SUBSAMPLE`
(one row per value).

Usage:  python benchmarks/bench_init.py [--sizes 2000] [--dims 1 2] [--rel-eps 0.005 0.05]
                                         [--subsample 1024] [--repeats 3] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import jax
import jax.numpy as jnp

import monge
from bench_sinkhorn import TARGET, data  # the same problems as the speed table
from monge.solvers.linear import initializers


def run(x, y, eps, init, anneal, repeats):
    solver = monge.Sinkhorn(threshold=TARGET, max_iterations=10_000, initializer=init, anneal=anneal)

    @jax.jit
    def solve(x, y, eps):
        sol = solver(monge.LinearProblem(monge.PointCloud(x, y), epsilon=eps))
        return sol.n_iters, sol.converged

    jax.block_until_ready(solve(x, y, eps))  # compile
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        it, converged = jax.block_until_ready(solve(x, y, eps))
        times.append(time.perf_counter() - t)
    return statistics.median(times), int(it), bool(converged)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[2000])
    p.add_argument("--dims", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rel-eps", type=float, nargs="+", default=[0.005, 0.05])
    p.add_argument("--subsample", type=int, nargs="+", default=[initializers.SUBSAMPLE])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    rows = ["| n | d | eps/mean | anneal | initializer | iterations | time s | vs zeros |", "|" + "---|" * 8]
    print("\n".join(rows), flush=True)
    for n in args.sizes:
        for d in args.dims:
            x, y = data(n, d)
            w = jnp.full(n, 1 / n)
            mean = float(monge.PointCloud(x, y).mean_cost(w, w))
            inits = ["zeros", "gaussian"] + (["sorting"] if d == 1 else [])
            inits += [f"subsample:{k}" for k in args.subsample]
            for rel in args.rel_eps:
                eps = jnp.float32(rel * mean)
                for anneal in (True, False):
                    base = None
                    for label in inits:
                        init, _, k = label.partition(":")
                        if k:  # read when tracing: clear the compiled solvers
                            initializers.SUBSAMPLE = int(k)
                            jax.clear_caches()
                        t, it, ok = run(x, y, eps, init, anneal, args.repeats)
                        base = t if base is None else base
                        flag = "" if ok else " (not converged)"
                        row = f"| {n} | {d} | {rel} | {anneal} | {label} | {it}{flag} | {t:.3f} | {base / t:.2f}× |"
                        rows.append(row)
                        print(row, flush=True)
    summary = f"\n{platform.processor() or platform.machine()}, {jax.devices()[0].platform}, jax {jax.__version__}"
    print(summary)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write("\n".join(rows) + "\n" + summary + "\n")


if __name__ == "__main__":
    main()
