"""Exact OT: monge's backends against POT's network simplex (`ot.emd`) and, for
uniform weights (assignments), scipy's `linear_sum_assignment`.

Point clouds in d=2 (n = m), squared Euclidean cost, uniform and non-uniform weights.
Each row is the best of `--repeats` runs after one warm-up call (compilation excluded),
end to end from points to plan (monge builds the cost matrix itself; POT and scipy are
given it pre-computed, to their advantage). Timings on a shared machine are indicative.

    python benchmarks/bench_exact.py --n 500 2000

`--batch B n [B n ...]` adds tables of B assignments of n points each (minibatch
couplings, as in OT flow matching): POT and scipy looped over the batch, monge
`jax.vmap`-ed (one compiled call; host methods cross to the host once per batch).

    python benchmarks/bench_exact.py --n 2000 --batch 256 32 64 128 16 512

`--random n [n ...]` adds tables on unstructured costs (C uniform on [0, 1], one
problem), where scipy's shortest augmenting paths beat the network simplex.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
import ot
from scipy.optimize import linear_sum_assignment

import monge
from monge.solvers.linear.exact import Exact


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
        return sol.cost, sol.error, sol.converged, sol.n_iters

    return lambda: run(x, y, a, b)


def rows_for(weights: str, x, y, a, b, args) -> list[tuple]:
    C = ot.dist(x, y)  # float64, squared Euclidean
    t_pot, plan = best_time(lambda: ot.emd(a, b, C, numItermax=args.pivots), args.repeats)
    ref = float(np.sum(plan * C))
    rows = [("POT `ot.emd` (float64)", weights, t_pot, 1.0, 0.0, "-")]
    if weights == "uniform":
        t_lsa, (i, j) = best_time(lambda: linear_sum_assignment(C), args.repeats)
        rel = abs(float(C[i, j].mean()) - ref) / ref
        rows.append(("scipy `linear_sum_assignment` (float64)", weights, t_lsa, t_lsa / t_pot, rel, "-"))
    x32, y32, a32, b32 = (z.astype(np.float32) for z in (x, y, a, b))
    configs = [("monge network simplex (float32)", dict(method="network_simplex"), False)]
    if weights == "uniform":
        configs.append(("monge assignment (float32)", dict(method="assignment"), False))
        configs.append(("monge auction (float32)", dict(method="auction"), False))
        configs.append(("monge auction (float64)", dict(method="auction"), True))
    configs.append(
        (
            f"monge sinkhorn_rounding (float32, <= {args.sinkhorn_iterations} it.)",
            dict(method="sinkhorn_rounding", max_iterations=args.sinkhorn_iterations),
            False,
        )
    )
    for name, kwargs, wide in configs:
        repeats = 1 if kwargs["method"] == "sinkhorn_rounding" else args.repeats
        data = (x, y, a, b) if wide else (x32, y32, a32, b32)
        with jax.enable_x64(wide):
            t, out = best_time(monge_exact(*data, **kwargs), repeats)
        cost, error, converged, n_iters = (float(z) for z in out)
        rel = abs(cost - ref) / ref
        note = f"certified gap {error:.1e}, converged={bool(converged)}"
        if n_iters >= 0:
            note += f", {int(n_iters)} " + ("rounds" if kwargs["method"] == "auction" else "it.")
        rows.append((name, weights, t, t / t_pot, rel, note))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[2000], help="one table per n")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pivots", type=int, default=10_000_000)
    parser.add_argument("--sinkhorn-iterations", type=int, default=1000)
    parser.add_argument("--batch", type=int, nargs="*", default=[], help="pairs B n: B assignments of n points")
    parser.add_argument("--random", type=int, nargs="*", default=[], help="sizes of uniform random cost matrices")
    args = parser.parse_args()
    for n in args.n:
        table(n, args)
    for n in args.random:
        random_table(n, args)
    for B, n in zip(args.batch[::2], args.batch[1::2]):
        batch_table(B, n, args)


def random_table(n: int, args) -> None:
    C = np.random.default_rng(0).uniform(size=(n, n))
    a = np.full(n, 1.0 / n)
    t_pot, plan = best_time(lambda: ot.emd(a, a, C, numItermax=args.pivots), args.repeats)
    ref = float(np.sum(plan * C))
    t_lsa, (i, j) = best_time(lambda: linear_sum_assignment(C), args.repeats)
    rows = [("POT `ot.emd` (float64)", t_pot, 0.0, "-"),
            ("scipy `linear_sum_assignment` (float64), no duals", t_lsa, abs(C[i, j].mean() - ref) / ref, "-")]
    for method in ("network_simplex", "assignment", "auction"):
        solver = Exact(method=method, max_iterations=args.pivots if method == "network_simplex" else None)
        run = jax.jit(lambda C: (lambda sol: (sol.cost, sol.error))(solver(monge.LinearProblem(monge.CostMatrix(C)))))
        C32 = jax.numpy.asarray(C, np.float32)
        t, (cost, error) = best_time(lambda: run(C32), args.repeats)
        rows.append((f"monge {method} (float32)", t, abs(float(cost) - ref) / ref, f"certified gap {float(error):.1e}"))
    print(f"\nExact OT, uniform random costs C ~ U[0, 1], n = m = {n}, uniform weights, "
          f"{jax.devices()[0].platform} (best of {args.repeats})\n")
    print("| method | time (s) | ratio to POT | rel. cost diff | notes |")
    print("|---|---|---|---|---|")
    for name, t, rel, note in rows:
        print(f"| {name} | {t:.3f} | {t / t_pot:.2f}x | {rel:.1e} | {note} |")


def batch_table(B: int, n: int, args) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(B, n, 2))
    y = rng.normal(size=(B, n, 2)) + 1.0
    Cs = ((x[:, :, None] - y[:, None]) ** 2).sum(-1)
    a = np.full(n, 1.0 / n)
    t_pot, ref = best_time(lambda: np.array([np.sum(ot.emd(a, a, C) * C) for C in Cs]), args.repeats)
    rows = [("POT `ot.emd` (float64), looped", t_pot, 0.0, "-")]
    t_lsa, out = best_time(lambda: [linear_sum_assignment(C) for C in Cs], args.repeats)
    lsa = np.array([C[i, j].mean() for C, (i, j) in zip(Cs, out)])
    rows.append(("scipy `linear_sum_assignment` (float64), looped, no duals", t_lsa, np.max(np.abs(lsa - ref) / ref), "-"))
    for method, wide in (("network_simplex", False), ("assignment", False), ("auction", False), ("auction", True)):
        solver = Exact(method=method)

        def one(x, y):
            sol = solver(monge.LinearProblem(monge.PointCloud(x, y)))
            return sol.cost, sol.error

        dtype = np.float64 if wide else np.float32
        with jax.enable_x64(wide):
            run = jax.jit(jax.vmap(one))
            xs, ys = jax.numpy.asarray(x, dtype), jax.numpy.asarray(y, dtype)
            t, (cost, error) = best_time(lambda: run(xs, ys), args.repeats)
        rel = np.max(np.abs(np.asarray(cost, np.float64) - ref) / ref)
        name = f"monge {method} ({np.dtype(dtype).name}), vmap"
        rows.append((name, t, rel, f"max certified gap {float(np.max(error)):.1e}"))
    print(f"\nExact OT, a batch of B = {B} assignments of n = {n} points, d = 2, "
          f"{jax.devices()[0].platform} (best of {args.repeats})\n")
    print("| method | time (s) | ratio to POT | max rel. cost diff | notes |")
    print("|---|---|---|---|---|")
    for name, t, rel, note in rows:
        print(f"| {name} | {t:.4f} | {t / t_pot:.2f}x | {rel:.1e} | {note} |")


def table(n: int, args) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 2))
    y = rng.normal(size=(n, 2)) + 1.0
    uniform = np.full(n, 1.0 / n)
    a = rng.uniform(0.5, 1.5, n)
    b = rng.uniform(0.5, 1.5, n)
    rows = rows_for("uniform", x, y, uniform, uniform, args)
    rows += rows_for("non-uniform", x, y, a / a.sum(), b / b.sum(), args)
    print(f"\nExact OT, n = m = {n}, d = 2, {jax.devices()[0].platform} "
          f"(best of {args.repeats}; indicative, shared machine)\n")
    print("| method | weights | time (s) | ratio to POT | rel. cost diff | notes |")
    print("|---|---|---|---|---|---|")
    for name, weights, t, ratio, rel, note in rows:
        print(f"| {name} | {weights} | {t:.3f} | {ratio:.2f}x | {rel:.1e} | {note} |")


if __name__ == "__main__":
    main()
