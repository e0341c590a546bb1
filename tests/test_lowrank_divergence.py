"""The debiased low-rank divergence (`monge.tools.lowrank_divergence`) against closed
forms: zero on identical inputs, |t|^2 between a cloud and its translate (the squared
Euclidean cost of a coupling with equal marginals moves by exactly |t|^2), and the
gradient of that value in the translation, 2t."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import monge

RANK = 3


@pytest.fixture(scope="module")
def cloud():
    rng = np.random.default_rng(4)
    return rng.normal(size=(29, 2)).astype(np.float32)


def test_divergence_of_a_measure_with_itself_is_zero(cloud):
    out = monge.tools.lowrank_divergence(cloud, cloud, rank=RANK)
    assert bool(out.converged)
    assert abs(float(out.value)) <= 1e-6 * float(out.solutions[1].reg_cost)


def test_divergence_of_a_translate_is_the_squared_shift(cloud):
    t = np.array([1.5, -0.5], np.float32)
    out = monge.tools.lowrank_divergence(cloud, cloud + t, rank=RANK)
    assert bool(out.converged)
    # the biased value LOT(x, x + t) = LOT(x, x) + |t|^2 > |t|^2: debiasing removes it
    assert float(out.solutions[0].reg_cost) > float(t @ t) * 1.05
    np.testing.assert_allclose(float(out.value), float(t @ t), rtol=2e-2)


def test_gradient_in_the_translation_is_twice_the_shift(cloud):
    t = jnp.array([1.5, -0.5])

    def value(t):
        return monge.tools.lowrank_divergence(cloud, cloud + t, rank=RANK).value

    np.testing.assert_allclose(np.asarray(jax.grad(value)(t)), 2 * np.asarray(t), rtol=3e-2)


def test_solver_of_another_rank_is_an_error(cloud):
    with pytest.raises(ValueError, match="differs from `rank=3`"):
        monge.tools.lowrank_divergence(cloud, cloud, rank=RANK,
                                       solver=monge.LowRankSinkhorn(rank=2))


def test_unbalanced_divergence_is_finite_and_zero_on_itself(cloud):
    out = monge.tools.lowrank_divergence(cloud, cloud, rank=RANK, tau_a=0.9, tau_b=0.9)
    assert bool(out.converged) and abs(float(out.value)) <= 1e-6
    far = monge.tools.lowrank_divergence(cloud, cloud + 3.0, rank=RANK, tau_a=0.9, tau_b=0.9)
    assert bool(far.converged) and float(far.value) > 0
