"""The auction, Sinkhorn rounding and smooth/sparse OT (Newton, L-BFGS) on the shared
driver (`monge.solvers.driver`): warm starts (`init=`) give the answer of the
independent references (scipy's `linear_sum_assignment`, POT's `ot.emd2` and smooth
OT, all float64) in no more iterations, bad warm starts and warm starts to the host
methods raise, and `progress=True` prints through the driver."""

import jax
import jax.numpy as jnp
import numpy as np
import ot
import pytest
from conftest import sqdist
from scipy.optimize import linear_sum_assignment

import monge
from monge.solvers.linear.auction import auction
from monge.solvers.linear.exact import Exact
from monge.solvers.linear.smooth import SmoothOT
from monge.solvers.linear.sparse import SparseOT


def _port_clouds(n, m, seed, shift=0.5):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 2)), rng.normal(size=(m, 2)) + shift


def _port_weights(n, m, seed):
    rng = np.random.default_rng(seed + 100)
    a, b = rng.uniform(0.5, 1.5, n), rng.uniform(0.5, 1.5, m)
    return a / a.sum(), b / b.sum()


def _port_problem(C, a=None, b=None, dtype=np.float64):
    a = None if a is None else jnp.asarray(a, dtype)
    b = None if b is None else jnp.asarray(b, dtype)
    return monge.LinearProblem(monge.CostMatrix(jnp.asarray(C, dtype)), a, b)


def _port_lsa_cost(C):
    C = np.asarray(C, np.float64)
    rows, cols = linear_sum_assignment(C)
    return C[rows, cols].mean()


# -- the auction ----------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("n, dtype", [(17, np.float64), (60, np.float32), (33, np.float64)])
def test_auction_warm_start_same_optimum_fewer_rounds(n, dtype):
    """Warm from its own solution and from the solution of a perturbed problem: the
    optimal assignment (scipy, float64) to the certificate, in no more rounds."""
    x, y = _port_clouds(n, n, n)
    C = sqdist(x, y)
    C_near = C + 0.05 * np.random.default_rng(n).normal(size=C.shape)
    with jax.enable_x64(dtype == np.float64):
        solver = Exact(method="auction")
        cold = solver(_port_problem(C, dtype=dtype))
        near = solver(_port_problem(C_near, dtype=dtype))
        warm = {
            "own solution": solver(_port_problem(C, dtype=dtype), init=cold),
            "own (f, g)": solver(_port_problem(C, dtype=dtype), init=(cold.f, cold.g)),
            "perturbed problem": jax.jit(lambda p, s: solver(p, init=s))(
                _port_problem(C, dtype=dtype), near),
        }
        ref = _port_lsa_cost(np.asarray(jnp.asarray(C, dtype), np.float64))
        tol = float(solver.tolerance(jnp.dtype(dtype)))
        assert bool(cold.converged)
        for name, sol in warm.items():
            assert bool(sol.converged) and float(sol.error) <= tol, name
            # an optimum certified to `tol` of the mean cost (the costs as rounded)
            assert abs(float(sol.cost) - ref) <= 2 * tol * np.abs(C).mean() + 1e-12, name
            assert 0 < int(sol.n_iters) <= int(cold.n_iters), name
        assert int(warm["own solution"].n_iters) < int(cold.n_iters) // 4


def test_auction_function_warm_start_under_vmap():
    """`auction(C, ..., init=g)` batched: each problem's own optimal assignment."""
    Cs = np.stack([sqdist(*_port_clouds(23, 23, s)) for s in range(3)])
    with jax.enable_x64(True):
        cold = jax.vmap(lambda C: auction(C, 1e-12, 100_000))(jnp.asarray(Cs))
        warm = jax.vmap(lambda C, g: auction(C, 1e-12, 100_000, init=g))(jnp.asarray(Cs), cold.g)
    for C, cols, n_warm, n_cold, status in zip(Cs, warm.cols, warm.n_iters, cold.n_iters, warm.status):
        assert int(status) == monge.Status.CONVERGED
        assert C[np.arange(23), np.asarray(cols)].mean() == pytest.approx(_port_lsa_cost(C), rel=1e-12)
        assert int(n_warm) <= int(n_cold)


@pytest.mark.slow
def test_auction_rounds_budget_is_max_iterations_status():
    """A budget spent mid-phase is MAX_ITERATIONS (a permutation, honest error), not
    DIVERGED, warm or cold: the driver's status on the completed assignment."""
    C = sqdist(*_port_clouds(40, 40, 5))
    with jax.enable_x64(True):
        cold = auction(jnp.asarray(C), 1e-12, 7)
        far = auction(jnp.asarray(C), 1e-12, 7, init=jnp.asarray(np.random.default_rng(0).normal(size=40)))
    for out in (cold, far):
        assert int(out.status) == monge.Status.MAX_ITERATIONS and int(out.n_iters) == 7
        assert sorted(np.asarray(out.cols).tolist()) == list(range(40))
        assert np.isfinite(float(out.error)) and float(out.error) > 1e-12


