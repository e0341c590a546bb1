"""Side-by-side Sinkhorn timings: monge vs OTT-JAX (vs POT where it finishes).

Same problems (float32, squared Euclidean ‖x−y‖², uniform weights, n = m), same
epsilon (a multiple of the mean cost), same target: L1 marginal error ≤ 1e-3. Times are
medians of `--repeats` runs after compilation. Every solver's final marginal error
(both marginals, L1) is recomputed here in float64 from its potentials, in blocks, so
"converged" is checked independently of the solvers. Memory is XLA's own account of
the compiled solve (arguments + outputs + temporaries, `memory_analysis()`); the
process's peak resident memory is printed at the end.

monge runs in each of `--modes` (dense: stored cost matrix; online: blocks recomputed,
memory O(n + m) beyond one block, so a matrix that is a single block is stored;
`--chunk-size` forces smaller blocks); OTT-JAX runs once per problem, dense (its online mode, batch_size=,
crashes on JAX 0.10: `batching.is_vmappable`), and both monge modes are compared with it.

Usage:  python benchmarks/bench_sinkhorn.py [--sizes 1000 4000 16000] [--dims 2 32]
            [--rel-eps 0.05 0.005] [--modes dense online] [--pot] [--out FILE.md]
The n = 100k online run: --sizes 100000 --dims 2 --rel-eps 0.05 --modes online
(OTT is skipped above --ott-max-n: a dense 100k × 100k matrix is 40 GB).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
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


def timed(fn, args, repeats):
    compiled = jax.jit(fn).lower(*args).compile()
    mem = compiled.memory_analysis()
    megabytes = float("nan")
    if mem is not None:
        total = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
        megabytes = total / 2**20
    if repeats > 1:  # compiled ahead of time above; one warm-up run for the caches
        out = jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times), out, megabytes


@jax.jit
def _block_marginals(f, g, x, y, eps, log_ab):
    x, y, f, g = (z.astype(jnp.float64) for z in (x, y, f, g))
    C = jnp.sum((x[:, None, :] - y[None, :, :]) ** 2, axis=-1)
    P = jnp.exp((f[:, None] + g[None, :] - C) / eps + log_ab)
    return P.sum(1), P.sum(0)


def marginal_error(f, g, x, y, eps, weighted: bool, rows=256):
    """L1 error of both marginals of P_ij = [a_i b_j] exp((f_i + g_j - C_ij)/eps), in
    float64 (weights a = b = 1/n in the potentials' convention when `weighted`)."""
    n, m = x.shape[0], y.shape[0]
    log_ab = -np.log(n) - np.log(m) if weighted else 0.0
    with jax.enable_x64(True):
        row_sums, col_sums = [], np.zeros(m)
        for s in range(0, n, rows):
            r, c = _block_marginals(jnp.asarray(f[s : s + rows]), jnp.asarray(g), jnp.asarray(x[s : s + rows]), jnp.asarray(y), float(eps), log_ab)
            row_sums.append(np.asarray(r))
            col_sums += np.asarray(c)
    return np.abs(np.concatenate(row_sums) - 1 / n).sum() + np.abs(col_sums - 1 / m).sum()


def run_monge(x, y, eps, repeats, online, chunk_size=None):
    solver = monge.Sinkhorn(threshold=TARGET, max_iterations=10_000)

    def solve(x, y, eps):
        geom = monge.PointCloud(x, y, online=online, chunk_size=chunk_size if online else None)
        sol = solver(monge.LinearProblem(geom, epsilon=eps))
        return sol.f, sol.g, sol.n_iters, sol.error

    t, (f, g, it, own), mb = timed(solve, (x, y, eps), repeats)
    return t, int(it), marginal_error(np.asarray(f), np.asarray(g), x, y, eps, weighted=True), mb


def run_ott(x, y, eps, repeats):
    from ott.geometry import pointcloud
    from ott.problems.linear import linear_problem
    from ott.solvers.linear import sinkhorn

    solver = sinkhorn.Sinkhorn(threshold=TARGET, max_iterations=10_000)

    def solve(x, y, eps):
        geom = pointcloud.PointCloud(x, y, epsilon=eps)
        out = solver(linear_problem.LinearProblem(geom))
        return out.f, out.g, out.n_iters

    t, (f, g, it), mb = timed(solve, (x, y, eps), repeats)
    return t, int(it), marginal_error(np.asarray(f), np.asarray(g), x, y, eps, weighted=False), mb


def run_pot(x, y, eps):
    import ot

    n = x.shape[0]
    a = np.full(n, 1 / n)
    M = ot.dist(x.astype(np.float64), y.astype(np.float64))
    t0 = time.perf_counter()
    # POT stops on the L2 norm of one marginal's error: L1 <= sqrt(n) L2, so this
    # threshold guarantees the L1 target (the other marginal is exact after an update)
    plan = ot.sinkhorn(a, a, M, eps, method="sinkhorn_log", stopThr=TARGET / np.sqrt(n), numItermax=100_000)
    t = time.perf_counter() - t0
    return t, np.abs(plan.sum(1) - a).sum() + np.abs(plan.sum(0) - a).sum()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000])
    p.add_argument("--dims", type=int, nargs="+", default=[2, 32])
    p.add_argument("--rel-eps", type=float, nargs="+", default=[0.05, 0.005])
    p.add_argument("--modes", nargs="+", default=["dense", "online"], choices=["dense", "online"])
    p.add_argument("--pot", action="store_true", help="also run POT's float64 log-domain Sinkhorn (slow)")
    p.add_argument("--pot-max-n", type=int, default=1000, help="run POT only up to this n")
    p.add_argument("--ott-max-n", type=int, default=20000, help="run OTT only up to this n")
    p.add_argument("--chunk-size", type=int, default=None, help="online: lines per block (default: 2**21 entries)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs (median); default 3 up to n = 1000, else 1")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    cols = ["n", "d", "eps/mean", "monge mode", "monge s", "monge it", "monge err", "monge MB", "OTT s", "OTT it", "OTT err", "OTT MB", "OTT/monge"]
    if args.pot:
        cols += ["POT s", "POT err", "POT/monge"]
    rows = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    print(rows[0], flush=True)
    ratios, pot_ratios, one_block = [], [], False
    for n in args.sizes:
        repeats = args.repeats or (3 if n <= 1000 else 1)
        for d in args.dims:
            x, y = data(n, d)
            w = jnp.full(n, 1 / n)
            mean = float(monge.PointCloud(x, y, online=n * n > 2**25).mean_cost(w, w))
            for rel in args.rel_eps:
                eps = jnp.float32(rel * mean)
                ott = None
                if n <= args.ott_max_n:
                    try:
                        ott = run_ott(x, y, eps, repeats)
                    except Exception as error:  # e.g. out of memory
                        print(f"OTT failed: {type(error).__name__}: {str(error)[:120]}")
                pot = run_pot(x, y, float(eps)) if args.pot and n <= args.pot_max_n else None
                for mode in args.modes:
                    tm, im, em, mm = run_monge(x, y, eps, repeats, mode == "online", args.chunk_size)
                    label = mode
                    if mode == "online" and not monge.PointCloud(x, y, online=True, chunk_size=args.chunk_size).is_online:
                        label, one_block = "online*", True
                    row = [n, d, rel, label, f"{tm:.3f}", im, f"{em:.1e}", f"{mm:.0f}"]
                    if ott is not None:
                        to, io, eo, mo = ott
                        ratios.append(to / tm)
                        row += [f"{to:.3f}", io, f"{eo:.1e}", f"{mo:.0f}", f"{to / tm:.1f}×"]
                    else:
                        row += ["—"] * 5
                    if args.pot:
                        if pot is not None:
                            tp, ep = pot
                            pot_ratios.append(tp / tm)
                            row += [f"{tp:.2f}", f"{ep:.1e}", f"{tp / tm:.0f}×"]
                        else:
                            row += ["—"] * 3
                    rows.append("| " + " | ".join(map(str, row)) + " |")
                    print(rows[-1], flush=True)
    table = "\n".join(rows)
    lines = []
    if one_block:
        lines.append("online*: the whole cost matrix is one online block (n·m ≤ 2**21 entries), so it is stored, as in dense mode")
    if ratios:
        lines.append(f"median OTT/monge: {statistics.median(ratios):.2f}×, min {min(ratios):.2f}× ({len(ratios)} rows)")
    if pot_ratios:
        lines.append(f"median POT/monge: {statistics.median(pot_ratios):.0f}×, min {min(pot_ratios):.0f}× ({len(pot_ratios)} rows)")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    lines.append(
        f"peak resident memory of this process: {peak:.0f} MB — {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, {jax.devices()[0].platform}, jax {jax.__version__}, monge {monge.__version__}"
    )
    summary = "\n".join(lines)
    print(summary)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(table + "\n\n" + summary + "\n")


if __name__ == "__main__":
    main()
