"""Low-rank OT: monge.LowRankSinkhorn vs OTT-JAX LRSinkhorn, and monge alone at n = 10⁶.

Problem (float32, squared Euclidean ‖x−y‖², uniform weights, n = m): source x ~ N(0, I),
target y ~ 0.7 N(0, I) + 1, d = 2 for the side-by-side rows. Both solvers get the
same problem, the same rank (`--rank`, default 10) and the same named initialisation
("rank2", "kmeans", "random"), each with its own defaults otherwise (monge: stop when a
block of 10 steps decreases the objective by ≤ 1e-4 relative, at most 2000 steps; OTT:
stop when the generalised JS change of (Q, R, g) is < 1e-3, at most 2000 steps). The
k-means starts are each library's own (OTT clusters each cloud; monge clusters the
source and sends both clouds to its centroids), so the starts are alike, not equal.

Times: "first" is the first call of the jitted solve (compilation + one run); "s" is the
median of `--repeats` later calls. Every returned coupling P = Q diag(1/g) Rᵀ is checked
here, independently of both libraries, in float64 NumPy: its cost ⟨C, P⟩ = Σ_k (Qᵀ A
Bᵀ R)_kk / g_k with A = [‖x‖², 1, −2x], B = [1, ‖y‖², y] (so C = A Bᵀ is never formed),
and the marginal errors ‖Q1 − a‖₁ + ‖R1 − b‖₁ ("err a,b") and ‖Qᵀ1 − g‖₁ + ‖Rᵀ1 − g‖₁
("err g"). Up to `--exact-max-n` the exact OT cost (POT `ot.emd2`, float64) is given
for reference.

`--million`: monge alone at n = m = 10⁶, d = 2 and d = 30, default initializer ("auto":
k-means), each in a fresh subprocess, so the time includes Python start-up, imports and
compilation; peak memory is the child's maximum resident set size.

Usage:  python benchmarks/bench_lowrank.py [--sizes 2000 10000 100000] [--inits rank2 kmeans random]
            [--million] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

DEFAULT_OUT = "benchmarks/results/2026-12-01-lowrank.md"


def data(n, d, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = (0.7 * rng.normal(size=(n, d)) + 1.0).astype(np.float32)
    return x, y


def check(x, y, q, r, g):
    """float64 cost of P = Q diag(1/g) Rᵀ and its marginal errors (uniform weights)."""
    x, y, q, r, g = (np.asarray(z, dtype=np.float64) for z in (x, y, q, r, g))
    n, m = x.shape[0], y.shape[0]
    A = np.concatenate([np.sum(x**2, axis=1, keepdims=True), np.ones((n, 1)), -2.0 * x], axis=1)
    B = np.concatenate([np.ones((m, 1)), np.sum(y**2, axis=1, keepdims=True), y], axis=1)
    cost = float(np.sum(np.sum((q.T @ A) * (r.T @ B), axis=1) / g))
    err_ab = float(np.abs(q.sum(1) - 1 / n).sum() + np.abs(r.sum(1) - 1 / m).sum())
    err_g = float(np.abs(q.sum(0) - g).sum() + np.abs(r.sum(0) - g).sum())
    return cost, err_ab, err_g


def timed(solve, args, repeats):
    """(first call s, median of `repeats` later calls s, output)."""
    import jax

    t0 = time.perf_counter()
    out = jax.block_until_ready(solve(*args))
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(solve(*args))
        times.append(time.perf_counter() - t0)
    return first, (statistics.median(times) if times else float("nan")), out


def run_monge(x, y, init, rank, repeats, max_iterations=2000):
    import jax

    import monge

    solver = monge.LowRankSinkhorn(rank=rank, initializer=init, max_iterations=max_iterations)

    @jax.jit
    def solve(x, y):
        sol = solver(monge.LinearProblem(monge.PointCloud(x, y)))
        return sol.q, sol.r, sol.g, sol.n_iters, sol.converged

    first, t, (q, r, g, it, conv) = timed(solve, (x, y), repeats)
    return dict(first=first, s=t, it=int(it), conv=bool(conv), q=q, r=r, g=g)


def run_ott(x, y, init, rank, repeats, max_iterations=2000, threshold=1e-3):
    import jax
    from ott.geometry import pointcloud
    from ott.initializers.linear import initializers_lr
    from ott.problems.linear import linear_problem
    from ott.solvers.linear import sinkhorn_lr

    cls = {"rank2": initializers_lr.Rank2Initializer, "random": initializers_lr.RandomInitializer,
           "kmeans": initializers_lr.KMeansInitializer}[init]
    solver = sinkhorn_lr.LRSinkhorn(rank=rank, initializer=cls(rank), max_iterations=max_iterations,
                                    threshold=threshold)

    @jax.jit
    def solve(x, y):
        out = solver(linear_problem.LinearProblem(pointcloud.PointCloud(x, y)))
        return out.q, out.r, out.g, out.errors, out.converged

    first, t, (q, r, g, errors, conv) = timed(solve, (x, y), repeats)
    it = int(np.sum(np.asarray(errors) != -1)) * solver.inner_iterations
    return dict(first=first, s=t, it=it, conv=bool(conv), q=q, r=r, g=g)


def exact_cost(x, y):
    import ot

    x, y = x.astype(np.float64), y.astype(np.float64)
    w = np.full(x.shape[0], 1 / x.shape[0])
    return float(ot.emd2(w, w, ot.dist(x, y), numItermax=10**8))


def versions():
    import jax
    import ot
    import ott

    import monge

    return f"jax {jax.__version__}, monge {monge.__version__}, ott-jax {ott.__version__}, POT {ot.__version__}, numpy {np.__version__}"


def machine():
    cpu = platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {platform.system()} {platform.release()}"


def peak_rss_mib():
    """This process's peak resident memory in MiB: VmHWM of /proc/self/status (the high-water
    mark of this program's own address space, which `execve` starts afresh), else
    `ru_maxrss`, which on Linux also counts the parent's memory at the fork that started
    this process."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**10
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def child(n, d, rank, seed, dykstra_threshold=None):
    """One monge solve at n = m, d (default initializer), in this fresh process; prints JSON."""
    t_start = time.perf_counter()
    import jax

    import monge

    t_import = time.perf_counter() - t_start
    x, y = data(n, d, seed)
    rss_data = peak_rss_mib()
    extra = {} if dykstra_threshold is None else {"dykstra_threshold": dykstra_threshold}
    solver = monge.LowRankSinkhorn(rank=rank, **extra)

    @jax.jit
    def solve(x, y):
        sol = solver(monge.LinearProblem(monge.PointCloud(x, y)))
        return sol.q, sol.r, sol.g, sol.n_iters, sol.converged, sol.status

    t0 = time.perf_counter()
    compiled = solve.lower(x, y).compile()
    t_compile = time.perf_counter() - t0
    t0 = time.perf_counter()
    q, r, g, it, conv, status = jax.block_until_ready(compiled(x, y))
    t_run = time.perf_counter() - t0
    q, r, g = np.asarray(q), np.asarray(r), np.asarray(g)
    peak = peak_rss_mib()  # before the check
    t_total = time.perf_counter() - t_start
    cost, err_ab, err_g = check(x, y, q, r, g)
    print(json.dumps(dict(n=n, d=d, import_s=t_import, compile_s=t_compile, run_s=t_run,
                          to_solution_s=t_total, peak_mib=peak, data_mib=rss_data, it=int(it),
                          conv=bool(conv), status=monge.Status(int(status)).name, cost=cost, err_ab=err_ab,
                          err_g=err_g, initializer=solver.resolved_initializer(monge.PointCloud(x[:1], y[:1])))))


