r"""How gradients flow through a linear OT solver: implicit or unrolled.

The entropic (unbalanced) dual optimum $(f^*, g^*)$ solves $F(f, g; \theta) = 0$ with

$$F_f = a \odot e^{-f/\rho_a} - P\mathbf 1, \qquad F_g = b \odot e^{-g/\rho_b} - P^\top
\mathbf 1, \qquad P_{ij} = a_i b_j e^{(f_i + g_j - C_{ij})/\varepsilon},$$

the gradient of the concave dual ($\rho = \infty$ drops the exponential: balanced).
`ImplicitAdjoint` differentiates that equation (Blondel et al., 2022, "Efficient and
modular implicit differentiation"; Luise et al., 2018): for a cotangent $\bar z$ on
$z = (f, g)$, solve $H u = \bar z$ with $H = \partial_z F$ and return $\bar\theta =
-(\partial_\theta F)^\top u$. At the fixed point $H = -\tfrac1\varepsilon D^{1/2} M
D^{1/2}$ with $D = \mathrm{diag}(P\mathbf 1, P^\top\mathbf 1)$ and

$$M = \begin{pmatrix} I/\tau_a & A \\ A^\top & I/\tau_b\end{pmatrix},\quad
A = \mathrm{diag}(r)^{-1/2} P\, \mathrm{diag}(c)^{-1/2},$$

symmetric positive semi-definite with eigenvalues in $[0, 2/\min\tau]$; it is solved by
conjugate gradients (lineax). In the balanced case $M$ has the null vector
$(\sqrt r, -\sqrt c)$ (potentials are defined up to $(f + t, g - t)$), one per block
where forbidden pairs split the problem into independent blocks (`blocks`); they are
projected out. Memory is that of the forward pass: the plan is applied lazily.
"""

from __future__ import annotations

import abc

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx

from monge.geometry import as_float_array, safe_log

__all__ = ["AbstractAdjoint", "ImplicitAdjoint", "UnrolledAdjoint", "optimality"]


def optimality(f, g, theta):
    """$F(f, g; \\theta)$ above, in units of mass; `theta = (geom, a, b, eps, tau_a, tau_b)`."""
    geom, a, b, eps, tau_a, tau_b = theta
    geom = geom.precompute()
    f_hat = -eps * geom.lse(g, eps, 1, w=b)
    g_hat = -eps * geom.lse(f, eps, 0, w=a)
    fa = a * (jnp.exp(-(1 - tau_a) / (tau_a * eps) * f) - jnp.exp((f - f_hat) / eps))
    fb = b * (jnp.exp(-(1 - tau_b) / (tau_b * eps) * g) - jnp.exp((g - g_hat) / eps))
    return fa, fb


class AbstractAdjoint(eqx.Module):
    """How a solver's output is differentiated."""

    @abc.abstractmethod
    def fixed_point(self, solver, theta, init=None):
        """Run `solver.iterate(theta, unrolled, init) -> (f, g, trace)` with this
        adjoint's gradient attached; `init` is a warm start (no gradient flows into it)."""


class UnrolledAdjoint(AbstractAdjoint):
    """Differentiate through every iteration (reverse mode through a `scan`).

    Exact for the iterate actually returned, converged or not, but memory grows with
    the number of iterations (blocks are rematerialised) and it is slower than
    implicit differentiation. Useful as a reference and for few iterations.
    """

    def fixed_point(self, solver, theta, init=None):
        return solver.iterate(theta, True, init)


