r"""Quadratic problems: Gromov-Wasserstein (GW) and fused GW across two spaces.

Two metric-measure spaces are given by their intra-space costs $A$ ($n \times n$, on
the source points) and $B$ ($m \times m$, on the target points), which may live in
spaces of different dimensions. A coupling $P \in \Pi(a, b)$ is scored by how well it
preserves the intra-space costs:

$$\mathrm{GW}(P) = \sum_{i,k,j,l} L(A_{ik}, B_{jl})\,P_{ij} P_{kl},$$

with an inner loss $L$ that splits as $L(s, t) = f_1(s) + f_2(t) - h_1(s) h_2(t)$
(Peyré, Cuturi & Solomon 2016, Prop. 1), so that $\mathrm{GW}(P) = p^\top f_1(A) p +
q^\top f_2(B) q - \langle h_1(A) P h_2(B), P\rangle$ with $p = P\mathbf 1$,
$q = P^\top \mathbf 1$ (functions applied entrywise, $A$ and $B$ symmetric). This costs
$O(n^2 m + n m^2)$ per evaluation, or $O(nm(d_x + d_y))$ for squared-Euclidean point
clouds (`PointCloud.apply_cost`), never the $n^2 m^2$ tensor.

| `loss` | $L(s, t)$ | $f_1$ | $f_2$ | $h_1$ | $h_2$ |
|---|---|---|---|---|---|
| ``"sqeuclidean"`` | $(s - t)^2$ | $s^2$ | $t^2$ | $s$ | $2t$ |
| ``"kl"`` | $s \log(s/t) - s + t$ | $s \log s - s$ | $t$ | $s$ | $\log t$ |

Fused GW adds a linear term on a cost $M$ between the spaces (when the points share
features): $(1 - \alpha)\langle M, P\rangle + \alpha\,\mathrm{GW}(P)$ (Vayer et al.
2019), the convention of POT. Entropic GW adds $\varepsilon\,\mathrm{KL}(P\|ab^\top)$.

The gradient of the objective at $P$ (a linear cost, the "linearisation") is
$\nabla = 2\alpha\,(f_1(A) p\,\mathbf 1^\top + \mathbf 1\,(f_2(B) q)^\top - h_1(A) P
h_2(B)) + (1 - \alpha) M$, which the mirror-descent and conditional-gradient solvers
use.

References: Mémoli 2011; Peyré, Cuturi & Solomon, "Gromov-Wasserstein averaging of
kernel and distance matrices", ICML 2016; Vayer, Chapel, Flamary, Tavenard & Courty,
"Optimal transport for structured data with application on graphs", ICML 2019.
"""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from monge import checks
from monge.geometry import AbstractGeometry, as_float_array
from monge.problems.linear import checked_marginals

__all__ = ["QuadraticProblem", "LOSSES"]

#: Inner losses of GW: the squared difference and the (generalised) KL divergence.
LOSSES = ("sqeuclidean", "kl")


def _kl_log(t):
    """$\\log t$ for the KL loss, floored at the dtype's smallest normal number (a
    zero similarity has $L = +\\infty$ otherwise; POT adds 1e-15)."""
    return jnp.log(jnp.maximum(t, jnp.finfo(t.dtype).tiny))


def _xlogx_minus_x(s):
    return jnp.where(s > 0, s * jnp.log(jnp.where(s > 0, s, 1.0)), 0.0) - s


# (f1, f2, h1, h2); `None` marks the identity and a number a multiple of it, so that
# the geometry's fast `apply_cost` does the product.
_PARTS = {
    "sqeuclidean": (jnp.square, jnp.square, None, 2.0),
    "kl": (_xlogx_minus_x, None, None, _kl_log),
}


def _apply(geom: AbstractGeometry, h, V: Array) -> Array:
    """$h(C)\\,V$ for the square matrix $C$ of `geom` (entrywise $h$; `None` = identity,
    a number = that multiple of the identity): `apply_cost` when $h$ is linear."""
    if h is None or isinstance(h, float):
        out = geom.apply_cost(V, axis=1)
        return out if h is None else h * out
    return geom.map_blocks(lambda c: jnp.tensordot(h(c), V, axes=([1], [0])), 1)


