r"""Semi-discrete optimal transport: a continuous source known by samples, discrete target.

The source $\mu$ is only available through a sampler; the target is
$\nu = \sum_{j=1}^m b_j \delta_{y_j}$. The problem is solved in the semi-dual, a concave
maximisation over one potential $g \in \mathbb{R}^m$:

$$\max_g\ H_\varepsilon(g) = \mathbb{E}_{x\sim\mu}\big[g^{c,\varepsilon}(x)\big]
+ \langle g, b\rangle,$$

with the c-transform $g^{c}(x) = \min_j c(x, y_j) - g_j$ for $\varepsilon = 0$ and its
soft version $g^{c,\varepsilon}(x) = -\varepsilon\log\sum_j b_j
e^{(g_j - c(x, y_j))/\varepsilon}$ for $\varepsilon > 0$. $H_\varepsilon(g^\star)$ is the
(entropic) optimal transport cost, $\min_\pi \int c\,d\pi +
\varepsilon\mathrm{KL}(\pi\|\mu\otimes\nu)$, the same convention as `monge.solve`.
Its gradient is $b_j - \mathbb{E}_x[\chi_j(x)]$, where $\chi_j(x)$ is the conditional
law of the target given $x$ (the indicator of the Laguerre cell of $y_j$ when
$\varepsilon = 0$), so a minibatch of samples gives an unbiased stochastic gradient.

Reference: Genevay, Cuturi, Peyré & Bach, *Stochastic optimization for large-scale
optimal transport*, NeurIPS 2016 (Algorithm 2, averaged SGD on the semi-dual).
"""

from __future__ import annotations

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray

from monge import checks
from monge.checks import concrete
from monge.costs import AbstractCost, as_cost
from monge.geometry import safe_log

__all__ = ["SemidiscreteSolution", "semidiscrete"]


def _logits(ground_cost, x, y, g, b, epsilon):
    """Costs `(k, m)` and the two scores: hard $c_{ij} - g_j$ (inf where $b_j = 0$) and
    soft $\\log b_j + (g_j - c_{ij})/\\varepsilon$ (epsilon replaced by 1 when 0)."""
    C = ground_cost.all_pairs(x, y)
    hard = jnp.where(b > 0, C - g, jnp.inf)
    eps = jnp.where(epsilon > 0, epsilon, 1.0)
    log_b = safe_log(b)
    soft = log_b + (g - C) / eps
    return C, hard, soft, eps


@eqx.filter_jit
def _c_transform_and_probs(ground_cost, x, y, g, b, epsilon):
    r"""$g^{c,\varepsilon}(x_i)$, $(k,)$, the probabilities $\chi_j(x_i)$, $(k, m)$, and
    the costs $c(x_i, y_j)$, $(k, m)$."""
    C, hard, soft, eps = _logits(ground_cost, x, y, g, b, epsilon)
    smooth = epsilon > 0
    transform = jnp.where(smooth, -eps * jax.nn.logsumexp(soft, axis=1), jnp.min(hard, 1))
    one_hot = jax.nn.one_hot(jnp.argmin(hard, axis=1), y.shape[0], dtype=C.dtype)
    probs = jnp.where(smooth, jax.nn.softmax(soft, axis=1), one_hot)
    return transform, probs, C


