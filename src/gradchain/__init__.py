"""gradchain: pure, composable gradient transformations for PyTorch.

The public API is re-exported here; see the modules for the details.
"""

from gradchain.base import (
    EmptyState,
    GradientTransformation,
    applied,
    apply_updates,
    apply_updates_,
    chain,
    identity,
    is_gate,
)
from gradchain.tree import from_state_dict, to_state_dict, tree_get

__version__ = "0.1.0"

__all__ = [
    "EmptyState",
    "GradientTransformation",
    "applied",
    "apply_updates",
    "apply_updates_",
    "chain",
    "from_state_dict",
    "identity",
    "is_gate",
    "to_state_dict",
    "tree_get",
]