def fmt_pct(u, v):
    return f"{100 * (u / v - 1):+.2f}%"


def side_by_side(args, lines):
    cols = ["n", "init", "monge first s", "monge s", "monge it", "monge conv", "monge cost",
            "monge err a,b", "monge err g", "OTT first s", "OTT s", "OTT it", "OTT conv", "OTT cost",
            "OTT err a,b", "OTT err g", "OTT/monge time", "cost monge/OTT − 1"]
    if any(n <= args.exact_max_n for n in args.sizes):
        cols += ["exact (emd2)", "monge/exact − 1", "OTT/exact − 1"]
    rows = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    print(rows[0], flush=True)
    done = {}
    for n in args.sizes:
        x, y = data(n, 2, args.seed)
        exact = exact_cost(x, y) if n <= args.exact_max_n else None
        repeats = args.repeats if args.repeats is not None else (3 if n <= 2000 else 1)
        for init in args.inits:
            mo = run_monge(x, y, init, args.rank, repeats)
            mc = check(x, y, mo["q"], mo["r"], mo["g"])
            done[n, init] = (mo, mc)
            ott_iters = args.ott_max_iterations.get(n, 2000)
            ot_ = run_ott(x, y, init, args.rank, repeats, ott_iters)
            oc = check(x, y, ot_["q"], ot_["r"], ot_["g"])
            row = [n, init, f"{mo['first']:.2f}", f"{mo['s']:.2f}", mo["it"], mo["conv"], f"{mc[0]:.5f}",
                   f"{mc[1]:.1e}", f"{mc[2]:.1e}", f"{ot_['first']:.2f}", f"{ot_['s']:.2f}",
                   f"{ot_['it']}" + ("*" if ott_iters != 2000 else ""), ot_["conv"], f"{oc[0]:.5f}",
                   f"{oc[1]:.1e}", f"{oc[2]:.1e}", f"{ot_['s'] / mo['s']:.1f}×", fmt_pct(mc[0], oc[0])]
            if len(cols) > 18:
                row += ([f"{exact:.5f}", fmt_pct(mc[0], exact), fmt_pct(oc[0], exact)] if exact is not None
                        else ["—"] * 3)
            rows.append("| " + " | ".join(map(str, row)) + " |")
            print(rows[-1], flush=True)
    lines += ["## Side by side: monge vs OTT-JAX (d = 2, rank %d)" % args.rank, ""] + rows + [""]
    capped = {n: k for n, k in args.ott_max_iterations.items() if n in args.sizes}
    if capped:
        lines += [f"\\* OTT capped at max_iterations = {k} at n = {n} (time-box)." for n, k in capped.items()] + [""]
    return done