class SemidiscreteSolution(eqx.Module):
    r"""The result of `semidiscrete`: a target potential and the map it defines.

    Attributes:
        g: the averaged potential on the target atoms, shape `(m,)` (defined up to an
            additive constant).
        y: the target atoms, `(m, d)`.
        b: the target weights, normalised, `(m,)`.
        epsilon: the entropic regularisation ($0$: unregularised).
        ground_cost: the cost $c(x, y)$ as a `monge.costs` object.
        cost: $\int c\,d\pi$, the transport cost of the coupling defined by `g`,
            estimated on fresh samples.
        reg_cost: the semi-dual value $H_\varepsilon(g)$ on the same fresh samples, an
            estimate of the (entropic) OT cost; equal to `cost` in expectation at the
            optimum when $\varepsilon = 0$. Differentiable w.r.t. `y` and `b` (Danskin:
            `g` is held fixed).
        objective: the semi-dual value at the averaged potential after each step,
            estimated on that step's minibatch, shape `(n_steps,)`.
    """

    g: Float[Array, " m"]
    y: Float[Array, "m d"]
    b: Float[Array, " m"]
    epsilon: Float[Array, ""]
    ground_cost: AbstractCost
    cost: Float[Array, ""]
    reg_cost: Float[Array, ""]
    objective: Float[Array, " n_steps"]

    def _points(self, x) -> Array:
        x = jnp.asarray(x, dtype=self.y.dtype)
        d = self.y.shape[1]
        if x.ndim != 2 or x.shape[1] != d:
            raise ValueError(
                f"`x` must be source points of shape (k, {d}) (the dimension of the "
                f"target atoms); received shape {tuple(x.shape)}. For 1-D data pass "
                "x[:, None].")
        return x

    def probabilities(self, x: Float[ArrayLike, "k d"]) -> Float[Array, "k m"]:
        r"""$\chi_j(x_i)$: where the plan sends $x_i$, one row per point summing to 1.

        $\chi_j(x) \propto b_j e^{(g_j - c(x, y_j))/\varepsilon}$ for $\varepsilon > 0$;
        the indicator of the Laguerre cell $\{x: c(x, y_j) - g_j \le c(x, y_l) - g_l\
        \forall l\}$ for $\varepsilon = 0$.
        """
        x = self._points(x)
        return _c_transform_and_probs(self.ground_cost, x, self.y, self.g, self.b,
                                      self.epsilon)[1]

    def assign(self, x: Float[ArrayLike, "k d"]) -> Int[Array, " k"]:
        r"""Index of the target atom of each point: its Laguerre cell
        $\arg\min_j c(x, y_j) - g_j$ ($\varepsilon = 0$), or the most likely atom
        $\arg\max_j \chi_j(x)$ ($\varepsilon > 0$)."""
        return jnp.argmax(self.probabilities(x), axis=1)

    def transport(self, x: Float[ArrayLike, "k d"]) -> Float[Array, "k d"]:
        r"""The transport map on new points: $y_{\mathrm{assign}(x)}$ for
        $\varepsilon = 0$; the barycentric projection $\sum_j \chi_j(x) y_j$ for
        $\varepsilon > 0$."""
        return self.probabilities(x) @ self.y

    def evaluate(self, x: Float[ArrayLike, "k d"]) -> tuple[Array, Array]:
        r"""`(cost, reg_cost)` estimated on the samples `x` of the source:
        $\frac1k\sum_i \sum_j \chi_j(x_i) c(x_i, y_j)$ and
        $\frac1k\sum_i g^{c,\varepsilon}(x_i) + \langle g, b\rangle$."""
        x = self._points(x)
        return _estimates(self.ground_cost, x, self.y, self.g, self.b, self.epsilon)


@eqx.filter_jit
def _estimates(ground_cost, x, y, g, b, epsilon) -> tuple[Array, Array]:
    transform, probs, C = _c_transform_and_probs(ground_cost, x, y, g, b, epsilon)
    return jnp.mean(jnp.sum(probs * C, axis=1)), jnp.mean(transform) + g @ b


@eqx.filter_jit
def _ascend(sampler, ground_cost, y, b, epsilon, learning_rate, key, n_steps: int,
            batch_size: int):
    """Averaged SGD on the semi-dual; returns the averaged potential and the history."""
    keys = jax.random.split(key, n_steps)
    if learning_rate is None:  # the typical cost: the semi-dual's natural unit for g
        C0 = ground_cost.all_pairs(sampler(keys[0], batch_size).astype(y.dtype), y)
        learning_rate = jnp.mean(C0 @ b)
    learning_rate = jnp.asarray(learning_rate, y.dtype)

    def step(state, inputs):
        g, g_bar = state
        k, t = inputs
        x = sampler(k, batch_size).astype(y.dtype)
        _, probs, _ = _c_transform_and_probs(ground_cost, x, y, g, b, epsilon)
        g = g + learning_rate / jnp.sqrt(t + 1.0) * (b - jnp.mean(probs, axis=0))
        g_bar = g_bar + (g - g_bar) / (t + 1.0)
        transform, _, _ = _c_transform_and_probs(ground_cost, x, y, g_bar, b, epsilon)
        return (g, g_bar), jnp.mean(transform) + g_bar @ b

    g0 = jnp.zeros_like(b)
    steps = jnp.arange(n_steps, dtype=y.dtype)
    (_, g_bar), history = jax.lax.scan(step, (g0, g0), (keys, steps))
    return g_bar, history


def _check_int(name: str, value, low: int, example: str) -> int:
    if isinstance(value, bool) or not (isinstance(value, (int, np.integer)) and value >= low):
        raise ValueError(
            f"`monge.semidiscrete({name}=...)` must be an int >= {low}; received "
            f"{value!r}. Pass e.g. {name}={example}.")
    return int(value)