# -- Sinkhorn rounding ----------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("n, m, dtype", [(13, 21, np.float64), (40, 29, np.float32)])
def test_sinkhorn_rounding_warm_start_same_optimum_fewer_iterations(n, m, dtype):
    x, y = _port_clouds(n, m, n + m)
    a, b = _port_weights(n, m, n)
    C = sqdist(x, y)
    C_near = C * 1.05
    ref = ot.emd2(a, b, C)
    with jax.enable_x64(dtype == np.float64):
        solver = Exact(method="sinkhorn_rounding", threshold=1e-3)
        problem = _port_problem(C, a, b, dtype)
        cold = solver(problem)
        near = solver(_port_problem(C_near, a, b, dtype))
        for name, sol in {
            "own solution": solver(problem, init=cold),
            "own (f, g)": solver(problem, init=(cold.f, cold.g)),
            "perturbed problem": jax.jit(lambda p, s: solver(p, init=s))(problem, near),
        }.items():
            assert bool(sol.converged) and float(sol.error) <= 1e-3, name
            # certified: cost - OT <= gap = error * (a^T |C| b)
            unit = a @ np.abs(C) @ b
            assert ref - 1e-5 * unit <= float(sol.cost) <= ref + 1.01e-3 * unit, name
            np.testing.assert_allclose(np.asarray(sol.plan).sum(1), a, atol=1e-5)
            assert 0 < int(sol.n_iters) <= int(cold.n_iters), name
            if name != "perturbed problem":  # no annealing from the optimum
                assert int(sol.n_iters) <= int(cold.n_iters) // 3, name


# -- smooth and sparse OT -------------------------------------------------------------
_PORT_POT = {"dual": ot.smooth.smooth_ot_dual, "semi_dual": ot.smooth.smooth_ot_semi_dual}


@pytest.mark.parametrize(
    "method, formulation, n, m",
    [pytest.param("newton", "semi_dual", 9, 14, marks=pytest.mark.slow), ("newton", "dual", 16, 11),
     pytest.param("lbfgs", "semi_dual", 12, 7, marks=pytest.mark.slow),
     pytest.param("lbfgs", "dual", 8, 13, marks=pytest.mark.slow)],
)
def test_smooth_warm_start_matches_pot(method, formulation, n, m):
    """Warm from its own solution (no iteration), from its potentials and from the
    solution of a perturbed problem: POT's smooth OT plan (float64), no more iterations."""
    x, y = _port_clouds(n, m, n * m)
    a, b = _port_weights(n, m, n)
    C = sqdist(x, y)
    gamma = 1.0
    ref = _PORT_POT[formulation](a, b, C, gamma, reg_type="l2", stopThr=1e-14, numItermax=10_000)
    with jax.enable_x64(True):
        solver = SmoothOT(gamma=gamma, formulation=formulation, method=method, threshold=1e-9,
                          max_iterations=3000)
        problem = _port_problem(C, a, b)
        cold = solver(problem)
        near = solver(_port_problem(C * 1.1 + 0.05, a, b))
        runs = {
            "own solution": solver(problem, init=cold),
            "own (f, g)": solver(problem, init=(cold.f, cold.g)),
            "perturbed problem": jax.jit(lambda p, s: solver(p, init=s))(problem, near),
        }
    assert bool(cold.converged)
    np.testing.assert_allclose(np.asarray(cold.plan), ref, atol=1e-6)
    for name, sol in runs.items():
        assert bool(sol.converged) and float(sol.error) <= 1e-9, name
        np.testing.assert_allclose(np.asarray(sol.plan), ref, atol=1e-6, err_msg=name)
        assert int(sol.n_iters) <= int(cold.n_iters), name
    assert int(runs["own solution"].n_iters) == 0  # already optimal: no step
    assert int(runs["perturbed problem"].n_iters) < int(cold.n_iters)


def test_smooth_semi_dual_warm_start_uses_f_only():
    """Semi-dual: `g` is not a variable (recomputed from f): a wrong g changes nothing."""
    x, y = _port_clouds(10, 8, 3)
    a, b = _port_weights(10, 8, 3)
    C = sqdist(x, y)
    with jax.enable_x64(True):
        solver = SmoothOT(gamma=0.5, threshold=1e-9)
        problem = _port_problem(C, a, b)
        cold = solver(problem)
        f = cold.f + 0.3 * jnp.asarray(np.random.default_rng(1).normal(size=10))
        one = solver(problem, init=(f, cold.g))
        other = solver(problem, init=(f, jnp.full(8, 1e3)))
    ref = ot.smooth.smooth_ot_semi_dual(a, b, C, 0.5, reg_type="l2", stopThr=1e-14, numItermax=10_000)
    np.testing.assert_allclose(np.asarray(one.plan), ref, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(one.plan), np.asarray(other.plan))
    assert int(one.n_iters) == int(other.n_iters) > 0


