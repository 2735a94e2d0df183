"""Temporary bridge to today's module layout (until the core re-cut lands).

After the re-cut these names come from ``gradchain.base``, ``gradchain.transforms``,
``gradchain._ops``, ``gradchain._checks`` and ``gradchain._tree``; this module then goes.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from gradchain.base import EmptyState, GradientTransformation, chain, donation
from gradchain.base import _expect_state as expect_state
from gradchain.optimizers import (
    ScaleByScheduleState,
    TraceState,
    add_decayed_weights,
    scale,
    scale_by_learning_rate,
    trace,
)
from gradchain.optimizers import _acc_dtype as acc_dtype
from gradchain.optimizers import _as_scalar as as_scalar
from gradchain.optimizers import _buffers_like as buffers_like
from gradchain.optimizers import _check_betas as check_betas
from gradchain.optimizers import _check_bool as as_bool
from gradchain.optimizers import _check_finite as finite
from gradchain.optimizers import _check_lr as check_lr
from gradchain.optimizers import _check_nonneg as nonneg
from gradchain.optimizers import _first_device as first_device
from gradchain.optimizers import _groups as groups
from gradchain.optimizers import _is_schedule as is_schedule
from gradchain.optimizers import _next_count as safe_increment
from gradchain.optimizers import _pick as pick
from gradchain.optimizers import _scalar_dtype as scalar_dtype
from gradchain.optimizers import _scalar_for as scalar_for
from gradchain.optimizers import _scatter as scatter
from gradchain.optimizers import _zero_count as zero_count
from gradchain.tree import Leaves, flatten, leaf_paths, unflatten
from gradchain.tree import _known_bool as known_bool

__all__ = [
    "EmptyState", "GradientTransformation", "Leaves", "ScaleByScheduleState", "TraceState",
    "acc_dtype", "add_decayed_weights", "as_bool", "as_scalar", "buffers_like", "chain",
    "check_betas", "check_lr", "donation", "expect_state", "finite", "first_device", "flatten", "groups", "in_range",
    "is_schedule", "known_bool", "leaf_paths", "nonneg", "pick", "safe_increment", "scale",
    "scale_by_learning_rate", "scalar_dtype", "scalar_for", "scatter", "state_scalar_dtype",
    "trace", "unflatten", "zero_count", "real",
]


def real(value: Any, name: str, who: str) -> float:
    """A finite-or-not Python float hyperparameter (bools and tensors refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{who}: {name} must be a float, got {type(value).__name__}")
    return float(value)


def in_range(
    value: Any, name: str, who: str, lo: float = -math.inf, hi: float = math.inf,
    lo_open: bool = False, hi_open: bool = False,
) -> float:
    """``value`` as a float checked against ``lo <= value <= hi`` (``<`` where open),
    the message naming the function, the argument, the value and the expected range."""
    v = real(value, name, who)
    ok = (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)
    if not ok:
        left = "" if lo == -math.inf else f"{lo:g} {'<' if lo_open else '<='} "
        right = "" if hi == math.inf else f" {'<' if hi_open else '<='} {hi:g}"
        raise ValueError(f"{who}: invalid {name}={v!r}; expected {left}{name}{right}")
    return v


def state_scalar_dtype() -> torch.dtype:
    """The dtype torch.optim gives its per-parameter scalar state (``step``, NAdam's
    ``mu_product``, ASGD's ``eta`` and ``mu``): float64 when the default dtype is float64,
    else float32 (``torch.optim.optimizer._get_scalar_dtype``). Rules that keep such a
    scalar in their state use it, so that they round it exactly as torch does."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
