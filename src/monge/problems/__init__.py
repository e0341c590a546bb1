"""Problems: what to solve, independently of how.

- `linear`: `LinearProblem` (entropic, possibly unbalanced OT on a geometry), the
  default epsilon and the marginal checks every problem shares.
- `partial`: `PartialProblem` (transport a given mass).
- `quadratic`: `QuadraticProblem` (fused, entropic, unbalanced Gromov-Wasserstein).

Multi-marginal problems will join here.
"""

from monge.problems.linear import (
    DEFAULT_RELATIVE_EPSILON,
    LinearProblem,
    checked_marginals,
    default_epsilon,
)
from monge.problems.partial import PartialProblem
from monge.problems.quadratic import QuadraticProblem

__all__ = [
    "LinearProblem",
    "PartialProblem",
    "QuadraticProblem",
    "DEFAULT_RELATIVE_EPSILON",
    "default_epsilon",
    "checked_marginals",
]
