"""Input validation shared by problems, solvers, front doors and tools.

Shapes and dtypes are checked in plain Python before tracing (`as_real_array`,
`check_cloud`, `check_nonempty_matrix`): a `ValueError` naming the argument. Values
(NaN, negative weights, unequal masses) are checked with NumPy when the arrays are
concrete, so the user gets a `ValueError`; under `jax.jit`/`vmap`/`grad` they are traced:

- weights, epsilon and tau: `traced_checks` raises through `eqx.error_if` (an
  `EquinoxRuntimeError`);
- points and costs: not an error under `jit` (the check would be one more pass over the
  data, and one bad problem would abort a whole vmapped batch); a solver that meets
  non-finite values returns `Status.DIVERGED` ("failure is data"), and a function that
  returns a plain number (`wasserstein_1d`, `sliced_wasserstein`) returns NaN, never a
  finite value.

Options that the chosen mode would ignore are errors too (`reject_unused`).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

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


#: Units of mass in `check_feasible`'s integer flow network (its capacities are int32).
_FLOW_UNITS = 2**28
#: `check_feasible` raises when more than this fraction of the mass cannot avoid the
#: forbidden pairs: well above the rounding of float32 weight totals (about 1e-7), well
#: below any threshold a solver is run at.
FEASIBILITY_RTOL = 1e-5


def check_feasible(C, a, b, mass=None) -> None:
    r"""Some coupling avoids the forbidden pairs ($C_{ij} = +\infty$): a plan $P \ge 0$
    with $P\mathbf 1 \le a$, $P^\top \mathbf 1 \le b$ and total `mass` (default
    $\sum a$, a balanced problem) that is 0 on every forbidden pair. Checked (concrete
    arrays with at least one forbidden pair only) as a maximum flow from the rows to the
    columns through the allowed pairs (Hall's condition; scipy's Dinic on integer
    capacities, weights rounded up to units of $\text{mass} / 2^{28}$, in float64).
    Infeasible means that more than `FEASIBILITY_RTOL` of the mass cannot move: smaller
    deficits are rounding of the weights (float32 totals agree to about 1e-7), and a
    solver run at a coarser threshold cannot tell them from a feasible problem."""
    Cc, ac, bc, mc = concrete(C), concrete(a), concrete(b), concrete(mass)
    if Cc is None or ac is None or bc is None or (mass is not None and mc is None):
        return
    if np.all(np.isfinite(Cc)):
        return
    from scipy.sparse import csr_array
    from scipy.sparse.csgraph import maximum_flow

    ac, bc = ac.astype(np.float64), bc.astype(np.float64)
    rows, cols = np.flatnonzero(ac > 0), np.flatnonzero(bc > 0)
    need = float(ac.sum() if mass is None else mc)
    unit = need / _FLOW_UNITS
    # no line carries more than the whole mass: capping there keeps capacities in int32
    cap = lambda w: np.minimum(np.ceil(w / unit), _FLOW_UNITS + 1).astype(np.int64)  # noqa: E731
    supply, demand = cap(ac[rows]), cap(bc[cols])
    r, c = rows.size, cols.size
    ii, jj = np.nonzero(np.isfinite(Cc[np.ix_(rows, cols)]))
    source, sink = 0, r + c + 1
    tail = np.concatenate([np.zeros(r, np.int64), 1 + ii, 1 + r + np.arange(c)])
    head = np.concatenate([1 + np.arange(r), 1 + r + jj, np.full(c, sink)])
    capacity = np.concatenate([supply, np.full(ii.size, _FLOW_UNITS * 2), demand])
    graph = csr_array((capacity.astype(np.int32), (tail, head)), shape=(sink + 1, sink + 1))
    flow = maximum_flow(graph, source, sink).flow_value
    if flow < (1 - FEASIBILITY_RTOL) * _FLOW_UNITS:
        moved = flow * unit
        what = "the mass" if mass is None else "`mass`"
        raise ValueError(
            f"Infeasible problem: no coupling of `a` and `b` avoids the forbidden pairs "
            f"(C = inf). At most {moved:.6g} of {what} {need:.6g} can be transported on "
            "allowed pairs: some set of rows can only reach columns of smaller total "
            "weight. Allow more pairs (finite costs), change the weights, or let mass be "
            "created or destroyed (tau_a, tau_b < 1, or partial OT with a smaller `mass`)."
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


def traced_weights(a, b, balanced, hint: str = "") -> tuple:
    """`check_weights` and `check_masses` for traced weights, through `eqx.error_if`
    (an `EquinoxRuntimeError` when the computation runs); returns `(a, b)` to thread
    the checks into it (`error_if` needs its output used). `balanced`: whether the
    masses must be equal (a traced bool); `hint` ends that message."""
    sa, sb = jnp.sum(a), jnp.sum(b)
    bad = lambda w, s: jnp.any(~jnp.isfinite(w)) | jnp.any(w < 0) | ~(s > 0)  # noqa: E731
    a = eqx.error_if(a, bad(a, sa), "`a` must be finite, non-negative weights with a positive sum.")
    b = eqx.error_if(b, bad(b, sb), "`b` must be finite, non-negative weights with a positive sum.")
    a = eqx.error_if(
        a,
        balanced & (jnp.abs(sa - sb) > MASS_RTOL * jnp.maximum(sa, sb)),
        "A balanced problem needs equal masses sum(a) == sum(b); normalise the weights" + hint,
    )
    return a, b


def traced_checks(problem, eps) -> tuple:
    """The value checks above, for traced inputs (weights, masses, epsilon, tau);
    returns `(a, b)` to thread the checks into the computation."""
    balanced = (problem.tau_a == 1) & (problem.tau_b == 1)
    a, b = traced_weights(problem.a, problem.b, balanced, " or use tau_a < 1, tau_b < 1.")
    a = eqx.error_if(
        a, ~(jnp.isfinite(eps) & (eps > 0)), "`epsilon` must be positive and finite."
    )
    taus = jnp.stack([problem.tau_a, problem.tau_b])
    a = eqx.error_if(
        a, jnp.any(~((taus > 0) & (taus <= 1))), "`tau_a` and `tau_b` must lie in (0, 1]."
    )
    return a, b


# -- arrays at the door (shared by geometries, problems, front doors and tools) ---------
def as_real_array(name: str, z, fn: str | None = None):
    """`z` as a real floating JAX array (integers and booleans promoted to the default
    float dtype), or a `ValueError` naming `name` (and the function `fn`, if given)
    for values that are not real numbers: complex arrays (OT costs are real; the
    imaginary part would be dropped or break the arithmetic), strings and objects.
    Works on traced arrays (only the dtype is read)."""
    where = f"`{name}`" if fn is None else f"`monge.{fn}({name}=...)`"
    dtype = getattr(z, "dtype", None)
    if dtype is None:
        try:
            dtype = np.asarray(z).dtype
        except (TypeError, ValueError):  # ragged nested lists and the like
            dtype = np.dtype(object)
    if jnp.issubdtype(dtype, jnp.complexfloating):
        raise ValueError(
            f"{where} is complex (dtype {dtype}); optimal transport needs real numbers: "
            "pass its real part, its modulus, or real and imaginary parts as two "
            "coordinates (np.stack([z.real, z.imag], -1))."
        )
    if not (jnp.issubdtype(dtype, jnp.number) or jnp.issubdtype(dtype, jnp.bool_)):
        what = f"dtype {dtype}" if dtype != np.dtype(object) else f"type {type(z).__name__}"
        raise ValueError(
            f"{where} must be a real-valued numeric array; received {what}. Convert it "
            "first, e.g. np.asarray(z, dtype=np.float32) (strings must be parsed into "
            "numbers)."
        )
    return as_float_array(z)


def as_float_array(z) -> Array:
    """`jnp.asarray(z)`, promoting integers and booleans to the default float dtype and
    half precision (float16, bfloat16) to float32.

    monge computes in float32 at least: in float16 a squared distance of $10^{-3}$
    next to 1 rounds away, exponentials of costs over epsilon overflow at 11, and
    Sinkhorn returned a cost of 0 marked converged. Inputs are upcast, never
    silently computed in half precision."""
    z = jnp.asarray(z)
    if not jnp.issubdtype(z.dtype, jnp.inexact):
        return z.astype(jnp.result_type(float))
    if jnp.issubdtype(z.dtype, jnp.floating) and jnp.finfo(z.dtype).bits < 32:
        return z.astype(jnp.float32)
    return z


def check_cloud(name: str, z, fn: str | None = None) -> None:
    """A point cloud: a 2-D `(n, d)` array with n >= 1 points and d >= 1 coordinates
    (an empty cloud has no transport plan, and d = 0 makes every cost 0)."""
    where = f"`{name}`" if fn is None else f"`monge.{fn}({name}=...)`"
    shape = tuple(np.shape(z))
    if len(shape) != 2:
        hint = " Use z.reshape(-1, 1) for points on a line." if len(shape) == 1 else ""
        raise ValueError(
            f"{where} must be a 2-D array of points, shape (n, d); received shape "
            f"{shape}.{hint}"
        )
    if shape[0] == 0:
        raise ValueError(
            f"{where} is an empty point cloud (shape {shape}); pass at least one point."
        )
    if shape[1] == 0:
        raise ValueError(
            f"{where} has points in dimension d = 0 (shape {shape}); pass at least one "
            "coordinate per point."
        )


def check_clouds(x, y) -> None:
    """Two point clouds `(n, d)` and `(m, d)`: shapes, and finite values when concrete."""
    for name, z in (("x", x), ("y", y)):
        check_cloud(name, z)
        check_points(name, z)
    if x.shape[1] != y.shape[1]:
        raise ValueError(
            f"`x` and `y` must have the same dimension d; received x of shape "
            f"{tuple(x.shape)} and y of shape {tuple(y.shape)}."
        )


def check_nonempty_matrix(name: str, C) -> None:
    """A cost matrix: 2-D `(n, m)` with n, m >= 1."""
    shape = tuple(np.shape(C))
    if len(shape) != 2:
        raise ValueError(
            f"A cost matrix must be 2-D, of shape (n, m); received shape {shape} (`{name}`)."
        )
    if 0 in shape:
        raise ValueError(
            f"`{name}` is an empty cost matrix (shape {shape}); pass at least one source "
            "(row) and one target (column)."
        )


def reject_unused(owner: str, given: dict, why: str, fix: str) -> None:
    """Raise if options that `owner` would ignore were given (not None).

    `given` maps the option names (as the user writes them) to their values; `None`
    means "not given". An option that is accepted and silently ignored lets a user
    believe a setting took effect, so it is an error that names it and says what to do.
    """
    names = [f"{k}={v!r}" for k, v in given.items() if v is not None]
    if names:
        raise ValueError(f"{owner}: {', '.join(names)} {why}; {fix}")


# -- the one-call functions of `monge.tools` -------------------------------------------
def float_dtype(*arrays) -> jnp.dtype:
    """Common floating dtype of `arrays`: float32 by default, float64 under x64."""
    return jnp.result_type(*[a for a in arrays if a is not None], 1.0)


def tool_weights(w, n: int, name: str, points: str, fn: str, dtype) -> Array:
    """Checks a weight vector of the one-call function `fn` against `n` points;
    uniform weights if `w` is None."""
    if w is None:
        return jnp.full((n,), 1.0 / n, dtype=dtype)
    w = as_real_array(name, w, fn)
    shape = np.shape(w)
    if shape != (n,):
        raise ValueError(
            f"`monge.{fn}({name}=...)` has shape {shape} but {points} has {n} points: "
            f"pass one non-negative weight per point of {points} (shape ({n},)), "
            "or leave it None for uniform weights.")
    if concrete(w) is not None:
        values = np.asarray(w)
        if not np.all(values >= 0):  # also catches NaN
            raise ValueError(
                f"`monge.{fn}({name}=...)` has negative or NaN entries (min "
                f"{values.min()}): pass finite non-negative weights.")
        if not values.sum() > 0:
            raise ValueError(
                f"`monge.{fn}({name}=...)` sums to {values.sum()}: pass at least one "
                "positive weight (weights are normalised to sum to 1).")
    return jnp.asarray(w, dtype=dtype)


def tool_clouds(x, y, fn: str) -> tuple[Array, Array]:
    """Checks two point clouds (n, d) and (m, d) of the one-call function `fn`;
    returns them in a float dtype."""
    x = as_real_array("x", x, fn)
    y = as_real_array("y", y, fn)
    sx, sy = np.shape(x), np.shape(y)
    for name, z in (("x", x), ("y", y)):
        shape = np.shape(z)
        if len(shape) != 2 or shape[0] == 0 or shape[1] == 0:
            raise ValueError(
                f"`monge.{fn}({name}=...)` must be a non-empty (n, d) array of n "
                f"points in dimension d, got shape {shape}: for 1-D data pass "
                f"{name}[:, None].")
        check_points(f"monge.{fn}({name}=...)", z)
    if sx[1] != sy[1]:
        raise ValueError(
            f"`monge.{fn}`: x has shape {sx} but y has shape {sy}: both point clouds "
            "must live in the same dimension d (the same number of columns).")
    dtype = float_dtype(x, y)
    return jnp.asarray(x, dtype=dtype), jnp.asarray(y, dtype=dtype)
