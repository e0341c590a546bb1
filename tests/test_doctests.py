"""The examples in the docstrings run and print what they say."""

import doctest
import importlib

import pytest

MODULES = [
    "monge.costs",
    "monge.geometry",
    "monge.front",
    "monge.solvers.linear.sinkhorn",
    "monge.solvers.linear.initializers",
    "monge.solvers.linear.exact",
    "monge.solvers.linear.auction",
    "monge.solvers.linear.partial",
    "monge.solvers.linear.smooth",
    "monge.solvers.linear.sparse",
    "monge.solvers.linear.lowrank",
    "monge.tools.divergence",
    "monge.tools.univariate",
    "monge.tools.sliced",
    "monge.tools.semidiscrete",
    "monge.tools.prw",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    # import_module, not attribute access: monge.tools.semidiscrete is also a function
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0