class QuadraticProblem(eqx.Module):
    r"""A (fused, entropic) Gromov-Wasserstein problem between two spaces.

    Args:
        geom_xx: intra-source costs $A$, a square geometry `(n, n)` (e.g.
            `PointCloud(x, x)` or `CostMatrix(A)`), symmetric.
        geom_yy: intra-target costs $B$, a square geometry `(m, m)`, symmetric.
        geom_xy: optional cost $M$ `(n, m)` between the spaces for fused GW.
        a, b: weights `(n,)`, `(m,)`, uniform if omitted.
        alpha: trade-off of fused GW, in $(0, 1]$: objective $(1-\alpha)\langle M,
            P\rangle + \alpha\,\mathrm{GW}(P)$. Default 0.5 with `geom_xy` (POT's
            default), 1 without (then only 1 is accepted). Traced.
        loss: inner loss $L$: ``"sqeuclidean"`` $(s - t)^2$ (default) or ``"kl"``
            $s\log(s/t) - s + t$ (for positive similarities). Static.
        epsilon: entropic regularisation $\varepsilon > 0$, in units of the objective
            (cost$^2$ for the squared loss); `None` lets the solver choose
            (`GromovWasserstein` docstring). Traced.
        tau_a, tau_b: unbalancedness in $(0, 1]$, $\tau = \rho / (\rho + \varepsilon)$
            as for `LinearProblem`; 1 (default) is balanced. Traced.

    Raises:
        ValueError: non-square or mismatched geometries, non-symmetric concrete cost
            matrices, an unknown `loss`, negative costs with the KL loss, `alpha`
            outside $(0, 1]$ or given without `geom_xy`, and every check of
            `LinearProblem` on weights, epsilon and tau.
    """

    geom_xx: AbstractGeometry
    geom_yy: AbstractGeometry
    geom_xy: AbstractGeometry | None
    a: Float[Array, " n"]
    b: Float[Array, " m"]
    alpha: Float[Array, ""]
    epsilon: Float[Array, ""] | None
    tau_a: Float[Array, ""]
    tau_b: Float[Array, ""]
    loss: str = eqx.field(static=True)

    def __init__(self, geom_xx, geom_yy, geom_xy=None, a=None, b=None, *, alpha=None,
                 loss="sqeuclidean", epsilon=None, tau_a=1.0, tau_b=1.0):
        for name, geom in (("geom_xx", geom_xx), ("geom_yy", geom_yy)):
            if not isinstance(geom, AbstractGeometry):
                raise ValueError(f"`{name}` must be a monge geometry (PointCloud, CostMatrix, "
                                 f"...); received {type(geom).__name__}.")
            n0, n1 = geom.shape
            if n0 != n1:
                raise ValueError(
                    f"`{name}` must hold the costs within one space, a square (n, n) "
                    f"geometry; received shape {geom.shape}. Pass PointCloud(x, x) or the "
                    "intra-space cost matrix.")
        n, m = geom_xx.shape[0], geom_yy.shape[0]
        if geom_xy is not None and tuple(geom_xy.shape) != (n, m):
            raise ValueError(
                f"`geom_xy` (the fused term) must have shape (n, m) = ({n}, {m}) to match "
                f"geom_xx and geom_yy; received {geom_xy.shape}.")
        if loss not in LOSSES:
            raise ValueError(f"`loss` must be one of {LOSSES}; received {loss!r}.")
        self.geom_xx, self.geom_yy, self.geom_xy, self.loss = geom_xx, geom_yy, geom_xy, loss
        # the weights, checked as a linear problem's (on a dummy n x m shape)
        self.a, self.b = checked_marginals(_Shape(n, m, geom_xx.dtype), a, b)
        for name, geom in (("geom_xx", geom_xx), ("geom_yy", geom_yy)):
            geom.check_values()
            _check_symmetric(name, geom, loss)
        if geom_xy is not None:
            geom_xy.check_values()
        if alpha is None:
            alpha = 0.5 if geom_xy is not None else 1.0
        self.alpha = as_float_array(alpha)
        if self.alpha.ndim != 0:
            raise ValueError(f"`alpha` must be a scalar; received shape {self.alpha.shape}.")
        value = checks.concrete(self.alpha)
        if value is not None and not 0.0 < float(value) <= 1.0:
            raise ValueError(
                f"`alpha` must be in (0, 1] (the weight of the GW term in fused GW); received "
                f"{float(value)}. alpha = 1 is pure GW; for the linear term alone solve "
                "linear OT (monge.solve).")
        if geom_xy is None and value is not None and float(value) != 1.0:
            raise ValueError(
                f"`alpha={float(value)}` has no effect without a fused term: pass geom_xy "
                "(fused=... in monge.solve_gromov), or drop alpha.")
        self.epsilon = None if epsilon is None else as_float_array(epsilon)
        self.tau_a, self.tau_b = as_float_array(tau_a), as_float_array(tau_b)
        if self.epsilon is not None:
            if self.epsilon.ndim != 0:
                raise ValueError(f"`epsilon` must be a scalar; received shape {self.epsilon.shape}.")
            checks.check_positive("epsilon", self.epsilon,
                                  "Pass epsilon > 0, or epsilon=0 for unregularised GW "
                                  "(conditional gradient).")
        for name in ("tau_a", "tau_b"):
            tau = getattr(self, name)
            if tau.ndim != 0:
                raise ValueError(f"`{name}` must be a scalar; received shape {tau.shape}.")
            checks.check_tau(name, tau)
        checks.check_masses(self.a, self.b, self.tau_a, self.tau_b)

    # -- structure --------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        return self.geom_xx.shape[0], self.geom_yy.shape[0]

    @property
    def dtype(self):
        return self.a.dtype

    @property
    def is_fused(self) -> bool:
        return self.geom_xy is not None

    @property
    def is_balanced(self) -> Array:
        return (self.tau_a == 1) & (self.tau_b == 1)

    # -- the objective and its gradient ------------------------------------------------
    def marginal_terms(self, p: Array, q: Array) -> tuple[Array, Array]:
        r"""$(f_1(A) p, f_2(B) q)$, shapes `(n,)` and `(m,)`."""
        f1, f2, _, _ = _PARTS[self.loss]
        return _apply(self.geom_xx, f1, p), _apply(self.geom_yy, f2, q)

    def cross(self, P: Float[Array, "n m"]) -> Float[Array, "n m"]:
        r"""$h_1(A)\,P\,h_2(B)$ (B symmetric), in $O(nm(n + m))$, or
        $O(nm(d_x + d_y))$ on squared-Euclidean point clouds."""
        _, _, h1, h2 = _PARTS[self.loss]
        AP = _apply(self.geom_xx, h1, P)
        return _apply(self.geom_yy, h2, AP.T).T

    def gw(self, P: Float[Array, "n m"]) -> Float[Array, ""]:
        r"""$\mathrm{GW}(P) = \sum L(A_{ik}, B_{jl}) P_{ij} P_{kl}$ of any non-negative
        `P` (its own marginals enter, so it is also the unbalanced GW term)."""
        p, q = jnp.sum(P, 1), jnp.sum(P, 0)
        u, v = self.marginal_terms(p, q)
        return p @ u + q @ v - jnp.sum(self.cross(P) * P)

    def linear_term(self, P: Float[Array, "n m"]) -> Float[Array, ""]:
        r"""$\langle M, P\rangle$ (0 without a fused term)."""
        if self.geom_xy is None:
            return jnp.zeros((), P.dtype)
        return jnp.sum(self.geom_xy.map_blocks(lambda c, p: c * p, 1, P))

    def objective(self, P: Float[Array, "n m"]) -> Float[Array, ""]:
        r"""$(1 - \alpha)\langle M, P\rangle + \alpha\,\mathrm{GW}(P)$."""
        out = self.alpha * self.gw(P)
        if self.geom_xy is not None:
            out = out + (1 - self.alpha) * self.linear_term(P)
        return out

    def gradient(self, P: Float[Array, "n m"]) -> Float[Array, "n m"]:
        r"""The linearisation $\nabla_P$ of `objective` at `P`, a dense `(n, m)` cost:
        $2\alpha(f_1(A)p\mathbf 1^\top + \mathbf 1 (f_2(B)q)^\top - h_1(A)Ph_2(B)) +
        (1 - \alpha)M$."""
        p, q = jnp.sum(P, 1), jnp.sum(P, 0)
        u, v = self.marginal_terms(p, q)
        grad = 2 * self.alpha * (u[:, None] + v[None, :] - self.cross(P))
        if self.geom_xy is not None:
            grad = grad + (1 - self.alpha) * self.geom_xy.map_blocks(lambda c: c, 1)
        return grad

    def scale(self) -> Float[Array, ""]:
        r"""A typical size of the objective's gradient, for default tolerances and
        epsilon: $2\alpha\,\mathrm{GW}(ab^\top)/(\sum a \sum b) + (1-\alpha)\bar M$,
        i.e. twice the loss under the independent coupling (the gradient's mean there)."""
        P = self.a[:, None] * self.b[None, :]
        mass = jnp.sum(self.a) * jnp.sum(self.b)
        s = 2 * self.alpha * jnp.abs(self.gw(P)) / mass
        if self.geom_xy is not None:
            s = s + (1 - self.alpha) * self.geom_xy.mean_abs_cost(self.a, self.b)
        return s


