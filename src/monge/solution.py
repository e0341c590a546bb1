r"""What a solver returns: dual potentials and a lazy coupling.

Potentials follow the convention $P_{ij} = a_i b_j \exp((f_i + g_j - C_{ij}) /
\varepsilon)$, so that for a balanced problem $\langle f, a\rangle + \langle g,
b\rangle$ is the regularised cost (when $\sum a = \sum b = 1$).
"""

from __future__ import annotations

import enum

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from monge.geometry import flushed_exp, safe_log
from monge.problems import LinearProblem
from monge.problems.quadratic import QuadraticProblem

__all__ = ["Solution", "PlanSolution", "LowRankSolution", "Status"]


class Status(enum.IntEnum):
    """How a solver ended. `Solution.status` holds the integer; `.message` the text."""

    CONVERGED = 0
    MAX_ITERATIONS = 1
    DIVERGED = 2
    IMPRECISE = 3
    INFEASIBLE = 4


MESSAGES = {
    Status.CONVERGED: "converged: the solver's error fell below its threshold",
    Status.MAX_ITERATIONS: (
        "not converged: max_iterations was reached (or the solver stalled) before its "
        "error fell below the threshold; increase max_iterations or the regularisation "
        "(epsilon, gamma), or relax the threshold"
    ),
    Status.DIVERGED: (
        "diverged: non-finite values (NaN or inf) appeared; check the inputs for NaN/inf, "
        "or increase epsilon"
    ),
    Status.INFEASIBLE: (
        "infeasible: no coupling with the given marginals avoids the forbidden pairs "
        "(C = inf); allow more pairs or change the weights"
    ),
    Status.IMPRECISE: (
        "imprecise: the floating-point precision cannot resolve an error below the "
        "threshold (epsilon too small for the dtype, potentials or costs too large "
        "relative to epsilon, or costs spanning more orders of magnitude than the dtype "
        "holds); increase epsilon, use float64 (jax.config.update('jax_enable_x64', True) "
        "and float64 inputs), use exact OT (epsilon=0), remove outlying costs (C = inf "
        "forbids a pair), or relax the threshold"
    ),
}


def status_message(status) -> str | list:
    """Readable text for a status code, or a nested list of texts for a batch."""
    codes = np.asarray(status)
    if codes.ndim == 0:
        return MESSAGES[Status(int(codes))]
    return np.vectorize(lambda s: MESSAGES[Status(int(s))], otypes=[object])(codes).tolist()


def check_apply(v, axis: int, shape: tuple[int, int]) -> Array:
    """Validate the argument of `apply(v, axis)`: one entry per point of the summed side."""
    if axis not in (0, 1):
        raise ValueError(f"`axis` must be 0 or 1; received {axis!r}.")
    v = jnp.asarray(v)
    expected = shape[axis]
    if v.ndim not in (1, 2) or v.shape[0] != expected:
        raise ValueError(
            f"`sol.apply(v, axis={axis})` needs v of shape ({expected},) or ({expected}, k) "
            f"(one entry per {'source' if axis == 0 else 'target'} point); received "
            f"shape {tuple(v.shape)}."
        )
    return v


def batch_depth(sol) -> int:
    """How many `jax.vmap` levels `sol` was returned through: the rank of its
    iteration count `n_iters` (a scalar for one problem). Every output of `vmap`
    with `out_axes=0` gets the batch axis, even one that does not depend on the batched
    input, so this is not fooled when the batch size equals n, m or the rank."""
    return jnp.ndim(sol.n_iters)


def over_batch(sol, fn):
    """`fn(sol)` for a solution of one problem, or stacked over a vmapped batch (one
    `eqx.filter_vmap` per level: every array leaf of a vmapped output has the axis)."""
    for _ in range(batch_depth(sol)):
        fn = eqx.filter_vmap(fn)
    return fn(sol)