def ott_tight(args, lines, done):
    """OTT with a tighter threshold (and more steps), first call only, vs monge's defaults."""
    thr, iters = args.ott_tight
    iters = int(iters)
    cols = ["n", "init", "monge first s", "monge it", "monge cost", f"OTT(thr {thr:g}) first s", "OTT it",
            "OTT conv", "OTT cost", "OTT err a,b", "cost monge/OTT − 1"]
    rows = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    print(rows[0], flush=True)
    for n in [n for n in args.sizes if n <= args.ott_tight_max_n]:
        x, y = data(n, 2, args.seed)
        for init in args.inits:
            mo, mc = done[n, init]
            ot_ = run_ott(x, y, init, args.rank, 0, iters, thr)
            oc = check(x, y, ot_["q"], ot_["r"], ot_["g"])
            row = [n, init, f"{mo['first']:.2f}", mo["it"], f"{mc[0]:.5f}", f"{ot_['first']:.2f}", ot_["it"],
                   ot_["conv"], f"{oc[0]:.5f}", f"{oc[1]:.1e}", fmt_pct(mc[0], oc[0])]
            rows.append("| " + " | ".join(map(str, row)) + " |")
            print(rows[-1], flush=True)
    lines += [f"## OTT with threshold = {thr:g}, max_iterations = {iters} (one call each, compilation included)", "",
              "OTT's default threshold (1e-3 on the JS change of the factors) stops on the plateau near "
              "its start (see the costs above); this table shows what it reaches when pushed further. "
              "monge columns: the default runs of the first table.", ""] + rows + [""]


