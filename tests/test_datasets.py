import doctest
import math

import numpy as np
import pytest

from monge import datasets


def test_shapes_sizes_dtype_and_scale():
    x, y = datasets.shapes(30, 41, seed=0)
    assert x.shape == (30, 2) and y.shape == (41, 2)
    assert x.dtype == np.float32 and y.dtype == np.float32
    assert np.all(np.isfinite(x)) and np.all(np.isfinite(y))
    # unit-ish: both clouds within a few units of the origin, comparable spreads
    assert np.abs(x).max() < 1.5 and np.abs(y).max() < 1.5
    assert 0.3 < y.std() / x.std() < 1.5


def test_shapes_is_deterministic_and_seeded():
    x1, y1 = datasets.shapes(30, 41, seed=3)
    x2, y2 = datasets.shapes(30, 41, seed=3)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    x3, y3 = datasets.shapes(30, 41, seed=4)
    assert not np.allclose(x1, x3) and not np.allclose(y1, y3)


def test_shapes_target_does_not_depend_on_source_size():
    _, y1 = datasets.shapes(30, 41, seed=0)
    _, y2 = datasets.shapes(7, 41, seed=0)
    np.testing.assert_array_equal(y1, y2)


def test_shapes_without_noise_is_a_unit_ring_and_two_moons():
    x, y = datasets.shapes(30, 41, seed=0, noise=0.0)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-6)
    # undo the centring/scaling: each moon lies on a unit circle
    moons = y / 0.6 + np.array([0.5, 0.25])
    upper, lower = moons[:21], moons[21:]
    np.testing.assert_allclose(np.linalg.norm(upper, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(lower - [1.0, 0.5], axis=1), 1.0, rtol=1e-5)
    assert np.all(upper[:, 1] >= -1e-6) and np.all(lower[:, 1] <= 0.5 + 1e-6)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"n_source": 0}, r"shapes\(n_source=\.\.\.\)` must be a positive integer, got 0"),
        ({"n_target": -2}, r"n_target=\.\.\.\)` must be a positive integer, got -2: .*=400"),
        ({"n_source": 2.5}, r"n_source.*got 2\.5"),
        ({"n_source": True}, r"n_source.*got True"),
        ({"seed": -1}, r"shapes\(seed=\.\.\.\)` must be a non-negative integer, got -1"),
        ({"seed": "0"}, r"seed.*got '0'"),
        ({"noise": -0.1}, r"noise=\.\.\.\)` must be a finite number >= 0, got -0\.1"),
        ({"noise": math.nan}, r"noise.*got nan"),
    ],
)
def test_shapes_rejects_bad_arguments(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        datasets.shapes(**kwargs)


def test_gaussians_shapes_and_parameters():
    x, y, params = datasets.gaussians(30, 41, dim=3, seed=1)
    assert x.shape == (30, 3) and y.shape == (41, 3)
    assert x.dtype == np.float32 and y.dtype == np.float32
    assert params.mean_source.shape == (3,) and params.cov_target.shape == (3, 3)
    for cov in (params.cov_source, params.cov_target):
        np.testing.assert_allclose(cov, cov.T)
        assert np.linalg.eigvalsh(cov).min() >= 0.25 - 1e-12
    x2, y2, params2 = datasets.gaussians(30, 41, dim=3, seed=1)
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    assert params.w2_squared == params2.w2_squared


def test_gaussians_samples_follow_their_parameters():
    x, y, params = datasets.gaussians(4000, 5000, dim=2, seed=0)
    np.testing.assert_allclose(x.mean(0), params.mean_source, atol=0.06)
    np.testing.assert_allclose(y.mean(0), params.mean_target, atol=0.06)
    np.testing.assert_allclose(np.cov(x.T), params.cov_source, atol=0.08)
    np.testing.assert_allclose(np.cov(y.T), params.cov_target, atol=0.08)


def test_gaussian_w2_closed_form_matches_commuting_case():
    # diagonal covariances: W2^2 = |m0 - m1|^2 + sum (sqrt(s0) - sqrt(s1))^2
    s0, s1 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    m0, m1 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    expected = np.sum((m0 - m1) ** 2) + np.sum((np.sqrt(s0) - np.sqrt(s1)) ** 2)
    value = datasets.gaussian_w2_squared(m0, np.diag(s0), m1, np.diag(s1))
    assert value == pytest.approx(expected, rel=1e-12)
    # invariant under a common rotation of both covariances
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((3, 3)))
    c0, c1 = q @ np.diag(s0) @ q.T, q @ np.diag(s1) @ q.T
    rotated = datasets.gaussian_w2_squared(q @ m0, c0, q @ m1, c1)
    assert rotated == pytest.approx(expected, rel=1e-9)


def test_gaussians_w2_is_close_to_exact_ot_of_samples():
    ot = pytest.importorskip("ot")
    x, y, params = datasets.gaussians(400, 400, dim=2, seed=0)
    sample = ot.emd2([], [], ot.dist(x.astype(np.float64), y.astype(np.float64)))
    assert sample == pytest.approx(params.w2_squared, rel=0.15)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"dim": 0}, r"gaussians\(dim=\.\.\.\)` must be a positive integer, got 0"),
        ({"n_target": 1.0}, r"gaussians\(n_target=\.\.\.\)`.*got 1\.0"),
        ({"seed": -3}, r"gaussians\(seed=\.\.\.\)`.*got -3"),
    ],
)
def test_gaussians_rejects_bad_arguments(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        datasets.gaussians(**kwargs)


def test_docstring_examples_run():
    result = doctest.testmod(datasets)
    assert result.attempted > 0 and result.failed == 0
