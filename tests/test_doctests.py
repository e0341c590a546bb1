"""The examples in the docstrings run and print what they say."""

import doctest

import pytest

import monge.costs
import monge.front
import monge.geometry
import monge.solvers.sinkhorn

MODULES = [monge.costs, monge.geometry, monge.front, monge.solvers.sinkhorn]


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{module.__name__} has no examples"
    assert result.failed == 0
