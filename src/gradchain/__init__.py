"""gradchain: pure, composable gradient transformations for PyTorch.

The public API is re-exported here; see the modules for the details.
"""

from gradchain import checkpoint
from gradchain.adapter import ChainedOptimizer
from gradchain.base import (
    EmptyState,
    GradientTransformation,
    applied,
    apply_updates,
    apply_updates_,
    chain,
    chain_members,
    donation,
    gate_state,
    identity,
    is_gate,
    mark_gate,
)
from gradchain.clipping import ClipByNormState, clip_by_norm, clip_by_value
from gradchain.fused import update_and_apply_
from gradchain.gates import (
    AccumulateState,
    LossScaleState,
    SkipIfNonfiniteState,
    accumulate_every,
    loss_scale,
    scale_loss,
    skip_if_nonfinite,
)
from gradchain.optimizers import (
    ScaleByAdamState,
    ScaleByScheduleState,
    TraceState,
    adam,
    adamw,
    add_decayed_weights,
    scale,
    scale_by_adam,
    scale_by_learning_rate,
    sgd,
    trace,
)
from gradchain.partition import MaskedState, PartitionState, masked, partition
from gradchain.schedules import (
    constant_schedule,
    cosine_decay_schedule,
    exponential_decay,
    join_schedules,
    linear_schedule,
    step_decay,
    warmup_cosine_decay_schedule,
)
from gradchain.tree import from_state_dict, to_state_dict, tree_get

__version__ = "0.1.0"

__all__ = [
    "ChainedOptimizer",
    "checkpoint",
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
    "chain_members",
    "donation",
    "gate_state",
    "mark_gate",
    "from_state_dict",
    "MaskedState",
    "PartitionState",
    "masked",
    "partition",
    "identity",
    "is_gate",
    "to_state_dict",
    "tree_get",
    "ScaleByAdamState",
    "ScaleByScheduleState",
    "TraceState",
    "adam",
    "adamw",
    "add_decayed_weights",
    "scale",
    "scale_by_adam",
    "scale_by_learning_rate",
    "sgd",
    "trace",
    "update_and_apply_",
    "constant_schedule",
    "cosine_decay_schedule",
    "exponential_decay",
    "join_schedules",
    "linear_schedule",
    "step_decay",
    "warmup_cosine_decay_schedule",
]
