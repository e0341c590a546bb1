"""monge against POT, side by side, for the 1-D, sliced, partial, smooth, sparse, PRW
and semi-discrete solvers.

Each case builds one input, runs monge (float32, JAX's default; compiled by one
warm-up call that is not timed) and POT (float64, NumPy) on it, and reports the median
of `--repeats` timed runs and the relative difference of the two values. Timings on a
shared machine are indicative.

    python benchmarks/bench_linear.py [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import ot

import monge

REPEATS = 3
BUDGET = 5.0  # seconds


def median_time(fn, repeats: int = REPEATS, warmup: bool = True):
    """Median wall time of `fn()` over `repeats` runs (after one untimed warm-up); a
    call slower than BUDGET seconds is timed once only, to keep the script short."""
    out = jax.block_until_ready(fn()) if warmup else None
    times = []
    while len(times) < repeats and sum(times) < BUDGET:
        start = time.perf_counter()
        out = jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def weights(rng, n):
    w = rng.uniform(0.5, 1.5, n)
    return w / w.sum()


def sqeuclidean(x, y):
    return ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)


def rel(mine, ref) -> float:
    return abs(float(mine) - float(ref)) / abs(float(ref))


def quad_objective(C, P, gamma):
    """<C, P> + gamma/2 ||P||^2, the primal objective of smooth and sparse OT."""
    P = np.asarray(P, np.float64)
    return float((C * P).sum() + 0.5 * gamma * (P**2).sum())


# -- cases: each returns (method, size, monge_time, pot_time, rel_diff, note) ----------
def case_1d(rng, n, k=None):
    shape = (n,) if k is None else (n, k)
    u, v = rng.normal(size=shape), rng.normal(1.0, 2.0, size=shape)
    a, b = weights(rng, n), weights(rng, n)
    f = jax.jit(lambda u, v, a, b: monge.wasserstein_1d(u, v, a=a, b=b, p=2))
    args = [jnp.asarray(t, jnp.float32) for t in (u, v, a, b)]
    tm, vm = median_time(lambda: f(*args))
    tp, vp = median_time(lambda: ot.wasserstein_1d(u, v, a, b, p=2), warmup=False)
    name, size = ("1-D exact", f"n=m={n}") if k is None else ("1-D exact, batched", f"n=m={n}, k={k}")
    return name, size, tm, tp, float(np.max(np.abs(vm - vp) / np.abs(vp))), "weighted"


def case_sliced(rng, n, d=10, n_proj=256):
    x, y = rng.normal(size=(n, d)), rng.normal(0.5, 1.0, size=(n, d))
    D = rng.normal(size=(n_proj, d))
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    f = jax.jit(lambda x, y, D: monge.sliced_wasserstein(x, y, n_projections=n_proj, directions=D, p=2))
    args = [jnp.asarray(t, jnp.float32) for t in (x, y, D)]
    tm, vm = median_time(lambda: f(*args))
    pot = lambda: ot.sliced_wasserstein_distance(x, y, n_projections=n_proj, projections=D.T, p=2) ** 2
    tp, vp = median_time(pot, warmup=False)
    return "sliced", f"n=m={n}, d={d}, L={n_proj}", tm, tp, rel(vm, vp), "SW_2^2"


def cloud_problem(rng, n, d=2):
    x, y = rng.uniform(size=(n, d)), rng.uniform(size=(n, d))
    return sqeuclidean(x, y), weights(rng, n), weights(rng, n)


def case_partial(rng, n, epsilon=0.0, mass=0.6):
    C, a, b = cloud_problem(rng, n)
    f = eqx.filter_jit(lambda C, a, b: monge.solve_matrix(C, a=a, b=b, epsilon=epsilon, mass=mass))
    args = [jnp.asarray(t, jnp.float32) for t in (C, a, b)]
    tm, sol = median_time(lambda: f(*args))
    if epsilon == 0:
        pot = lambda: ot.partial.partial_wasserstein(a, b, C, m=mass)
        name, size = "partial exact", f"n=m={n}, m={mass}"
    else:
        pot = lambda: ot.partial.entropic_partial_wasserstein(a, b, C, epsilon, m=mass)
        name, size = "partial entropic", f"n=m={n}, m={mass}, eps={epsilon}"
    tp, P = median_time(pot, warmup=False)
    note = f"cost <C,P>; converged={bool(sol.converged)}"
    return name, size, tm, tp, rel(sol.cost, (C * P).sum()), note


def case_smooth(rng, n, gamma=0.1, k=None):
    C, a, b = cloud_problem(rng, n)
    solver = monge.SmoothOT(gamma=gamma) if k is None else monge.SparseOT(k=k, gamma=gamma)
    f = eqx.filter_jit(lambda C, a, b: solver(monge.LinearProblem(monge.CostMatrix(C), a, b)))
    args = [jnp.asarray(t, jnp.float32) for t in (C, a, b)]
    tm, sol = median_time(lambda: f(*args))
    if k is None:
        pot = lambda: ot.smooth.smooth_ot_dual(a, b, C, gamma, reg_type="l2")
        name, size = "smooth (L2)", f"n=m={n}, gamma={gamma}"
    else:
        def pot():  # POT 0.9.7 prints a debug line per call (ot/utils.py): silence it
            with contextlib.redirect_stdout(io.StringIO()):
                return ot.smooth.smooth_ot_semi_dual(
                    a, b, C, gamma, reg_type="sparsity_constrained", max_nz=k)
        name, size = "sparsity-constrained", f"n=m={n}, k={k}, gamma={gamma}"
    tp, P = median_time(pot, warmup=False)
    pot_err = np.abs(P.sum(1) - a).sum() + np.abs(P.sum(0) - b).sum()
    note = (f"monge reg_cost vs POT <C,P>+g/2|P|^2; L1 marginal error: monge "
            f"{float(sol.error):.1e} (converged={bool(sol.converged)}), POT {pot_err:.1e}")
    return name, size, tm, tp, rel(sol.reg_cost, quad_objective(C, P, gamma)), note


def case_prw(rng, n, d=10, k=2):
    x, y = rng.normal(size=(n, d)), rng.normal(size=(n, d))
    y[:, :k] += 2.0
    key = jax.random.key(0)
    f = jax.jit(lambda x, y, key: monge.projection_robust_wasserstein(x, y, k=k, key=key).value)
    args = (jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32), key)
    tm, vm = median_time(lambda: f(*args))
    try:
        import ot.dr  # noqa: F401  (needs autograd, pymanopt, scikit-learn)
    except ImportError:
        note = "POT not run: ot.dr needs autograd + pymanopt (not installed)"
        return "PRW", f"n=m={n}, d={d}, k={k}", tm, None, None, note
    a = np.full(n, 1.0 / n)
    U0 = np.linalg.qr(rng.normal(size=(d, k)))[0]
    pot = lambda: ot.dr.projection_robust_wasserstein(x, y, a, a, tau=0.002, U0=U0, reg=0.1, k=k)
    tp, (pi, U) = median_time(pot, warmup=False)
    diff = x[:, None, :] @ U - (y @ U)[None]
    return "PRW", f"n=m={n}, d={d}, k={k}", tm, tp, rel(vm, (pi * (diff**2).sum(-1)).sum()), ""


def uniform_square(key, n):
    return jax.random.uniform(key, (n, 2))


def case_semidiscrete(rng, m, n_steps):
    y = rng.uniform(size=(m, 2))
    yj, key = jnp.asarray(y, jnp.float32), jax.random.key(0)
    run = lambda: monge.semidiscrete(uniform_square, yj, key=key, n_steps=n_steps).reg_cost
    tm, vm = median_time(run)
    note = "no POT counterpart"
    if not hasattr(ot, "semidiscrete"):
        return "semi-discrete", f"m={m}, steps={n_steps}", tm, None, None, note
    # POT >= 0.9.7 has one: ot.semidiscrete.solve_semidiscrete (SGD, uniform on [0,1]^d)
    pot = lambda: ot.semidiscrete.solve_semidiscrete(y, "unif", max_iter=n_steps, batch_size=128)
    tp, g = median_time(pot, warmup=False)
    xs = rng.uniform(size=(100_000, 2))
    vp = np.mean(ot.semidiscrete.semidiscrete_c_transform(y, xs, g)) + g.mean()
    note = (f"POT: ot.semidiscrete.solve_semidiscrete, default lr; semi-dual on 1e5 samples: "
            f"monge {float(vm):.4f}, POT {vp:.4f}")
    return "semi-discrete", f"m={m}, steps={n_steps}", tm, tp, rel(vm, vp), note


def row(case, *args):
    name = case.__name__.removeprefix("case_")
    try:
        return case(*args)
    except Exception as err:  # one failing case must not stop the table
        msg = f"{type(err).__name__}: {err}".replace("\n", " ").replace("|", "/")[:160]
        return name, "", None, None, None, f"ERROR {msg}"


def fmt(t):
    return "—" if t is None else f"{t * 1e3:.1f} ms"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    args = parser.parse_args()
    q = args.quick
    rng = np.random.default_rng(0)
    cases = [
        (case_1d, rng, 10_000 if q else 100_000),
        (case_1d, rng, 2_000 if q else 100_000, 64),
        (case_sliced, rng, 1_000 if q else 5_000),
        (case_partial, rng, 100 if q else 500),
        (case_partial, rng, 100 if q else 500, 0.05),
        (case_smooth, rng, 100 if q else 300),
        (case_smooth, rng, 100 if q else 300, 0.1, 5),
        (case_prw, rng, 100 if q else 200),
        (case_semidiscrete, rng, 20 if q else 50, 500 if q else 2000),
    ]
    print(f"monge {monge.__version__} (float32, jax {jax.__version__}, {jax.devices()[0].platform}) "
          f"vs POT {ot.__version__} (float64); median of {REPEATS} runs (1 run where a call "
          f"takes over {BUDGET:.0f} s), monge after compilation.\n")
    print("| method | size | monge | POT | POT/monge | rel. diff | note |")
    print("|---|---|---|---|---|---|---|")
    for case, *case_args in cases:
        name, size, tm, tp, diff, note = row(case, *case_args)
        ratio = "—" if tm is None or tp is None else f"{tp / tm:.2f}"
        d = "—" if diff is None else f"{diff:.1e}"
        print(f"| {name} | {size} | {fmt(tm)} | {fmt(tp)} | {ratio} | {d} | {note} |", flush=True)


if __name__ == "__main__":
    main()
