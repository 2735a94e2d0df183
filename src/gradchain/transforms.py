"""Generic processing: ``scale``, ``scale_by_learning_rate``, ``add_decayed_weights``.

Building blocks that update rules (:mod:`gradchain.optim`) and users' chains share. They
output updates to be added to the params with :func:`~gradchain.apply_updates`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from gradchain import _checks, _ops
from gradchain._tree import Leaves
from gradchain.base import (
    EmptyState,
    GradientTransformation,
    Params,
    Updates,
    donation,
    expect_state,
)
from gradchain.schedules import Schedule

__all__ = [
    "ScalarOrSchedule",
    "ScaleByScheduleState",
    "scale",
    "scale_by_learning_rate",
    "add_decayed_weights",
]

ScalarOrSchedule = float | torch.Tensor | Schedule
"""A hyperparameter given as a float, a 0-dim tensor, or a schedule of the update count."""
TList = list[torch.Tensor]


# --------------------------------------------------------------------------- scale
def scale(step_size: float | torch.Tensor) -> GradientTransformation:
    """Multiply the updates by a constant.

    .. math:: u \\leftarrow \\mathrm{step\\_size}\\cdot u

    Args:
        step_size: a float or a 1-element tensor (differentiable: gradients flow to it).

    Returns:
        A stateless :class:`~gradchain.GradientTransformation` (state ``EmptyState()``).

    Example:
        >>> import torch, gradchain as gc
        >>> tx = gc.scale(-2.0)
        >>> tx.update({"w": torch.tensor([1.0, 2.0]), "b": None}, tx.init(None))[0]
        {'w': tensor([-2., -4.]), 'b': None}
    """
    factor = _checks.as_scalar(step_size, "step_size", "scale")
    _checks.finite(factor, "step_size", "scale")

    def init(params: Params) -> EmptyState:
        del params
        return EmptyState()

    def update(
        updates: Updates, state: EmptyState, params: Params | None = None, **extra: Any
    ) -> tuple[Updates, EmptyState]:
        del params
        donated, _ = donation(extra, "scale")
        view = Leaves(updates)
        return view.put(_scaled(view.values, factor, donated)), state

    return GradientTransformation(init, update)


def _scaled(gs: list[torch.Tensor], factor: float | torch.Tensor, donated: bool = False) -> TList:
    """``factor * g`` leafwise, ``factor`` cast per (device, dtype) group; in the donated
    ``gs``' memory when that gives the same values."""
    mul = _ops.mul_ if donated and _ops.inplace_ok(gs) else _ops.mul
    if not isinstance(factor, torch.Tensor):
        return mul(gs, factor)
    out: list[Any] = [None] * len(gs)
    for idx in _ops.groups(gs):
        group = _ops.pick(gs, idx)
        _ops.scatter(out, idx, mul(group, _ops.scalar_for(factor, group[0])))
    return out


# --------------------------------------------------------------------------- learning rate
class ScaleByScheduleState(NamedTuple):
    """State of :func:`scale_by_learning_rate` with a schedule.

    Attributes:
        count: int64 0-dim tensor, the number of updates already applied (the argument
            of the schedule at the next update).

    Example:
        >>> import torch, gradchain as gc
        >>> gc.scale_by_learning_rate(gc.constant_schedule(0.1)).init({"w": torch.zeros(1)})
        ScaleByScheduleState(count=tensor(0))
    """

    count: torch.Tensor  # type: ignore[assignment]  # shadows tuple.count, as in optax


