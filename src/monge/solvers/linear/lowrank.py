r"""Low-rank optimal transport: couplings of rank at most $r$, in time linear in $n$.

Scetbon, Cuturi & Peyré (2021), "Low-rank Sinkhorn factorization", look for the
coupling among those of the form

$$P = Q\,\mathrm{diag}(1/g)\,R^\top,\qquad Q \in \Pi(a, g),\ R \in \Pi(b, g),\
g \ge \alpha,$$

($Q$: `(n, r)`, $R$: `(m, r)`) that minimises $\langle C, P\rangle$ (plus, optionally,
$\varepsilon$ times the negative entropy of $(Q, R, g)$ and KL penalties on the
marginals, Scetbon, Klein, Palla & Cuturi, 2023). The problem is not convex; it is
solved by mirror descent in the KL geometry: with $G_Q = C R\,\mathrm{diag}(1/g)$,
$G_R = C^\top Q\,\mathrm{diag}(1/g)$ and $h = \mathrm{diag}(Q^\top C R)/g^2$ (the
gradients, $-h$ for $g$), one step is

$$(Q, R, g) \leftarrow \mathrm{Proj}^{\mathrm{KL}}\Big(Q \odot e^{-\gamma_k G_Q},\
R \odot e^{-\gamma_k G_R},\ g \odot e^{\gamma_k h}\Big)$$

(each raised to the power $1/(1 + \varepsilon\gamma_k)$ when $\varepsilon > 0$) onto
the constraints, with the step $\gamma_k = \gamma / \max(\|G_Q\|, \|G_R\|,
\|h\|_\infty)^2$ of Scetbon & Cuturi (2022), "Low-rank optimal transport:
approximation, statistics and debiasing", where $\|G\|$ is the sup-norm up to a
constant per row (`_sup`: such constants are removed or damped by the projection),
times a scale in $[2^{-20}, 16]$ (`MAX_STEP_SCALE`). The projection is Dykstra's
algorithm, written as block coordinate ascent on its dual with log-domain duals
(`project`): row scalings (a proximal step when unbalanced), the floor $g \ge
\alpha$, then the column scalings that make $Q^\top\mathbf 1 = R^\top\mathbf 1 = g$
(their common value is the geometric mean of $g$ and the two column sums). Every
array is `(n, r)`, `(m, r)` or `(r,)`; the cost enters only through
`geometry.apply_cost`, which is $O((n + m) r k)$ for factored costs (`LowRankCost`,
squared Euclidean point clouds).

**Stopping.** After each block of `inner_iterations` steps the objective is
recomputed. A block that increases it (beyond what the projection's tolerance can
move it) is rejected: the iterate is kept, the step halved, and doubled back after
each accepted block, so the objective decreases monotonically. The block's error is
the relative decrease of the objective, $(F_{\text{before}} -
F_{\text{after}})/|F_{\text{after}}|$, and the solver stops when it is at most
`threshold` on a block that may end the run: an accepted block at the full step whose
projections met their tolerance and whose decrease is no larger than the previous
block's. Decreases that grow mean the iterates are leaving a saddle point (the
rank-2 and random starts begin near one: all components alike), where a small
decrease is no sign of convergence.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array

from monge import checks
from monge.geometry import as_float_array, safe_log
from monge.problems import LinearProblem
from monge.solution import LowRankSolution, Status, fix_gauge, marginal_penalty
from monge.solvers import driver
from monge.solvers.linear import lowrank_init

__all__ = ["LowRankSinkhorn", "INITIALIZERS"]

#: The initialisations: "auto" ("kmeans" on point clouds, else "rank2"), "rank2"
#: (deterministic, any problem), "random", "kmeans" (point clouds).
INITIALIZERS = ("auto", "rank2", "random", "kmeans")

#: The step is halved after a rejected block; the solver stalls below this fraction.
MIN_STEP_SCALE = 2.0**-20

#: The paper's step $\gamma_k$ is multiplied by a scale that starts at this value,
#: halves after a rejected block and doubles back (to at most this) after an accepted
#: one. With $\gamma = 10$ the paper's own steps (scale 1) took 2000 iterations to
#: cross the plateau of a rank-2 start on 200 Gaussian points, scale 16 took 300 and
#: reached a lower cost; larger scales needed 5-25x more projection sweeps per step
#: and stalled on rejected blocks.
MAX_STEP_SCALE = 16.0


class LowRankSinkhorn(driver.AbstractIterativeSolver):
    r"""Low-rank OT by mirror descent and Dykstra projections (module docstring).

    Args:
        rank: the number of components $r$ of the coupling, $1 \le r \le \min(n, m)$;
            static.
        gamma: the step scale $\gamma$ of $\gamma_k = \gamma / \|\nabla\|_\infty^2$
            (Scetbon & Cuturi, 2022; default 10, their value); traced.
        epsilon: entropic regularisation of the factors, $\varepsilon\,(\langle Q,
            \log Q - 1\rangle + \langle R, \log R - 1\rangle + \langle g, \log g -
            1\rangle)$; default 0 (none: the rank constraint is the regulariser);
            traced.
        alpha: the floor on $g$, relative to the uniform weight $\sum a / r$ (default
            1e-4): a component whose weight tends to 0 makes $h \propto 1/g^2$, hence
            the step, degenerate. Traced.
        threshold: stop when a block decreases the objective by at most this,
            relative (default 1e-4); traced.
        max_iterations: mirror-descent steps at most (default 2000); static.
        inner_iterations: steps per block (default 10): the unit of the monotonicity
            check and of `errors`; static.
        dykstra_threshold: the projections stop when the L1 violation of their
            constraints is at most this fraction of the mass (default 1e-4: at 1e-5
            the projections took 5x (d = 2) to 40x (d = 30) more sweeps at n = 10⁵ for
            the same cost to 4 digits); traced.
        dykstra_iterations: at most this many projection sweeps per step (default
            300); static.
        initializer: ``"auto"`` (default): ``"kmeans"`` when the geometry has points,
            else ``"rank2"``. ``"kmeans"``: Q and R are entropic plans from each
            cloud to the k-means centroids of the source cloud (Scetbon & Cuturi,
            2022), so the components start as spatial clusters. ``"rank2"``: the
            deterministic rank-2 coupling of Scetbon et al. (2021), any geometry.
            ``"random"``: random factors from `seed`. The rank-2 and random starts
            weight points by their index or at random, so on large clouds their
            components start almost alike: near the saddle point where all are equal,
            which the iterations leave slowly (at n = 10⁵ the first blocks decrease
            the objective by less than float32 resolves). See `lowrank_init`. Static.
        seed: the seed of ``"random"`` and ``"kmeans"``; traced.
        progress: print the iteration count and error to stderr after every block.

    Example:
        >>> import jax, monge
        >>> x = jax.random.normal(jax.random.key(0), (60, 2))
        >>> y = jax.random.normal(jax.random.key(1), (50, 2)) + 1.0
        >>> problem = monge.LinearProblem(monge.PointCloud(x, y))
        >>> sol = monge.LowRankSinkhorn(rank=4)(problem)
        >>> bool(sol.converged), sol.q.shape, sol.r.shape
        (True, (60, 4), (50, 4))
    """

    rank: int = eqx.field(static=True, kw_only=True)
    gamma: Array = eqx.field(default=10.0, converter=as_float_array)
    epsilon: Array = eqx.field(default=0.0, converter=as_float_array)
    alpha: Array = eqx.field(default=1e-4, converter=as_float_array)
    threshold: Array = eqx.field(default=1e-4, converter=as_float_array)
    max_iterations: int = eqx.field(default=2000, static=True)
    inner_iterations: int = eqx.field(default=10, static=True)
    dykstra_threshold: Array = eqx.field(default=1e-4, converter=as_float_array)
    dykstra_iterations: int = eqx.field(default=300, static=True)
    initializer: str = eqx.field(default="auto", static=True)
    seed: Array = eqx.field(default=0, converter=jnp.asarray)
    progress: bool = eqx.field(default=False, static=True)

    def __check_init__(self):
        for name in ("rank", "max_iterations", "inner_iterations", "dykstra_iterations"):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise ValueError(f"`{name}` must be a positive integer; received {value!r}.")
        if self.initializer not in INITIALIZERS:
            raise ValueError(
                f"`initializer` must be one of {INITIALIZERS}; received {self.initializer!r}."
            )
        checks.check_positive("gamma", self.gamma, "The default 10 suits most problems.")
        checks.check_positive("threshold", self.threshold, "Typical values: 1e-3 to 1e-6.")
        checks.check_positive("dykstra_threshold", self.dykstra_threshold, "Default: 1e-4.")
        checks.check_positive("alpha", self.alpha, "Default: 1e-4; it must be below 1.")
        for name, value, upper in (("epsilon", self.epsilon, None), ("alpha", self.alpha, 1.0)):
            v = checks.concrete(value)
            if v is not None and (v.ndim or v < 0 or (upper is not None and v >= upper)):
                bound = "[0, inf)" if upper is None else "(0, 1)"
                raise ValueError(f"`{name}` must be a scalar in {bound}; received {v!r}.")

    @property
    def error_label(self) -> str:
        return "relative decrease"

    def resolved_initializer(self, geom) -> str:
        """The initializer used on `geom` ("auto" resolved)."""
        if self.initializer == "auto":
            return "rank2" if geom.supports is None else "kmeans"
        return self.initializer

    def __call__(self, problem: LinearProblem, *, init=None, throw: bool = False) -> LowRankSolution:
        """Solve `problem` (a `LinearProblem`; its `epsilon` only sets the strength
        $\\rho = \\varepsilon\\tau/(1 - \\tau)$ of the marginal penalties when unbalanced).

        Args:
            problem: the problem.
            init: a warm start: a previous `LowRankSolution` of the same shapes and
                rank, or factors `(q, r, g)`. No gradient flows into it.
            throw: raise an `EquinoxRuntimeError` carrying the status message instead
                of returning a run that did not converge.

        Raises:
            ValueError: for a problem that is not a `LinearProblem`, a rank above
                $\\min(n, m)$, a `"kmeans"` start without points, an `epsilon` given
                to a balanced problem (it would be ignored: the entropy on the factors
                is `LowRankSinkhorn(epsilon=...)`), or a warm start of the wrong shape.
        """
        if not isinstance(problem, LinearProblem):
            raise ValueError(
                f"`LowRankSinkhorn` solves a monge.LinearProblem; received "
                f"{type(problem).__name__}."
            )
        n, m = problem.geom.shape
        if self.rank > min(n, m):
            raise ValueError(
                f"`rank={self.rank}` exceeds min(n, m) = {min(n, m)} (n={n}, m={m}); a "
                "coupling of n x m has rank at most min(n, m): pass a smaller rank, or "
                "use monge.Sinkhorn for the full-rank problem."
            )
        if self.initializer == "kmeans" and problem.geom.supports is None:
            raise ValueError(
                "`initializer='kmeans'` clusters points, and this geometry has none (a "
                "cost matrix); use initializer='rank2' or 'random', or a point cloud."
            )
        balanced = checks.concrete(problem.is_balanced)
        if problem.epsilon is not None and balanced is not None and bool(balanced):
            raise ValueError(
                "A balanced low-rank problem does not use the problem's `epsilon` (the "
                "rank constraint replaces the entropy); drop it, pass the entropy of the "
                "factors as LowRankSinkhorn(epsilon=...), or use tau_a/tau_b < 1, where "
                "epsilon sets the marginal penalty rho = epsilon * tau / (1 - tau)."
            )
        return _solve(self, problem, self._warm_start(init, n, m), throw)

    def _warm_start(self, init, n, m):
        if init is None:
            return None
        factors = (init.q, init.r, init.g) if isinstance(init, LowRankSolution) else init
        shapes = ((n, self.rank), (m, self.rank), (self.rank,))
        if not (isinstance(factors, (tuple, list)) and len(factors) == 3
                and all(jnp.shape(z) == s for z, s in zip(factors, shapes))):
            got = (type(init).__name__ if not isinstance(factors, (tuple, list))
                   else [tuple(jnp.shape(z)) for z in factors])
            raise ValueError(
                f"`init` must be a LowRankSolution or factors (q, r, g) of shapes {shapes} "
                f"(this problem and rank={self.rank}); received {got}."
            )
        return tuple(jax.lax.stop_gradient(as_float_array(z)) for z in factors)

    # -- iterations (run by the shared driver) ----------------------------------------
    def init(self, data, init):
        """The first state: the factors (logs and values), projection duals, the
        objective, the step scale, the last step and the last error."""
        geom, a, b, rho_a, rho_b = data
        if init is None:  # starts are balanced: b at the mass of a (unbalanced: a start)
            key = jax.random.key(self.seed)
            b_start = b * (jnp.sum(a) / jnp.sum(b))
            if self.resolved_initializer(geom) == "rank2":
                q, r, g = lowrank_init.rank2(a, b_start, self.rank)
            elif self.initializer == "random":
                q, r, g = lowrank_init.random(a, b_start, self.rank, key)
            else:
                x, y = geom.supports
                q, r, g = lowrank_init.kmeans_init(x, y, a, b_start, self.rank, key)
        else:
            q, r, g = init
        q, r, g = (jax.lax.stop_gradient(z.astype(a.dtype)) for z in (q, r, g))
        zeros = jnp.zeros((self.rank,), a.dtype)
        duals = (jnp.zeros_like(a), jnp.zeros_like(b), zeros, zeros, zeros)
        # Project the start onto the constraints (hard rows when balanced, columns
        # always): a warm start from a problem with other weights is not feasible, and
        # its objective, not comparable with a feasible one, made every block rejected.
        mass = jnp.sum(a)
        floor = jnp.log(self.alpha.astype(a.dtype) * mass / self.rank)
        hard = tuple(jnp.where(jnp.isfinite(rho), 0.0, 1.0) for rho in (rho_a, rho_b))
        factors, duals, _ = project((safe_log(q), safe_log(r), safe_log(g)), a, b, floor, hard,
                                    duals, self.dykstra_threshold * mass, self.dykstra_iterations)
        value, _ = self._objective(data, factors)
        one = jnp.ones((), a.dtype)
        full = jnp.asarray(MAX_STEP_SCALE, a.dtype)
        return (factors, duals, value, full, one, one)  # error 1: no block measured yet

    def _objective(self, data, z: Factors):
        """The objective (`LowRankSolution.reg_cost`) at `z`, and its gradients
        $(G_Q, G_R, h)$ ($-h$ for $g$), from two `apply_cost`s."""
        geom, a, b, rho_a, rho_b = data
        CR = geom.apply_cost(z.r, 1)
        diag = jnp.sum(z.q * CR, axis=0)  # diag(Q^T C R)
        grads = (CR / z.g, geom.apply_cost(z.q, 0) / z.g, diag / z.g**2)
        entropy = sum(jnp.sum(jnp.where(v > 0, v * (lv - 1.0), 0.0))
                      for v, lv in ((z.q, z.lq), (z.r, z.lr), (z.g, z.lg)))
        value = (jnp.sum(diag / z.g) + jnp.where(self.epsilon > 0, self.epsilon * entropy, 0.0)
                 + marginal_penalty(jnp.sum(z.q, axis=1), a, rho_a)
                 + marginal_penalty(jnp.sum(z.r, axis=1), b, rho_b))
        return value, grads

    def _mirror_step(self, data, z: Factors, duals, grads, scale):
        r"""One mirror-descent step from `z` with gradients `grads`; returns the new
        factors, duals, step $\gamma'$ and whether the projection converged."""
        geom, a, b, rho_a, rho_b = data
        G_q, G_r, h = grads
        eps = self.epsilon.astype(a.dtype)
        norm = jnp.maximum(jnp.maximum(_sup(G_q, a), _sup(G_r, b)), jnp.max(jnp.abs(h)))
        gamma = scale * self.gamma.astype(a.dtype) / jnp.where(norm > 0, norm, 1.0) ** 2
        damp = 1.0 + eps * gamma
        xi_q = (z.lq - gamma * jnp.where(a[:, None] > 0, G_q, 0.0)) / damp
        xi_r = (z.lr - gamma * jnp.where(b[:, None] > 0, G_r, 0.0)) / damp
        xi_g = (z.lg + gamma * h) / damp
        step = gamma / damp  # gamma' of the proximal steps
        mass = jnp.sum(a)
        floor = jnp.log(self.alpha.astype(a.dtype) * mass / self.rank)
        c_a, c_b = (_damping(rho, step) for rho in (rho_a, rho_b))
        z, duals, ok = project((xi_q, xi_r, xi_g), a, b, floor, (c_a, c_b), duals,
                               self.dykstra_threshold * mass, self.dykstra_iterations)
        return z, duals, step, ok

    def step(self, data, state, k):
        """A block of `inner_iterations` mirror steps, accepted if the objective does
        not increase (else the state is kept and the step halved)."""
        z, duals, value, scale, step, error = state
        _, grads = self._objective(data, z)

        def one(carry, _):
            z, duals, _, grads, _, ok = carry
            z, duals, step, ok_step = self._mirror_step(data, z, duals, grads, scale)
            value, grads = self._objective(data, z)
            return (z, duals, value, grads, step, ok & ok_step), None

        start = (z, duals, value, grads, step, jnp.asarray(True))
        (new_z, new_duals, new_value, _, new_step, ok), _ = jax.lax.scan(
            one, start, None, self.inner_iterations)
        # the projections meet the marginals to `dykstra_threshold` (L1, relative to
        # the mass), which moves the objective by up to that times the mass and the
        # largest gradient: an increase within that is noise, not a rejected step
        largest = jnp.maximum(jnp.max(jnp.abs(grads[0])), jnp.max(jnp.abs(grads[1])))
        noise = self.dykstra_threshold * jnp.sum(data[1]) * largest
        accept = jnp.isfinite(new_value) & (new_value <= value + noise + 1e-6 * jnp.abs(value))
        tiny = jnp.finfo(value.dtype).tiny
        change = jnp.maximum((value - new_value) / jnp.maximum(jnp.abs(new_value), tiny), 0.0)
        # a block whose projections missed their tolerance cannot converge
        new_error = jnp.where(ok, change, jnp.maximum(change, 2 * self.threshold))
        new = (new_z, new_duals, new_value, jnp.minimum(2.0 * scale, MAX_STEP_SCALE), new_step, new_error)
        old = (z, duals, value, 0.5 * scale, step, error)
        state = jax.tree_util.tree_map(lambda u, v: jnp.where(accept, u, v), new, old)
        # decreases that grow are an escape from a saddle under way, not convergence,
        # and the decrease of a step cut by rejections says little about the full one
        slowing = (k > 0) & (change <= error) & (scale >= MAX_STEP_SCALE)
        block = driver.Block(error=state[5], n_run=self.inner_iterations, final=accept & slowing,
                             stalled=state[3] < MIN_STEP_SCALE)
        return state, block