def reject_batch(sol, what: str) -> None:
    """`ValueError` for an operation whose argument makes a batch ambiguous."""
    depth = batch_depth(sol)
    if depth:
        shape = tuple(jnp.shape(sol.n_iters)[:depth])
        size = shape[0] if depth == 1 else " x ".join(map(str, shape))
        raise ValueError(
            f"this Solution holds a batch of {size} problems (from jax.vmap); evaluate "
            f".{what} inside the vmapped function or index one problem: "
            "jax.tree_util.tree_map(lambda z: z[i], sol)."
        )


def fix_gauge(f: Array, g: Array, a: Array, b: Array) -> tuple[Array, Array]:
    r"""$(f + t, g - t)$ with $t$ such that $\langle f, a\rangle = \langle g, b\rangle$.

    Balanced OT (entropic or exact) determines its potentials only up to $(f + t, g -
    t)$: solvers return this gauge, a smooth function of what they computed, so that
    `f` and `g` (and their gradients) do not depend on the iterations that produced
    them. Points of zero weight do not enter the sums (their potential may be
    $+\infty$: every pair forbidden)."""
    fa = jnp.where(a > 0, f, 0.0) @ a
    gb = jnp.where(b > 0, g, 0.0) @ b
    t = (gb - fa) / (jnp.sum(a) + jnp.sum(b))
    return f + t, g - t


