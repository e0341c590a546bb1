r"""Quadratically regularised ("smooth") optimal transport, by Newton's method on its dual.

The primal problem (Blondel, Seguy & Rolet, 2018) is

$$\mathrm{OT}_\gamma(a, b, C) = \min_{P \in \Pi(a, b)}\ \langle C, P\rangle
  + \frac{\gamma}{2}\|P\|_F^2, \qquad \Pi(a, b) = \{P \ge 0: P\mathbf 1 = a,\
  P^\top \mathbf 1 = b\}.$$

Its dual is smooth and concave,

$$\max_{f, g}\ \langle f, a\rangle + \langle g, b\rangle
  - \frac{1}{2\gamma}\sum_{ij} [f_i + g_j - C_{ij}]_+^2,
  \qquad P_{ij} = [f_i + g_j - C_{ij}]_+ / \gamma,$$

and maximising in closed form over $g$ gives the semi-dual

$$\max_f\ \langle f, a\rangle - \sum_j \max_{t \ge 0,\ \sum_i t_i = b_j}
  \Big(\langle f - C_{:j}, t\rangle - \frac{\gamma}{2}\|t\|^2\Big),$$

whose inner maximiser is a simplex projection: $P_{:j} = [f - C_{:j} - \tau_j]_+/\gamma$
with $\tau_j$ chosen so that the column sums to $b_j$ (then $g_j = -\tau_j$). The gradient
of the dual is the marginal residual $(a - P\mathbf 1, b - P^\top\mathbf 1)$, so the
stopping rule "L1 norm of the gradient below `threshold`" is "L1 marginal error below
`threshold`".

Both are piecewise quadratic, and maximised by default by semismooth Newton (`newton`):
conjugate gradients with the generalised Hessian (the derivative of the marginal
residual, fixed while the plan's support is), a line search on the derivative (which
float32 resolves near the optimum, unlike the value), and continuation in $\gamma$ from
a dense plan, so that each stage starts near its support (Lorenz, Manns & Meyer, 2021,
solve this dual by a semismooth quasi-Newton method). L-BFGS (optax, zoom line search;
`method="lbfgs"`) needs hundreds of iterations on these problems (the Hessian is a
bipartite graph Laplacian over $\gamma$, badly conditioned for small $\gamma$), and in
float32 it stalls when the dual value no longer resolves its own decrease.

The same machinery, with each column's support limited to its $k$ largest entries,
is the sparsity-constrained solver of `monge.solvers.linear.sparse` (L-BFGS, started from the
smooth optimum found by Newton).

Differentiation: the reported `reg_cost` is the dual Lagrangian evaluated at the
solution with the solution held fixed (`stop_gradient`), so by the envelope theorem
its gradient is exact: $\partial/\partial C = P$, $\partial/\partial a = f$,
$\partial/\partial b = g$, $\partial/\partial\gamma = \tfrac12\|P\|^2$. The
potentials, and through them `plan` and `cost`, are differentiated by the implicit
function theorem on the optimality condition $\nabla D = 0$: a `jax.custom_vjp`
solving with the dual Hessian by conjugate gradients, its constant (gauge) direction
projected out. Differentiation is reverse mode only (`jax.grad`, `jax.vjp`,
`jax.jacrev`); forward mode (`jax.jvp`, `jax.jacfwd`) raises JAX's "can't apply
forward-mode autodiff (jvp) to a custom_vjp function".

References: M. Blondel, V. Seguy, A. Rolet, "Smooth and sparse optimal transport",
AISTATS 2018 (arXiv:1710.06276); T. Liu, J. Puigcerver, M. Blondel,
"Sparsity-constrained optimal transport", ICLR 2023 (arXiv:2209.15466); D. A. Lorenz,
P. Manns, C. Meyer, "Quadratically regularized optimal transport", Appl. Math. Optim.
83, 2021 (arXiv:1903.01112).
"""

from __future__ import annotations

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import lineax as lx
import optax
from jaxtyping import Array, Float

from monge import checks
from monge.geometry import as_float_array
from monge.problems import LinearProblem
from monge.solution import PlanSolution
from monge.solvers import driver

__all__ = ["SmoothOT", "FORMULATIONS"]

#: The objectives a quadratic solver can maximise.
FORMULATIONS = ("dual", "semi_dual")
#: How `SmoothOT` maximises them.
METHODS = ("newton", "lbfgs")

#: Default L-BFGS memory (correction pairs) of `SmoothOT` and `SparseOT`.
LBFGS_MEMORY = 10


# -- the inner maximisation: plan columns from dual variables ---------------------------
def _scatter_columns(values: Array, idx: Array, n: int) -> Array:
    """An `(n, m)` matrix with column j holding `values[j]` at rows `idx[j]`."""
    m = values.shape[0]
    return jnp.zeros((m, n), values.dtype).at[jnp.arange(m)[:, None], idx].set(values).T