class Factors(NamedTuple):
    """$(Q, R, g)$ held twice: logs (for the mirror steps) and values (for products)."""

    lq: Array
    lr: Array
    lg: Array
    q: Array
    r: Array
    g: Array


def _sup(G, w):
    r"""$\max_{ik} (G_{ik} - \min_l G_{il})$ over the rows of positive weight: the
    sup-norm of the gradient up to a constant per row. A constant added to a row of
    $G$ is removed by the projection's row scaling when balanced, and damped by the
    proximal step to at most $1/\rho$ when unbalanced, so it does not limit the step:
    counting it, a far outlier (costs 200x the others) shrank every step and the
    solver did not converge in 2000 iterations. ($h$ keeps its absolute value: its
    constant moves the total mass when unbalanced, and $e^{\gamma h}$ must not
    overflow.)"""
    spread = G - jnp.min(G, axis=1, keepdims=True)
    return jnp.max(jnp.where(w[:, None] > 0, spread, 0.0))


def _damping(rho, step):
    r"""$\rho / (\rho + 1/\gamma')$: the exponent of an unbalanced (proximal) row
    scaling; 1 for $\rho = \infty$ (a projection)."""
    finite = jnp.isfinite(rho)
    rho = jnp.where(finite, rho, 1.0)
    return jnp.where(finite, rho / (rho + 1.0 / step), 1.0)