class Solution(eqx.Module):
    r"""The result of a linear OT solver.

    Attributes:
        problem: the problem that was solved.
        f, g: dual potentials, shapes `(n,)` and `(m,)`. In a balanced problem they are
            unique only up to $(f + t, g - t)$ and are returned in the gauge
            $\langle f, a\rangle = \langle g, b\rangle$ (`fix_gauge`), so their
            gradients are those of that gauge. Where forbidden pairs ($C_{ij} = \infty$)
            split the problem into independent blocks, each block has its own constant:
            only functions of `f`, `g` unchanged by a shift per block (differences
            within a block, $\langle f, a\rangle + \langle g, b\rangle$) have a
            gradient; that of any other is not defined (not checked).
        epsilon: the entropic regularisation used (the default resolved to a number).
        n_iters: number of Sinkhorn iterations (one f and one g update each).
        error: the final L1 marginal (optimality) error.
        errors: marginal error after each block of `inner_iterations`; -1 where the
            solver had stopped.
        converged: whether the final error is below the threshold.
        status: a `Status` code; `message` is its text.

    A `Solution` returned by `jax.vmap` holds batched arrays (a batch of B problems:
    `f` of shape `(B, n)`, detected by that rank). Its fields read directly; `plan`,
    `cost`, `reg_cost` and `marginals()` are computed problem by problem and stacked
    (`(B, n, m)`, `(B,)`, ...); `apply(v)` and `transport(z)`, whose argument could be
    one for all problems or one per problem, raise a `ValueError`: call them inside
    the vmapped function, or on one problem, `jax.tree_util.tree_map(lambda z: z[i],
    sol)`.
    """

    problem: LinearProblem
    f: Float[Array, " n"]
    g: Float[Array, " m"]
    epsilon: Float[Array, ""]
    n_iters: Int[Array, ""]
    error: Float[Array, ""]
    errors: Float[Array, " blocks"]
    converged: Bool[Array, ""]
    status: Int[Array, ""]

    @property
    def message(self) -> str | list:
        """The status as readable text (a nested list for a batch of solutions)."""
        return status_message(self.status)

    # -- the coupling -----------------------------------------------------------------
    def _log_ab(self):
        return safe_log(self.problem.a), safe_log(self.problem.b)

    @property
    def plan(self) -> Float[Array, "n m"]:
        """The dense coupling $P$, materialised (memory $nm$): prefer `apply`."""
        if batch_depth(self):
            return over_batch(self, lambda s: s.plan)
        p = self.problem
        return p.geom.plan(self.f, self.g, self.epsilon, p.a, p.b)

    def apply(self, v: Array, axis: int = 0) -> Array:
        r"""The coupling applied to `v` without materialising it.

        `axis=0` sums over the source: $P^\top v$ with `v` of shape `(n,)` or `(n, k)`;
        `axis=1` sums over the target: $P v$ with `v` of shape `(m,)` or `(m, k)`.
        """
        reject_batch(self, "apply(v)")
        v = check_apply(v, axis, self.problem.geom.shape)
        a, b, eps = self.problem.a, self.problem.b, self.epsilon
        # The weights multiply (rather than enter as logs), so that derivatives in a
        # weight are right at zero weight too (d log w / dw has no value at w = 0).
        if axis == 1:
            h, w_in, w_out, out_pot = self.g, b, a, self.f
        else:
            h, w_in, w_out, out_pot = self.f, a, b, self.g
        v_in = w_in[:, None] * v if v.ndim == 2 else w_in * v
        top, w = self.problem.geom.apply_kernel(h, eps, v_in, axis)
        scale = w_out * jnp.exp(out_pot / eps + top)
        return scale[:, None] * w if w.ndim == 2 else scale * w

    def marginals(self) -> tuple[Array, Array]:
        """$(P\\mathbf 1, P^\\top \\mathbf 1)$: the coupling's two marginals."""
        if batch_depth(self):
            return over_batch(self, lambda s: s.marginals())
        n, m = self.problem.geom.shape
        dtype = self.f.dtype
        return self.apply(jnp.ones((m,), dtype), axis=1), self.apply(jnp.ones((n,), dtype), axis=0)

    # -- costs ------------------------------------------------------------------------
    @property
    def cost(self) -> Float[Array, ""]:
        r"""$\langle C, P\rangle$, the transport cost of the coupling (no entropy)."""
        if batch_depth(self):
            return over_batch(self, lambda s: s.cost)
        a, b, eps = self.problem.a, self.problem.b, self.epsilon

        def line(c):
            s = (self.g - c) / eps
            top = jax.lax.stop_gradient(jnp.max(s))
            top = jnp.where(jnp.isfinite(top), top, 0.0)
            return top, (flushed_exp(s - top) * b) @ jnp.where(jnp.isfinite(c), c, 0.0)  # forbidden: 0

        top, w = self.problem.geom.map_lines(line, 1)
        return jnp.sum(a * jnp.exp(self.f / eps + top) * w)

    @property
    def reg_cost(self) -> Float[Array, ""]:
        r"""The regularised objective, as the dual value at $(f, g)$:

        $$-\rho_a\langle a, e^{-f/\rho_a} - 1\rangle - \rho_b\langle b, e^{-g/\rho_b} - 1
        \rangle - \varepsilon(\textstyle\sum P - \sum a \sum b),$$

        which is $\langle f, a\rangle + \langle g, b\rangle$ for a balanced problem with
        unit masses. At convergence it equals the primal $\langle C, P\rangle +
        \varepsilon\mathrm{KL}(P\|ab^\top) + \rho_a\mathrm{KL}(P\mathbf 1\|a) +
        \rho_b\mathrm{KL}(P^\top\mathbf 1\|b)$.
        """
        if batch_depth(self):
            return over_batch(self, lambda s: s.reg_cost)
        p = self.problem
        eps = self.epsilon
        mass = jnp.sum(self.marginals()[0])
        return (
            p.a @ phi_star(self.f, p.tau_a, eps)
            + p.b @ phi_star(self.g, p.tau_b, eps)
            - eps * (mass - jnp.sum(p.a) * jnp.sum(p.b))
        )

    # -- maps -------------------------------------------------------------------------
    def transport(self, z: Float[Array, "k d"]) -> Float[Array, "k d"]:
        r"""The entropic map (Pooladian & Niles-Weed, 2021) applied to new points `z`.

        $T(z) = z - \nabla h^*(\nabla f_\varepsilon(z))$ for a cost $h(x - y)$, with
        $f_\varepsilon(z) = -\varepsilon \log \sum_j b_j e^{(g_j - c(z, y_j))/\varepsilon}$.
        For the squared Euclidean cost this is the barycentric projection
        $\sum_j p_j(z) y_j$, $p_j(z) \propto b_j e^{(g_j - \|z - y_j\|^2)/\varepsilon}$.
        Only for point-cloud problems.
        """
        reject_batch(self, "transport(z)")
        geom = self.problem.geom
        if geom.supports is None:
            raise ValueError(
                "`transport` needs a point-cloud problem (monge.solve(x, y, ...)); this "
                "solution comes from a cost matrix, which has no points to map."
            )
        x, y = geom.supports
        origin = geom.frame_origin
        if origin is not None:  # the geometry holds centred points: z - o, exactly in NumPy
            o = np.asarray(origin)
            z = np.asarray(z, np.float64) - o if not isinstance(z, jax.Array) else z - origin
        z = jnp.asarray(z, dtype=x.dtype)
        if z.ndim != 2 or z.shape[1] != x.shape[1]:
            raise ValueError(
                f"`transport(z)` needs z of shape (k, {x.shape[1]}) (points of the "
                f"source space); received shape {tuple(z.shape)}."
            )
        cost = geom.ground_cost
        b, g, eps = self.problem.b, self.g, self.epsilon

        def f_eps(zz):
            new = geom.with_supports(zz, y)
            return -eps * new.map_lines(lambda c: jax.nn.logsumexp((g - c) / eps, b=b), 1)

        grad_f = jax.grad(lambda zz: jnp.sum(f_eps(zz)))(z)
        out = z - jax.vmap(cost.h_star_grad)(grad_f)
        return out if origin is None else out + origin