class ImplicitAdjoint(AbstractAdjoint):
    r"""Implicit differentiation of the optimality conditions (default).

    The gradient is that of the exact optimum: it ignores how the solver got there
    (initialisers, acceleration), and is accurate when the solver converged.

    Args:
        rtol: relative tolerance of the conjugate-gradient solve: it stops when
            $\|M w - b\|_2 \le \text{tol}\,\|b\|_2$, tol $= \max(\text{rtol},
            10\,\mathrm{eps}\sqrt{n + m})$ (the float32 floor of the residual,
            `_cg`). Static.
        ridge: added to the diagonal of $M$ (relative to its unit diagonal), guarding
            against the near-singular directions of very small epsilon.
        max_steps: conjugate-gradient iterations at most (static).

    Raises:
        EquinoxRuntimeError (a `JaxRuntimeError` under plain `jax.jit`): on the
        backward pass, when the adjoint solve failed — its residual, recomputed after
        the solve, is not finite or above `FAIL_RESIDUAL` (`ADJOINT_FAILURE`). A gradient is
        never silently NaN or garbage; a diverged forward solve raises here too.
    """

    rtol: float = eqx.field(default=1e-6, static=True)
    ridge: float = eqx.field(default=1e-7, converter=as_float_array)
    max_steps: int = eqx.field(default=500, static=True)

    def fixed_point(self, solver, theta, init=None):
        f, g, stats = _implicit(theta, solver, init)
        f, g = zero_weight_potentials(theta, f, g)
        return f, g, stats


def zero_weight_potentials(theta, f, g):
    r"""`(f, g)` with the potentials of zero-weight points replaced by their
    (tempered) soft c-transforms, differentiably:

    $$f_i = -\tau_a\varepsilon\log\textstyle\sum_j b_j e^{(g_j - C_{ij})/\varepsilon}
    \quad (a_i = 0),$$

    likewise $g_j$ for $b_j = 0$. The optimality conditions $F$ carry a factor $a_i$,
    so they say nothing about such an $f_i$ and the implicit adjoint would give it no
    sensitivity; as an explicit function of $g$ and $\theta$ it gets the right one
    (it is what the Sinkhorn update converges to, and the derivative of the
    regularised cost in $a_i$ at $a_i = 0$ is $f_i - \varepsilon$). One pass over $C$
    per side, only when some weight is zero (`lax.cond`).
    """
    geom, a, b, eps, tau_a, tau_b = theta

    def transforms():
        f_new = jnp.where(a > 0, f, -tau_a * eps * geom.lse(g, eps, 1, w=b))
        g_new = jnp.where(b > 0, g, -tau_b * eps * geom.lse(f, eps, 0, w=a))
        return f_new, g_new

    return jax.lax.cond(jnp.any(a <= 0) | jnp.any(b <= 0), transforms, lambda: (f, g))


@eqx.filter_custom_vjp
def _implicit(theta, solver, init):
    return solver.iterate(theta, False, init)


@_implicit.def_fwd
def _implicit_fwd(perturbed, theta, solver, init):
    out = solver.iterate(theta, False, init)
    return out, (out[0], out[1])


@_implicit.def_bwd
def _implicit_bwd(residuals, grad_obj, perturbed, theta, solver, init):
    adjoint = solver.adjoint
    f, g = residuals
    f_bar, g_bar = grad_obj[0], grad_obj[1]
    f_bar = jnp.zeros_like(f) if f_bar is None else f_bar
    g_bar = jnp.zeros_like(g) if g_bar is None else g_bar
    u_f, u_g = _solve_adjoint_system(f, g, f_bar, g_bar, theta, adjoint)
    theta = jax.tree_util.tree_map(jax.lax.stop_gradient, theta)
    _, vjp = jax.vjp(lambda th: optimality(f, g, th), theta)
    (theta_bar,) = vjp((u_f, u_g))
    return jax.tree_util.tree_map(lambda t: None if t is None else -t, theta_bar)