def project(xi, a, b, log_alpha, c, duals, tol, max_sweeps):
    r"""The KL projection of $(e^{\xi_Q}, e^{\xi_R}, e^{\xi_g})$ onto $\{Q\mathbf 1 =
    a,\ R\mathbf 1 = b,\ Q^\top\mathbf 1 = R^\top\mathbf 1 = g,\ g \ge \alpha\}$
    (unbalanced rows: the proximal step of $\rho\,\mathrm{KL}(\cdot\|a)$, exponent
    $c$), by block coordinate ascent on the dual.

    With duals $(\phi_Q, \phi_R)$ (rows), $(\psi_Q, \psi_R)$ (columns) and $\eta \ge
    0$ (the floor), the primal point is $\log Q = \xi_Q + \phi_Q \oplus \psi_Q$,
    $\log R = \xi_R + \phi_R \oplus \psi_R$, $\log g = \xi_g + \eta - \psi_Q - \psi_R$.
    A sweep maximises the dual over each block in turn: rows $\phi_Q = c\,(\log a -
    \mathrm{LSE}_k(\xi_Q + \psi_Q))$; the floor $\eta = \max(0, \log\alpha - (\xi_g -
    \psi_Q - \psi_R))$; columns, with $S_Q = \mathrm{LSE}_i(\xi_Q + \phi_Q)$ (likewise
    $S_R$), $\log h = (\xi_g + \eta + S_Q + S_R)/3$, $\psi_Q = \log h - S_Q$, $\psi_R =
    \log h - S_R$, so that $Q^\top\mathbf 1 = R^\top\mathbf 1 = g = h$. This is
    Dykstra's algorithm (Scetbon et al., 2021, Alg. 2): its correction factors are
    the exponentials of these duals, and the corrections of the affine constraints
    are absorbed by the projections. Ascent may start from any duals with $\eta \ge 0$:
    `duals` warm-starts it from the previous step.

    Arithmetic: the log-sum-exps are products with the kernel $K = e^{\xi + \phi^0
    \oplus \psi^0}$ at the starting duals (one exponential per entry, then matrix-vector
    products with $e^{\phi - \phi^0}$, $e^{\psi - \psi^0}$, near 1 when warm); if
    any value is not finite (float32 overflow) the projection is redone with
    log-sum-exps.

    Stops when the L1 change that the next sweep's row and floor updates would make,
    $\|Q\mathbf 1 - Q'\mathbf 1\|_1 + \|R\mathbf 1 - R'\mathbf 1\|_1 + \|g - g'\|_1$
    (columns are exact after a sweep), is at most `tol`, or after `max_sweeps`.
    Returns `(Factors, duals, converged)`.
    """
    xi_q, xi_r, xi_g = xi
    phi_q, phi_r, psi_q, psi_r, _ = duals
    psi0 = (psi_q, psi_r)
    dot = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)
    refs = [jnp.where(jnp.isfinite(phi), phi, 0.0) for phi in (phi_q, phi_r)]
    kernels = [jnp.exp(xi_f + ref[:, None] + psi[None, :])
               for xi_f, ref, psi in ((xi_q, refs[0], psi_q), (xi_r, refs[1], psi_r))]

    def kernel_ops(K, ref, psi0):
        rows = lambda psi: jnp.log(dot(K, jnp.exp(psi - psi0))) - ref  # noqa: E731
        cols = lambda phi: jnp.log(column_sums(jnp.exp(phi - ref), K)) - psi0  # noqa: E731
        return rows, cols

    def log_ops(xi_f):
        rows = lambda psi: jax.nn.logsumexp(xi_f + psi[None, :], axis=1)  # noqa: E731
        cols = lambda phi: jax.nn.logsumexp(xi_f + phi[:, None], axis=0)  # noqa: E731
        return rows, cols

    fast = [kernel_ops(K, ref, psi) for K, ref, psi in zip(kernels, refs, (psi_q, psi_r))]
    out = jax.lax.cond(  # balanced rows: divisions, no logarithm or exponential per row
        (c[0] == 1) & (c[1] == 1),
        lambda: _scaling_sweeps(kernels, refs, psi0, xi_g, a, b, log_alpha, duals, tol, max_sweeps),
        lambda: _sweeps(fast, xi_g, a, b, log_alpha, c, duals, tol, max_sweeps))
    finite = jnp.all(jnp.isfinite(out[0][2])) & jnp.all(jnp.isfinite(out[0][3])) & jnp.isfinite(out[1])
    duals, change = jax.lax.cond(
        finite, lambda: out,
        lambda: _sweeps([log_ops(xi_q), log_ops(xi_r)], xi_g, a, b, log_alpha, c, duals, tol, max_sweeps))
    phi_q, phi_r, psi_q, psi_r, eta = duals
    lq = xi_q + phi_q[:, None] + psi_q[None, :]
    lr = xi_r + phi_r[:, None] + psi_r[None, :]
    lg = xi_g + eta - psi_q - psi_r

    def scaled(K, phi, ref, psi, psi0):  # K e^{phi - ref} e^{psi - psi0}: no new exponential
        return K * jnp.exp(phi - ref)[:, None] * jnp.exp(psi - psi0)[None, :]

    q, r = jax.lax.cond(
        finite,
        lambda: (scaled(kernels[0], phi_q, refs[0], psi_q, psi0[0]),
                 scaled(kernels[1], phi_r, refs[1], psi_r, psi0[1])),
        lambda: (jnp.exp(lq), jnp.exp(lr)))
    return Factors(lq, lr, lg, q, r, jnp.exp(lg)), duals, change <= tol