def phi_star(f: Array, tau: Array, eps: Array) -> Array:
    r"""$\rho(1 - e^{-f/\rho})$ with $\rho = \varepsilon\tau/(1-\tau)$; $f$ when $\tau = 1$.

    Both branches are evaluated, so the unbalanced one gets a harmless argument
    (0) when $\tau = 1$ (the double-`where` pattern): there $\rho = \varepsilon$ and
    $e^{-f/\varepsilon}$ overflows for potentials below $-89\varepsilon$ in float32,
    and the unselected branch's inf times the zero cotangent of `where` made every
    gradient NaN.
    """
    unbalanced = tau < 1
    rho = eps * tau / jnp.where(unbalanced, 1 - tau, 1.0)
    return jnp.where(unbalanced, -rho * jnp.expm1(-jnp.where(unbalanced, f, 0.0) / rho), f)


class PlanSolution(eqx.Module):
    r"""A solution held as an explicit coupling: exact, partial, smooth or sparse OT.

    Same reading interface as `Solution` where it makes sense (`plan`, `apply`,
    `cost`, `reg_cost`, `marginals`, `converged`, `status`, `message`); the potentials
    are the solver's dual variables (for exact OT: $f_i + g_j \le C_{ij}$, with equality
    on the support of the plan).

    Attributes:
        problem: the problem that was solved (its `epsilon` may be unused).
        plan: the `(n, m)` coupling.
        f, g: dual potentials.
        reg_cost: the objective value the solver minimised (equal to `cost` for exact OT).
        n_iters, error, converged, status: as in `Solution`; `error` is the solver's own
            optimality measure (its docstring says which).
    """

    problem: LinearProblem
    plan: Float[Array, "n m"]
    f: Float[Array, " n"]
    g: Float[Array, " m"]
    reg_cost: Float[Array, ""]
    n_iters: Int[Array, ""]
    error: Float[Array, ""]
    converged: Bool[Array, ""]
    status: Int[Array, ""]

    @property
    def message(self) -> str | list:
        """The status as readable text."""
        return status_message(self.status)

    @property
    def cost(self) -> Float[Array, ""]:
        r"""$\langle C, P\rangle$ (stacked, `(B,)`, for a vmapped batch)."""
        if batch_depth(self):
            return over_batch(self, lambda s: s.cost)
        C = self.problem.geom.cost_matrix()
        return jnp.sum(jnp.where(self.plan == 0, 0.0, self.plan * C))  # forbidden: 0 * inf; NaN stays

    def apply(self, v: Array, axis: int = 0) -> Array:
        r"""`axis=0`: $P^\top v$; `axis=1`: $P v$ (as `Solution.apply`)."""
        reject_batch(self, "apply(v)")
        v = check_apply(v, axis, self.problem.geom.shape)
        return self.plan.T @ v if axis == 0 else self.plan @ v

    def marginals(self) -> tuple[Array, Array]:
        r"""$(P\mathbf 1, P^\top \mathbf 1)$ (stacked for a vmapped batch)."""
        if batch_depth(self):
            return over_batch(self, lambda s: s.marginals())
        return jnp.sum(self.plan, axis=1), jnp.sum(self.plan, axis=0)


