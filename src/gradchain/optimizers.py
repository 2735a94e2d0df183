"""Former home of the update rules and building blocks, kept as a re-export: the rules
now live in :mod:`gradchain.optim` (one module per algorithm) and the generic blocks in
:mod:`gradchain.transforms`."""

from gradchain.optim import ScaleByAdamState, TraceState, adam, adamw, scale_by_adam, sgd, trace
from gradchain.transforms import (
    ScaleByScheduleState,
    add_decayed_weights,
    scale,
    scale_by_learning_rate,
)

__all__ = [
    "ScaleByScheduleState",
    "ScaleByAdamState",
    "TraceState",
    "scale",
    "scale_by_learning_rate",
    "scale_by_adam",
    "trace",
    "add_decayed_weights",
    "sgd",
    "adam",
    "adamw",
]
