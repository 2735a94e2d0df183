"""Property-test gradient transformations: hypothesis strategies and law checks.

``check_transformation(tx)`` runs a transformation on many drawn params and gradient
trees and checks the laws of gradchain's protocol (purity, determinism, structure,
state as data, ``None`` pass-through, unknown keyword arguments; opt-in ``vmap``,
``torch.compile`` and chain laws). ``strategies`` has the hypothesis strategies it uses,
for your own properties.

This subpackage needs `hypothesis <https://hypothesis.readthedocs.io>`_, which the core
package does not: ``pip install "gradchain[testing]"`` (or ``pip install hypothesis``).

Example:
    >>> import torch, gradchain as gc
    >>> from gradchain.testing import check_transformation
    >>> check_transformation(gc.clip_by_norm(1.0), max_examples=5)
"""

from __future__ import annotations

try:
    import hypothesis  # noqa: F401
except ImportError as err:  # pragma: no cover - exercised only without hypothesis
    raise ImportError(
        "gradchain.testing needs hypothesis: pip install 'gradchain[testing]' "
        "(or pip install hypothesis)"
    ) from err

from gradchain.testing import strategies
from gradchain.testing.laws import (
    DEFAULT_LAWS,
    LAWS,
    Example,
    LawViolation,
    check_transformation,
)

__all__ = [
    "DEFAULT_LAWS",
    "LAWS",
    "Example",
    "LawViolation",
    "check_transformation",
    "strategies",
]