class LowRankSolution(eqx.Module):
    r"""The result of low-rank OT: a coupling of rank at most $r$ held by its factors,

    $$P = Q\,\mathrm{diag}(1/g)\,R^\top,\qquad Q \in \Pi(a, g),\ R \in \Pi(b, g),$$

    never materialised unless asked (`plan`): `apply`, `cost` and `marginals` go
    through the factors in $O((n + m) r)$ plus the geometry's `apply_cost`.

    Attributes:
        problem: the problem that was solved.
        q, r: the factors, shapes `(n, rank)` and `(m, rank)`.
        g: the weights of the rank components, shape `(rank,)`: $Q^\top\mathbf 1 =
            R^\top\mathbf 1 = g$.
        dual_a, dual_b: the derivatives of the objective with respect to the weights
            `a` and `b` at the solution: balanced, the multipliers of $Q\mathbf 1 = a$
            and $R\mathbf 1 = b$ (up to $(+t, -t)$, returned with $\langle \text{dual\_a},
            a\rangle = \langle\text{dual\_b}, b\rangle$); unbalanced, $\rho_a(1 -
            Q\mathbf 1/a)$ and $\rho_b(1 - R\mathbf 1/b)$.
        epsilon: the entropic regularisation of the factors (0: none).
        rho_a, rho_b: the strengths of the KL marginal penalties ($\infty$: balanced).
        n_iters: mirror-descent iterations run.
        error: the last block's relative decrease of the objective.
        errors: that decrease after each block of `inner_iterations`; -1 where the
            solver had stopped.
        converged, status, message: as in `Solution`.

    Gradients (envelope theorem; Scetbon, Cuturi & Peyré, 2021; Scetbon & Cuturi,
    2022): `cost` and `reg_cost` carry the gradient of the objective the solver
    minimised with the factors held at their optimum, $\partial/\partial C = P$
    (through the geometry: points, factors of the cost) and $\partial/\partial a =$
    `dual_a`, $\partial/\partial b =$ `dual_b`. The objective is not convex: this is
    the gradient of the local optimum the solver found, exact at a stationary point
    (converged), and `cost` carries that of `reg_cost` (they agree when $\varepsilon =
    0$ and the problem is balanced). `q`, `r` and `g` carry no gradient.
    """

    problem: LinearProblem
    q: Float[Array, "n rank"]
    r: Float[Array, "m rank"]
    g: Float[Array, " rank"]
    dual_a: Float[Array, " n"]
    dual_b: Float[Array, " m"]
    epsilon: Float[Array, ""]
    rho_a: Float[Array, ""]
    rho_b: Float[Array, ""]
    n_iters: Int[Array, ""]
    error: Float[Array, ""]
    errors: Float[Array, " blocks"]
    converged: Bool[Array, ""]
    status: Int[Array, ""]

    @property
    def message(self) -> str | list:
        """The status as readable text (a nested list for a batch of solutions)."""
        return status_message(self.status)

    @property
    def rank(self) -> int:
        """The number of components $r$ (an upper bound on the rank of the plan)."""
        return self.q.shape[-1]

    @property
    def plan(self) -> Float[Array, "n m"]:
        """The dense coupling $Q\\,\\mathrm{diag}(1/g)\\,R^\\top$, materialised (memory
        $nm$): prefer `apply`."""
        if batch_depth(self):
            return over_batch(self, lambda s: s.plan)
        return (self.q / self.g) @ self.r.T

    def apply(self, v: Array, axis: int = 0) -> Array:
        r"""The coupling applied to `v` through its factors, in $O((n + m) r)$.

        `axis=0`: $P^\top v = R\,\mathrm{diag}(1/g)\,Q^\top v$, `v` of shape `(n,)` or
        `(n, k)`; `axis=1`: $P v = Q\,\mathrm{diag}(1/g)\,R^\top v$, `v` of shape `(m,)`
        or `(m, k)`.
        """
        reject_batch(self, "apply(v)")
        v = check_apply(v, axis, self.problem.geom.shape)
        inner, outer = (self.q, self.r) if axis == 0 else (self.r, self.q)
        z = inner.T @ v
        return outer @ (z / (self.g[:, None] if z.ndim == 2 else self.g))

    def marginals(self) -> tuple[Array, Array]:
        """$(P\\mathbf 1, P^\\top \\mathbf 1)$: the coupling's two marginals."""
        if batch_depth(self):
            return over_batch(self, lambda s: s.marginals())
        n, m = self.problem.geom.shape
        dtype = self.q.dtype
        return self.apply(jnp.ones((m,), dtype), axis=1), self.apply(jnp.ones((n,), dtype), axis=0)

    def _weight_terms(self) -> Array:
        """Zero, with the derivatives `dual_a`, `dual_b` in the weights (envelope)."""
        a, b = self.problem.a, self.problem.b
        return (self.dual_a @ (a - jax.lax.stop_gradient(a))
                + self.dual_b @ (b - jax.lax.stop_gradient(b)))

    @property
    def cost(self) -> Float[Array, ""]:
        r"""$\langle C, P\rangle = \sum_k (Q^\top C R)_{kk} / g_k$, through the
        geometry's `apply_cost` (never an $n \times m$ array on a factored or
        squared-Euclidean geometry). Its gradient is that of `reg_cost` (see the
        class docstring)."""
        if batch_depth(self):
            return over_batch(self, lambda s: s.cost)
        return self._transport_cost() + self._weight_terms()

    def _transport_cost(self) -> Array:
        q, r, g = self.q, self.r, self.g
        return jnp.sum(q * self.problem.geom.apply_cost(r / g, 1))

    @property
    def reg_cost(self) -> Float[Array, ""]:
        r"""The objective the solver minimised:

        $$\langle C, P\rangle + \varepsilon\,(\langle Q, \log Q - 1\rangle + \langle
        R, \log R - 1\rangle + \langle g, \log g - 1\rangle) + \rho_a
        \mathrm{KL}(Q\mathbf 1\|a) + \rho_b \mathrm{KL}(R\mathbf 1\|b),$$

        the entropy term only when $\varepsilon > 0$, the KL terms only when
        unbalanced."""
        if batch_depth(self):
            return over_batch(self, lambda s: s.reg_cost)
        a, b = jax.lax.stop_gradient((self.problem.a, self.problem.b))  # see _weight_terms
        entropy = sum(jnp.sum(neg_entropy(z)) for z in (self.q, self.r, self.g))
        value = (self._transport_cost()
                 + jnp.where(self.epsilon > 0, self.epsilon * entropy, 0.0)
                 + marginal_penalty(jnp.sum(self.q, axis=1), a, self.rho_a)
                 + marginal_penalty(jnp.sum(self.r, axis=1), b, self.rho_b))
        return value + self._weight_terms()


