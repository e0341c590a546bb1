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
$(\sqrt r, -\sqrt c)$ (potentials are defined up to $(f + t, g - t)$), which is
projected out. Memory is that of the forward pass: the plan is applied lazily.
"""

from __future__ import annotations

import abc

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx

from monge.geometry import as_float_array
from monge.solution import safe_log

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
    """Implicit differentiation of the optimality conditions (default).

    The gradient is that of the exact optimum: it ignores how the solver got there
    (initialisers, acceleration), and is accurate when the solver converged.

    Args:
        rtol: relative tolerance of the conjugate-gradient solve.
        ridge: added to the diagonal of $M$ (relative to its unit diagonal), guarding
            against the near-singular directions of very small epsilon.
        max_steps: conjugate-gradient iterations at most (static).
    """

    rtol: float = eqx.field(default=1e-6, static=True)
    ridge: float = eqx.field(default=1e-7, converter=as_float_array)
    max_steps: int = eqx.field(default=500, static=True)

    def fixed_point(self, solver, theta, init=None):
        return _implicit(theta, solver, init)


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
    # Balanced: remove the component along the null vector (sqrt r, -sqrt c).
    null = (jnp.sqrt(r), -jnp.sqrt(c))
    norm2 = jnp.sum(r) + jnp.sum(c)
    along = (rhs[0] @ null[0] + rhs[1] @ null[1]) / norm2
    balanced = (tau_a == 1) & (tau_b == 1)
    along = jnp.where(balanced, along, 0.0)
    rhs = (rhs[0] - along * null[0], rhs[1] - along * null[1])

    structure = jax.eval_shape(lambda: rhs)
    operator = lx.FunctionLinearOperator(matvec, structure, tags=lx.positive_semidefinite_tag)
    solver = lx.CG(rtol=adjoint.rtol, atol=adjoint.rtol * 1e-3, max_steps=adjoint.max_steps)
    w = lx.linear_solve(operator, rhs, solver, throw=False).value
    return inv_sqrt_r * w[0], inv_sqrt_c * w[1]
