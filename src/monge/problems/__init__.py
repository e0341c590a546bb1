"""Problems: what to solve, independently of how.

- `linear`: `LinearProblem` (entropic, possibly unbalanced OT on a geometry), the
  default epsilon and the marginal checks every problem shares.
- `partial`: `PartialProblem` (transport a given mass).

Quadratic (Gromov-Wasserstein) and multi-marginal problems will join here.
"""

from monge.problems.linear import (
    DEFAULT_RELATIVE_EPSILON,
    LinearProblem,
    checked_marginals,
    default_epsilon,
)
from monge.problems.partial import PartialProblem

__all__ = [
    "LinearProblem",
    "PartialProblem",
    "DEFAULT_RELATIVE_EPSILON",
    "default_epsilon",
    "checked_marginals",
]
