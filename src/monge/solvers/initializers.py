r"""Initial dual potentials for Sinkhorn (Thornton & Cuturi, 2022, "Rethinking
initialization of the Sinkhorn algorithm").

An initializer proposes a starting $f_0$; Sinkhorn computes $g_0$ from it by one
update. The start changes how many iterations are needed, never the fixed point, and
the solver stops gradients through it, so gradients are those of the optimum.

Each initializer is one function `potential(geom, a, b, eps) -> f0` registered in
`_POTENTIALS`, plus a rule in `check_applicable` saying which problems it accepts.
"""

from __future__ import annotations

import jax.numpy as jnp

from monge.costs import SqEuclidean
from monge.geometry import PointCloud

__all__ = ["NAMES", "check_name", "check_applicable", "initial_potential", "gaussian_potential"]


def gaussian_potential(x, y, a, b):
    r"""Dual potential $f_0(x) = \|x\|^2 - (x - m_0)^\top A (x - m_0) - 2\langle m_1,
    x\rangle$ of the Brenier map $T(x) = m_1 + A(x - m_0)$ between Gaussian fits
    $N(m_0, \Sigma_0)$, $N(m_1, \Sigma_1)$ of the weighted clouds, for the cost
    $\|x - y\|^2$, with $A = \Sigma_0^{-1/2}(\Sigma_0^{1/2}\Sigma_1\Sigma_0^{1/2})^{1/2}
    \Sigma_0^{-1/2}$ (Thornton & Cuturi, 2022). Computed on points centred at the mean of
    `y` (the cost is translation invariant; float32 does not cancel). $\Sigma_0$ gets a
    small ridge, so fewer points than dimensions are fine.
    """
    centre = jnp.mean(y, axis=0)
    x, y = x - centre, y - centre
    a, b = a / jnp.sum(a), b / jnp.sum(b)
    m0, m1 = a @ x, b @ y
    d = x.shape[1]
    s0 = (x - m0).T @ ((x - m0) * a[:, None])
    s1 = (y - m1).T @ ((y - m1) * b[:, None])
    s0 = s0 + 1e-6 * (jnp.trace(s0) / d + 1e-12) * jnp.eye(d, dtype=x.dtype)

    def sym_power(s, power):
        w, v = jnp.linalg.eigh(s)
        return (v * jnp.maximum(w, 0.0) ** power) @ v.T

    root0, inv_root0 = sym_power(s0, 0.5), sym_power(s0, -0.5)
    A = inv_root0 @ sym_power(root0 @ s1 @ root0, 0.5) @ inv_root0
    z = x - m0
    return jnp.sum(x**2, axis=1) - jnp.sum((z @ A) * z, axis=1) - 2 * x @ m1


def _gaussian(geom, a, b, eps):
    return gaussian_potential(geom.x, geom.y, a, b)


_POTENTIALS = {"gaussian": _gaussian}

#: Accepted names; ``"zeros"`` is the plain start $f_0 = 0$.
NAMES = ("zeros", *_POTENTIALS)


def check_name(name) -> None:
    if name not in NAMES:
        raise ValueError(
            f"`initializer` must be one of {', '.join(map(repr, NAMES))}; received {name!r}."
        )


def check_applicable(name, geom) -> None:
    """Raise a ValueError if initializer `name` cannot start a problem on `geom`."""
    if name == "gaussian" and not (
        isinstance(geom, PointCloud) and isinstance(geom.cost, SqEuclidean)
    ):
        cost = f" with cost {type(geom.cost).__name__}" if isinstance(geom, PointCloud) else ""
        raise ValueError(
            "`initializer='gaussian'` needs a point-cloud problem with the squared "
            f"Euclidean cost; received a {type(geom).__name__}{cost}. Use "
            "initializer='zeros'."
        )


def initial_potential(name, geom, a, b, eps):
    """The initial $f_0$ of initializer `name`, or None for ``"zeros"``."""
    return None if name == "zeros" else _POTENTIALS[name](geom, a, b, eps)