def plan_from_dual(X: Array, gamma: Array, k: int | None) -> Array:
    r"""$P = [X]_+/\gamma$, keeping the $k$ largest entries of each column if `k`."""
    if k is None:
        return jnp.maximum(X, 0) / gamma
    top, idx = jax.lax.top_k(X.T, k)
    return _scatter_columns(jnp.maximum(top, 0) / gamma, idx, X.shape[0])


@jax.custom_jvp
def column_thresholds(X: Array, mass: Array) -> Array:
    r"""$\tau_j$ with $\sum_i [X_{ij} - \tau_j]_+ = m_j$ (`mass`), for every column.

    Newton's method from the left, started at $\max_i X_{ij} - m_j$: the function is
    convex, decreasing and piecewise linear, so each step only shrinks the support, and
    the step after the last change is exact. A few $O(nm)$ passes, no sort (a sort of
    every column, the textbook method, costs far more on CPU). A zero mass gives an
    empty support and $\tau_j = \max_i X_{ij}$."""
    def support(tau):
        above = X > tau
        return jnp.sum(above, 0), jnp.sum(jnp.where(above, X, 0), 0)

    def step(carry):
        tau, count, total, _, it = carry
        tau = jnp.where(count > 0, (total - mass) / jnp.maximum(count, 1), tau)
        new_count, new_total = support(tau)
        return tau, new_count, new_total, jnp.any(new_count != count), it + 1

    tau = jnp.max(X, 0) - mass
    carry = (tau, *support(tau), jnp.asarray(True), 0)
    tau, count, total, _, _ = jax.lax.while_loop(
        lambda c: c[3] & (c[4] < X.shape[0]), step, carry
    )
    return jnp.where(count > 0, (total - mass) / jnp.maximum(count, 1), tau)


@column_thresholds.defjvp
def _column_thresholds_jvp(primals, tangents):
    (X, mass), (dX, dmass) = primals, tangents
    tau = column_thresholds(X, mass)
    above = X > tau
    # An empty column (zero mass) moves with its largest entry, as a support of one.
    support = jnp.where(jnp.any(above, 0), above, X >= jnp.max(X, 0))
    count = jnp.sum(support, 0)
    return tau, (jnp.sum(jnp.where(support, dX, 0), 0) - dmass) / count


def plan_from_semi_dual(X: Array, b: Array, gamma: Array, k: int | None):
    r"""Columns $P_{:j} = [X_{:j} - \tau_j]_+/\gamma$ summing to $b_j$, and $\tau$.

    $\tau_j$ is the threshold of the Euclidean projection of $X_{:j}/(\gamma b_j)$ onto
    the simplex, times $\gamma b_j$ (`column_thresholds`; with `k`, onto its $k$-sparse
    part, from the sorted top $k$: Kyrillidis et al., 2013). Written without dividing
    by $b_j$, so a zero weight gives an empty column and $\tau_j = \max_i X_{ij}$.
    """
    if k is None:
        tau = column_thresholds(X, gamma * b)
        return jnp.maximum(X - tau, 0) / gamma, tau
    n = X.shape[0]
    top, idx = jax.lax.top_k(X.T, k)  # (m, k), sorted decreasing
    ranks = jnp.arange(1, k + 1, dtype=X.dtype)
    excess = jnp.cumsum(top, axis=1) - (gamma * b)[:, None]
    support = jnp.maximum(jnp.sum(top * ranks > excess, axis=1), 1)  # 1 when b_j = 0
    tau = jnp.take_along_axis(excess, support[:, None] - 1, axis=1)[:, 0] / support
    return _scatter_columns(jnp.maximum(top - tau[:, None], 0) / gamma, idx, n), tau


def recover(x: Array, C: Array, b: Array, gamma: Array, formulation: str, k: int | None):
    """`(f, g, P)` from the optimisation variable `x` (`concat(f, g)` or `f`)."""
    n = C.shape[0]
    if formulation == "dual":
        f, g = x[:n], x[n:]
        return f, g, plan_from_dual(f[:, None] + g[None, :] - C, gamma, k)
    P, tau = plan_from_semi_dual(x[:, None] - C, b, gamma, k)
    return x, -tau, P


def lagrangian(f, g, P, C, a, b, gamma) -> Array:
    r"""$\langle f, a\rangle + \langle g, b\rangle - \sum_{ij} (f_i + g_j - C_{ij})P_{ij}
    + \frac\gamma2\|P\|^2$: the dual value when $P$ is the inner maximiser, and, with
    $(f, g, P)$ held fixed, the envelope-theorem gradient in $(C, a, b, \gamma)$."""
    X = f[:, None] + g[None, :] - C
    return f @ a + g @ b - jnp.sum(X * P) + 0.5 * gamma * jnp.sum(P * P)


# -- L-BFGS ---------------------------------------------------------------------------
def marginal_error(P: Array, a: Array, b: Array) -> Array:
    r"""$\|P\mathbf 1 - a\|_1 + \|P^\top\mathbf 1 - b\|_1$, `inf` for NaN."""
    err = jnp.sum(jnp.abs(jnp.sum(P, 1) - a)) + jnp.sum(jnp.abs(jnp.sum(P, 0) - b))
    return jnp.where(jnp.isnan(err), jnp.inf, err)