def scale_by_learning_rate(
    learning_rate: ScalarOrSchedule, flip_sign: bool = True
) -> GradientTransformation:
    """Multiply the updates by ``-learning_rate`` (by ``learning_rate`` if not ``flip_sign``).

    .. math:: u \\leftarrow -\\eta_t\\, u, \\qquad \\eta_t = \\mathrm{lr}(t)
              \\text{ for a schedule, else } \\eta

    where ``t`` is the number of updates already applied (``0`` at the first update).

    Args:
        learning_rate: a float, a 1-element tensor (differentiable: gradients flow to it)
            or a schedule, i.e. a callable of the int64 0-dim count tensor returning a
            float or 0-dim tensor (see :mod:`gradchain.schedules`).
        flip_sign: negate, so that the result is a descent step to add to the params.

    Returns:
        A :class:`~gradchain.GradientTransformation`; its state is
        :class:`ScaleByScheduleState` for a schedule and ``EmptyState()`` otherwise.

    Example:
        >>> import torch, gradchain as gc
        >>> tx = gc.scale_by_learning_rate(gc.linear_schedule(1.0, 0.0, transition_steps=2))
        >>> params = {"w": torch.zeros(1)}
        >>> state = tx.init(params)
        >>> for _ in range(3):
        ...     updates, state = tx.update({"w": torch.ones(1)}, state, params)
        ...     print(updates["w"])
        tensor([-1.])
        tensor([-0.5000])
        tensor([-0.])
    """
    sign = -1.0 if flip_sign else 1.0
    if _checks.is_schedule(learning_rate):
        schedule: Callable[[torch.Tensor], Any] = learning_rate  # type: ignore[assignment]

        def init_s(params: Params) -> ScaleByScheduleState:
            return ScaleByScheduleState(count=_ops.zero_count(params))

        def update_s(
            updates: Updates,
            state: ScaleByScheduleState,
            params: Params | None = None,
            **extra: Any,
        ) -> tuple[Updates, ScaleByScheduleState]:
            del params
            expect_state(state, ScaleByScheduleState, "scale_by_learning_rate")
            donated, _ = donation(extra, "scale_by_learning_rate")
            lr = schedule(state.count)
            factor = lr * sign if isinstance(lr, torch.Tensor) else float(lr) * sign
            view = Leaves(updates)
            out = _scaled(view.values, factor, donated)
            return view.put(out), ScaleByScheduleState(count=_ops.safe_increment(state.count))

        return GradientTransformation(init_s, update_s)

    lr = _checks.as_scalar(learning_rate, "learning_rate", "scale_by_learning_rate")  # type: ignore[arg-type]
    _checks.finite(lr, "learning_rate", "scale_by_learning_rate")
    inner = scale(-lr if flip_sign else lr)
    return GradientTransformation(inner.init, inner.update)


# --------------------------------------------------------------------------- weight decay
def add_decayed_weights(weight_decay: float) -> GradientTransformation:
    """Add ``weight_decay * params`` to the updates.

    .. math:: u \\leftarrow u + \\lambda\\, p

    Placed before an optimizer it is L2 regularisation (``torch.optim.Adam``'s
    ``weight_decay``); placed after the direction and before
    :func:`scale_by_learning_rate` it is decoupled weight decay (``AdamW``).

    Args:
        weight_decay: the factor :math:`\\lambda`.

    Returns:
        A stateless :class:`~gradchain.GradientTransformation`. Its ``update`` needs
        ``params`` and raises ``ValueError`` without them.

    Example:
        >>> import torch, gradchain as gc
        >>> tx = gc.add_decayed_weights(0.1)
        >>> params = {"w": torch.tensor([10.0, 20.0])}
        >>> tx.update({"w": torch.ones(2)}, tx.init(params), params)[0]
        {'w': tensor([2., 3.])}
    """
    fn = "add_decayed_weights"
    weight_decay = _checks.as_float(weight_decay, "weight_decay", fn)
    _checks.finite(weight_decay, "weight_decay", fn)

    def init(params: Params) -> EmptyState:
        del params
        return EmptyState()

    def update(
        updates: Updates, state: EmptyState, params: Params | None = None, **extra: Any
    ) -> tuple[Updates, EmptyState]:
        donated, _ = donation(extra, fn)
        view = Leaves(updates)
        gs = view.values
        if not gs:
            # No gradient to decay (e.g. a partition member whose subset is empty: for a
            # single-leaf tree its params are then ``None`` too).
            return updates, state
        if params is None:
            raise ValueError(
                f"{fn}: params is None; weight decay needs the parameters, call "
                "tx.update(grads, state, params)"
            )
        ps = view.take(params, "params", dtype=False)
        add = _ops.add_ if donated and _ops.inplace_ok(gs, ps) else _ops.add
        out = _ops.cast(add(gs, ps, alpha=weight_decay), [g.dtype for g in gs])
        return view.put(out), state

    return GradientTransformation(init, update)
