"""Low-rank OT (`LowRankSinkhorn`, `LowRankSolution`, `monge.solve(..., rank=r)`).

Every check is against an independent reference: NumPy float64 (plans, marginals,
costs, closed forms), POT's `emd2` (the exact optimum bounds every coupling's cost from
below), finite differences (gradients) and Python loops (vmap).

Compilations are the cost of this module (5-15 s each on 2 cores; the k-means start
is the largest): one problem shape (n=23, m=17, d=3), rank 3 and one solver
configuration per compile, shared through module-scoped fixtures, which every test
using that configuration requests so that the compile happens there. The fast part
compiles: the front door on points (k-means start), the same with a warm start, the
front door on a cost matrix at ranks 1, 3 and 17 (rank-2 start), the random start,
one jit(vmap) and one x64 jacobian.
"""

import jax
import jax.numpy as jnp
import numpy as np
import ot
import pytest

import monge
from conftest import compile_log, sqdist
from monge.geometry import CostMatrix, LowRankCost
from monge.solvers.linear import lowrank_init

N, M, D, RANK = 23, 17, 3, 3
FULL = min(N, M)  # the largest rank
EPS = 0.3  # the marginal penalty rho = EPS tau / (1 - tau) of the x64 unbalanced checks


# -- data and solutions (float32, the default dtype) -----------------------------------
@pytest.fixture(scope="module")
def data():
    """float32 clouds (n=23, m=17, d=3) and non-uniform float32 weights."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, D)).astype(np.float32)
    y = (rng.normal(size=(M, D)) + 0.7).astype(np.float32)
    a = rng.uniform(0.5, 1.5, N)
    b = rng.uniform(0.5, 1.5, M)
    return x, y, (a / a.sum()).astype(np.float32), (b / b.sum()).astype(np.float32)


@pytest.fixture(scope="module")
def oracle(data):
    """float64 NumPy: the cost matrix, the weights, POT's exact optimum."""
    x, y, a, b = data
    C = sqdist(x, y)
    a64, b64 = (np.asarray(w, np.float64) for w in (a, b))
    a64, b64 = a64 / a64.sum(), b64 / b64.sum()
    return C, a64, b64, float(ot.emd2(a64, b64, C))


@pytest.fixture(scope="module")
def pc_sol(data):
    """The front door on points (k-means start) and the compile messages it logged."""
    x, y, a, b = data
    out = []
    log = compile_log(lambda: out.append(monge.solve(x, y, a=a, b=b, rank=RANK)))
    return out[0], log


@pytest.fixture(scope="module")
def matrix_sols(data, oracle):
    """The front door on the cost matrix (rank-2 start) at ranks 1, RANK and min(n, m)."""
    _, _, a, b = data
    C32 = oracle[0].astype(np.float32)
    return {r: monge.solve_matrix(C32, a=a, b=b, rank=r) for r in (1, RANK, FULL)}


def as64(z):
    return np.asarray(z, np.float64)


def plan64(sol):
    return as64(sol.plan)


# -- 1. feasibility and structure ------------------------------------------------------
@pytest.fixture(scope="module", params=["points", "matrix"])
def structured(request, pc_sol, matrix_sols):
    return pc_sol[0] if request.param == "points" else matrix_sols[RANK]


def test_plan_has_the_marginals_and_rank(structured, oracle):
    sol = structured
    _, a, b, _ = oracle
    assert bool(sol.converged), sol.message
    P = plan64(sol)
    assert P.shape == (N, M) and np.all(P >= 0)
    # the projections stop at an L1 violation of 1e-5 of the mass (dykstra_threshold)
    assert np.abs(P.sum(1) - a).sum() < 1e-4
    assert np.abs(P.sum(0) - b).sum() < 1e-4
    q, r, g = as64(sol.q), as64(sol.r), as64(sol.g)
    np.testing.assert_allclose(q.sum(0), g, rtol=1e-4)
    np.testing.assert_allclose(r.sum(0), g, rtol=1e-4)
    s = np.linalg.svd(P, compute_uv=False)
    # float32 rounding of a rank-3 product leaves singular values near 1e-7 s_max
    assert np.linalg.matrix_rank(P, tol=1e-5 * s[0]) <= RANK, s[: RANK + 2] / s[0]