def neg_entropy(z: Array) -> Array:
    r"""$z(\log z - 1)$ entrywise, 0 at $z = 0$."""
    positive = z > 0
    return jnp.where(positive, z * (jnp.log(jnp.where(positive, z, 1.0)) - 1.0), 0.0)


def marginal_penalty(p: Array, w: Array, rho: Array) -> Array:
    r"""$\rho\,\mathrm{KL}(p\|w) = \rho\sum_i p_i\log(p_i/w_i) - p_i + w_i$; 0 when
    $\rho = \infty$ (a hard constraint, met by the solver)."""
    finite = jnp.isfinite(rho)
    # w ((1 + u) log(1 + u) - u) with u = p/w - 1: no cancellation near p = w, where
    # the textbook sum lost every digit in float32 (-1.6e-3 for a true 1.2e-4)
    positive = w > 0
    u = jnp.where(positive, p / jnp.where(positive, w, 1.0) - 1.0, 0.0)
    log1p = jnp.log1p(jnp.where(u > -1.0, u, 0.0))
    terms = jnp.where(u > -1.0, w * ((1.0 + u) * log1p - u), w)  # u = -1 (p = 0): w
    terms = jnp.where(positive, terms, jnp.where(p > 0, jnp.inf, 0.0))
    kl = jnp.sum(terms)
    return jnp.where(finite, jnp.where(finite, rho, 0.0) * kl, 0.0)