@pytest.mark.parametrize("formulation", [pytest.param("semi_dual", marks=pytest.mark.slow), "dual"])
def test_sparse_warm_start_matches_pot(formulation):
    """k = n (not binding): POT's smooth plan; warm from a perturbed problem's solution."""
    x, y = _port_clouds(9, 12, 11)
    a, b = _port_weights(9, 12, 11)
    C = sqdist(x, y)
    ref = _PORT_POT[formulation](a, b, C, 1.0, reg_type="l2", stopThr=1e-14, numItermax=10_000)
    with jax.enable_x64(True):
        solver = SparseOT(k=9, gamma=1.0, formulation=formulation, threshold=1e-8,
                          max_iterations=3000)
        problem = _port_problem(C, a, b)
        cold = solver(problem)
        warm = solver(problem, init=solver(_port_problem(C * 1.05, a, b)))
        again = solver(problem, init=cold)
    for sol in (cold, warm, again):
        assert bool(sol.converged) and float(sol.error) <= 1e-8
        np.testing.assert_allclose(np.asarray(sol.plan), ref, atol=1e-5)
    assert int(again.n_iters) == 0


# -- bad warm starts ------------------------------------------------------------------
def _port_small():
    x, y = _port_clouds(5, 6, 0)
    a, b = _port_weights(5, 6, 0)
    return _port_problem(sqdist(x, y), a, b, np.float32)


@pytest.mark.parametrize(
    "solver",
    [Exact(method="sinkhorn_rounding"), SmoothOT(gamma=1.0), SparseOT(k=2, gamma=1.0),
     SmoothOT(gamma=1.0, method="lbfgs", formulation="dual")],
)
def test_warm_start_of_the_wrong_shape_raises(solver):
    problem = _port_small()
    with pytest.raises(ValueError, match=r"`init` potentials must have shapes \(5,\) and \(6,\).*received \(6,\) and \(5,\)"):
        solver(problem, init=(jnp.zeros(6), jnp.zeros(5)))
    with pytest.raises(ValueError, match=r"`init` must be a previous solution or a pair of potentials"):
        solver(problem, init=jnp.zeros(5))


def test_auction_warm_start_of_the_wrong_shape_raises():
    C = jnp.asarray(sqdist(*_port_clouds(6, 6, 1)), jnp.float32)
    with pytest.raises(ValueError, match=r"`init` must be the column potentials g of shape \(6,\).*received shape \(5,\)"):
        auction(C, 1e-5, 1000, init=jnp.zeros(5))
    problem = monge.LinearProblem(monge.CostMatrix(C))
    with pytest.raises(ValueError, match=r"`init` potentials must have shapes \(6,\) and \(6,\)"):
        Exact(method="auction")(problem, init=(jnp.zeros(6), jnp.zeros(7)))


@pytest.mark.parametrize("method", ["network_simplex", "assignment"])
def test_host_methods_reject_a_warm_start(method):
    C = jnp.asarray(sqdist(*_port_clouds(6, 6, 2)))
    problem = monge.LinearProblem(monge.CostMatrix(C))
    sol = Exact(method="auction")(problem)
    with pytest.raises(ValueError, match=rf"`init` \(a warm start\) was passed to Exact\(method='{method}'\).*take no warm start"):
        Exact(method=method)(problem, init=sol)


# -- progress lines through the driver ------------------------------------------------
@pytest.mark.slow
def test_progress_lines_through_the_driver(capfd):
    C = jnp.asarray(sqdist(*_port_clouds(12, 12, 4)), jnp.float32)
    out = auction(C, 1e-5, 10_000, progress=True)
    SmoothOT(gamma=1.0, progress=True)(_port_small())
    SparseOT(k=1, gamma=1.0, progress=True, max_iterations=30)(_port_small())
    jax.effects_barrier()
    err = capfd.readouterr().err
    auction_lines = [line for line in err.splitlines() if line.startswith("auction: iteration")]
    assert auction_lines and f"{int(out.n_iters)}/10000" in auction_lines[-1]
    assert "relative gap" in auction_lines[-1]
    assert any(line.startswith("smoothot newton: iteration") and "marginal error" in line
               for line in err.splitlines())
    assert any(line.startswith("sparseot lbfgs: iteration") for line in err.splitlines())
