"""Solvers of quadratic (Gromov-Wasserstein) problems.

- `gromov`: entropic (fused, unbalanced) GW by mirror descent, `GromovWasserstein`.
"""

from monge.solvers.quadratic.gromov import GromovWasserstein

__all__ = ["GromovWasserstein"]
