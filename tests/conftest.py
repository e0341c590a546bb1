import numpy as np
import pytest


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