def lbfgs(fun, error, x0: Array, threshold, max_iterations: int, memory_size: int,
          progress: bool = False, label: str = "lbfgs"):
    """Minimise the convex `fun` from `x0` by L-BFGS until `error(x) <= threshold`, on
    the shared driver (`monge.solvers.driver`; one L-BFGS update per block).

    Returns `(x, n_iters)`. After a failed line search (rounding, ill-conditioning for
    small gamma, a kink of a sparse objective), seen as a step that increases `fun`
    beyond the search's own tolerance (refused) or decreases neither `fun` nor
    `error`, L-BFGS restarts from scratch (its memory is cleared); `patience` such
    steps in a row end the run (the driver's `stalled`). A start that already meets
    `threshold` runs no step."""
    solver = _LBFGS(threshold, max_iterations, progress=progress, fun=fun, error=error,
                    memory_size=memory_size, label=label)
    (x, *_), trace = driver.fixed_point(solver, None, solver.init(None, x0))
    return x, trace.n_iters


class _LBFGS(driver.AbstractIterativeSolver):
    """optax's L-BFGS (zoom line search) as the driver runs it: a block is one update."""

    threshold: Array
    max_iterations: int = eqx.field(static=True)
    inner_iterations: int = eqx.field(default=1, static=True)
    progress: bool = eqx.field(default=False, static=True)
    fun: object = eqx.field(default=None, static=True)
    error: object = eqx.field(default=None, static=True)
    memory_size: int = eqx.field(default=10, static=True)
    label: str = eqx.field(default="lbfgs", static=True)
    patience: int = eqx.field(default=5, static=True)

    @property
    def name(self) -> str:
        return self.label

    @property
    def error_label(self) -> str:
        return "marginal error"

    def _optimizer(self, dtype):
        # Near the optimum the value stops resolving the decrease: the line search then
        # uses Hager & Zhang's approximate Wolfe conditions, which allow increases up to
        # `rtol * |value|`, above float32 rounding.
        rtol = 1e-6 if dtype == jnp.float64 else 1e-5
        search = optax.scale_by_zoom_linesearch(max_linesearch_steps=30, approx_dec_rtol=rtol)
        return optax.lbfgs(memory_size=self.memory_size, linesearch=search), rtol

    def init(self, data, init):
        """`(x, optimizer state, error, stalls)` from the start `init` (an array)."""
        opt, _ = self._optimizer(init.dtype)
        return init, opt.init(init), self.error(init), jnp.asarray(0)

    def step(self, data, state, k):
        x, opt_state, err, stalls = state
        opt, rtol = self._optimizer(x.dtype)
        fun = self.fun
        value_and_grad = optax.value_and_grad_from_state(fun)

        def update():
            value, grad = value_and_grad(x, state=opt_state)
            updates, new_state = opt.update(grad, opt_state, x, value=value, grad=grad,
                                            value_fn=fun)
            new = optax.apply_updates(x, updates)
            new_value = optax.tree.get(new_state, "value")
            accept = new_value <= value + rtol * jnp.abs(value)
            new, new_err = jnp.where(accept, new, x), jnp.where(accept, self.error(new), err)
            progress = accept & ((new_value < value) | (new_err < err))
            new_state = jax.tree.map(
                lambda u, v: jnp.where(progress, u, v), new_state, opt.init(new)
            )
            return (new, new_state, new_err, jnp.where(progress, 0, stalls + 1)), jnp.asarray(1)

        done = err <= jnp.asarray(self.threshold, err.dtype)  # only at k = 0: a converged start
        state, n_run = jax.lax.cond(done, lambda: (state, jnp.asarray(0)), update)
        _, _, err, stalls = state
        return state, driver.Block(error=err, n_run=n_run, stalled=stalls >= self.patience)


# -- semismooth Newton, with continuation in gamma -------------------------------------------
def _marginal_residual(P: Array, a: Array, b: Array, formulation: str) -> Array:
    """The gradient of the negated dual in its variable: `P 1 - a` (and `P^T 1 - b`)."""
    r = jnp.sum(P, axis=1) - a
    return jnp.concatenate([r, jnp.sum(P, axis=0) - b]) if formulation == "dual" else r


def _hessian(P: Array, gamma: Array, formulation: str):
    r"""`(matvec, diagonal)` of the generalised Hessian of the negated dual at plan `P`:
    the derivative of the marginal residual, fixed while the support $S$ of `P` is.

    Dual: $\frac1\gamma\begin{pmatrix}\mathrm{diag}(S\mathbf 1) & S\\ S^\top &
    \mathrm{diag}(S^\top\mathbf 1)\end{pmatrix}$; semi-dual: $\frac1\gamma(
    \mathrm{diag}(S\mathbf 1) - S\,\mathrm{diag}(1/S^\top\mathbf 1)S^\top)$."""
    S = (P > 0).astype(P.dtype)
    rows, cols = jnp.sum(S, 1), jnp.sum(S, 0)
    n = S.shape[0]
    if formulation == "dual":
        def matvec(v):
            return jnp.concatenate([rows * v[:n] + S @ v[n:], S.T @ v[:n] + cols * v[n:]]) / gamma

        return matvec, jnp.concatenate([rows, cols]) / gamma
    inverse = 1 / jnp.maximum(cols, 1)

    def matvec(v):
        return (rows * v - S @ (inverse * (S.T @ v))) / gamma

    return matvec, (rows - S @ inverse) / gamma