def _scaling_sweeps(kernels, refs, psi0, xi_g, a, b, log_alpha, duals, tol, max_sweeps):
    r"""The sweeps of `project` for balanced rows, in scaling variables: with $u =
    e^{\phi - \phi^0}$ (rows) and $v = e^{\psi - \psi^0}$ (columns), a row update is
    $u = a / (K v)$, the column sums are $K^\top u$, and only the $r$-vectors of the
    column and floor updates take logarithms. The same iterates as `_sweeps`, with two
    matrix-vector products and one division per factor and row. Returns `(duals,
    change)`, the duals in log form."""
    dot = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)
    (K_q, K_r), (ref_q, ref_r), (psi0_q, psi0_r) = kernels, refs, psi0

    def divide(w, s):  # w / s, 0 where w = 0 (a zero weight's row stays empty)
        return jnp.where(w > 0, w / jnp.where(w > 0, s, 1.0), 0.0)

    def floor(psi_q, psi_r):
        return jnp.maximum(0.0, log_alpha - (xi_g - psi_q - psi_r))

    def sweep(carry):
        (_, _, psi_q, psi_r, eta), (Kv_q, Kv_r), _, it = carry
        u_q, u_r = divide(a, Kv_q), divide(b, Kv_r)
        eta = floor(psi_q, psi_r)
        S_q = jnp.log(column_sums(u_q, K_q)) - psi0_q
        S_r = jnp.log(column_sums(u_r, K_r)) - psi0_r
        log_h = (xi_g + eta + S_q + S_r) / 3.0
        psi_q, psi_r = log_h - S_q, log_h - S_r
        Kv_q, Kv_r = dot(K_q, jnp.exp(psi_q - psi0_q)), dot(K_r, jnp.exp(psi_r - psi0_r))
        change = (jnp.sum(jnp.abs(u_q * Kv_q - a)) + jnp.sum(jnp.abs(u_r * Kv_r - b))
                  + jnp.sum(jnp.abs(jnp.exp(log_h) - jnp.exp(xi_g - psi_q - psi_r + floor(psi_q, psi_r)))))
        change = jnp.where(jnp.isnan(change), jnp.inf, change)
        return (u_q, u_r, psi_q, psi_r, eta), (Kv_q, Kv_r), change, it + 1

    def going(carry):
        *_, change, it = carry
        return (it == 0) | ((it < max_sweeps) & (change > tol) & jnp.isfinite(change))

    _, _, psi_q, psi_r, eta = duals
    Kv = (dot(K_q, jnp.exp(psi_q - psi0_q)), dot(K_r, jnp.exp(psi_r - psi0_r)))
    start = ((a, b, psi_q, psi_r, eta), Kv, jnp.asarray(jnp.inf, a.dtype), jnp.asarray(0))
    (u_q, u_r, psi_q, psi_r, eta), _, change, _ = jax.lax.while_loop(going, sweep, start)
    return (ref_q + safe_log(u_q), ref_r + safe_log(u_r), psi_q, psi_r, eta), change