def test_apply_equals_plan_products(structured):
    sol = structured
    P = plan64(sol)
    rng = np.random.default_rng(3)
    for axis, length in ((0, N), (1, M)):
        for shape in ((length,), (length, 2)):
            v = rng.normal(size=shape).astype(np.float32)
            expected = (P.T if axis == 0 else P) @ as64(v)
            got = as64(sol.apply(v, axis))
            assert got.shape == expected.shape
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())


def test_cost_is_the_plan_against_numpy_costs(structured, oracle):
    sol = structured
    C = oracle[0]
    P = plan64(sol)
    np.testing.assert_allclose(float(sol.cost), np.sum(C * P), rtol=2e-6)
    # balanced, no entropy on the factors: the objective is the transport cost
    np.testing.assert_allclose(float(sol.reg_cost), np.sum(C * P), rtol=2e-6)
    p1, p2 = (as64(z) for z in sol.marginals())
    np.testing.assert_allclose(p1, P.sum(1), rtol=1e-5)
    np.testing.assert_allclose(p2, P.sum(0), rtol=1e-5)


# -- 2. oracles: exact OT below, the independent coupling at rank 1 --------------------
def test_cost_is_above_exact_ot_at_every_rank(pc_sol, matrix_sols, oracle):
    emd = oracle[3]
    costs = {r: float(s.cost) for r, s in matrix_sols.items()}
    for r, s in matrix_sols.items():
        assert bool(s.converged), (r, s.message)
    assert float(pc_sol[0].cost) >= emd * (1 - 1e-6)
    for r, c in costs.items():
        assert c >= emd * (1 - 1e-6), (r, c, emd)


def test_rank_one_is_the_independent_coupling(matrix_sols, oracle):
    C, a, b, _ = oracle
    sol = matrix_sols[1]
    np.testing.assert_allclose(float(sol.cost), a @ C @ b, rtol=1e-4)  # the projections meet the marginals to 1e-4
    np.testing.assert_allclose(plan64(sol), np.outer(a, b), atol=1e-6)


def test_cost_decreases_with_rank_to_exact_ot(matrix_sols, oracle):
    emd = oracle[3]
    c1, c3, cfull = (float(matrix_sols[r].cost) for r in (1, RANK, FULL))
    assert c1 > c3 > cfull, (c1, c3, cfull)
    assert cfull <= 1.05 * emd, (cfull, emd)


# -- 3. gradients (x64, tight tolerances, finite differences) --------------------------
def feasible_start(q, r, a, b, t=1e-3):
    """Factors that meet Q1 = a, R1 = b, Q^T1 = R^T1 = g exactly in float64, near the
    float32 factors (q, r), mixed with t times the rank-2 start (positive entries)."""
    q = q + (a - q.sum(1))[:, None] * (q.sum(0) / q.sum())[None, :]  # rows exact
    r = r + (b - r.sum(1))[:, None] * (r.sum(0) / r.sum())[None, :]
    g = 0.5 * (q.sum(0) + r.sum(0))  # columns: a rank-one correction with zero row sums
    q = q + (a / a.sum())[:, None] * (g - q.sum(0))[None, :]
    r = r + (b / b.sum())[:, None] * (g - r.sum(0))[None, :]
    q0, r0, g0 = (np.asarray(z) for z in lowrank_init.rank2(a, b, RANK))
    out = (1 - t) * q + t * q0, (1 - t) * r + t * r0, (1 - t) * g + t * g0
    assert min(float(out[0].min()), float(out[1].min())) > 0
    return out