def _line_search(slope, slope0: Array, max_steps: int = 12):
    """A step `t` along a descent direction of a convex function, from its derivative:
    `slope(t)` returns `(phi'(t), aux)`. From t = 1 (the Newton step), doubles t while
    phi'(t) < -|phi'(0)| / 2 and narrows by regula falsi while phi'(t) > |phi'(0)| / 2
    (the strong Wolfe curvature condition). Returns `(t, aux)`.

    Derivatives, unlike values, stay resolved in float32 near the optimum: the value
    is a difference of large terms, the derivative a sum of marginal residuals."""
    bound = 0.5 * jnp.abs(slope0)

    def step(carry):
        lo, slope_lo, aux_lo, hi, slope_hi, t, value, aux, it = carry
        short = value < -bound  # finite, too short: t becomes the lower end
        lo, slope_lo = jnp.where(short, t, lo), jnp.where(short, value, slope_lo)
        aux_lo = jax.tree.map(lambda u, v: jnp.where(short, u, v), aux, aux_lo)
        hi = jnp.where(short, hi, t)
        slope_hi = jnp.where(short, slope_hi, jnp.where(jnp.isfinite(value), value, jnp.inf))
        secant = lo - slope_lo * (hi - lo) / (slope_hi - slope_lo)  # zero of the chord
        width = hi - lo
        t = jnp.where(
            jnp.isinf(hi), 2 * lo,
            jnp.where(jnp.isfinite(slope_hi), jnp.clip(secant, lo + 0.05 * width,
                                                       hi - 0.05 * width), lo + width / 2),
        )
        return (lo, slope_lo, aux_lo, hi, slope_hi, t, *slope(t), it + 1)

    zero, one = jnp.zeros((), slope0.dtype), jnp.ones((), slope0.dtype)
    value, aux = slope(one)
    carry = (zero, slope0, aux, jnp.inf * one, jnp.inf * one, one, value, aux, 0)
    lo, _, aux_lo, _, _, t, value, aux, _ = jax.lax.while_loop(
        lambda c: ~(jnp.abs(c[6]) <= bound) & (c[8] < max_steps), step, carry
    )
    # Out of steps: the last trial if it still descends, else the lower end (if any).
    back = ~(value <= bound) & (lo > 0)
    return jnp.where(back, lo, t), jax.tree.map(lambda u, v: jnp.where(back, u, v), aux_lo, aux)


def newton(C, a, b, gamma, threshold, formulation: str, max_iterations: int, x0=None,
           progress: bool = False, label: str = "newton"):
    r"""Maximise the dual (`k = None`) by semismooth Newton until the L1 marginal error is
    at most `threshold`, on the shared driver (one Newton step per block); returns
    `(x, n_iters)`.

    Each step solves $(H + \mu I)d = -\nabla$ by Jacobi-preconditioned conjugate gradients
    (to a relative tolerance $\min(0.1, \sqrt{\text{error}})$, the damping $\mu$
    vanishing with the error: inexact Newton, superlinear) on the complement of the
    constant null direction, then searches the line with `_line_search`. The dual is
    piecewise quadratic, so Newton is exact once the support is found, but from a far
    start the support changes at every step. Continuation fixes this: start at a
    $\gamma_0$ that spreads each column over a tenth of the range of $C$ (a tenth of
    that range over the mean of $b$), solve to 1% marginal error, divide $\gamma$ by
    4, warm-start, and so on; the last stage, at `gamma`, solves to `threshold`. A
    block's error is final once the stage is at `gamma`. A run that does not reduce
    the error in `patience` steps in a row stops (the driver's `stalled`; reported as
    not converged). A warm start `x0` (the variable: `concat(f, g)` or `f`) starts at
    `gamma` itself, without continuation; one that already meets `threshold` runs no
    step."""
    solver = _Newton(threshold, max_iterations, progress=progress, formulation=formulation,
                     label=label)
    data = (C, a, b, gamma)
    (x, *_), trace = driver.fixed_point(solver, data, solver.init(data, x0))
    return x, trace.n_iters