def million(args, lines):
    cols = ["n", "d", "rank", "init", "dykstra_threshold", "process s (start → solution)", "imports s", "compile s", "solve s",
            "peak RSS MiB", "RSS after data MiB", "it", "conv", "status", "cost (float64)", "err a,b", "err g"]
    rows = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    print(rows[0], flush=True)
    runs = [(d, None) for d in args.million_dims] + [(d, t) for t in args.million_dykstra_threshold
                                                     for d in args.million_dims]
    for d, thr in runs:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", str(args.million_n), str(d),
               str(args.rank), str(args.seed)] + ([] if thr is None else ["--child-dykstra-threshold", str(thr)])
        label = "default (1e-5)" if thr is None else f"{thr:g} (what-if)"
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.million_timeout)
        except subprocess.TimeoutExpired:
            rows.append(f"| {args.million_n} | {d} | {args.rank} | auto | {label} | killed after {args.million_timeout} s |")
            print(rows[-1], flush=True)
            continue
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            print(proc.stderr[-3000:])
            rows.append(f"| {args.million_n} | {d} | {args.rank} | auto | {label} | failed (rc {proc.returncode}, {wall:.0f} s) |")
            continue
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        row = [res["n"], d, args.rank, f"auto ({res['initializer']})", label,
               f"{res['to_solution_s']:.1f} (process {wall:.1f})",
               f"{res['import_s']:.1f}", f"{res['compile_s']:.1f}", f"{res['run_s']:.1f}", f"{res['peak_mib']:.0f}",
               f"{res['data_mib']:.0f}", res["it"], res["conv"], res["status"], f"{res['cost']:.5f}",
               f"{res['err_ab']:.1e}", f"{res['err_g']:.1e}"]
        rows.append("| " + " | ".join(map(str, row)) + " |")
        print(rows[-1], flush=True)
    lines += [f"## monge alone at n = m = {args.million_n} (fresh process each)", ""] + rows + [""]
    lines += ["\"process s\": from the child's start (before `import jax`) until the solution is "
              "back in NumPy, which includes compilation; in brackets the parent's wall time of the "
              "whole child (also the float64 check and exit). Peak RSS: the child's VmHWM "
              "(/proc/self/status), read before the float64 check; \"RSS after data\": the same mark "
              "after `import jax`, `import monge` and the points.", ""]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="*", default=[2000, 10000, 100000])
    p.add_argument("--inits", nargs="+", default=["rank2", "kmeans", "random"], choices=["rank2", "kmeans", "random"])
    p.add_argument("--rank", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=None, help="timed calls after the first (median); default 3 up to n = 2000, else 1")
    p.add_argument("--exact-max-n", type=int, default=2000, help="exact OT cost (POT emd2) up to this n")
    p.add_argument("--ott-max-iterations", nargs="*", default=[], metavar="N:ITERS",
                   help="cap OTT's max_iterations at size N (time-box), e.g. 100000:500")
    p.add_argument("--ott-tight", nargs="*", default=["1e-7", "5000"], metavar="THRESHOLD MAX_ITERATIONS",
                   help="also run OTT at this threshold and max_iterations (no values: skip)")
    p.add_argument("--ott-tight-max-n", type=int, default=10000)
    p.add_argument("--million", action="store_true", help="also run monge at n = 10⁶ in fresh processes")
    p.add_argument("--million-n", type=int, default=1_000_000)
    p.add_argument("--million-dims", type=int, nargs="+", default=[2, 30])
    p.add_argument("--million-timeout", type=float, default=3600.0, help="kill a 10⁶ child after this many seconds")
    p.add_argument("--million-dykstra-threshold", type=float, nargs="*", default=[],
                   help="also run the 10⁶ rows with these dykstra_threshold values (what-if rows)")
    p.add_argument("--child-dykstra-threshold", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--note", action="append", default=[], help="a line added to the results file")
    p.add_argument("--child", nargs=4, type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(*args.child, dykstra_threshold=args.child_dykstra_threshold)
        return
    args.ott_tight = (float(args.ott_tight[0]), int(args.ott_tight[1])) if args.ott_tight else None
    args.ott_max_iterations = {int(k): int(v) for k, v in (s.split(":") for s in args.ott_max_iterations)}

    import jax

    lines = [f"# Low-rank OT: monge.LowRankSinkhorn vs OTT-JAX LRSinkhorn ({datetime.date.today()})", "",
             f"Machine: {machine()}; JAX on {jax.devices()[0].platform}.",
             f"Versions: {versions()}, Python {platform.python_version()}.",
             f"Command: `python {' '.join([os.path.relpath(__file__)] + sys.argv[1:])}`", "",
             "Problem: float32, squared Euclidean cost, uniform weights, n = m, x ~ N(0, I), "
             "y ~ 0.7 N(0, I) + 1, seed %d. Each solver with its own stopping defaults (monge: "
             "relative objective decrease per block of 10 steps ≤ 1e-4; OTT: generalised JS change "
             "of the factors < 1e-3; both at most 2000 steps)." % args.seed, "",
             "Cost check: every returned coupling's cost is recomputed here in float64 NumPy from "
             "its factors as Σ_k (Qᵀ A Bᵀ R)_kk / g_k with A = [‖x‖², 1, −2x] and B = [1, ‖y‖², y] "
             "(so the n × m cost is never formed); \"err a,b\" = ‖Q1 − a‖₁ + ‖R1 − b‖₁ and "
             "\"err g\" = ‖Qᵀ1 − g‖₁ + ‖Rᵀ1 − g‖₁, also in float64.", ""] + args.note + [""]
    if args.sizes:
        done = side_by_side(args, lines)
        if args.ott_tight and any(n <= args.ott_tight_max_n for n in args.sizes):
            ott_tight(args, lines, done)
    if args.million:
        million(args, lines)
    lines.append(f"Peak resident memory of the side-by-side process: {peak_rss_mib():.0f} MiB.")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
