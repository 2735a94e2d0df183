"""gradchain: pure, composable gradient transformations for PyTorch.

The public API is re-exported here; see the modules for the details.
"""

# The former module paths load first: a submodule loaded later would set its name on this
# package and hide the function of the same name (``gradchain.partition``).
from gradchain import checkpoint, fused, optimizers, tree  # noqa: F401  (re-export modules)
from gradchain import partition as _partition_module  # noqa: F401
from gradchain.adapter import ChainedOptimizer
from gradchain.base import EmptyState, GradientTransformation, donation, identity, is_transformation
from gradchain.clipping import ClipByNormState, clip_by_norm, clip_by_value
from gradchain.combine import (
    MaskedState,
    PartitionState,
    chain,
    chain_members,
    masked,
    partition,
)
from gradchain.gates import (
    AccumulateState,
    LossScaleState,
    SkipIfNonfiniteState,
    accumulate_every,
    loss_scale,
    scale_loss,
    skip_if_nonfinite,
)
from gradchain.gating import applied, gate_state, is_gate, mark_gate
from gradchain.optim import (
    ScaleByAdamState,
    TraceState,
    adam,
    adamw,
    scale_by_adam,
    sgd,
    trace,
)
from gradchain.schedules import (
    constant_schedule,
    cosine_decay_schedule,
    exponential_decay,
    join_schedules,
    linear_schedule,
    step_decay,
    warmup_cosine_decay_schedule,
)
from gradchain.state import from_state_dict, to_state_dict, tree_get
from gradchain.transforms import (
    ScaleByScheduleState,
    add_decayed_weights,
    scale,
    scale_by_learning_rate,
)
from gradchain.update import apply_updates, apply_updates_, update_and_apply_

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
    "is_transformation",
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