def column_sums(u, K):
    r"""$K^\top u$ as a reduction over the $n$ rows (XLA sums pairwise): as a float32
    vector-matrix product its relative error was 3.7e-5 at $n = 10^6$ (2e-7 this way),
    close to the projections' tolerance, and the sweeps never met it."""
    return jnp.sum(u[:, None] * K, axis=0)


def _sweeps(ops, xi_g, a, b, log_alpha, c, duals, tol, max_sweeps):
    """The sweeps of `project`, with its log-sum-exps given as `ops` = ((rows,
    cols) of Q, (rows, cols) of R). Returns `(duals, change)`."""
    (rows_q, cols_q), (rows_r, cols_r) = ops
    c_a, c_b = c
    log_a, log_b = safe_log(a), safe_log(b)

    def floor(psi_q, psi_r):
        return jnp.maximum(0.0, log_alpha - (xi_g - psi_q - psi_r))

    def sweep(carry):
        (_, _, psi_q, psi_r, eta), (s_q, s_r), _, it = carry
        phi_q, phi_r = c_a * (log_a - s_q), c_b * (log_b - s_r)
        eta = floor(psi_q, psi_r)
        S_q, S_r = cols_q(phi_q), cols_r(phi_r)
        log_h = (xi_g + eta + S_q + S_r) / 3.0
        psi_q, psi_r = log_h - S_q, log_h - S_r
        s_q, s_r = rows_q(psi_q), rows_r(psi_r)
        change = (_row_change(phi_q, s_q, log_a, c_a) + _row_change(phi_r, s_r, log_b, c_b)
                  + jnp.sum(jnp.abs(jnp.exp(log_h) - jnp.exp(xi_g - psi_q - psi_r + floor(psi_q, psi_r)))))
        change = jnp.where(jnp.isnan(change), jnp.inf, change)
        return (phi_q, phi_r, psi_q, psi_r, eta), (s_q, s_r), change, it + 1

    def going(carry):
        *_, change, it = carry
        return (it == 0) | ((it < max_sweeps) & (change > tol) & jnp.isfinite(change))

    _, _, psi_q, psi_r, _ = duals
    start = (duals, (rows_q(psi_q), rows_r(psi_r)), jnp.asarray(jnp.inf, a.dtype), jnp.asarray(0))
    duals, _, change, _ = jax.lax.while_loop(going, sweep, start)
    return duals, change


