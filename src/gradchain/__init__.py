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
from gradchain.clipping import ClipByNormState, clip_by_norm, clip_by_value
from gradchain.gates import (
    AccumulateState,
    LossScaleState,
    SkipIfNonfiniteState,
    accumulate_every,
    loss_scale,
    scale_loss,
    skip_if_nonfinite,
)
from gradchain.partition import MaskedState, PartitionState, masked, partition
from gradchain.tree import from_state_dict, to_state_dict, tree_get

__version__ = "0.1.0"

__all__ = [
    "AccumulateState",
    "ClipByNormState",
    "LossScaleState",
    "SkipIfNonfiniteState",
    "accumulate_every",
    "clip_by_norm",
    "clip_by_value",
    "loss_scale",
    "scale_loss",
    "skip_if_nonfinite",
    "EmptyState",
    "GradientTransformation",
    "applied",
    "apply_updates",
    "apply_updates_",
    "chain",
    "from_state_dict",
    "MaskedState",
    "PartitionState",
    "masked",
    "partition",
    "identity",
    "is_gate",
    "to_state_dict",
    "tree_get",
]