def _xlog_ratio(z: Array, w: Array) -> Array:
    r"""$\sum z \log(z / w)$, 0 where $z = 0$."""
    positive = z > 0
    return jnp.sum(jnp.where(positive, z * (jnp.log(jnp.where(positive, z, 1.0))
                                            - jnp.log(jnp.where(positive, w, 1.0))), 0.0))


def quadratic_kl(z: Array, w: Array) -> Array:
    r"""$\mathrm{KL}^\otimes(z\otimes z\,\|\,w\otimes w) = 2m(z)\sum z\log(z/w) - m(z)^2
    + m(w)^2$ (Séjourné et al. 2021), for arrays of any shape."""
    mz, mw = jnp.sum(z), jnp.sum(w)
    return 2 * mz * _xlog_ratio(z, w) - mz**2 + mw**2


class GromovSolution(eqx.Module):
    r"""The result of entropic Gromov-Wasserstein (`GromovWasserstein`).

    Attributes:
        problem: the `QuadraticProblem` solved.
        P: the coupling, shape `(n, m)` (dense: entropic GW builds it at every
            iteration); also `plan`.
        f, g: the potentials of the last inner Sinkhorn solve (on the linearised cost
            `problem.gradient(P)`): balanced, the multipliers of $P\mathbf 1 = a$,
            $P^\top\mathbf 1 = b$ at a stationary point.
        epsilon: the entropic regularisation used.
        rho_a, rho_b: the marginal penalties ($\infty$: balanced).
        n_iters: outer (mirror-descent) iterations after the first; each is one
            warm-started Sinkhorn solve.
        error: the last relative change of the coupling; `errors` per iteration
            (-1 where the solver had stopped).
        converged, status, message: as in `Solution`.

    Gradients (envelope theorem): at a stationary point of the regularised objective
    (`reg_cost`), its derivative in anything the problem depends on (points or cost
    matrices through the geometries, $\alpha$, weights) is the partial derivative at
    the fixed coupling, plus, balanced, $\partial/\partial a = f$, $\partial/\partial
    b = g$ (the multipliers). `reg_cost` carries that gradient, and so do `cost` and
    `gw_cost` (their values are the unregularised terms; their exact derivatives would
    also need the coupling's, which the envelope omits, as POT does). `P` and `plan`
    carry none. The objective is not convex: these are derivatives of the local
    optimum found, exact only when converged.
    """

    problem: QuadraticProblem
    P: Float[Array, "n m"]
    f: Float[Array, " n"]
    g: Float[Array, " m"]
    epsilon: Float[Array, ""]
    rho_a: Float[Array, ""]
    rho_b: Float[Array, ""]
    n_iters: Int[Array, ""]
    error: Float[Array, ""]
    errors: Float[Array, " blocks"]
    converged: Bool[Array, ""]
    status: Int[Array, ""]

    @property
    def message(self) -> str | list:
        """The status as readable text (a nested list for a batch of solutions)."""
        return status_message(self.status)

    @property
    def plan(self) -> Float[Array, "n m"]:
        """The coupling $P$, shape `(n, m)`."""
        return self.P

    def apply(self, v: Array, axis: int = 0) -> Array:
        r"""$P^\top v$ (`axis=0`, `v` of shape `(n,)` or `(n, k)`) or $P v$ (`axis=1`)."""
        reject_batch(self, "apply(v)")
        v = check_apply(v, axis, self.P.shape)
        return jnp.tensordot(self.P, v, axes=([axis], [0]))

    def marginals(self) -> tuple[Array, Array]:
        """$(P\\mathbf 1, P^\\top \\mathbf 1)$."""
        return jnp.sum(self.P, -1), jnp.sum(self.P, -2)

    @property
    def reg_cost(self) -> Float[Array, ""]:
        r"""The objective minimised: balanced, $\mathcal E(P) + \varepsilon\,
        \mathrm{KL}(P\|ab^\top)$; unbalanced, $\mathcal E(P) + \frac{\rho_a}{2}
        \mathrm{KL}^\otimes(P\mathbf 1\|a) + \frac{\rho_b}{2}\mathrm{KL}^\otimes(
        P^\top\mathbf 1\|b) + \frac{\varepsilon}{2}\mathrm{KL}^\otimes(P\|ab^\top)$
        (`GromovWasserstein` docstring), with $\mathcal E = (1 - \alpha)\langle M,
        P\rangle + \alpha\,\mathrm{GW}(P)$. Envelope gradient (class docstring)."""
        if batch_depth(self):
            return over_batch(self, lambda s: s.reg_cost)
        problem, P, eps = self.problem, self.P, self.epsilon
        a, b = problem.a, problem.b
        ab = a[:, None] * b[None, :]
        balanced = problem.is_balanced
        kl = _xlog_ratio(P, ab) - jnp.sum(P) + jnp.sum(a) * jnp.sum(b)
        multipliers = (self.f @ (a - jax.lax.stop_gradient(a))
                       + self.g @ (b - jax.lax.stop_gradient(b)))
        balanced_terms = eps * kl + multipliers

        def half(rho, z, w):
            finite = jnp.isfinite(rho)
            return jnp.where(finite, jnp.where(finite, rho, 0.0) / 2 * quadratic_kl(z, w), 0.0)

        unbalanced_terms = (half(self.rho_a, jnp.sum(P, 1), a) + half(self.rho_b, jnp.sum(P, 0), b)
                            + eps / 2 * quadratic_kl(P, ab))
        return problem.objective(P) + jnp.where(balanced, balanced_terms, unbalanced_terms)

    def _with_envelope(self, value: Array) -> Array:
        """`value`, carrying the gradient of `reg_cost`."""
        reg = self.reg_cost
        return jax.lax.stop_gradient(value) + reg - jax.lax.stop_gradient(reg)

    @property
    def cost(self) -> Float[Array, ""]:
        r"""$\mathcal E(P) = (1 - \alpha)\langle M, P\rangle + \alpha\,\mathrm{GW}(P)$
        (just $\mathrm{GW}(P)$ without a fused term), POT's
        `entropic_(fused_)gromov_wasserstein2` value; gradient of `reg_cost`."""
        if batch_depth(self):
            return over_batch(self, lambda s: s.cost)
        return self._with_envelope(self.problem.objective(self.P))

    @property
    def gw_cost(self) -> Float[Array, ""]:
        r"""$\mathrm{GW}(P) = \sum L(A_{ik}, B_{jl}) P_{ij}P_{kl}$ alone (without
        $\alpha$ or the fused term); gradient of `reg_cost`."""
        if batch_depth(self):
            return over_batch(self, lambda s: s.gw_cost)
        return self._with_envelope(self.problem.gw(self.P))