def _row_change(phi, s, log_w, c):
    r"""$\sum_i |e^{\phi_i + s_i} - e^{\phi'_i + s_i}|$ with $\phi' = c(\log w - s)$:
    how much the next row update would move the row sums (0 rows of zero weight)."""
    new = c * (log_w - s)
    return jnp.sum(jnp.where(jnp.isfinite(log_w), jnp.abs(jnp.exp(phi + s) - jnp.exp(new + s)), 0.0))


def _rho(problem: LinearProblem, tau):
    """$\\rho = \\varepsilon\\tau/(1 - \\tau)$, $\\infty$ for $\\tau = 1$."""
    unbalanced = tau < 1
    return jnp.where(unbalanced, problem.resolved_epsilon() * tau / jnp.where(unbalanced, 1 - tau, 1.0),
                     jnp.inf)


@eqx.filter_jit
def _solve(solver: LowRankSinkhorn, problem: LinearProblem, init, throw: bool) -> LowRankSolution:
    balanced = checks.concrete(problem.is_balanced)
    a, b = checks.traced_weights(problem.a, problem.b, problem.is_balanced,
                                 " or use tau_a < 1, tau_b < 1.")
    if balanced is not None and bool(balanced):  # no default epsilon to compute
        rho_a = rho_b = jnp.asarray(jnp.inf, a.dtype)
    else:
        rho_a, rho_b = (_rho(problem, tau).astype(a.dtype) for tau in (problem.tau_a, problem.tau_b))
    geom = jax.lax.stop_gradient(problem.geom)  # the envelope gradient flows through `cost`
    data = (geom, jax.lax.stop_gradient(a), jax.lax.stop_gradient(b), rho_a, rho_b)
    state = solver.init(data, init)
    state, trace = driver.fixed_point(solver, data, state)
    z, duals, value, _, step, _ = state
    q, r, g = z.q, z.r, z.g
    dual_a, dual_b = _weight_derivatives(solver, data, z, duals, step)
    converged, status = driver.status_of(trace, solver.threshold)
    finite = jnp.isfinite(value) & jnp.all(jnp.isfinite(g))
    status = jnp.where(finite, status, Status.DIVERGED).astype(jnp.int32)
    q = driver.finish(q, status, throw)
    return LowRankSolution(problem, q, r, g, dual_a, dual_b, solver.epsilon.astype(a.dtype),
                           rho_a, rho_b, trace.n_iters, trace.error, trace.errors,
                           status == Status.CONVERGED, status)