def _check_scalar(name: str, value, positive: bool, hint: str) -> None:
    if np.shape(value) != ():
        raise ValueError(
            f"`monge.semidiscrete({name}=...)` must be a scalar; received shape "
            f"{np.shape(value)}. {hint}")
    vc = concrete(value)
    if vc is not None and not (np.isfinite(vc) and (vc > 0 if positive else vc >= 0)):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(
            f"`monge.semidiscrete({name}=...)` must be finite and {bound}; received "
            f"{float(vc)!r}. {hint}")


def _check_target(y, b) -> tuple[Array, Array]:
    y = checks.as_real_array("y", y, "semidiscrete")
    b = None if b is None else checks.as_real_array("b", b, "semidiscrete")
    if len(np.shape(y)) != 2 or 0 in np.shape(y):
        raise ValueError(
            f"`monge.semidiscrete(y=...)` must be a non-empty (m, d) array of target "
            f"atoms; received shape {np.shape(y)}. For 1-D atoms pass y[:, None].")
    dtype = checks.float_dtype(y)
    y = jnp.asarray(y, dtype=dtype)
    yc = concrete(y)
    if yc is not None and not np.all(np.isfinite(yc)):
        raise ValueError(
            "`monge.semidiscrete(y=...)` has non-finite values (NaN or inf); remove "
            "those atoms.")
    m = y.shape[0]
    if b is None:
        return y, jnp.full((m,), 1.0 / m, dtype=dtype)
    if np.shape(b) != (m,):
        raise ValueError(
            f"`monge.semidiscrete(b=...)` has shape {np.shape(b)} but y has {m} atoms: "
            f"pass one non-negative weight per atom (shape ({m},)), or None for uniform.")
    b = jnp.asarray(b, dtype=dtype)
    bc = concrete(b)
    if bc is not None and not (np.all(bc >= 0) and np.all(np.isfinite(bc)) and bc.sum() > 0):
        raise ValueError(
            f"`monge.semidiscrete(b=...)` must be finite, non-negative weights with a "
            f"positive sum; received {bc!r}.")
    return y, b / jnp.sum(b)


def _check_sampler(sampler, key, batch_size: int, d: int) -> None:
    """Traces `sampler` once, abstractly (no computation), to check what it returns."""
    if not callable(sampler):
        raise ValueError(
            "`monge.semidiscrete(sampler=...)` must be a function sampler(key, n) "
            f"returning n source points of shape (n, d); received {type(sampler).__name__}.")
    try:
        out = jax.eval_shape(lambda k: sampler(k, batch_size), key)
    except Exception as err:  # report any tracing failure with the expected signature
        raise ValueError(
            "`monge.semidiscrete(sampler=...)` failed when called as sampler(key, n) "
            f"under JAX tracing ({type(err).__name__}: {err}). It must be a JAX function "
            "of a PRNG key and a Python int n, e.g. "
            "lambda key, n: jax.random.uniform(key, (n, 1)).") from err
    shape = getattr(out, "shape", None)
    if shape != (batch_size, d) or not jnp.issubdtype(out.dtype, jnp.floating):
        raise ValueError(
            f"`monge.semidiscrete(sampler=...)` must return a float array of shape "
            f"(n, {d}) (n points in the dimension of y); sampler(key, {batch_size}) "
            f"returned {getattr(out, 'dtype', type(out).__name__)} of shape {shape}.")