def moved_start(factors, a, b, a2, b2, t=1e-2):
    """A feasible start for the weights (a2, b2) near `factors` (feasible for (a, b)):
    (1 - t) factors + t rank2(a, b) + rank2(a2, b2) - rank2(a, b). The rank-2 start is
    exact for its weights and its change is proportional to each weight, so the sum
    is feasible and positive. (`init=sol` itself is not used across weights: see
    `test_warm_start_from_other_weights_converges`.)"""
    base = [np.asarray(z) for z in lowrank_init.rank2(a, b, RANK)]
    new = [np.asarray(z) for z in lowrank_init.rank2(a2, b2, RANK)]
    out = tuple((1 - t) * np.asarray(f) + t * z0 + (z1 - z0) for f, z0, z1 in zip(factors, base, new))
    assert min(float(out[0].min()), float(out[1].min())) > 0
    return out


@pytest.fixture(scope="module")
def gradients(data, pc_sol):
    """Autodiff of `cost` and `reg_cost` against central differences of the solved
    objective, in x64. One compiled jacobian serves every solve (balanced and
    unbalanced: tau is traced; always a warm start, so no initializer is traced).
    Perturbed solves start from the base solution, so they stay in its local optimum.
    Returns {name: (finite difference of reg_cost, d cost, d reg_cost)} along the
    checked directions."""
    x, y, a, b = (as64(v) for v in data)
    a, b = a / a.sum(), b / b.sum()
    sol32 = pc_sol[0]
    h = 1e-5
    out = {}
    with jax.enable_x64(True):
        Y = jnp.asarray(y)
        solver = monge.LowRankSinkhorn(rank=RANK, threshold=1e-9, dykstra_threshold=1e-12,
                                       max_iterations=5000)

        def objective(x, a, b, tau, init):
            # epsilon only sets rho when tau < 1 (under jit the balanced check cannot
            # see tau, so one function serves both)
            problem = monge.LinearProblem(LowRankCost.from_points(x, Y), a, b, epsilon=EPS,
                                          tau_a=tau, tau_b=tau)
            sol = solver(problem, init=init)
            values = jnp.stack([sol.cost, sol.reg_cost])
            return values, (values, (sol.q, sol.r, sol.g), sol.converged, sol.n_iters)

        jac = jax.jit(jax.jacrev(objective, argnums=(0, 1, 2), has_aux=True))
        X, A, B = (jnp.asarray(v) for v in (x, a, b))

        def run(x, a, b, tau, init):
            d, (values, factors, converged, n_iters) = jac(x, a, b, tau, init)
            assert bool(converged), (tau, int(n_iters))
            return np.asarray(values), factors, d

        def base(tau, init):
            """Restart from the solution until a restart no longer descends: a solve
            can stop on the plateau of a saddle (relative decrease below threshold)."""
            previous = None
            for _ in range(4):
                d, (values, factors, converged, n_iters) = jac(X, A, B, tau, init)
                assert bool(converged), (tau, int(n_iters))
                if previous is not None and previous - values[1] <= 1e-9 * abs(values[1]):
                    return np.asarray(values), factors, d
                previous, init = values[1], factors
            raise AssertionError(f"tau={tau}: restarts keep descending ({previous} to {values[1]})")

        start = feasible_start(as64(sol32.q), as64(sol32.r), a, b)
        balanced = base(1.0, tuple(jnp.asarray(z) for z in start))
        rng = np.random.default_rng(1)
        for tau, (_, factors, d) in ((1.0, balanced), (0.9, base(0.9, balanced[1]))):
            kind = "balanced" if tau == 1 else "unbalanced"
            for i, j in ((0, 0), (9, 1), (22, 2)):
                e = np.zeros_like(x)
                e[i, j] = h
                up, down = (run(X + s * e, A, B, tau, factors)[0] for s in (1, -1))
                out[f"{kind} x[{i},{j}]"] = ((up[1] - down[1]) / (2 * h), float(d[0][0][i, j]),
                                             float(d[0][1][i, j]))
            for k, w in ((1, a), (2, b)):
                direction = rng.normal(size=w.shape)
                if tau == 1:  # balanced: stay on the simplex
                    direction -= direction.mean()
                vals = []
                for s in (1, -1):
                    args = [X, A, B]
                    args[k] = args[k] + s * h * direction
                    new_a, new_b = np.asarray(args[1]), np.asarray(args[2])
                    init = factors if tau < 1 else moved_start(factors, a, b, new_a, new_b)
                    vals.append(run(*args, tau, init)[0][1])
                out[f"{kind} {'ab'[k - 1]}"] = ((vals[0] - vals[1]) / (2 * h),
                                               float(np.sum(np.asarray(d[k][0]) * direction)),
                                               float(np.sum(np.asarray(d[k][1]) * direction)))
    return out


