import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest


def compile_log(fn) -> list[str]:
    """Run `fn()` with `jax.log_compiles` on; return every message JAX logged meanwhile
    (tests filter them, e.g. for "Compiling" and the jitted function's name)."""
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("jax")
    logger.addHandler(handler)
    try:
        with jax.log_compiles(True):
            fn()
    finally:
        logger.removeHandler(handler)
    return [r.getMessage() for r in records]


@pytest.fixture(scope="session")
def clouds():
    """Small uneven float64 NumPy clouds (n=7, m=11, d=3) with non-uniform weights."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 3))
    y = rng.normal(size=(11, 3)) + 0.7
    a = rng.uniform(0.5, 1.5, 7)
    b = rng.uniform(0.5, 1.5, 11)
    return x, y, a / a.sum(), b / b.sum()


def sqdist(x, y):
    """Independent squared Euclidean cost matrix in float64 (NumPy differences)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)


def central_difference(fun, z, h):
    """Central finite differences of a scalar `fun` at every entry of the array `z`."""
    out = np.zeros_like(z)
    for idx in np.ndindex(z.shape):
        e = np.zeros_like(z)
        e[idx] = h
        out[idx] = (float(fun(jnp.asarray(z + e))) - float(fun(jnp.asarray(z - e)))) / (2 * h)
    return out
