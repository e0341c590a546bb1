"""Side-by-side Sinkhorn timings: monge vs OTT-JAX (vs POT where it finishes).

Same problems (float32, squared Euclidean ‖x−y‖², uniform weights, n = m), same
epsilon (a multiple of the mean cost), same target: L1 marginal error ≤ 1e-3. Times are
medians of `--repeats` runs after compilation. Every solver's final marginal error is
recomputed here, in float64 from its coupling, so "converged" is checked independently.

Usage:  python benchmarks/bench_sinkhorn.py [--sizes 1000 4000] [--dims 2 32]
                                             [--rel-eps 0.05 0.005] [--pot] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import monge

TARGET = 1e-3


def data(n, d, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = (rng.normal(size=(n, d)) * 0.8 + 0.5).astype(np.float32)
    return x, y


def timed(fn, repeats):
    out = fn()
    jax.block_until_ready(out)  # compile
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def marginal_error(plan, n):
    plan = np.asarray(plan, np.float64)
    return np.abs(plan.sum(1) - 1 / n).sum() + np.abs(plan.sum(0) - 1 / n).sum()


def run_monge(x, y, eps, repeats, online):
    solver = monge.Sinkhorn(threshold=TARGET, max_iterations=10_000)

    @jax.jit
    def solve(x, y, eps):
        geom = monge.PointCloud(x, y, online=online)
        sol = solver(monge.LinearProblem(geom, epsilon=eps))
        return sol.f, sol.g, sol.n_iters, sol.cost

    t, (f, g, it, cost) = timed(lambda: solve(x, y, eps), repeats)
    sol = solver(monge.LinearProblem(monge.PointCloud(x, y, online=online), epsilon=eps))
    err = marginal_error(sol.plan, x.shape[0]) if x.shape[0] <= 8000 else float(sol.error)
    return t, int(it), err, float(cost)


def run_ott(x, y, eps, repeats, online):
    from ott.geometry import pointcloud
    from ott.problems.linear import linear_problem
    from ott.solvers.linear import sinkhorn

    solver = sinkhorn.Sinkhorn(threshold=TARGET, max_iterations=10_000)

    @jax.jit
    def solve(x, y, eps):
        geom = pointcloud.PointCloud(x, y, epsilon=eps, batch_size=1024 if online else None)
        out = solver(linear_problem.LinearProblem(geom))
        return out.f, out.g, out.n_iters, out.primal_cost

    t, (f, g, it, cost) = timed(lambda: solve(x, y, eps), repeats)
    n = x.shape[0]
    if n <= 8000:
        C = np.asarray(monge.PointCloud(x.astype(np.float64), y.astype(np.float64)).cost_matrix())
        plan = np.exp((np.asarray(f, np.float64)[:, None] + np.asarray(g, np.float64)[None] - C) / float(eps))
        err = marginal_error(plan, n)
    else:
        err = float("nan")
    return t, int(it), err, float(cost)


def run_pot(x, y, eps, repeats):
    import ot

    n = x.shape[0]
    a = np.full(n, 1 / n)
    M = ot.dist(x.astype(np.float64), y.astype(np.float64))
    t0 = time.perf_counter()
    plan = ot.sinkhorn(a, a, M, eps, method="sinkhorn_log", stopThr=TARGET, numItermax=10_000)
    return time.perf_counter() - t0, -1, marginal_error(plan, n), float(np.sum(plan * M))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000])
    p.add_argument("--dims", type=int, nargs="+", default=[2, 32])
    p.add_argument("--rel-eps", type=float, nargs="+", default=[0.05, 0.005])
    p.add_argument("--online", action="store_true", help="online (chunked) geometries")
    p.add_argument("--pot", action="store_true", help="also run POT (slow)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    header = "| n | d | eps/mean | mode | monge s | monge it | monge err | OTT s | OTT it | OTT err | OTT/monge |"
    rows = [header, "|" + "---|" * 11]
    if args.pot:
        rows[0] += " POT s | POT err | POT/monge |"
        rows[1] += "---|---|---|"
    ratios = []
    for n in args.sizes:
        for d in args.dims:
            x, y = data(n, d)
            mean = float(monge.LinearProblem(monge.PointCloud(x, y), epsilon=1.0).geom.mean_cost(jnp.full(n, 1 / n), jnp.full(n, 1 / n)))
            for rel in args.rel_eps:
                eps = jnp.float32(rel * mean)
                tm, im, em, cm = run_monge(x, y, eps, args.repeats, args.online)
                mode = "online" if args.online else "dense"
                try:
                    to, io, eo, co = run_ott(x, y, eps, args.repeats, args.online)
                except Exception as error:  # OTT 0.6's online mode fails on recent JAX
                    print(f"OTT {mode} failed ({type(error).__name__}: {str(error)[:80]}); timing OTT dense instead")
                    to, io, eo, co = run_ott(x, y, eps, args.repeats, False)
                    mode += " (OTT: dense, its online mode crashed)"
                ratios.append(to / tm)
                row = f"| {n} | {d} | {rel} | {mode} | {tm:.3f} | {im} | {em:.1e} | {to:.3f} | {io} | {eo:.1e} | {to / tm:.1f}× |"
                if args.pot:
                    tp, _, ep, _ = run_pot(x, y, float(eps), 1)
                    row += f" {tp:.2f} | {ep:.1e} | {tp / tm:.0f}× |"
                rows.append(row)
                print(row, flush=True)
    table = "\n".join(rows)
    summary = f"\nmedian OTT/monge: {statistics.median(ratios):.2f}×, min {min(ratios):.2f}× — {platform.processor() or platform.machine()}, {jax.devices()[0].platform}, jax {jax.__version__}"
    print(summary)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(table + "\n" + summary + "\n")


if __name__ == "__main__":
    main()