GRADIENT_CASES = [f"{kind} {what}" for kind in ("balanced", "unbalanced")
                  for what in ("x[0,0]", "x[9,1]", "x[22,2]", "a", "b")]


@pytest.mark.parametrize("name", GRADIENT_CASES)
def test_cost_gradient_matches_finite_differences(gradients, name):
    """d cost carries the derivative of the solved objective (the envelope theorem)."""
    fd, d_cost, _ = gradients[name]
    np.testing.assert_allclose(d_cost, fd, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("name", GRADIENT_CASES)
def test_reg_cost_gradient_matches_finite_differences(gradients, name):
    """d reg_cost, likewise (unbalanced: the KL terms hold the weights directly)."""
    fd, _, d_reg = gradients[name]
    np.testing.assert_allclose(d_reg, fd, rtol=1e-5, atol=1e-8)


# -- 4. jit, vmap, no recompilation ----------------------------------------------------
def test_jit_of_vmap_equals_a_loop_of_solves(data, oracle, matrix_sols):
    _, _, _, b = data
    C32 = oracle[0].astype(np.float32)
    rng = np.random.default_rng(4)
    batch = rng.uniform(0.5, 1.5, (3, N))
    batch = (batch / batch.sum(1, keepdims=True)).astype(np.float32)

    def solve(a):  # builds the geometry and the problem under jit
        sol = monge.solve_matrix(C32, a=a, b=b, rank=RANK)
        return sol.cost, sol.q, sol.converged

    costs, qs, converged = jax.jit(jax.vmap(solve))(batch)
    assert np.asarray(converged).all()
    assert len({round(float(c), 4) for c in costs}) == 3  # the batch differs
    for i in range(3):
        single = monge.solve_matrix(C32, a=batch[i], b=b, rank=RANK)  # compiled: matrix_sols
        np.testing.assert_allclose(float(costs[i]), float(single.cost), rtol=1e-5)
        np.testing.assert_allclose(np.asarray(qs[i]), np.asarray(single.q), atol=1e-5)


def test_new_gamma_epsilon_threshold_do_not_recompile(data, pc_sol):
    x, y, a, b = data
    _, first = pc_sol
    # the fixture's first solve compiled, and the filter sees it
    assert [m for m in first if "Compiling" in m and "_solve" in m]
    problem = monge.LinearProblem(LowRankCost.from_points(x, y), a, b)  # as the front door
    results = []

    def again():
        for gamma, epsilon, threshold in ((5.0, 0.0, 1e-3), (20.0, 1e-3, 1e-4), (10.0, 0.0, 1e-5)):
            solver = monge.LowRankSinkhorn(rank=RANK, gamma=gamma, epsilon=epsilon, threshold=threshold)
            results.append(solver(problem))

    compiles = [m for m in compile_log(again) if "Compiling" in m and "_solve" in m]
    assert not compiles, compiles
    assert all(bool(s.converged) for s in results)
    # the values took effect: entropy on the factors makes reg_cost differ from cost
    assert float(results[1].reg_cost) != float(results[1].cost)
    np.testing.assert_allclose(float(results[0].reg_cost), float(results[0].cost), rtol=1e-6)


# -- 5. unbalanced ---------------------------------------------------------------------
def test_tau_near_one_is_nearly_balanced(data, pc_sol):
    x, y, a, b = data
    balanced = pc_sol[0]
    sol = monge.solve(x, y, a=a, b=b, rank=RANK, tau_a=0.99999, tau_b=0.99999)
    np.testing.assert_allclose(float(sol.cost), float(balanced.cost), rtol=1e-3)
    P = plan64(sol)
    assert np.abs(P.sum(1) - a).sum() < 1e-3 and np.abs(P.sum(0) - b).sum() < 1e-3


def test_tau_near_one_converges_in_float32(data, pc_sol):
    """rho = epsilon tau / (1 - tau) is 3e4 here: the KL penalties must be computed
    without cancellation (float32 sum p log p - p log a - p + a loses 1e-8 per term),
    else their noise (times rho) exceeds the acceptance tolerance of a block and every
    block is rejected until the step stalls."""
    x, y, a, b = data
    sol = monge.solve(x, y, a=a, b=b, rank=RANK, tau_a=0.99999, tau_b=0.99999)
    assert bool(sol.converged), (sol.message, int(sol.n_iters))


def with_outlier(y, distance):
    far = y.copy()
    far[-1] = y.mean(0) + distance  # same shape: the compiled solver is reused
    return far


def test_unbalanced_plan_ignores_an_outlier(data, pc_sol):
    x, y, a, b = data
    far = with_outlier(y, 5.0)  # sqrt(3) * 5 from the centre of clouds of unit spread
    unbalanced = monge.solve(x, far, a=a, b=b, rank=RANK, tau_a=0.5, tau_b=0.5)
    balanced = monge.solve(x, far, a=a, b=b, rank=RANK)  # control: must send it all
    for sol in (unbalanced, balanced):
        assert bool(sol.converged), sol.message
    assert plan64(unbalanced).sum(0)[-1] < 0.1 * b[-1]
    np.testing.assert_allclose(plan64(balanced).sum(0)[-1], b[-1], rtol=1e-3)


def test_unbalanced_with_a_very_far_outlier_converges(data, pc_sol):
    """The step 1/max|gradient|^2 is set by the outlier's costs (~1200, against ~6),
    though the plan sends it nothing."""
    x, y, a, b = data
    sol = monge.solve(x, with_outlier(y, 20.0), a=a, b=b, rank=RANK, tau_a=0.5, tau_b=0.5)
    assert plan64(sol).sum(0)[-1] < 0.1 * b[-1]
    assert bool(sol.converged), (sol.message, int(sol.n_iters))


def test_unbalanced_with_unequal_masses(data, pc_sol):
    """tau < 1 allows sum(a) != sum(b) (`LinearProblem`); the low-rank start must not
    insist on equal masses."""
    x, y, a, b = data
    sol = monge.solve(x, y, a=a, b=1.3 * b, rank=RANK, tau_a=0.9, tau_b=0.9)
    assert bool(sol.converged), sol.message
    assert np.isfinite(float(sol.cost))
    # the transported mass may fall below both masses (transport costs more than the
    # KL penalty saves): compare with unbalanced Sinkhorn on the same problem
    entropic = monge.solve(x, y, a=a, b=1.3 * b, tau_a=0.9, tau_b=0.9)
    mass = float(np.asarray(entropic.marginals()[0], np.float64).sum())
    assert 0.0 < plan64(sol).sum() <= 1.3
    np.testing.assert_allclose(plan64(sol).sum(), mass, rtol=0.2)


# -- 6. warm start ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def warm(data, pc_sol):
    x, y, a, b = data
    sol = pc_sol[0]
    return (monge.solve(x, y, a=a, b=b, rank=RANK, init=sol),
            monge.solve(x, y, a=a, b=b, rank=RANK, init=(sol.q, sol.r, sol.g)))


def test_warm_start_from_a_solution(pc_sol, warm):
    sol = pc_sol[0]
    from_sol, from_tuple = warm
    assert bool(from_sol.converged), from_sol.message
    # convergence needs two blocks whose decrease shrinks: at the optimum the decreases
    # are rounding noise, so a few blocks (the cold solve of this small problem took 3)
    assert int(from_sol.n_iters) <= 5 * monge.LowRankSinkhorn(rank=RANK).inner_iterations
    assert float(from_sol.cost) <= float(sol.cost) * (1 + 1e-6)  # monotone
    # the relative-decrease rule stopped the cold solve within 1e-4 per block; going on
    # from it may still descend a little (0.09 % here), never climb
    np.testing.assert_allclose(float(from_sol.cost), float(sol.cost), rtol=2e-3)
    assert float(from_tuple.cost) == float(from_sol.cost)
    np.testing.assert_array_equal(np.asarray(from_tuple.q), np.asarray(from_sol.q))


def test_warm_start_from_other_weights_converges(data, oracle, pc_sol, warm):
    """A warm start from the solution for weights a, for weights a +- delta (an outer
    loop's use): the first projection onto the new marginals may raise the objective
    above that of the (infeasible) start, and must not be rejected."""
    x, y, a, b = data
    sol = pc_sol[0]
    delta = np.random.default_rng(5).normal(size=N)
    delta = 2e-3 * (delta - delta.mean()) / np.abs(delta).max()
    for sign in (1, -1):
        a2 = (a + sign * delta * a).astype(np.float32)
        a2 = a2 / a2.sum()
        new = monge.solve(x, y, a=a2, b=b, rank=RANK, init=sol)
        assert bool(new.converged), (sign, new.message, int(new.n_iters))
        assert np.abs(plan64(new).sum(1) - a2).sum() < 1e-4, sign


def test_warm_start_of_the_wrong_shape(data, pc_sol, matrix_sols):
    x, y, a, b = data
    sol = pc_sol[0]
    match = r"`init` must be a LowRankSolution or factors \(q, r, g\) of shapes"
    for init in ((sol.q[:-1], sol.r, sol.g), (sol.q, sol.r), matrix_sols[1], "rank2"):
        with pytest.raises(ValueError, match=match):
            monge.solve(x, y, a=a, b=b, rank=RANK, init=init)


# -- 7. every ValueError of the low-rank path ------------------------------------------
@pytest.mark.parametrize("options, match", [
    ({"rank": 0}, r"`rank` must be a positive integer; received 0"),
    ({"rank": 2.0}, r"`rank` must be a positive integer; received 2.0"),
    ({"rank": True}, r"`rank` must be a positive integer; received True"),
    ({"max_iterations": 0}, r"`max_iterations` must be a positive integer"),
    ({"inner_iterations": -1}, r"`inner_iterations` must be a positive integer"),
    ({"dykstra_iterations": 0}, r"`dykstra_iterations` must be a positive integer"),
    ({"initializer": "svd"},
     r"`initializer` must be one of \('auto', 'rank2', 'random', 'kmeans'\); received 'svd'"),
    ({"gamma": 0.0}, r"`gamma` must be positive and finite; received .*The default 10"),
    ({"gamma": float("inf")}, r"`gamma` must be positive and finite"),
    ({"threshold": -1e-3}, r"`threshold` must be positive and finite; received .*Typical values"),
    ({"dykstra_threshold": 0.0}, r"`dykstra_threshold` must be positive and finite"),
    ({"alpha": 0.0}, r"`alpha` must be positive and finite"),
    ({"alpha": 1.0}, r"`alpha` must be a scalar in \(0, 1\); received"),
    ({"alpha": np.array([0.1, 0.2])}, r"`alpha` must be a scalar in \(0, 1\)"),
    ({"epsilon": -0.1}, r"`epsilon` must be a scalar in \[0, inf\); received"),
])
def test_solver_options_are_checked(options, match):
    with pytest.raises(ValueError, match=match):
        monge.LowRankSinkhorn(**{"rank": RANK, **options})


def test_solver_rejects_what_it_cannot_solve(data, oracle):
    x, y, a, b = data
    C32 = oracle[0].astype(np.float32)
    points = monge.LinearProblem(LowRankCost.from_points(x, y), a, b)
    matrix = monge.LinearProblem(CostMatrix(C32), a, b)
    match = r"`LowRankSinkhorn` solves a monge.LinearProblem; received PartialProblem"
    with pytest.raises(ValueError, match=match):
        monge.LowRankSinkhorn(rank=RANK)(monge.PartialProblem(CostMatrix(C32), a, b, mass=0.5))
    with pytest.raises(ValueError, match=r"`rank=18` exceeds min\(n, m\) = 17 \(n=23, m=17\)"):
        monge.LowRankSinkhorn(rank=FULL + 1)(points)
    match = r"`initializer='kmeans'` clusters points, and this geometry has none"
    with pytest.raises(ValueError, match=match):
        monge.LowRankSinkhorn(rank=RANK, initializer="kmeans")(matrix)
    with pytest.raises(ValueError, match=r"A balanced low-rank problem does not use the problem's `epsilon`"):
        monge.LowRankSinkhorn(rank=RANK)(monge.LinearProblem(CostMatrix(C32), a, b, epsilon=0.1))


@pytest.mark.parametrize("options, match", [
    ({"online": True}, r"Low-rank OT \(rank=3\): online=True has no effect: the cost is factored"),
    ({"mass": 0.5}, r"Low-rank OT \(rank=3\): mass=0.5 has no effect: low-rank OT transports all the mass"),
    ({"implicit_diff": False}, r"Low-rank OT \(rank=3\): implicit_diff=False has no effect"),
    ({"mass": 0.5, "implicit_diff": False}, r"mass=0.5, implicit_diff=False has no effect"),
    ({"epsilon": 0}, r"`epsilon=0` with `rank=3`: low-rank OT has no entropy to switch off"),
    ({"epsilon": 0.1}, r"A balanced low-rank problem does not use the problem's `epsilon`"),
    ({"rank": 18}, r"`rank=18` exceeds min\(n, m\) = 17"),
    ({"rank": 0}, r"`rank` must be a positive integer; received 0"),
])
def test_front_door_rejects_options_of_low_rank(data, options, match):
    x, y, a, b = data
    with pytest.raises(ValueError, match=match):
        monge.solve(x, y, a=a, b=b, **{"rank": RANK, **options})


@pytest.mark.parametrize("options, match", [
    ({"mass": 0.5}, r"Low-rank OT \(rank=3\): mass=0.5 has no effect"),
    ({"implicit_diff": False}, r"Low-rank OT \(rank=3\): implicit_diff=False has no effect"),
    ({"epsilon": 0.0}, r"`epsilon=0` with `rank=3`"),
    ({"epsilon": 0.1}, r"A balanced low-rank problem does not use the problem's `epsilon`"),
    ({"rank": 18}, r"`rank=18` exceeds min\(n, m\) = 17"),
])
def test_front_door_on_a_matrix_rejects_options_of_low_rank(data, oracle, options, match):
    _, _, a, b = data
    with pytest.raises(ValueError, match=match):
        monge.solve_matrix(oracle[0].astype(np.float32), a=a, b=b, **{"rank": RANK, **options})


# -- 8. initialisers -------------------------------------------------------------------
@pytest.fixture(scope="module")
def random_sol(data):
    x, y, a, b = data
    problem = monge.LinearProblem(LowRankCost.from_points(x, y), a, b)
    return monge.LowRankSinkhorn(rank=RANK, initializer="random", seed=3)(problem)


@pytest.mark.parametrize("initializer", ["rank2", "kmeans", "random"])
def test_initializers_converge_above_exact_ot(initializer, pc_sol, matrix_sols, random_sol, oracle):
    # "auto" is "kmeans" on points and "rank2" on a cost matrix: the front-door
    # solutions are those starts (one compile each spared)
    sol = {"kmeans": pc_sol[0], "rank2": matrix_sols[RANK], "random": random_sol}[initializer]
    if initializer != "random":
        assert monge.LowRankSinkhorn(rank=RANK).resolved_initializer(sol.problem.geom) == initializer
    C, a, b, emd = oracle
    assert bool(sol.converged), sol.message
    P = plan64(sol)
    assert np.abs(P.sum(1) - a).sum() < 1e-4 and np.abs(P.sum(0) - b).sum() < 1e-4
    assert np.sum(C * P) >= emd * (1 - 1e-6)
    # a local optimum of rank 3: between exact OT and the independent coupling
    assert np.sum(C * P) < 0.8 * (a @ C @ b)


# -- 9. realistic size -----------------------------------------------------------------
@pytest.mark.slow
def test_large_problem_in_float32():
    n, m, r = 4000, 3000, 10
    rng = np.random.default_rng(7)
    x = rng.normal(size=(n, 2)).astype(np.float32)
    y = (rng.normal(size=(m, 2)) * np.array([1.5, 0.5]) + np.array([1.0, -0.5])).astype(np.float32)

    def cost(x):
        sol = monge.solve(x, y, rank=r)
        return sol.cost, sol

    grad, sol = jax.grad(cost, has_aux=True)(jnp.asarray(x))
    assert bool(sol.converged), sol.message
    assert sol.q.dtype == jnp.float32 and grad.dtype == jnp.float32
    q, rr, g = as64(sol.q), as64(sol.r), as64(sol.g)
    x, y = as64(x), as64(y)
    # the factors of the cost in float64, never n x m: C = A B^T
    A = np.hstack([np.sum(x**2, 1, keepdims=True), np.ones((n, 1)), -2 * x])
    B = np.hstack([np.ones((m, 1)), np.sum(y**2, 1, keepdims=True), y])
    row = q @ (rr.sum(0) / g)  # P 1
    col = rr @ (q.sum(0) / g)  # P^T 1
    assert np.abs(row - 1 / n).sum() < 1e-3 and np.abs(col - 1 / m).sum() < 1e-3
    value = np.sum((q.T @ A) * (rr.T @ B) / g[:, None])  # sum_k (Q^T A B^T R)_kk / g_k
    np.testing.assert_allclose(float(sol.cost), value, rtol=1e-4)
    # exact OT (POT's network simplex, 3 s here) bounds it below; a rank-10 coupling
    # of these 2-D clouds is well above it (measured: exact 1.758, rank 10 2.361,
    # rank 30 1.993, entropic Sinkhorn at the default epsilon 2.024), and far below
    # the independent coupling (rank 1: 5.745)
    emd = ot.emd2(np.full(n, 1 / n), np.full(m, 1 / m), sqdist(x, y), numItermax=10**7)
    independent = np.sum((x.mean(0) - y.mean(0)) ** 2) + np.sum(x.var(0)) + np.sum(y.var(0))
    assert emd * (1 - 1e-6) <= value <= 1.5 * emd, (value, emd)
    assert value < 0.5 * independent, (value, independent)
    # the envelope gradient 2 (diag(P 1) x - P y), through the factors
    grad = as64(grad)
    assert np.all(np.isfinite(grad))
    expected = 2 * (row[:, None] * x - q @ ((rr.T @ y) / g[:, None]))
    assert np.linalg.norm(grad - expected) < 1e-3 * np.linalg.norm(expected)