class _Newton(driver.AbstractIterativeSolver):
    """Semismooth Newton with continuation in gamma, as the driver runs it (`newton`)."""

    threshold: Array
    max_iterations: int = eqx.field(static=True)
    inner_iterations: int = eqx.field(default=1, static=True)
    progress: bool = eqx.field(default=False, static=True)
    formulation: str = eqx.field(default="semi_dual", static=True)
    label: str = eqx.field(default="newton", static=True)
    patience: int = eqx.field(default=10, static=True)
    cg_iterations: int = eqx.field(default=50, static=True)

    @property
    def name(self) -> str:
        return self.label

    @property
    def error_label(self) -> str:
        return "marginal error"

    def _evaluate(self, data, x, g):
        C, a, b, _ = data
        P = recover(x, C, b, g, self.formulation, None)[2]
        return P, _marginal_residual(P, a, b, self.formulation), marginal_error(P, a, b)

    def init(self, data, init):
        """`(x, stage gamma, plan, residual, error, stalls)`: the continuation's start,
        or the warm start `init` at `gamma`."""
        C, a, b, gamma = data
        if init is None:
            spread = jnp.max(C) - jnp.min(C)
            start = jnp.where(jnp.isfinite(spread), 0.1 * spread * C.shape[1] / jnp.sum(a), 0.0)
            g0 = jnp.maximum(gamma, start).astype(C.dtype)
            x0 = _initial(C, b, g0, self.formulation, None)
        else:
            g0, x0 = jnp.asarray(gamma, C.dtype), init.astype(C.dtype)
        return (x0, g0, *self._evaluate(data, x0, g0), jnp.asarray(0))

    def step(self, data, state, k):
        C, a, b, gamma = data
        formulation = self.formulation
        n, m = C.shape
        null = _null_vector(n, m, formulation, C.dtype)
        project = lambda z: z - null * (null @ z)  # noqa: E731
        mass = jnp.sum(a)
        threshold = jnp.asarray(self.threshold, C.dtype)
        stage_threshold = jnp.maximum(threshold, 1e-2 * mass)

        def body():
            x, g, P, r, err, stalls = state
            matvec, diagonal = _hessian(P, g, formulation)
            mu = jnp.minimum(1.0, err / mass) / g
            d = conjugate_gradients(
                lambda v: project(matvec(project(v)) + mu * v), -project(r),
                rtol=jnp.minimum(0.1, jnp.sqrt(err / mass)), max_steps=self.cg_iterations,
                preconditioner=lambda v: v / (diagonal + mu),
            )
            d = project(d)

            def slope(t):
                P_t = recover(x + t * d, C, b, g, formulation, None)[2]
                return _marginal_residual(P_t, a, b, formulation) @ d, P_t

            t, P_new = _line_search(slope, r @ d)
            x_new, err_new = x + t * d, marginal_error(P_new, a, b)
            stalls = jnp.where(err_new < err, 0, stalls + 1)
            g_new = jnp.where((err_new <= stage_threshold) & (g > gamma), jnp.maximum(gamma, g / 4), g)
            P, r, err = jax.lax.cond(
                g_new < g, lambda: self._evaluate(data, x_new, g_new),
                lambda: (P_new, _marginal_residual(P_new, a, b, formulation), err_new),
            )
            return (x_new, g_new, P, r, err, jnp.where(g_new < g, 0, stalls)), jnp.asarray(1)

        _, g, _, _, err, _ = state
        done = (g <= gamma) & (err <= threshold)  # only at k = 0: a converged warm start
        state, n_run = jax.lax.cond(done, lambda: (state, jnp.asarray(0)), body)
        _, g, _, _, err, stalls = state
        return state, driver.Block(error=err, n_run=n_run, final=g <= gamma,
                                   stalled=stalls >= self.patience)


def conjugate_gradients(matvec, rhs, *, rtol, max_steps: int, preconditioner=None):
    r"""$x$ with $A x \approx$ `rhs` for a positive semi-definite $A$ = `matvec`, by
    lineax's conjugate gradients (the project's one CG), stopped when $\|A x -
    \text{rhs}\|_2 \le$ `rtol` $\|\text{rhs}\|_2$ or after `max_steps`; `preconditioner`
    applies an approximate inverse (Jacobi). Returns the last iterate (no error when
    the budget is spent: callers measure their own residual)."""
    structure = jax.eval_shape(lambda: rhs)
    tags = lx.positive_semidefinite_tag
    operator = lx.FunctionLinearOperator(matvec, structure, tags=tags)
    options = {} if preconditioner is None else {
        "preconditioner": lx.FunctionLinearOperator(preconditioner, structure, tags=tags)}
    size = jnp.linalg.norm(rhs)
    solver = lx.CG(rtol=0.0, atol=rtol * size, norm=lambda z: jnp.linalg.norm(z), max_steps=max_steps)
    out = lx.linear_solve(operator, rhs, solver, options=options, throw=False).value
    return jnp.where(size > 0, out, jnp.zeros_like(rhs))


def _null_vector(n: int, m: int, formulation: str, dtype) -> Array:
    if formulation == "dual":  # (f + c, g - c) leaves the dual unchanged
        v = jnp.concatenate([jnp.ones((n,), dtype), -jnp.ones((m,), dtype)])
    else:  # f + c shifts every column's threshold by c
        v = jnp.ones((n,), dtype)
    return v / jnp.sqrt(jnp.asarray(v.shape[0], dtype))


