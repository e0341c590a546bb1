"""Input validation shared by problems and front doors.

Shapes and dtypes are checked in plain Python before tracing. Values (NaN, negative
weights, unequal masses) are checked with NumPy when the arrays are concrete, so the
user gets a `ValueError`; under `jax.jit`/`vmap`/`grad` they are traced and
`traced_checks` raises through `eqx.error_if` instead (an `EquinoxRuntimeError`).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

#: Relative tolerance on |sum(a) - sum(b)| for a balanced problem.
MASS_RTOL = 1e-4


def concrete(z) -> np.ndarray | None:
    """`z` as a NumPy array if its value is known now, `None` if it is being traced."""
    try:
        return np.asarray(z)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def check_points(name: str, z) -> None:
    """Points or costs must be finite."""
    zc = concrete(z)
    if zc is not None and not np.all(np.isfinite(zc)):
        bad = int(np.size(zc) - np.count_nonzero(np.isfinite(zc)))
        raise ValueError(
            f"`{name}` has {bad} non-finite value(s) (NaN or inf); remove or impute those "
            "entries before solving."
        )


def check_costs(name: str, C) -> None:
    """Costs: finite, or `+inf` for a forbidden pair; never NaN or `-inf`."""
    Cc = concrete(C)
    if Cc is None:
        return
    bad = int(np.count_nonzero(np.isnan(Cc) | (Cc == -np.inf)))
    if bad:
        raise ValueError(
            f"`{name}` has {bad} NaN or -inf value(s); costs must be finite, or +inf for a "
            "forbidden pair (never transported). Remove or impute those entries."
        )


def check_allowed(C, a, b) -> None:
    """Every row of positive weight needs an allowed (finite-cost) column of positive
    weight, and vice versa; otherwise no coupling exists."""
    Cc, ac, bc = concrete(C), concrete(a), concrete(b)
    if Cc is None or ac is None or bc is None or np.all(np.isfinite(Cc)):
        return
    allowed = np.isfinite(Cc)
    rows_ok = np.any(allowed & (bc[None, :] > 0), axis=1)
    cols_ok = np.any(allowed & (ac[:, None] > 0), axis=0)
    for w, ok, name in ((ac, rows_ok, "row"), (bc, cols_ok, "column")):
        stuck = np.flatnonzero((w > 0) & ~ok)
        if stuck.size:
            raise ValueError(
                f"Infeasible problem: {name} {int(stuck[0])} of the cost matrix `C` has "
                f"positive weight but every pair with positive weight on the other side "
                f"is forbidden (C = inf); {stuck.size} such {name}(s). Allow at least one "
                f"pair (a finite cost) for each, or give those {name}s zero weight."
            )


def check_weights(name: str, w, length: int, points: str) -> None:
    """Weights: one per point, finite, non-negative, positive total."""
    if w.ndim != 1 or w.shape[0] != length:
        raise ValueError(
            f"`{name}` must be a 1-D array of {length} weights, one per point of {points}; "
            f"received shape {tuple(w.shape)}."
        )
    wc = concrete(w)
    if wc is None:
        return
    if not np.all(np.isfinite(wc)):
        raise ValueError(
            f"`{name}` has non-finite weights (NaN or inf); pass finite non-negative weights."
        )
    if np.any(wc < 0):
        raise ValueError(
            f"`{name}` has negative weights (smallest {wc.min():.3g}); pass non-negative "
            "weights."
        )
    if not wc.sum() > 0:
        raise ValueError(f"`{name}` sums to 0; at least one weight must be positive.")


def check_positive(name: str, value, hint: str) -> None:
    vc = concrete(value)
    if vc is not None and not (np.all(np.isfinite(vc)) and np.all(vc > 0)):
        raise ValueError(f"`{name}` must be positive and finite; received {vc!r}. {hint}")


def check_tau(name: str, tau) -> None:
    tc = concrete(tau)
    if tc is not None and not np.all((tc > 0) & (tc <= 1)):
        raise ValueError(
            f"`{name}` must lie in (0, 1]: 1 is a balanced (hard) marginal constraint, "
            f"smaller values relax it; received {tc!r}."
        )


def check_masses(a, b, tau_a, tau_b) -> None:
    ac, bc, ta, tb = concrete(a), concrete(b), concrete(tau_a), concrete(tau_b)
    if any(v is None for v in (ac, bc, ta, tb)):
        return
    if np.all(ta == 1) and np.all(tb == 1):
        sa, sb = float(ac.sum()), float(bc.sum())
        if abs(sa - sb) > MASS_RTOL * max(sa, sb):
            raise ValueError(
                f"A balanced problem needs equal masses, but `a` sums to {sa:.6g} and `b` "
                f"to {sb:.6g}. Normalise both (a / a.sum(), b / b.sum()) or allow mass "
                "creation/destruction with tau_a < 1, tau_b < 1."
            )


def traced_checks(problem, eps) -> tuple:
    """The value checks above, for traced inputs; returns `(a, b)` to thread the checks
    into the computation (equinox's `error_if` needs its output used)."""
    a, b = problem.a, problem.b
    balanced = (problem.tau_a == 1) & (problem.tau_b == 1)
    sa, sb = jnp.sum(a), jnp.sum(b)
    a = eqx.error_if(
        a,
        jnp.any(~jnp.isfinite(a)) | jnp.any(a < 0) | ~(sa > 0),
        "`a` must be finite, non-negative weights with a positive sum.",
    )
    b = eqx.error_if(
        b,
        jnp.any(~jnp.isfinite(b)) | jnp.any(b < 0) | ~(sb > 0),
        "`b` must be finite, non-negative weights with a positive sum.",
    )
    a = eqx.error_if(
        a,
        balanced & (jnp.abs(sa - sb) > MASS_RTOL * jnp.maximum(sa, sb)),
        "A balanced problem needs equal masses sum(a) == sum(b); normalise the weights or "
        "use tau_a < 1, tau_b < 1.",
    )
    a = eqx.error_if(
        a, ~(jnp.isfinite(eps) & (eps > 0)), "`epsilon` must be positive and finite."
    )
    taus = jnp.stack([problem.tau_a, problem.tau_b])
    a = eqx.error_if(
        a, jnp.any(~((taus > 0) & (taus <= 1))), "`tau_a` and `tau_b` must lie in (0, 1]."
    )
    return a, b
