"""Issue 10, Part B, items 7 (vmapped solutions), 9 (options accepted and ignored),
10 (bad input names the argument) and 11 (command line honesty).

References are independent of the code under test: POT in float64 (Sinkhorn, exact
OT) for values, `pyproject.toml` for install hints, and the solver's own returned
iteration count for what the progress lines must agree with.
"""

import functools
import math
import re
import sys
import tomllib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import monge
from monge import cli
from monge.geometry import ONLINE_ABOVE
from monge.solvers.linear.exact import Exact
from monge.problems import PartialProblem
from monge.solvers.linear.partial import PartialExact
from monge.solvers.linear.smooth import SmoothOT
from monge.solvers.linear.sparse import SparseOT

ot = pytest.importorskip("ot")

_API_ROOT = Path(__file__).resolve().parents[1]


def _api_clouds(seed, n, m, d=2, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)).astype(dtype), (rng.normal(size=(m, d)) + 0.5).astype(dtype)


def _api_pot_sinkhorn(x, y, eps):
    """POT's log-domain Sinkhorn plan in float64 (uniform weights, |x - y|^2)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    a, b = np.full(len(x), 1 / len(x)), np.full(len(y), 1 / len(y))
    M = ot.dist(x, y)
    return ot.sinkhorn(a, b, M, eps, method="sinkhorn_log", stopThr=1e-13, numItermax=50_000), M


# ------------------------------------------------------------------ item 7: vmapped solutions
@functools.lru_cache(maxsize=None)
def _api_vmapped(B, n, m, eps=0.5):
    """A batch of B entropic problems solved under `jax.vmap` (cached: one compile)."""
    rng = np.random.default_rng(B * 100 + n)
    X = rng.normal(size=(B, n, 2)).astype(np.float32)
    Y = (rng.normal(size=(B, m, 2)) + 0.5).astype(np.float32)
    sol = jax.vmap(lambda x, y: monge.solve(x, y, epsilon=eps, threshold=1e-6))(X, Y)
    return X, Y, sol


@pytest.mark.parametrize("B,n,m", [(3, 3, 3), (4, 7, 5)])
def test_api_vmapped_solution_properties_match_each_problem(B, n, m):
    """B = n = m = 3 used to broadcast silently into a wrong plan; every computed
    property of a batch must equal the per-problem reference (POT, float64)."""
    eps = 0.5
    X, Y, sol = _api_vmapped(B, n, m, eps)
    assert sol.f.shape == (B, n)
    plans, costs = [], []
    for i in range(B):
        P, M = _api_pot_sinkhorn(X[i], Y[i], eps)
        plans.append(P)
        costs.append(np.sum(P * M))
    plans = np.stack(plans)
    np.testing.assert_allclose(np.asarray(sol.plan), plans, atol=2e-5)
    np.testing.assert_allclose(np.asarray(sol.cost), costs, rtol=1e-4)
    rows, cols = sol.marginals()
    np.testing.assert_allclose(np.asarray(rows), plans.sum(2), atol=2e-5)
    np.testing.assert_allclose(np.asarray(cols), plans.sum(1), atol=2e-5)
    # reg_cost: <C,P> + eps KL(P | ab^T) at the reference plan
    kl = [np.sum(np.where(P > 0, P * np.log(P * n * m), 0.0)) for P in plans]
    np.testing.assert_allclose(np.asarray(sol.reg_cost), np.asarray(costs) + eps * np.asarray(kl),
                               rtol=1e-4, atol=1e-5)


def test_api_vmapped_solution_apply_and_transport_raise():
    X, Y, sol = _api_vmapped(3, 3, 3)
    message = (r"this Solution holds a batch of 3 problems \(from jax.vmap\); evaluate "
               r"\.apply\(v\) inside the vmapped function or index one problem: "
               r"jax.tree_util.tree_map\(lambda z: z\[i\], sol\)")
    with pytest.raises(ValueError, match=message):
        sol.apply(jnp.ones(3))
    with pytest.raises(ValueError, match=r"holds a batch of 3 problems.*\.transport\(z\)"):
        sol.transport(jnp.ones((3, 2)))
    # indexing one problem, as the message says, gives that problem's solution
    one = jax.tree_util.tree_map(lambda z: z[1], sol)
    P, _ = _api_pot_sinkhorn(X[1], Y[1], 0.5)
    np.testing.assert_allclose(np.asarray(one.plan), P, atol=2e-5)


@pytest.mark.slow
def test_api_nested_vmap_solution_plan():
    rng = np.random.default_rng(5)
    X = rng.normal(size=(2, 3, 4, 2)).astype(np.float32)
    Y = rng.normal(size=(2, 3, 5, 2)).astype(np.float32)
    solve = lambda x, y: monge.solve(x, y, epsilon=0.5, threshold=1e-6)  # noqa: E731
    sol = jax.vmap(jax.vmap(solve))(X, Y)
    assert sol.plan.shape == (2, 3, 4, 5)
    for i, j in [(0, 0), (1, 2)]:
        np.testing.assert_allclose(np.asarray(sol.plan[i, j]), _api_pot_sinkhorn(X[i, j], Y[i, j], 0.5)[0],
                                   atol=2e-5)
    with pytest.raises(ValueError, match=r"holds a batch of 2 x 3 problems"):
        sol.apply(jnp.ones(4))


@pytest.mark.parametrize("B,n", [(3, 3), (4, 6)])
def test_api_vmapped_plan_solution_cost_and_marginals(B, n):
    """Exact OT (a PlanSolution): cost summed per problem, not over the whole batch."""
    rng = np.random.default_rng(n)
    X = rng.normal(size=(B, n, 2)).astype(np.float32)
    Y = rng.normal(size=(B, n, 2)).astype(np.float32)
    sol = jax.vmap(lambda x, y: monge.solve(x, y, epsilon=0))(X, Y)
    ref = [ot.emd2(np.full(n, 1 / n), np.full(n, 1 / n), ot.dist(X[i].astype(np.float64), Y[i].astype(np.float64)))
           for i in range(B)]
    np.testing.assert_allclose(np.asarray(sol.cost), ref, rtol=1e-5)
    rows, cols = sol.marginals()
    np.testing.assert_allclose(np.asarray(rows), np.full((B, n), 1 / n), atol=1e-6)
    np.testing.assert_allclose(np.asarray(cols), np.full((B, n), 1 / n), atol=1e-6)
    with pytest.raises(ValueError, match=rf"holds a batch of {B} problems .*\.apply\(v\)"):
        sol.apply(jnp.ones(n))


# ------------------------------------------------------------------ item 9: ignored options
_API_X, _API_Y = _api_clouds(0, 7, 7)
_API_C = np.asarray(monge.PointCloud(_API_X, _API_Y).cost_matrix())


@pytest.mark.parametrize("make, pattern", [
    (lambda: Exact(threshold=1e-6),
     r"Exact\(method='network_simplex'\): threshold=1e-06 has no effect: the method is exact"),
    (lambda: Exact(method="assignment", threshold=1e-6),
     r"Exact\(method='assignment'\): threshold=1e-06 has no effect"),
    (lambda: Exact(epsilon=1e-2),
     r"Exact\(method='network_simplex'\): epsilon=0.01 has no effect: only "
     r"method='sinkhorn_rounding' has an entropic schedule; drop it"),
    (lambda: Exact(method="assignment", epsilon_decay=0.9),
     r"Exact\(method='assignment'\): epsilon_decay=0.9 has no effect"),
    (lambda: Exact(method="auction", epsilon=1e-2),
     r"Exact\(method='auction'\): epsilon=0.01 has no effect"),
    (lambda: Exact(method="assignment", max_iterations=5),
     r"Exact\(method='assignment'\): max_iterations=5 has no effect: scipy's"),
    (lambda: monge.solve(_API_X, _API_Y, epsilon=0, threshold=1e-4),
     r"Exact OT \(epsilon=0\): threshold=0.0001 has no effect.*drop `threshold`"),
    (lambda: monge.solve_matrix(_API_C, epsilon=0, threshold=1e-4),
     r"Exact OT \(epsilon=0\): threshold=0.0001 has no effect"),
    (lambda: monge.solve_matrix(_API_C, epsilon=0, mass=0.5, threshold=1e-4),
     r"Exact partial OT \(epsilon=0, mass=...\): threshold=0.0001 has no effect"),
    (lambda: monge.PointCloud(_API_X, _API_Y, chunk_size=4),
     r"`chunk_size=4` has no effect: the cost matrix is stored \(online=None with n\*m = 49 "
     r"<= ONLINE_ABOVE"),
    (lambda: monge.PointCloud(_API_X, _API_Y, online=False, chunk_size=4),
     r"`chunk_size=4` has no effect: the cost matrix is stored \(online=False\).*online=True"),
    (lambda: SmoothOT(gamma=1.0, memory_size=5),
     r"SmoothOT\(method='newton'\): memory_size=5 has no effect: it is the number of L-BFGS"),
    (lambda: monge.Sinkhorn(anneal=False, anneal_decay=0.3),
     r"`anneal_decay=array\(0.3.*\)` has no effect with anneal=False"),
    (lambda: monge.Sinkhorn(initializer="sorting", anneal_decay=0.3),
     r"has no effect with initializer='sorting'"),
    (lambda: monge.sliced_wasserstein(_API_X, _API_Y, directions=np.eye(2), n_projections=8),
     r"got both `n_projections` and `directions`"),
    (lambda: monge.projection_robust_wasserstein(_API_X, _API_Y, k=1, key=jax.random.key(0),
                                                 init=np.array([[1.0], [0.0]])),
     r"got both `key` and `init`"),
])
def test_api_ignored_options_raise(make, pattern):
    with pytest.raises(ValueError, match=pattern):
        make()


def test_api_honoured_options_still_accepted():
    """The same options where they take effect (and their documented defaults)."""
    assert float(Exact(method="sinkhorn_rounding", epsilon=1e-2).epsilon) == pytest.approx(1e-2)
    assert float(Exact(method="sinkhorn_rounding").epsilon) == pytest.approx(1e-3)
    assert float(Exact(method="sinkhorn_rounding").epsilon_decay) == pytest.approx(0.97)
    assert Exact(method="auction", threshold=1e-6).threshold is not None
    assert SmoothOT(gamma=1.0, method="lbfgs", memory_size=5).lbfgs_memory == 5
    assert SmoothOT(gamma=1.0).lbfgs_memory == 10
    assert SparseOT(k=2, gamma=1.0, memory_size=5).memory_size == 5
    assert float(monge.Sinkhorn().anneal_decay) == 0.5
    assert float(monge.Sinkhorn(anneal_decay=0.3).anneal_decay) == pytest.approx(0.3)
    assert monge.PointCloud(_API_X, _API_Y, online=True, chunk_size=3).is_online
    big = np.zeros((ONLINE_ABOVE // 4000 + 1, 1), np.float32)  # n*m above the threshold
    assert monge.PointCloud(big, np.zeros((4000, 1), np.float32), chunk_size=64).is_online
    # a point cloud chunked online still maps new points (it builds a cloud of another
    # shape with the same blocking): the barycentric projection, in NumPy from g
    geom = monge.PointCloud(_API_X, _API_Y, online=True, chunk_size=3)
    sol = monge.Sinkhorn()(monge.LinearProblem(geom, epsilon=0.5))
    z = _API_X[:2].astype(np.float64)
    g, y = np.asarray(sol.g, np.float64), _API_Y.astype(np.float64)
    logits = (g[None, :] - ((z[:, None, :] - y[None]) ** 2).sum(-1)) / 0.5
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    np.testing.assert_allclose(sol.transport(_API_X[:2]), p @ y, atol=1e-4)


def test_api_exact_partial_rejects_threshold_of_host_solver():
    with pytest.raises(ValueError, match=r"Exact\(method='network_simplex'\): threshold"):
        PartialExact(Exact(threshold=1e-4))(PartialProblem(monge.CostMatrix(_API_C), mass=0.5))


# ------------------------------------------------------------------ item 10: bad input
def _api_entry_points():
    key = jax.random.key(0)
    sampler = lambda k, n: jax.random.normal(k, (n, 2))  # noqa: E731
    return {
        "solve": lambda x, y: monge.solve(x, y, epsilon=0.5),
        "solve_exact": lambda x, y: monge.solve(x, y, epsilon=0),
        "PointCloud": lambda x, y: monge.PointCloud(x, y),
        "sliced_wasserstein": lambda x, y: monge.sliced_wasserstein(x, y, key=key),
        "max_sliced_wasserstein": lambda x, y: monge.max_sliced_wasserstein(x, y, key=key, n_steps=2),
        "projection_robust_wasserstein": lambda x, y: monge.projection_robust_wasserstein(
            x, y, k=1, key=key, n_steps=1),
        "semidiscrete": lambda x, y: monge.semidiscrete(sampler, x, key=key, n_steps=2),
    }


_API_BAD = {
    "empty": (np.zeros((0, 2), np.float32), r"empty|non-empty"),
    "d=0": (np.zeros((7, 0), np.float32), r"dimension d = 0|non-empty"),
    "complex": ((np.ones((7, 2)) + 1j).astype(np.complex64), r"is complex \(dtype complex64\)"),
    "string": (np.full((7, 2), "a"), r"must be a real-valued numeric array; received dtype <U1"),
    "nan": (np.where(np.eye(7, 2) > 0, np.nan, 1.0).astype(np.float32), r"non-finite"),
}


@pytest.mark.parametrize("bad", list(_API_BAD))
@pytest.mark.parametrize("entry", list(_api_entry_points()))
def test_api_bad_points_raise_value_error_naming_the_argument(entry, bad):
    fn = _api_entry_points()[entry]
    value, pattern = _API_BAD[bad]
    if entry == "semidiscrete":
        if bad == "d=0":  # the sampler returns d = 2: a mismatch, also a ValueError
            pattern = r"y=\.\.\..*non-empty|sampler"
        with pytest.raises(ValueError, match=rf"y=\.\.\.|`y`|{pattern}") as info:
            fn(value, None)
        assert re.search(pattern, str(info.value)) and "y" in str(info.value)
        return
    with pytest.raises(ValueError) as info:
        fn(value, _API_Y)
    message = str(info.value)
    assert re.search(pattern, message), message
    assert "`x`" in message or "(x=...)" in message, message
    # the second argument gets the same check, under its own name
    with pytest.raises(ValueError) as info:
        fn(_API_X, value if bad != "d=0" else np.zeros((7, 0), np.float32))
    message = str(info.value)
    assert "`y`" in message or "(y=...)" in message or (bad == "d=0" and "same" in message), message


@pytest.mark.parametrize("bad", ["empty", "complex", "string", "nan"])
def test_api_bad_cost_matrix_and_weights(bad):
    value, pattern = _API_BAD[bad]
    C = value if bad != "empty" else np.zeros((0, 5), np.float32)
    with pytest.raises(ValueError, match=rf"`C`.*|{pattern}") as info:
        monge.solve_matrix(C, epsilon=0.5)
    assert re.search(pattern, str(info.value)) and "C" in str(info.value)
    if bad in ("complex", "string"):
        w = value[:, 0]
        with pytest.raises(ValueError, match=rf"`a` {pattern[:10]}|`a`"):
            monge.solve(_API_X, _API_Y, a=w, epsilon=0.5)
        with pytest.raises(ValueError, match=rf"monge.wasserstein_1d\(a=...\)"):
            monge.wasserstein_1d(_API_X[:, 0], _API_Y[:, 0], a=w)


@pytest.mark.parametrize("bad", list(_API_BAD))
def test_api_wasserstein_1d_bad_points(bad):
    value, pattern = _API_BAD[bad]
    u = value.reshape(-1) if bad != "d=0" else value.reshape(-1)
    with pytest.raises(ValueError, match=r"monge\.wasserstein_1d\(u=\.\.\.\)") as info:
        monge.wasserstein_1d(u, _API_Y[:, 0])
    if bad != "empty" and bad != "d=0":
        assert re.search(pattern, str(info.value))


@pytest.mark.parametrize("n", [1, 7, 33])
def test_api_nan_points_eager_error(n):
    x, y = _api_clouds(n, n, 5)
    x[n // 2, 1] = np.nan
    with pytest.raises(ValueError, match=r"`x` has 1 non-finite value\(s\)"):
        monge.solve(x, y)
    with pytest.raises(ValueError, match=r"`y` has 1 non-finite value\(s\)"):
        monge.solve(y, x, epsilon=0)
    with pytest.raises(ValueError, match=r"monge\.wasserstein_1d\(u=\.\.\.\)` has 1 non-finite"):
        monge.wasserstein_1d(x[:, 1], y[:, 0])
    with pytest.raises(ValueError, match=r"monge\.wasserstein_1d\(v=\.\.\.\)` has 1 non-finite"):
        monge.wasserstein_1d(y[:, 0], np.where(np.arange(n) == 0, np.inf, 1.0))
    with pytest.raises(ValueError, match=r"monge\.sliced_wasserstein\(x=\.\.\.\)` has 1 non-finite"):
        monge.sliced_wasserstein(x, y, key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"monge\.sliced_wasserstein\(y=\.\.\.\)` has"):
        monge.sliced_wasserstein(y, x, key=jax.random.key(0))


@pytest.mark.parametrize("n", [7])
def test_api_nan_points_eager_error_jit_nan_or_diverged(n):
    """The rule (documented in `checks`, `solve` and the README): concrete non-finite
    points raise a ValueError; under `jit` they cannot be read, and the result says so
    (status DIVERGED for solvers, NaN for functions that return a number), never a
    finite number."""
    x, y = _api_clouds(n, n, 5)
    x[n // 2, 1] = np.nan
    with pytest.raises(ValueError, match=r"`x` has 1 non-finite value\(s\)"):
        monge.solve(x, y)
    for kwargs in ({"epsilon": 0.3}, {"tau_a": 0.7, "epsilon": 0.3}, {"online": True, "epsilon": 0.3}):
        sol = jax.jit(lambda x, y: monge.solve(x, y, **kwargs))(x, y)
        assert int(sol.status) == monge.Status.DIVERGED and not bool(sol.converged), kwargs
    with pytest.raises(ValueError, match=r"monge\.wasserstein_1d\(u=\.\.\.\)` has 1 non-finite"):
        monge.wasserstein_1d(x[:, 1], y[:, 0])
    assert np.isnan(jax.jit(monge.wasserstein_1d)(x[:, 1], y[:, 0]))
    # the NaN point has zero weight: still no finite answer under jit
    a = np.full(n, 1.0 / max(n - 1, 1), np.float32)
    a[n // 2] = 0.0
    if n > 1:
        assert np.isnan(jax.jit(lambda u, v, a: monge.wasserstein_1d(u, v, a=a))(x[:, 1], y[:, 0], a))
    with pytest.raises(ValueError, match=r"monge\.sliced_wasserstein\(x=\.\.\.\)` has 1 non-finite"):
        monge.sliced_wasserstein(x, y, key=jax.random.key(0))
    sw = jax.jit(lambda x, y: monge.sliced_wasserstein(x, y, key=jax.random.key(0)))(x, y)
    assert np.isnan(sw)
    with pytest.raises(ValueError, match=r"monge\.sliced_wasserstein\(y=\.\.\.\)` has"):
        monge.sliced_wasserstein(y, x, key=jax.random.key(0))


def test_api_nan_points_under_vmap_only_that_problem_diverges():
    x, y = _api_clouds(3, 8, 6)
    X = np.stack([x, x, x])
    X[1, 2, 0] = np.nan
    sol = jax.vmap(lambda x: monge.solve(x, y, epsilon=0.3))(X)
    assert np.asarray(sol.status).tolist() == [0, monge.Status.DIVERGED, 0]


# ------------------------------------------------------------------ item 11: command line
@pytest.fixture(scope="module")
def _api_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("api_clouds")
    x, y = _api_clouds(11, 30, 41)
    np.save(root / "x.npy", x)
    np.save(root / "y.npy", y)
    return root, x, y


def _api_report_value(out, name):
    line = next(line for line in out.splitlines() if line.startswith(name))
    return line[len(name):].strip()


# every command-line solve below has the same shapes and static options (--progress,
# the default --max-iterations, a given --epsilon): one compile for all of them
@pytest.mark.parametrize("epsilon", ["0.3", "0.05"])
def test_api_cli_progress_count_agrees_with_report(_api_files, tmp_path, capsys, epsilon):
    root, _, _ = _api_files
    out_file = tmp_path / "r.npz"
    code = cli.main(["solve", str(root / "x.npy"), str(root / "y.npy"), "--epsilon", epsilon,
                     "--threshold", "1e-4", "--progress", "--out", str(out_file)])
    out, err = capsys.readouterr()
    assert code == 0, out + err
    reported = int(re.search(r"after (\d+) iterations", out).group(1))
    with np.load(out_file) as result:
        n_iters = int(result["n_iters"])
        errors = result["errors"]
    assert reported == n_iters
    last = re.findall(r"sinkhorn: iteration\s+(\d+)/", err)[-1]
    assert int(last) == n_iters, (last, n_iters)
    # errors: one entry per block of 10 iterations run, no -1 padding
    assert errors.shape == (math.ceil(n_iters / 10),)
    assert np.all(errors >= 0)


def test_api_cli_not_converged_exits_1_with_the_status(_api_files, tmp_path, capsys):
    root, _, _ = _api_files
    out_file = tmp_path / "r.npz"
    code = cli.main(["solve", str(root / "x.npy"), str(root / "y.npy"), "--epsilon", "0.01",
                     "--max-iterations", "10", "--progress", "--out", str(out_file)])
    out = capsys.readouterr().out
    assert code == 1
    assert "converged         no after 10 iterations" in out
    assert "not converged: max_iterations was reached" in _api_report_value(out, "status")
    with np.load(out_file) as result:
        assert result["errors"].shape == (1,) and result["errors"][0] > 1e-3


def test_api_cli_labels_optimality_residual_when_unbalanced(_api_files, capsys):
    root, _, _ = _api_files
    code = cli.main(["solve", str(root / "x.npy"), str(root / "y.npy"), "--epsilon", "0.3",
                     "--tau-a", "0.8", "--progress"])
    out = capsys.readouterr().out
    assert code == 0
    assert "optimality residual" in out and "marginal error" not in out
    code = cli.main(["solve", str(root / "x.npy"), str(root / "y.npy"), "--epsilon", "0.3",
                     "--progress"])
    assert "marginal error" in capsys.readouterr().out


def _api_no_solve(monkeypatch):
    calls = []
    monkeypatch.setattr(monge, "solve", lambda *a, **k: calls.append(1))
    return calls


def test_api_cli_plot_extension_checked_before_solving(_api_files, tmp_path, monkeypatch, capsys):
    root, _, _ = _api_files
    calls = _api_no_solve(monkeypatch)
    code = cli.main(["solve", str(root / "x.npy"), str(root / "y.npy"), "--plot",
                     str(tmp_path / "match.docx")])
    out, err = capsys.readouterr()
    assert code == 2 and calls == [] and out == ""
    assert re.search(r"--plot .*match.docx: matplotlib cannot write '\.docx' images: use one of .*\.png", err)


def test_api_cli_plot_without_matplotlib_checked_before_solving(_api_files, tmp_path, monkeypatch, capsys):
    root, _, _ = _api_files
    calls = _api_no_solve(monkeypatch)
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    code = cli.main(["solve", str(root / "x.npy"), str(root / "y.npy"), "--plot",
                     str(tmp_path / "match.png")])
    out, err = capsys.readouterr()
    assert code == 2 and calls == [] and out == ""
    assert "drawing needs matplotlib, which is not installed: run `pip install matplotlib`" in err
    assert 'pip install -e ".[plot]"' in err


def test_api_cli_exits_1_when_converged_but_cost_not_finite(_api_files, monkeypatch, capsys):
    root, x, y = _api_files
    real = monge.solve(x, y, epsilon=0.3)
    fake = type("Fake", (), {})()
    for name in ("f", "g", "epsilon", "n_iters", "error", "errors", "converged", "status",
                 "message", "reg_cost"):
        setattr(fake, name, getattr(real, name))
    fake.cost = jnp.asarray(jnp.inf)
    monkeypatch.setattr(monge, "solve", lambda *a, **k: fake)
    code = cli.main(["solve", str(root / "x.npy"), str(root / "y.npy")])
    out = capsys.readouterr().out
    assert code == 1
    assert "cost is not a finite number" in out


def test_api_install_hints_work_from_a_clone(monkeypatch):
    """monge is not on PyPI: hints name PyPI packages, or extras of the local checkout
    that pyproject.toml defines."""
    extras = tomllib.loads((_API_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    from monge.solvers.linear import exact

    monkeypatch.setitem(sys.modules, "ot", None)
    with pytest.raises(ImportError) as info:
        exact._import_pot()
    message = str(info.value)
    assert "monge[" not in message and "pip install pot scipy" in message
    for extra in re.findall(r'pip install -e "\.\[(\w+)\]"', message):
        assert extra in extras
    sources = [p for p in (_API_ROOT / "src").rglob("*.py")] + [_API_ROOT / "README.md"]
    for path in sources:
        text = path.read_text()
        assert not re.search(r'pip install [\'"]?monge\[', text), path
        for extra in re.findall(r'pip install -e "\.\[(\w+)\]"', text):
            assert extra in extras, (path, extra)