class _Shape(eqx.Module):
    """A stand-in geometry of a given shape, for the shared weight checks."""

    n: int = eqx.field(static=True)
    m: int = eqx.field(static=True)
    dtype_: object = eqx.field(static=True)

    @property
    def shape(self):
        return (self.n, self.m)

    @property
    def dtype(self):
        return self.dtype_

    @property
    def materialized(self):
        return False

    def check_values(self):
        pass


def _check_symmetric(name: str, geom: AbstractGeometry, loss: str) -> None:
    """A concrete stored intra-space cost must be symmetric (the GW identities above
    assume it), and non-negative for the KL loss."""
    if not geom.materialized:
        return
    C = checks.concrete(geom.cost_matrix())
    if C is None:
        return
    scale = max(float(np.max(np.abs(C))), np.finfo(C.dtype).tiny)
    if not np.allclose(C, C.T, rtol=0, atol=1e-5 * scale):
        gap = float(np.max(np.abs(C - C.T)))
        raise ValueError(
            f"`{name}` must be symmetric (intra-space costs, C = C^T); the largest "
            f"|C - C^T| is {gap:.3g}. Pass (C + C.T) / 2, or a distance.")
    if loss == "kl" and np.min(C) < 0:
        raise ValueError(
            f"`{name}` has negative entries ({float(np.min(C)):.3g}); the KL loss needs "
            "non-negative similarities. Use loss='sqeuclidean' for signed costs.")
