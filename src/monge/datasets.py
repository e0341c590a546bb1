"""Built-in point clouds for examples, tests and the `monge demo` command.

Everything here is generated deterministically with NumPy from an integer `seed`: no
network, no files. Points are float32 NumPy arrays of shape `(n, d)`, so they can be
passed straight to `monge.solve`.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import numpy as np

__all__ = ["GaussianPair", "gaussian_w2_squared", "gaussians", "shapes"]


def _check_count(func: str, name: str, value: object, example: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(
            f"`monge.datasets.{func}({name}=...)` must be a positive integer, got "
            f"{value!r}: pass the number of points wanted, e.g. {name}={example}."
        )
    return int(value)


def _check_seed(func: str, seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(
            f"`monge.datasets.{func}(seed=...)` must be a non-negative integer, got "
            f"{seed!r}: pass e.g. seed=0 (the same seed always gives the same points)."
        )
    return int(seed)


def _check_noise(func: str, noise: object) -> float:
    ok = isinstance(noise, numbers.Real) and not isinstance(noise, bool)
    if not ok or not math.isfinite(float(noise)) or float(noise) < 0:
        raise ValueError(
            f"`monge.datasets.{func}(noise=...)` must be a finite number >= 0, got "
            f"{noise!r}: pass the standard deviation of the Gaussian jitter, e.g. "
            "noise=0.05 (0 gives noiseless shapes)."
        )
    return float(noise)


def _streams(seed: int) -> tuple[np.random.Generator, np.random.Generator]:
    # Independent streams: the target does not change when only n_source changes.
    source, target = np.random.SeedSequence(seed).spawn(2)
    return np.random.default_rng(source), np.random.default_rng(target)


def shapes(
    n_source: int = 300,
    n_target: int = 400,
    seed: int = 0,
    *,
    noise: float = 0.05,
) -> tuple[np.ndarray, np.ndarray]:
    r"""A noisy ring (source) and two interleaved crescents (target) in the plane.

    The source is a ring of radius 1 centred at the origin; the target is the classic
    "two moons" pattern, centred at the origin and scaled to fit inside the ring
    (coordinates within about $[-1, 1]$). Matching them is non-trivial: the ring has to
    be split in two arcs folded onto the crescents, which makes a readable picture.

    Args:
        n_source: number of source points (ring).
        n_target: number of target points (crescents; the first gets the odd one).
        seed: non-negative integer; the same seed always gives the same points, and the
            target does not depend on `n_source` (nor the source on `n_target`).
        noise: standard deviation of the Gaussian jitter (radial for the ring).

    Returns:
        `(x, y)`: float32 arrays of shapes `(n_source, 2)` and `(n_target, 2)`.

    Raises:
        ValueError: when a count is not a positive integer, the seed is not a
            non-negative integer, or the noise is negative or not finite.

    Example:
        >>> from monge import datasets
        >>> x, y = datasets.shapes(30, 41, seed=0)
        >>> x.shape, y.shape, x.dtype
        ((30, 2), (41, 2), dtype('float32'))
    """
    n_source = _check_count("shapes", "n_source", n_source, 300)
    n_target = _check_count("shapes", "n_target", n_target, 400)
    seed = _check_seed("shapes", seed)
    noise = _check_noise("shapes", noise)
    rng_source, rng_target = _streams(seed)

    angle = rng_source.uniform(0.0, 2.0 * np.pi, n_source)
    radius = 1.0 + noise * rng_source.standard_normal(n_source)
    x = np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1)

    n_upper = (n_target + 1) // 2
    t = rng_target.uniform(0.0, np.pi, n_target)
    upper = np.stack([np.cos(t[:n_upper]), np.sin(t[:n_upper])], axis=1)
    lower = np.stack([1.0 - np.cos(t[n_upper:]), 0.5 - np.sin(t[n_upper:])], axis=1)
    moons = np.concatenate([upper, lower], axis=0)
    # Bounding box is [-1, 2] x [-0.5, 1]: centre it and scale it into the ring.
    moons = 0.6 * (moons - np.array([0.5, 0.25]))
    y = moons + noise * rng_target.standard_normal((n_target, 2))
    return x.astype(np.float32), y.astype(np.float32)


class GaussianPair(NamedTuple):
    """Parameters of the two Gaussians drawn by `gaussians`, in float64."""

    mean_source: np.ndarray
    """Mean of the source Gaussian, shape `(dim,)`."""
    cov_source: np.ndarray
    """Covariance of the source Gaussian, shape `(dim, dim)`."""
    mean_target: np.ndarray
    """Mean of the target Gaussian, shape `(dim,)`."""
    cov_target: np.ndarray
    """Covariance of the target Gaussian, shape `(dim, dim)`."""
    w2_squared: float
    """Closed-form squared 2-Wasserstein distance between the two Gaussians."""


def _sqrtm_psd(s: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(s)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def _random_covariance(rng: np.random.Generator, dim: int) -> np.ndarray:
    a = rng.standard_normal((dim, dim))
    return 0.5 * (a @ a.T) / dim + 0.25 * np.eye(dim)


def gaussian_w2_squared(
    mean_source: np.ndarray,
    cov_source: np.ndarray,
    mean_target: np.ndarray,
    cov_target: np.ndarray,
) -> float:
    r"""Squared 2-Wasserstein distance between two Gaussians, in closed form.

    $W_2^2 = \|m_0 - m_1\|^2 + \operatorname{tr}\big(\Sigma_0 + \Sigma_1
    - 2 (\Sigma_0^{1/2} \Sigma_1 \Sigma_0^{1/2})^{1/2}\big)$ (Dowson & Landau, 1982).

    Example:
        >>> import numpy as np
        >>> from monge.datasets import gaussian_w2_squared
        >>> round(gaussian_w2_squared(np.zeros(2), np.eye(2), np.ones(2), np.eye(2)), 6)
        2.0
    """
    m0, m1 = np.asarray(mean_source, np.float64), np.asarray(mean_target, np.float64)
    s0, s1 = np.asarray(cov_source, np.float64), np.asarray(cov_target, np.float64)
    root0 = _sqrtm_psd(s0)
    cross = _sqrtm_psd(root0 @ s1 @ root0)
    value = np.sum((m0 - m1) ** 2) + np.trace(s0) + np.trace(s1) - 2.0 * np.trace(cross)
    return float(max(value, 0.0))


def gaussians(
    n_source: int = 200,
    n_target: int = 300,
    dim: int = 2,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, GaussianPair]:
    r"""Samples of two Gaussians with known parameters and closed-form $W_2^2$.

    Means and covariances are drawn from `seed` (covariances have eigenvalues at least
    0.25, means differ by about 1 per coordinate), then `n_source` and `n_target` points
    are sampled from them.

    The returned `w2_squared` is the distance between the Gaussians themselves (the
    population); the optimal transport cost between the finite samples converges to it
    as the sample sizes grow, with an error of order $n^{-1/2}$ in small dimension.

    Args:
        n_source: number of points drawn from the source Gaussian.
        n_target: number of points drawn from the target Gaussian.
        dim: dimension of the points.
        seed: non-negative integer; the same seed always gives the same output.

    Returns:
        `(x, y, params)`: float32 arrays of shapes `(n_source, dim)` and
        `(n_target, dim)`, and a `GaussianPair` with the float64 parameters and
        `w2_squared` (squared Euclidean ground cost, no factor 1/2).

    Raises:
        ValueError: when a count or `dim` is not a positive integer, or the seed is not
            a non-negative integer.

    Example:
        >>> from monge import datasets
        >>> x, y, params = datasets.gaussians(30, 41, dim=3, seed=0)
        >>> x.shape, y.shape, params.cov_target.shape
        ((30, 3), (41, 3), (3, 3))
        >>> params.w2_squared > 0
        True
    """
    n_source = _check_count("gaussians", "n_source", n_source, 200)
    n_target = _check_count("gaussians", "n_target", n_target, 300)
    dim = _check_count("gaussians", "dim", dim, 2)
    seed = _check_seed("gaussians", seed)
    rng_params = np.random.default_rng(np.random.SeedSequence(seed).spawn(3)[2])
    rng_source, rng_target = _streams(seed)

    mean_source = rng_params.normal(0.0, 0.5, dim)
    mean_target = mean_source + rng_params.choice([-1.0, 1.0], dim)
    cov_source = _random_covariance(rng_params, dim)
    cov_target = _random_covariance(rng_params, dim)

    x = rng_source.multivariate_normal(mean_source, cov_source, n_source)
    y = rng_target.multivariate_normal(mean_target, cov_target, n_target)
    params = GaussianPair(
        mean_source=mean_source,
        cov_source=cov_source,
        mean_target=mean_target,
        cov_target=cov_target,
        w2_squared=gaussian_w2_squared(mean_source, cov_source, mean_target, cov_target),
    )
    return x.astype(np.float32), y.astype(np.float32), params