def _initial(C, b, gamma, formulation, k) -> Array:
    """Zero `f`, and for the dual the `g` that makes every column marginal exact."""
    f = jnp.zeros((C.shape[0],), C.dtype)
    if formulation == "semi_dual":
        return f
    _, tau = plan_from_semi_dual(-C, b, gamma, k)
    return jnp.concatenate([f, -tau])


def _residual(x, theta, formulation, k):
    """The gradient of the negated dual in `x`: the marginal residual."""
    C, a, b, gamma = theta
    return _marginal_residual(recover(x, C, b, gamma, formulation, k)[2], a, b, formulation)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4, 5))
def optimal_dual(formulation, k, method, max_iterations, memory_size, report, theta, threshold,
                 x0=None):
    """`(x, n_iters)`: the maximiser of the dual in `theta = (C, a, b, gamma)`, from the
    warm start `x0` (the variable, or None: a cold start).

    Reverse-mode differentiable by the implicit function theorem on the residual (no
    gradient flows into `x0`). `report`: `(progress, name)`, progress lines labelled by
    the solver's name."""
    progress, name = report
    C, a, b, gamma = theta
    n = C.shape[0]

    def negated_dual(x):
        f, g, P = jax.lax.stop_gradient(recover(x, C, b, gamma, formulation, k))
        if formulation == "dual":  # g is a variable: keep its dependence on x
            g = x[n:]
        return -lagrangian(x[:n], g, P, C, a, b, gamma)

    def error(x):
        return marginal_error(recover(x, C, b, gamma, formulation, k)[2], a, b)

    if method == "lbfgs" or (k is not None and x0 is not None):
        # a sparse warm start goes straight to the k-sparse dual
        x0 = _initial(C, b, gamma, formulation, k) if x0 is None else x0
        return lbfgs(negated_dual, error, x0, threshold, max_iterations, memory_size, progress,
                     f"{name} lbfgs")
    x, it = newton(C, a, b, gamma, threshold, formulation, max_iterations, x0, progress,
                   f"{name} newton")
    if k is None:
        return x, it
    # Sparse: L-BFGS on the k-sparse dual, from the smooth optimum (optimal already
    # when no column of that plan has more than k non-zeros).
    x, more = lbfgs(negated_dual, error, x, threshold, max_iterations, memory_size, progress,
                    f"{name} lbfgs")
    return x, it + more


def _optimal_dual_fwd(formulation, k, method, max_iterations, memory_size, report, theta,
                      threshold, x0=None):
    x, it = optimal_dual(formulation, k, method, max_iterations, memory_size, report, theta,
                         threshold, x0)
    return (x, it), (x, theta, threshold, x0)


def _optimal_dual_bwd(formulation, k, method, max_iterations, memory_size, report, saved,
                      cotangents):
    r"""$\bar\theta = -(\partial_\theta r)^\top z$ with $H z = \bar x$, $H = \partial_x r$
    (the PSD dual Hessian): conjugate gradients on the complement of its constant
    null direction, which gives the minimum-norm (gauge-free) solution."""
    x, theta, threshold, x0 = saved
    x_bar = cotangents[0]
    C = theta[0]
    null = _null_vector(C.shape[0], C.shape[1], formulation, x.dtype)
    project = lambda z: z - null * (null @ z)  # noqa: E731
    residual = lambda y: _residual(y, theta, formulation, k)  # noqa: E731
    hvp = lambda z: project(jax.jvp(residual, (x,), (project(z),))[1])  # noqa: E731
    tol = 1e-10 if x.dtype == jnp.float64 else 1e-5
    z = conjugate_gradients(hvp, project(x_bar), rtol=tol, max_steps=10 * x.shape[0])
    _, pullback = jax.vjp(lambda t: _residual(x, t, formulation, k), theta)
    (theta_bar,) = pullback(-project(z))
    return theta_bar, jnp.zeros_like(threshold), jax.tree.map(jnp.zeros_like, x0)


optimal_dual.defvjp(_optimal_dual_fwd, _optimal_dual_bwd)


@eqx.filter_jit
def solve_quadratic(
    problem: LinearProblem, gamma, threshold, *, formulation: str, k: int | None,
    method: str, max_iterations: int, memory_size: int, throw: bool, name: str,
    init=None, progress: bool = False,
) -> PlanSolution:
    """The jitted entry shared by `SmoothOT` and `SparseOT` (`k` static, or None);
    `init`: checked warm-start potentials `(f, g)` (see `SmoothOT.__call__`), or None."""
    a, b = checks.traced_checks(problem, jnp.ones((), problem.a.dtype))
    gamma = jnp.asarray(gamma, a.dtype)
    a = eqx.error_if(
        a, ~(jnp.isfinite(gamma) & (gamma > 0)), f"`{name}(gamma=...)` must be positive and finite."
    )
    a = eqx.error_if(
        a, ~problem.is_balanced, f"`{name}` solves balanced problems only: use tau_a = tau_b = 1."
    )
    C = problem.geom.cost_matrix().astype(a.dtype)
    theta = (C, a, b, gamma)
    x0 = None
    if init is not None:  # the dual's variable is (f, g); the semi-dual's is f alone
        f0, g0 = (jax.lax.stop_gradient(jnp.asarray(z, a.dtype)) for z in init)
        x0 = jnp.concatenate([f0, g0]) if formulation == "dual" else f0
    x, n_iters = optimal_dual(
        formulation, k, method, max_iterations, memory_size, (progress, name), theta, threshold,
        x0,
    )
    f, g, P = recover(x, C, b, gamma, formulation, k)
    stopped = jax.lax.stop_gradient((f, g, P))
    reg_cost = lagrangian(*stopped, C, a, b, gamma)
    error = jax.lax.stop_gradient(marginal_error(P, a, b))
    trace = driver.Trace(n_iters, error[None], error, jnp.asarray(True))
    converged, status = driver.status_of(trace, threshold)
    P = driver.finish(P, status, throw)
    return PlanSolution(problem, P, f, g, reg_cost, n_iters, error, converged, status)