def _solve_adjoint_system(f, g, f_bar, g_bar, theta, adjoint):
    """$u$ with $H u = \\bar z$, through the scaled system $M w = -\\varepsilon
    D^{-1/2}\\bar z$, $u = D^{-1/2} w$."""
    geom, a, b, eps, tau_a, tau_b = theta
    geom = geom.precompute()
    h_f, h_g = f + eps * safe_log(a), g + eps * safe_log(b)

    def plan_apply(v, axis):  # P v (axis=1) or P^T v (axis=0)
        h, h_out = (h_g, h_f) if axis == 1 else (h_f, h_g)
        top, w = geom.apply_kernel(h, eps, v, axis)
        return jnp.exp(h_out / eps + top) * w

    r = plan_apply(jnp.ones_like(g), 1)
    c = plan_apply(jnp.ones_like(f), 0)
    inv_sqrt_r = jnp.where(r > 0, jax.lax.rsqrt(jnp.where(r > 0, r, 1.0)), 0.0)
    inv_sqrt_c = jnp.where(c > 0, jax.lax.rsqrt(jnp.where(c > 0, c, 1.0)), 0.0)

    def matvec(w):
        w_f, w_g = w
        return (
            w_f / tau_a + inv_sqrt_r * plan_apply(inv_sqrt_c * w_g, 1) + adjoint.ridge * w_f,
            w_g / tau_b + inv_sqrt_c * plan_apply(inv_sqrt_r * w_f, 0) + adjoint.ridge * w_g,
        )

    rhs = (-eps * inv_sqrt_r * f_bar, -eps * inv_sqrt_c * g_bar)
    # Balanced: remove the components along the null vectors, (sqrt r, -sqrt c) on each
    # block of rows and columns that forbidden pairs leave connected (one block
    # without them). A component left in the right-hand side makes the system
    # inconsistent and conjugate gradients diverge along it.
    n, m = f.shape[0], g.shape[0]
    if geom.materialized:
        row_block, col_block = blocks(jnp.isfinite(geom.cost_matrix()))
    else:
        row_block, col_block = jnp.zeros(n, jnp.int32), jnp.zeros(m, jnp.int32)
    null = (jnp.sqrt(r), -jnp.sqrt(c))

    def per_block(u, v):  # sums of u (rows) and v (columns) over each block
        return (jax.ops.segment_sum(u, row_block, n + m)
                + jax.ops.segment_sum(v, col_block, n + m))

    norm2 = per_block(r, c)
    along = per_block(rhs[0] * null[0], rhs[1] * null[1]) / jnp.where(norm2 > 0, norm2, 1.0)
    balanced = (tau_a == 1) & (tau_b == 1)
    along = jnp.where(balanced, along, 0.0)
    rhs = (rhs[0] - along[row_block] * null[0], rhs[1] - along[col_block] * null[1])

    w, failed = _cg(matvec, rhs, adjoint)
    w = (
        eqx.error_if(w[0], failed, ADJOINT_FAILURE),
        w[1],
    )
    return inv_sqrt_r * w[0], inv_sqrt_c * w[1]


def blocks(allowed):
    r"""The connected components of the bipartite graph of allowed pairs: `(rows,
    columns)`, int32 labels in $[0, n + m)$, equal for rows and columns that a path of
    allowed pairs joins. Min-label propagation, one sweep per step of the longest
    shortest path (two sweeps when every pair is allowed; skipped then)."""
    n, m = allowed.shape
    start = (jnp.arange(n, dtype=jnp.int32), jnp.arange(n, n + m, dtype=jnp.int32))

    def sweep(state):
        rows, cols, _ = state
        new_rows = jnp.minimum(rows, jnp.min(jnp.where(allowed, cols[None, :], n + m), axis=1))
        new_cols = jnp.minimum(cols, jnp.min(jnp.where(allowed, new_rows[:, None], n + m), axis=0))
        return new_rows, new_cols, jnp.any(new_rows != rows) | jnp.any(new_cols != cols)

    def propagate():
        rows, cols, _ = jax.lax.while_loop(lambda s: s[2], sweep, (*start, jnp.asarray(True)))
        return rows, cols

    one = lambda: (jnp.zeros(n, jnp.int32), jnp.zeros(m, jnp.int32))  # noqa: E731
    return jax.lax.cond(jnp.all(allowed), one, propagate)


#: An adjoint solve whose relative residual ||M w - b|| / ||b|| is above this failed.
FAIL_RESIDUAL = 0.1

