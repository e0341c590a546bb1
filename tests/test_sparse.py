"""Sparsity-constrained OT: assignment for k = 1, smooth OT for k >= n, POT, gradients.

`gamma` is POT's `reg` (both solve min <C, T> + (gamma / 2) ||T||^2, see
tests/test_smooth.py).
"""

import contextlib
import io

import jax
import jax.numpy as jnp
import numpy as np
import ot
import pytest
from conftest import central_difference, compile_log, sqdist
from scipy.optimize import linear_sum_assignment

from monge import CostMatrix, LinearProblem
from monge.solvers.linear.sparse import SparseOT


def pot(a, b, C, gamma, **kwargs):
    """POT's semi-dual (its sparse projection prints; keep the test log quiet)."""
    with contextlib.redirect_stdout(io.StringIO()):
        solve = ot.smooth.smooth_ot_semi_dual
        return solve(a, b, C, gamma, stopThr=1e-14, numItermax=10_000, **kwargs)


@pytest.fixture(scope="module")
def data(clouds):
    x, y, a, b = clouds
    return sqdist(x, y), a, b


@pytest.fixture(scope="module")
def square():
    """Uniform weights, n = m = 9, a cost with a unique optimal permutation."""
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(9, 2)), rng.normal(size=(9, 2))
    C = sqdist(x, y)
    rows, cols = linear_sum_assignment(C)
    perm = np.zeros_like(C)
    perm[rows, cols] = 1.0 / 9
    return C, perm


@pytest.mark.parametrize("k, formulation", [(1, "semi_dual"), (2, "dual"), (3, "semi_dual")])
def test_at_most_k_nonzeros_per_column(data, k, formulation):
    C, a, b = data
    sol = SparseOT(k, gamma=5.0, formulation=formulation)(LinearProblem(CostMatrix(C), a, b))
    plan = np.asarray(sol.plan)
    assert np.all(np.isfinite(plan)) and plan.min() >= 0
    assert np.count_nonzero(plan, axis=0).max() <= k
    assert np.count_nonzero(plan, axis=0).min() >= 1


@pytest.mark.slow
@pytest.mark.parametrize("formulation, gamma", [("semi_dual", 1.0), ("dual", 0.1)])
def test_k_equal_one_recovers_the_optimal_assignment(square, formulation, gamma):
    C, perm = square
    with jax.enable_x64(True):
        solver = SparseOT(1, gamma=gamma, formulation=formulation, threshold=1e-6)
        sol = solver(LinearProblem(CostMatrix(C)))
        plan = np.asarray(sol.plan)
        assert bool(sol.converged)
        cost = float(sol.cost)
    np.testing.assert_array_equal(plan > 0, perm > 0)
    np.testing.assert_allclose(plan, perm, atol=1e-6)
    assert cost == pytest.approx(np.sum(perm * C), abs=1e-5)


@pytest.mark.parametrize("k, formulation", [(7, "semi_dual"), (20, "dual")])
def test_k_at_least_n_is_smooth_ot(data, k, formulation):
    C, a, b = data
    gamma = 2.0
    with jax.enable_x64(True):
        solver = SparseOT(
            k, gamma=gamma, formulation=formulation, threshold=1e-10, max_iterations=2000
        )
        sol = solver(LinearProblem(CostMatrix(C), a, b))
        plan, reg_cost = np.asarray(sol.plan), float(sol.reg_cost)
        assert bool(sol.converged)
    ref = pot(a, b, C, gamma, reg_type="l2")
    np.testing.assert_allclose(plan, ref, atol=2e-6)
    assert reg_cost == pytest.approx(np.sum(ref * C) + 0.5 * gamma * np.sum(ref**2), rel=1e-6)


def test_binding_k_matches_pot_semi_dual_value(data):
    C, a, b = data
    gamma, k = 5.0, 2
    regul = ot.smooth.SparsityConstrained(max_nz=k, gamma=gamma)
    _, log = pot(a, b, C, gamma, reg_type="sparsity_constrained", max_nz=k, log=True)
    with contextlib.redirect_stdout(io.StringIO()):
        pot_value, _ = ot.smooth.semi_dual_obj_grad(log["alpha"], a, b, C, regul)
    smooth = pot(a, b, C, gamma, reg_type="l2")
    smooth_value = np.sum(smooth * C) + 0.5 * gamma * np.sum(smooth**2)
    with jax.enable_x64(True):
        solver = SparseOT(k, gamma=gamma, threshold=1e-10, max_iterations=1000)
        sol = solver(LinearProblem(CostMatrix(C), a, b))
        reg_cost, f = float(sol.reg_cost), np.asarray(sol.f)
        plan = np.asarray(sol.plan)
    # reg_cost is the semi-dual objective at f (evaluated by POT), as good as POT's
    # maximum, and above smooth OT's (the constraint only raises the dual).
    with contextlib.redirect_stdout(io.StringIO()):
        value_at_f, _ = ot.smooth.semi_dual_obj_grad(f, a, b, C, regul)
    assert reg_cost == pytest.approx(value_at_f, rel=1e-10)
    assert reg_cost >= pot_value - 1e-6 * abs(pot_value)
    assert reg_cost > smooth_value
    assert np.count_nonzero(plan, axis=0).max() <= k
    np.testing.assert_allclose(plan.sum(0), b, atol=1e-12)  # columns are exact


