"""Exact OT: monge's backends against POT's network simplex (`ot.emd`).

Point clouds in d=2 (n = m), squared Euclidean cost, uniform and non-uniform weights.
Each row is the best of `--repeats` runs after one warm-up call (compilation excluded),
end to end from points to plan (monge builds the cost matrix itself; POT is given it
pre-computed, to its advantage). Timings on a shared machine are indicative.

    python benchmarks/bench_exact.py --n 2000
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
import ot

import monge
from monge.solvers.exact import Exact


def best_time(fn, repeats: int) -> tuple[float, object]:
    out = jax.block_until_ready(fn())  # warm-up (compilation)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return min(times), out


def monge_exact(x, y, a, b, **kwargs):
    solver = Exact(**kwargs)

    @jax.jit
    def run(x, y, a, b):
        sol = solver(monge.LinearProblem(monge.PointCloud(x, y), a, b))
        return sol.cost, sol.error, sol.converged

    return lambda: run(x, y, a, b)


def rows_for(weights: str, x, y, a, b, args) -> list[tuple]:
    C = ot.dist(x, y)  # float64, squared Euclidean
    t_pot, plan = best_time(lambda: ot.emd(a, b, C, numItermax=args.pivots), args.repeats)
    ref = float(np.sum(plan * C))
    rows = [("POT `ot.emd` (float64)", weights, t_pot, 1.0, 0.0, "-")]
    x32, y32, a32, b32 = (z.astype(np.float32) for z in (x, y, a, b))
    configs = [("monge network simplex (float32)", dict(method="network_simplex"))]
    if weights == "uniform":
        configs.append(("monge assignment (float32)", dict(method="assignment")))
    configs.append(
        (
            f"monge sinkhorn_rounding (float32, <= {args.sinkhorn_iterations} it.)",
            dict(method="sinkhorn_rounding", max_iterations=args.sinkhorn_iterations),
        )
    )
    for name, kwargs in configs:
        repeats = 1 if kwargs["method"] == "sinkhorn_rounding" else args.repeats
        t, (cost, error, converged) = best_time(monge_exact(x32, y32, a32, b32, **kwargs), repeats)
        rel = abs(float(cost) - ref) / ref
        note = f"certified gap {float(error):.1e}, converged={bool(converged)}"
        rows.append((name, weights, t, t / t_pot, rel, note))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pivots", type=int, default=10_000_000)
    parser.add_argument("--sinkhorn-iterations", type=int, default=1000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.n, 2))
    y = rng.normal(size=(args.n, 2)) + 1.0
    uniform = np.full(args.n, 1.0 / args.n)
    a = rng.uniform(0.5, 1.5, args.n)
    b = rng.uniform(0.5, 1.5, args.n)
    rows = rows_for("uniform", x, y, uniform, uniform, args)
    rows += rows_for("non-uniform", x, y, a / a.sum(), b / b.sum(), args)
    print(f"\nExact OT, n = m = {args.n}, d = 2, {jax.devices()[0].platform} "
          f"(best of {args.repeats}; indicative, shared machine)\n")
    print("| method | weights | time (s) | ratio to POT | rel. cost diff | notes |")
    print("|---|---|---|---|---|---|")
    for name, weights, t, ratio, rel, note in rows:
        print(f"| {name} | {weights} | {t:.3f} | {ratio:.2f}x | {rel:.1e} | {note} |")


if __name__ == "__main__":
    main()