#: The message of a failed adjoint solve (raised through `eqx.error_if`).
ADJOINT_FAILURE = (
    "implicit differentiation failed: the adjoint linear system (conjugate gradients) "
    "did not converge or produced non-finite values, so the gradient would be wrong. "
    "Check that the forward solve converged (sol.converged), increase epsilon or "
    "ImplicitAdjoint(max_steps=...), or differentiate through the iterations with "
    "implicit_diff=False (monge.UnrolledAdjoint())."
)


def _cg(matvec, rhs, adjoint):
    r"""Solve $M w = $ `rhs` by conjugate gradients; returns `(w, failed)`.

    - The right-hand side is normalised to unit norm and the solution scaled back, so
      CG's inner products neither underflow (tiny cotangents) nor overflow.
    - lineax's CG declares a breakdown (a NaN step) when $p^\top M p \le 100\,
      \mathrm{rcond}\, z^\top r$ with rcond $= 2\,\mathrm{eps}\,(n + m)$: a floor that
      grows with the size (0.12 at $n + m = 5000$ in float32, against eigenvalues of
      $M$ in $[0, 2]$) and that the slow directions of Sinkhorn fall below, which made
      every float32 gradient NaN from $n \approx 2000$. A scalar preconditioner
      $s I$, $s = 200 (n + m)$, leaves the iterates unchanged and moves that floor
      to machine epsilon.
    - It stops when $\|M w - \text{rhs}\|_2 \le$ tol with tol $= \max(\text{rtol},
      10\,\mathrm{eps}\sqrt{n + m})$: the residual of a float32 matrix-vector product
      with $n + m$ terms cannot be computed below about $\mathrm{eps}\sqrt{n + m}$
      (measured: CG stalls near $6\cdot 10^{-6}$ at $n + m = 5000$, then drifts
      upwards), so a smaller tolerance would only run to `max_steps`.
    - `failed`: the solution is not finite, or its true relative residual,
      recomputed after the solve, is above `FAIL_RESIDUAL` (CG broke down or ran out
      of steps far from the solution). The bar is loose on purpose: a cotangent such
      as that of `reg_cost` is the marginal error, which lies in the slowest
      directions of $M$; float32 CG may stall well above tol on it (0.04 after 500
      steps, x (60, 3), y (40, 3), epsilon 0.05) while its contribution to the
      gradient stays negligible (d reg_cost / d epsilon within 1e-3 of finite
      differences there).
    """
    size = jnp.sqrt(_dot(rhs, rhs))
    unit = jnp.where(size > 0, 1.0 / jnp.where(size > 0, size, 1.0), 0.0)
    rhs = jax.tree_util.tree_map(lambda z: z * unit, rhs)
    structure = jax.eval_shape(lambda: rhs)
    operator = lx.FunctionLinearOperator(matvec, structure, tags=lx.positive_semidefinite_tag)
    n_total = sum(z.size for z in jax.tree_util.tree_leaves(rhs))
    dtype = jax.tree_util.tree_leaves(rhs)[0].dtype
    scale = 200.0 * n_total
    precond = lx.FunctionLinearOperator(
        lambda v: jax.tree_util.tree_map(lambda z: scale * z, v), structure,
        tags=lx.positive_semidefinite_tag,
    )
    tol = max(adjoint.rtol, 10 * float(jnp.finfo(dtype).eps) * n_total ** 0.5)
    solver = lx.CG(rtol=0.0, atol=tol, norm=_two_norm, max_steps=adjoint.max_steps)
    w = lx.linear_solve(operator, rhs, solver, options={"preconditioner": precond}, throw=False).value
    res = jax.tree_util.tree_map(lambda u, v: u - v, matvec(w), rhs)
    residual = jnp.sqrt(_dot(res, res))
    failed = ~(residual <= FAIL_RESIDUAL) | ~jnp.all(jnp.array([jnp.all(jnp.isfinite(z)) for z in w]))
    return jax.tree_util.tree_map(lambda z: z * size, w), failed


def _dot(u, v) -> jax.Array:
    return sum(jnp.sum(p * q) for p, q in zip(jax.tree_util.tree_leaves(u), jax.tree_util.tree_leaves(v)))


def _two_norm(tree) -> jax.Array:
    return jnp.sqrt(_dot(tree, tree))