@pytest.mark.slow
def test_float32_binding_k_matches_pot_semi_dual_value():
    """80 x 60 points at gamma = 0.1, where the smooth plan has up to 6 non-zeros per
    column: k = 2 binds. float32 reaches POT's float64 semi-dual maximum."""
    rng = np.random.default_rng(5)
    x, y = rng.uniform(size=(80, 2)), rng.uniform(size=(60, 2))
    a, b = rng.uniform(0.5, 1.5, 80), rng.uniform(0.5, 1.5, 60)
    C, a, b = sqdist(x, y), a / a.sum(), b / b.sum()
    gamma, k = 0.1, 2
    regul = ot.smooth.SparsityConstrained(max_nz=k, gamma=gamma)
    _, log = pot(a, b, C, gamma, reg_type="sparsity_constrained", max_nz=k, log=True)
    with contextlib.redirect_stdout(io.StringIO()):
        pot_value, _ = ot.smooth.semi_dual_obj_grad(log["alpha"], a, b, C, regul)
    C32, a32, b32 = (z.astype(np.float32) for z in (C, a, b))
    sol = SparseOT(k, gamma=gamma)(LinearProblem(CostMatrix(C32), a32, b32))
    plan, f = np.asarray(sol.plan), np.asarray(sol.f, np.float64)
    with contextlib.redirect_stdout(io.StringIO()):
        value_at_f, _ = ot.smooth.semi_dual_obj_grad(f, a, b, C, regul)
    assert float(sol.reg_cost) == pytest.approx(value_at_f, rel=1e-5)
    assert value_at_f >= pot_value - 1e-5 * abs(pot_value)
    assert np.count_nonzero(plan, axis=0).max() <= k
    np.testing.assert_allclose(plan.sum(0), b, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("k, output", [(1, "reg_cost"), pytest.param(4, "cost", marks=pytest.mark.slow)])
def test_gradient_wrt_cost_matches_finite_differences(square, k, output):
    C, _ = square
    C = C[:6, :6]
    with jax.enable_x64(True):
        solver = SparseOT(k, gamma=0.5, threshold=1e-12, max_iterations=2000)
        fun = jax.jit(lambda C: getattr(solver(LinearProblem(CostMatrix(C))), output))
        assert bool(solver(LinearProblem(CostMatrix(C))).converged)
        grad = np.asarray(jax.jit(jax.grad(fun))(jnp.asarray(C)))
        fd = central_difference(fun, C, 1e-5)
    np.testing.assert_allclose(grad, fd, atol=1e-6)
    assert np.abs(fd).max() > 0.05


def test_jit_and_vmap_give_assignments(square):
    C, _ = square
    rng = np.random.default_rng(4)
    Cs = np.stack([C, C + rng.uniform(size=C.shape), C.T]).astype(np.float32)

    @jax.jit
    @jax.vmap
    def solve(C, gamma):
        return SparseOT(1, gamma=gamma)(LinearProblem(CostMatrix(C))).plan

    plans = np.asarray(solve(jnp.asarray(Cs), jnp.array([0.5, 1.0, 2.0])))
    for P, Ci in zip(plans, Cs.astype(np.float64)):
        rows, cols = linear_sum_assignment(Ci)
        expected = np.zeros_like(Ci, dtype=bool)
        expected[rows, cols] = True
        np.testing.assert_array_equal(P > 0, expected)


def test_new_gamma_does_not_recompile(data):
    C, a, b = (z.astype(np.float32) for z in data)
    problem = LinearProblem(CostMatrix(C), a, b)
    SparseOT(2, gamma=0.3)(problem)  # compile

    def again():
        for gamma in (0.7, 2.0):
            SparseOT(2, gamma=gamma)(problem).plan.block_until_ready()

    compiles = [m for m in compile_log(again) if "solve_quadratic" in m]
    assert not compiles, compiles


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((0,), {"gamma": 1.0}, r"`SparseOT\(k=...\)` must be a positive integer .*received 0\. Use k=1"),
        ((-2,), {"gamma": 1.0}, r"`SparseOT\(k=...\)` must be a positive integer .*; received -2"),
        ((2.5,), {"gamma": 1.0}, r"`SparseOT\(k=...\)` must be a positive integer .*; received 2\.5"),
        ((True,), {"gamma": 1.0}, r"`SparseOT\(k=...\)` must be a positive integer .*; received True"),
        ((2,), {"gamma": 0.0}, r"`SparseOT\(gamma=...\)` must be positive and finite; received 0\.0"),
        ((2,), {"gamma": -3.0}, r"`SparseOT\(gamma=...\)` must be positive and finite; received -3\.0"),
        (
            (2,),
            {"gamma": 1.0, "formulation": "primal"},
            r"`SparseOT\(formulation=...\)` must be 'dual' or 'semi_dual'",
        ),
        (
            (2,),
            {"gamma": 1.0, "max_iterations": -1},
            r"`SparseOT\(max_iterations=...\)` must be a positive integer; received -1",
        ),
    ],
)
def test_bad_options_raise(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        SparseOT(*args, **kwargs)


def test_bad_problems_raise(data):
    C, a, b = data
    with pytest.raises(ValueError, match="`SparseOT` solves a monge.LinearProblem; received nd"):
        SparseOT(2, gamma=1.0)(C)
    unbalanced = LinearProblem(CostMatrix(C), a, b, tau_b=0.9)
    with pytest.raises(ValueError, match=r"balanced problems only, but the problem has tau_b=0\.9"):
        SparseOT(2, gamma=1.0)(unbalanced)