def _weight_derivatives(solver, data, z, duals, step):
    r"""The derivatives of the objective in `a` and `b` at a stationary point.

    Balanced: the multipliers of $Q\mathbf 1 = a$, $R\mathbf 1 = b$. At a fixed
    point of the mirror step, $\log Q = \xi_Q + \phi_Q\oplus\psi_Q$ with $\xi_Q = (\log
    Q - \gamma G_Q)/(1 + \varepsilon\gamma)$ gives $G_Q + \varepsilon\log Q =
    (\phi_Q \oplus \psi_Q)/\gamma'$: the stationarity of the Lagrangian, whose row
    multiplier is $\lambda = \phi_Q/\gamma'$ (the column ones $\psi/\gamma'$ are tied
    through $g$, so $\lambda$ and $\mu = \phi_R/\gamma'$ share one gauge $(+t,
    -t)$, fixed by `fix_gauge`). A point of zero weight gets the cost of its best
    component, $\min_k (G_Q + \varepsilon \log Q)_{ik} - \psi_{Q,k}/\gamma'$ (its
    Lagrangian bound). Unbalanced: $\rho(1 - Q\mathbf 1 / a)$, the derivative of
    $\rho\,\mathrm{KL}(Q\mathbf 1\|a)$."""
    geom, a, b, rho_a, rho_b = data
    phi_q, phi_r, psi_q, psi_r, _ = duals
    _, (G_q, G_r, _) = solver._objective(data, z)
    eps = solver.epsilon.astype(a.dtype)

    def multiplier(phi, psi, G, log_f, w):
        best = jnp.min(G + jnp.where(eps > 0, eps * log_f, 0.0) - psi / step, axis=1)
        return jnp.where(w > 0, phi / step, best)

    lam = multiplier(phi_q, psi_q, G_q, z.lq, a)
    mu = multiplier(phi_r, psi_r, G_r, z.lr, b)
    balanced = ~(jnp.isfinite(rho_a) | jnp.isfinite(rho_b))
    lam_fixed, mu_fixed = fix_gauge(lam, mu, a, b)  # one side soft: the duals have no gauge
    lam, mu = jnp.where(balanced, lam_fixed, lam), jnp.where(balanced, mu_fixed, mu)

    def penalty_grad(rho, f, w):
        finite = jnp.isfinite(rho)
        p = jnp.sum(f, axis=1)
        return jnp.where(finite, jnp.where(finite, rho, 0.0) * (1 - p / jnp.where(w > 0, w, 1.0)), 0.0)

    dual_a = jnp.where(jnp.isfinite(rho_a), penalty_grad(rho_a, z.q, a), lam)
    dual_b = jnp.where(jnp.isfinite(rho_b), penalty_grad(rho_b, z.r, b), mu)
    return jax.lax.stop_gradient(dual_a), jax.lax.stop_gradient(dual_b)