# -- checks at the door ------------------------------------------------------------------
def check_options(name, gamma, formulation, threshold, max_iterations, memory_size) -> None:
    """Plain-Python checks of a quadratic solver's options (`name` for the messages)."""
    if formulation not in FORMULATIONS:
        raise ValueError(
            f"`{name}(formulation=...)` must be 'dual' or 'semi_dual'; received "
            f"{formulation!r}."
        )
    for field, value in (("gamma", gamma), ("threshold", threshold)):
        if value.ndim != 0:
            raise ValueError(
                f"`{name}({field}=...)` must be a scalar; received shape "
                f"{tuple(value.shape)}. Use jax.vmap to solve for several values."
            )
    for field, value, hint in (
        ("gamma", gamma, "Pass gamma > 0: smaller is closer to unregularised OT and slower "
         "to solve; see the class docstring for its scale."),
        ("threshold", threshold, "Typical values: 1e-3 to 1e-5 in float32, down to 1e-10 "
         "in float64."),
    ):
        v = checks.concrete(value)
        if v is not None and not (np.all(np.isfinite(v)) and np.all(v > 0)):
            raise ValueError(
                f"`{name}({field}=...)` must be positive and finite; received {v.item()!r}. "
                + hint
            )
    for field, value in (("max_iterations", max_iterations), ("memory_size", memory_size)):
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise ValueError(
                f"`{name}({field}=...)` must be a positive integer; received {value!r}."
            )


def check_problem(name: str, problem) -> None:
    """The problem must be a balanced `LinearProblem` (concrete tau checked now)."""
    if not isinstance(problem, LinearProblem):
        raise ValueError(
            f"`{name}` solves a monge.LinearProblem; received {type(problem).__name__}."
        )
    for tau_name in ("tau_a", "tau_b"):
        tau = checks.concrete(getattr(problem, tau_name))
        if tau is not None and tau != 1:
            raise ValueError(
                f"`{name}` solves balanced problems only, but the problem has "
                f"{tau_name}={float(tau):g}; build it with tau_a = tau_b = 1 (the default), "
                "or use monge.Sinkhorn for unbalanced transport."
            )