def semidiscrete(
    sampler: Callable[[PRNGKeyArray, int], Float[Array, "n d"]],
    y: Float[ArrayLike, "m d"],
    *,
    b: Float[ArrayLike, " m"] | None = None,
    epsilon: float | Float[ArrayLike, ""] = 0.0,
    cost: str | AbstractCost | Callable = "sqeuclidean",
    key: PRNGKeyArray | None = None,
    n_steps: int = 2000,
    batch_size: int = 128,
    learning_rate: float | Float[ArrayLike, ""] | None = None,
    n_eval: int = 4096,
) -> SemidiscreteSolution:
    r"""Semi-discrete OT from a sampled source to atoms $y$ by averaged SGD on the semi-dual.

    Maximises $H_\varepsilon(g) = \mathbb{E}_{x\sim\mu}[g^{c,\varepsilon}(x)] +
    \langle g, b\rangle$ (module docstring) with `n_steps` steps
    $g \leftarrow g + \frac{\gamma}{\sqrt{t+1}}\big(b - \frac1B\sum_{i}
    \chi(x_i)\big)$ on minibatches of $B$ = `batch_size` fresh samples, and returns the
    running average $\bar g$ of the iterates (Polyak-Ruppert), whose error decays as
    $O(1/\sqrt{t})$. Everything runs in one `lax.scan` under `eqx.filter_jit`:
    `epsilon`, `learning_rate`, `y`, `b` and `key` are traced; `n_steps`,
    `batch_size`, `n_eval`, `cost` and the `sampler` function itself (by identity:
    define it once, not as a new lambda per call) recompile.

    Args:
        sampler: a JAX function `sampler(key, n)` returning `n` i.i.d. source samples,
            shape `(n, d)`.
        y: target atoms, shape `(m, d)`.
        b: non-negative target weights, shape `(m,)`; uniform if None (normalised).
            Atoms of weight 0 receive no mass.
        epsilon: entropic regularisation $\varepsilon \ge 0$; 0 (default) is
            unregularised OT, whose plan is a map onto the Laguerre cells.
        cost: ``"sqeuclidean"`` ($\|x - y\|^2$), another name accepted by
            `monge.solve`, a `monge.costs` object or a function `c(x, y)` of one pair.
        key: `jax.random.key(...)` for the samples (required).
        n_steps: number of stochastic gradient steps.
        batch_size: samples per step.
        learning_rate: $\gamma$, in units of the cost (the potential's unit). Default:
            the mean cost $\frac1B\sum_{i,j} b_j c(x_i, y_j)$ on the first batch, so the
            default does not depend on the units of the data.
        n_eval: fresh samples used for the final estimates `cost` and `reg_cost`.

    Returns:
        A `SemidiscreteSolution` with `g`, `assign(x)`, `transport(x)`,
        `probabilities(x)`, `evaluate(x)`, the estimates `cost`, `reg_cost` and the
        history `objective`.

    Raises:
        ValueError: no `key`; `y` not a finite `(m, d)` array; `b` not `(m,)`
            non-negative with a positive sum; `epsilon` < 0 or `learning_rate` <= 0;
            `n_steps`, `batch_size` or `n_eval` not a positive int; `sampler` not a JAX
            function returning `(n, d)` floats; an unknown `cost`.

    References:
        Genevay, Cuturi, Peyré & Bach, *Stochastic optimization for large-scale optimal
        transport*, NeurIPS 2016.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from monge.tools.semidiscrete import semidiscrete
        >>> uniform = lambda key, n: jax.random.uniform(key, (n, 1))
        >>> y = jnp.array([[0.25], [0.75]])
        >>> sol = semidiscrete(uniform, y, key=jax.random.key(0), n_steps=500)
        >>> sol.assign(jnp.array([[0.1], [0.4], [0.6], [0.9]])).tolist()
        [0, 0, 1, 1]
        >>> round(float(sol.cost), 2)  # 2 * int_0^0.5 (x - 0.25)^2 dx = 1/48
        0.02
    """
    if key is None:
        raise ValueError(
            "`monge.semidiscrete(key=...)` is required to draw source samples: pass "
            "e.g. key=jax.random.key(0).")
    y, b = _check_target(y, b)
    ground_cost = as_cost(cost)
    n_steps = _check_int("n_steps", n_steps, 1, "2000")
    batch_size = _check_int("batch_size", batch_size, 1, "128")
    n_eval = _check_int("n_eval", n_eval, 1, "4096")
    _check_scalar("epsilon", epsilon, False,
                  "Pass epsilon=0 for unregularised OT or a positive regularisation.")
    if learning_rate is not None:  # an array, so that a new value does not recompile
        _check_scalar("learning_rate", learning_rate, True,
                      "Pass a positive step in units of the cost, or None for the default.")
        learning_rate = jnp.asarray(learning_rate, dtype=y.dtype)
    _check_sampler(sampler, key, batch_size, y.shape[1])
    epsilon = jnp.asarray(epsilon, dtype=y.dtype)
    fit_key, eval_key = jax.random.split(key)
    g, history = _ascend(sampler, ground_cost, *jax.lax.stop_gradient((y, b, epsilon)),
                         learning_rate, fit_key, n_steps, batch_size)
    g = jax.lax.stop_gradient(g)
    x = jnp.asarray(sampler(eval_key, n_eval), dtype=y.dtype)
    cost_value, reg_cost = _estimates(ground_cost, x, y, g, b, epsilon)
    return SemidiscreteSolution(g=g, y=y, b=b, epsilon=epsilon, ground_cost=ground_cost,
                                cost=cost_value, reg_cost=reg_cost, objective=history)