# -- the solver ----------------------------------------------------------------------------
class SmoothOT(eqx.Module):
    r"""Quadratically regularised optimal transport (Blondel, Seguy & Rolet, 2018).

    Solves $\min_{P \in \Pi(a, b)} \langle C, P\rangle + \frac{\gamma}{2}\|P\|_F^2$
    by semismooth Newton (or L-BFGS) on its dual or semi-dual (see the module
    docstring). The plan is sparse:
    $P_{ij} = [f_i + g_j - C_{ij}]_+/\gamma$. As $\gamma \to 0$ the value tends to
    unregularised OT; as $\gamma \to \infty$ the plan tends to the one of minimal
    Frobenius norm.

    **Scale of gamma.** $\gamma$ lives on the solver, not on the problem (whose
    `epsilon`, an entropic parameter, is ignored): its units are cost per unit mass,
    and a plan column $P_{:j}$ keeps the rows $i$ whose $f_i - C_{ij}$ is within
    $\gamma b_j$ of the column's best. With uniform $b = 1/m$, $\gamma = m\delta$
    spreads each column over the rows within about $\delta$ (in cost) of its best. POT's
    `ot.smooth.smooth_ot_dual(a, b, C, reg, reg_type="l2")` uses the same objective
    ($\Omega(P) = \frac{\text{reg}}{2}\|P\|^2$), so `gamma = reg`.

    Args:
        gamma: regularisation $\gamma > 0$; traced (a new value does not recompile).
        formulation: `"dual"` (variables $f, g$) or `"semi_dual"` (default; variable
            $f$, column marginals exact); static.
        threshold: stop when the L1 marginal error $\|P\mathbf 1 - a\|_1 +
            \|P^\top\mathbf 1 - b\|_1$ (the L1 norm of the dual gradient) is at most
            this; traced. Float64 reaches $10^{-10}$. Float32 resolves each plan
            entry only to about $10^{-7}\max|C|/\gamma$, so its floor rises as
            $\gamma$ falls (about $10^{-5}$ at $\gamma = 1$, $10^{-3}$ at
            $\gamma = 0.01$, for unit masses and costs near 10): use float64 for
            small $\gamma$. A run that stops reducing the error stops early and
            reports `MAX_ITERATIONS`.
        max_iterations: at most this many iterations (Newton steps, over all the
            continuation stages, or L-BFGS steps); static.
        memory_size: number of L-BFGS correction pairs (`method="lbfgs"` only: an error
            with Newton, which would ignore it); None (default) is `LBFGS_MEMORY` = 10,
            optax's default, enough curvature pairs for the smooth dual. Static.
        method: `"newton"` (default: semismooth Newton with conjugate gradients and
            continuation in $\gamma$; tens of steps) or `"lbfgs"` (optax's L-BFGS;
            hundreds of steps, and in float32 it can stall above `threshold` for
            $\gamma \lesssim 0.1$); static. Both converge to the same optimum.
        progress: print one line per iteration through the shared driver (iteration,
            L1 marginal error); static.

    Returns (when called on a balanced `LinearProblem`, optionally `throw=True`): a
    `monge.solution.PlanSolution` with the plan, potentials `f`, `g`, `reg_cost` (the
    regularised optimum), `n_iters`, `error` (the L1 marginal error above),
    `converged` and `status`. `reg_cost` has exact (envelope) gradients; `plan`,
    `f`, `g` and `cost` are differentiated implicitly; reverse mode only. The cost
    matrix is materialised ($nm$ memory).

    Raises:
        ValueError: `gamma` not a positive finite scalar, an unknown `formulation` or
            `method`, a non-positive `threshold`, `max_iterations` or `memory_size`; at
            the call,
            a problem that is not a balanced `LinearProblem`.

    Example:
        >>> import jax.numpy as jnp
        >>> from monge import CostMatrix, LinearProblem
        >>> from monge.solvers.linear.smooth import SmoothOT
        >>> C = jnp.array([[0.0, 1.0, 3.0], [2.0, 0.0, 1.0]])
        >>> problem = LinearProblem(CostMatrix(C), jnp.array([0.5, 0.5]),
        ...                         jnp.array([0.25, 0.5, 0.25]))
        >>> sol = SmoothOT(gamma=1.0)(problem)
        >>> bool(sol.converged), round(float(sol.reg_cost), 4)
        (True, 0.625)
        >>> (sol.plan > 0).astype(int).tolist()
        [[1, 1, 0], [0, 1, 1]]
    """

    gamma: Float[Array, ""] = eqx.field(converter=as_float_array)
    formulation: str = eqx.field(default="semi_dual", static=True)
    threshold: Float[Array, ""] = eqx.field(default=1e-4, converter=as_float_array)
    max_iterations: int = eqx.field(default=500, static=True)
    memory_size: int | None = eqx.field(default=None, static=True)
    method: str = eqx.field(default="newton", static=True)
    progress: bool = eqx.field(default=False, static=True)

    def __check_init__(self):
        check_options(
            "SmoothOT", self.gamma, self.formulation, self.threshold, self.max_iterations,
            self.lbfgs_memory,
        )
        if self.method not in METHODS:
            raise ValueError(
                f"`SmoothOT(method=...)` must be 'newton' or 'lbfgs'; received {self.method!r}."
            )
        if self.method == "newton":
            checks.reject_unused(
                "SmoothOT(method='newton')", {"memory_size": self.memory_size},
                "has no effect: it is the number of L-BFGS correction pairs, and Newton's "
                "method stores none",
                "drop it, or pass method='lbfgs'.",
            )

    @property
    def lbfgs_memory(self) -> int:
        """The L-BFGS memory used: `memory_size`, or `LBFGS_MEMORY` when None."""
        return LBFGS_MEMORY if self.memory_size is None else self.memory_size

    def __call__(self, problem: LinearProblem, *, init=None, throw: bool = False) -> PlanSolution:
        """Solve `problem`.

        Args:
            problem: a balanced `LinearProblem`.
            init: a warm start: a previous solution (of a problem of the same shape) or
                dual potentials `(f, g)` of shapes `(n,)`, `(m,)`; no gradient flows into
                it. With `formulation="dual"` both start the iteration; with
                `"semi_dual"` only `f` does (the semi-dual's variable: `g` is recomputed
                from `f` as the column thresholds, so a given `g` is not used). Newton
                then starts at `gamma` itself, without continuation. The optimum, hence
                the result to `threshold` and the gradients, is the same as from a cold
                start; a start that already meets `threshold` runs no iteration.
            throw: raise an `EquinoxRuntimeError` carrying the status message instead of
                returning a run that did not converge.

        Raises:
            ValueError: `init` is not a solution or a pair `(f, g)` of those shapes.
        """
        check_problem("SmoothOT", problem)
        return solve_quadratic(
            problem, self.gamma, self.threshold, formulation=self.formulation, k=None,
            method=self.method, max_iterations=self.max_iterations,
            memory_size=self.lbfgs_memory,
            throw=throw, name="SmoothOT", init=driver.warm_start(init, problem.geom.shape),
            progress=self.progress,
        )
