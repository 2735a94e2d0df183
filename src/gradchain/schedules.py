"""Learning-rate schedules: callables of the step count.

A schedule maps ``count``, the number of updates already applied (the first applied
update sees ``count == 0``, as in optax and ``torch.optim.lr_scheduler.LambdaLR``), to a
value. Pass one as ``lr`` to :func:`gradchain.sgd`, :func:`gradchain.adam`,
:func:`gradchain.adamw` or :func:`gradchain.scale_by_learning_rate`.

Every schedule here accepts

* a Python ``int``: the result is a Python ``float`` computed in double precision (handy
  for plotting and logging);
* an integer tensor (the int64 0-dim counter kept in a transformation's state, or a
  batch of them under ``torch.func.vmap``): the result is a **float32** tensor of the
  same shape on the same device. It is computed in float64 (float32 on devices without
  float64, e.g. ``mps``) and rounded once, so it matches the double-precision learning
  rates of ``torch.optim.lr_scheduler`` to float32 precision.

The tensor path uses only torch ops (``torch.where``, ``torch.clamp``, ...), never Python
branching on tensor values, so schedules run under ``torch.compile(fullgraph=True)`` and
``torch.func.vmap`` without host-device synchronization.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

__all__ = [
    "Schedule",
    "constant_schedule",
    "linear_schedule",
    "cosine_decay_schedule",
    "exponential_decay",
    "step_decay",
    "warmup_cosine_decay_schedule",
    "join_schedules",
]

Count = int | torch.Tensor
ScheduleValue = float | torch.Tensor
Schedule = Callable[[Count], ScheduleValue]
"""A callable of the step count returning a learning rate (float or 0-dim tensor)."""


# --------------------------------------------------------------------------- helpers
def _compute_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _as_float_tensor(count: Count) -> tuple[torch.Tensor, bool]:
    """``count`` as a float tensor for the maths, and whether the caller gave a tensor."""
    if isinstance(count, torch.Tensor):
        return count.to(_compute_dtype(count.device)), True
    if isinstance(count, bool) or not isinstance(count, int):
        raise TypeError(
            f"schedule: count must be an int or an integer tensor, got {type(count).__name__}"
        )
    return torch.tensor(float(count), dtype=torch.float64), False


def _finish(value: torch.Tensor, is_tensor: bool) -> ScheduleValue:
    if is_tensor:
        return value.to(torch.float32)
    return float(value)


def _check_nonneg_int(name: str, value: object, fn: str, positive: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{fn}: {name} must be an int, got {type(value).__name__}")
    if positive and value <= 0:
        raise ValueError(f"{fn}: {name} must be a positive int, got {value}")
    if value < 0:
        raise ValueError(f"{fn}: {name} must be a non-negative int, got {value}")
    return value


def _check_float(name: str, value: object, fn: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{fn}: {name} must be a float, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{fn}: {name} must be finite, got {value}")
    return float(value)


# --------------------------------------------------------------------------- schedules
def constant_schedule(value: float) -> Schedule:
    """The schedule that is ``value`` at every step.

    .. math:: \\mathrm{lr}(t) = \\mathrm{value}

    Args:
        value: the constant.

    Returns:
        A schedule (float for an ``int`` count, float32 tensor shaped like a tensor count).

    Example:
        >>> import torch, gradchain as gc
        >>> sched = gc.constant_schedule(0.1)
        >>> sched(7)
        0.1
        >>> sched(torch.tensor(7))
        tensor(0.1000)
    """
    value = _check_float("value", value, "constant_schedule")

    def schedule(count: Count) -> ScheduleValue:
        t, is_tensor = _as_float_tensor(count)
        return _finish(torch.full_like(t, value), is_tensor)

    return schedule


def linear_schedule(
    init_value: float, end_value: float, transition_steps: int, transition_begin: int = 0
) -> Schedule:
    """Linear interpolation from ``init_value`` to ``end_value`` (optax semantics).

    .. math::
        s = \\mathrm{clip}(t - \\mathrm{transition\\_begin}, 0, \\mathrm{transition\\_steps}),
        \\qquad
        \\mathrm{lr}(t) = \\mathrm{init} + (\\mathrm{end} - \\mathrm{init})
                          \\frac{s}{\\mathrm{transition\\_steps}}

    The value is ``init_value`` up to step ``transition_begin`` and ``end_value`` from step
    ``transition_begin + transition_steps`` on. ``transition_steps == 0`` gives the
    constant ``init_value`` (as optax does). ``torch.optim.lr_scheduler.LinearLR(
    start_factor, end_factor, total_iters)`` on a base lr ``b`` is
    ``linear_schedule(b * start_factor, b * end_factor, total_iters)``.

    Args:
        init_value: value at the start.
        end_value: value at the end.
        transition_steps: number of steps of the ramp (>= 0).
        transition_begin: number of steps at ``init_value`` before the ramp (>= 0).

    Returns:
        A schedule.

    Example:
        >>> import gradchain as gc
        >>> sched = gc.linear_schedule(1.0, 0.0, transition_steps=4, transition_begin=2)
        >>> [sched(t) for t in range(8)]
        [1.0, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    """
    fn = "linear_schedule"
    init_value = _check_float("init_value", init_value, fn)
    end_value = _check_float("end_value", end_value, fn)
    transition_steps = _check_nonneg_int("transition_steps", transition_steps, fn)
    transition_begin = _check_nonneg_int("transition_begin", transition_begin, fn)
    if transition_steps == 0:
        return constant_schedule(init_value)

    def schedule(count: Count) -> ScheduleValue:
        t, is_tensor = _as_float_tensor(count)
        s = torch.clamp(t - transition_begin, 0.0, float(transition_steps))
        frac = 1.0 - s / transition_steps
        return _finish((init_value - end_value) * frac + end_value, is_tensor)

    return schedule


def cosine_decay_schedule(init_value: float, decay_steps: int, alpha: float = 0.0) -> Schedule:
    """Cosine decay from ``init_value`` to ``alpha * init_value`` over ``decay_steps``.

    .. math::
        s = \\min(t, \\mathrm{decay\\_steps}), \\qquad
        \\mathrm{lr}(t) = \\mathrm{init}\\left((1 - \\alpha)\\,
            \\tfrac12\\left(1 + \\cos\\tfrac{\\pi s}{\\mathrm{decay\\_steps}}\\right)
            + \\alpha\\right)

    The value stays at ``alpha * init_value`` after ``decay_steps`` (optax semantics;
    ``torch.optim.lr_scheduler.CosineAnnealingLR(T_max, eta_min)`` is the same up to
    ``T_max`` with ``alpha = eta_min / base_lr``, but rises again after it).

    Args:
        init_value: value at step 0.
        decay_steps: number of steps of the decay (> 0).
        alpha: final value as a fraction of ``init_value``.

    Returns:
        A schedule.

    Example:
        >>> import gradchain as gc
        >>> sched = gc.cosine_decay_schedule(1.0, decay_steps=4, alpha=0.1)
        >>> [round(sched(t), 4) for t in range(6)]
        [1.0, 0.8682, 0.55, 0.2318, 0.1, 0.1]
    """
    fn = "cosine_decay_schedule"
    init_value = _check_float("init_value", init_value, fn)
    decay_steps = _check_nonneg_int("decay_steps", decay_steps, fn, positive=True)
    alpha = _check_float("alpha", alpha, fn)

    def schedule(count: Count) -> ScheduleValue:
        t, is_tensor = _as_float_tensor(count)
        s = torch.clamp(t, max=float(decay_steps))
        cosine = 0.5 * (1.0 + torch.cos(math.pi * s / decay_steps))
        return _finish(init_value * ((1.0 - alpha) * cosine + alpha), is_tensor)

    return schedule


def exponential_decay(
    init_value: float,
    decay_rate: float,
    transition_steps: int = 1,
    staircase: bool = False,
    end_value: float | None = None,
) -> Schedule:
    """Exponential decay ``init_value * decay_rate ** (t / transition_steps)`` (optax semantics).

    .. math::
        p = \\frac{t}{\\mathrm{transition\\_steps}}
            \\;(\\lfloor\\cdot\\rfloor \\text{ if staircase}),\\qquad
        \\mathrm{lr}(t) = \\mathrm{init}\\cdot \\mathrm{decay\\_rate}^{p}

    clipped from below at ``end_value`` when ``decay_rate < 1`` (from above when
    ``decay_rate > 1``). ``torch.optim.lr_scheduler.ExponentialLR(gamma)`` on base lr ``b``
    is ``exponential_decay(b, gamma)``.

    Args:
        init_value: value at step 0.
        decay_rate: factor per ``transition_steps`` steps (> 0).
        transition_steps: number of steps per factor of ``decay_rate`` (> 0).
        staircase: decay in discrete jumps every ``transition_steps`` steps.
        end_value: optional bound the value does not cross.

    Returns:
        A schedule.

    Example:
        >>> import gradchain as gc
        >>> sched = gc.exponential_decay(1.0, 0.5, transition_steps=2, staircase=True)
        >>> [sched(t) for t in range(6)]
        [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
        >>> gc.exponential_decay(1.0, 0.5, end_value=0.2)(10)
        0.2
    """
    fn = "exponential_decay"
    init_value = _check_float("init_value", init_value, fn)
    decay_rate = _check_float("decay_rate", decay_rate, fn)
    if decay_rate <= 0:
        raise ValueError(f"{fn}: decay_rate must be > 0, got {decay_rate}")
    transition_steps = _check_nonneg_int("transition_steps", transition_steps, fn, positive=True)
    if end_value is not None:
        end_value = _check_float("end_value", end_value, fn)

    def schedule(count: Count) -> ScheduleValue:
        t, is_tensor = _as_float_tensor(count)
        p = t / transition_steps
        if staircase:
            p = torch.floor(p)
        value = init_value * torch.pow(decay_rate, p)
        if end_value is not None:
            if decay_rate < 1.0:
                value = torch.clamp(value, min=end_value)
            else:
                value = torch.clamp(value, max=end_value)
        return _finish(value, is_tensor)

    return schedule


def step_decay(init_value: float, step_size: int, gamma: float = 0.1) -> Schedule:
    """Multiply by ``gamma`` every ``step_size`` steps (``torch.optim.lr_scheduler.StepLR``).

    .. math:: \\mathrm{lr}(t) = \\mathrm{init}\\cdot\\gamma^{\\lfloor t / \\mathrm{step\\_size}\\rfloor}

    Args:
        init_value: value at step 0 (StepLR's base lr).
        step_size: period of the decay in steps (> 0).
        gamma: factor applied every ``step_size`` steps.

    Returns:
        A schedule.

    Example:
        >>> import gradchain as gc
        >>> sched = gc.step_decay(1.0, step_size=2, gamma=0.5)
        >>> [sched(t) for t in range(5)]
        [1.0, 1.0, 0.5, 0.5, 0.25]
    """
    fn = "step_decay"
    init_value = _check_float("init_value", init_value, fn)
    step_size = _check_nonneg_int("step_size", step_size, fn, positive=True)
    gamma = _check_float("gamma", gamma, fn)

    def schedule(count: Count) -> ScheduleValue:
        t, is_tensor = _as_float_tensor(count)
        k = torch.floor(t / step_size)
        return _finish(init_value * torch.pow(gamma, k), is_tensor)

    return schedule


def join_schedules(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Schedule:
    """Run ``schedules`` one after another, switching at ``boundaries`` (optax semantics).

    With boundaries ``b_1 < b_2 < ...``, schedule ``i`` (0-based) is used for
    ``b_i <= t < b_{i+1}`` and is called with ``t - b_i`` (``b_0 = 0``), so each schedule
    starts from its own step 0.

    Args:
        schedules: the schedules, ``len(boundaries) + 1`` of them. User schedules may
            return floats or 0-dim tensors; for tensor counts they must use torch ops.
        boundaries: non-decreasing non-negative ints.

    Returns:
        A schedule.

    Example:
        >>> import gradchain as gc
        >>> sched = gc.join_schedules(
        ...     [gc.constant_schedule(1.0), gc.linear_schedule(1.0, 0.0, 2)], boundaries=[3]
        ... )
        >>> [sched(t) for t in range(6)]
        [1.0, 1.0, 1.0, 1.0, 0.5, 0.0]
    """
    fn = "join_schedules"
    schedules = list(schedules)
    boundaries = [_check_nonneg_int("boundaries[i]", b, fn) for b in boundaries]
    if len(schedules) != len(boundaries) + 1:
        raise ValueError(
            f"{fn}: expected len(schedules) == len(boundaries) + 1, got {len(schedules)} "
            f"schedules and {len(boundaries)} boundaries"
        )
    if any(b2 < b1 for b1, b2 in zip(boundaries, boundaries[1:])):
        raise ValueError(f"{fn}: boundaries must be non-decreasing, got {boundaries}")
    for i, s in enumerate(schedules):
        if not callable(s):
            raise TypeError(f"{fn}: schedules[{i}] must be callable, got {type(s).__name__}")

    def schedule(count: Count) -> ScheduleValue:
        if not isinstance(count, torch.Tensor):
            _as_float_tensor(count)  # validates the type
            index = sum(1 for b in boundaries if count >= b)
            start = boundaries[index - 1] if index else 0
            return float(schedules[index](count - start))
        out = torch.as_tensor(schedules[0](count), dtype=torch.float32, device=count.device)
        for b, s in zip(boundaries, schedules[1:]):
            # Clamped so that a schedule never sees a negative count, even in the branch
            # that torch.where discards (e.g. 1 / sqrt(count) would give nan there).
            shifted = torch.clamp(count - b, min=0)
            value = torch.as_tensor(s(shifted), dtype=torch.float32, device=count.device)
            out = torch.where(count < b, out, value)
        return out

    return schedule


def warmup_cosine_decay_schedule(
    init_value: float,
    peak_value: float,
    warmup_steps: int,
    decay_steps: int,
    end_value: float = 0.0,
) -> Schedule:
    """Linear warmup from ``init_value`` to ``peak_value``, then cosine decay to ``end_value``.

    .. math::
        \\mathrm{lr}(t) = \\begin{cases}
            \\mathrm{init} + (\\mathrm{peak} - \\mathrm{init})\\,t / w & t < w \\\\
            \\mathrm{end} + (\\mathrm{peak} - \\mathrm{end})\\,\\tfrac12\\left(1 +
                \\cos\\tfrac{\\pi \\min(t - w,\\, D - w)}{D - w}\\right) & t \\ge w
        \\end{cases}

    with ``w = warmup_steps`` and ``D = decay_steps``. As in optax, ``decay_steps`` counts
    the whole schedule *including* the warmup, and the value stays at ``end_value`` after.

    Args:
        init_value: value at step 0.
        peak_value: value at the end of the warmup.
        warmup_steps: steps of linear warmup (>= 0).
        decay_steps: total steps of warmup plus decay (> ``warmup_steps``).
        end_value: final value.

    Returns:
        A schedule.

    Example:
        >>> import gradchain as gc
        >>> sched = gc.warmup_cosine_decay_schedule(0.0, 1.0, warmup_steps=2, decay_steps=6)
        >>> [round(sched(t), 4) for t in range(8)]
        [0.0, 0.5, 1.0, 0.8536, 0.5, 0.1464, 0.0, 0.0]
    """
    fn = "warmup_cosine_decay_schedule"
    init_value = _check_float("init_value", init_value, fn)
    peak_value = _check_float("peak_value", peak_value, fn)
    end_value = _check_float("end_value", end_value, fn)
    warmup_steps = _check_nonneg_int("warmup_steps", warmup_steps, fn)
    decay_steps = _check_nonneg_int("decay_steps", decay_steps, fn)
    if decay_steps <= warmup_steps:
        raise ValueError(
            f"{fn}: decay_steps (total steps, warmup included) must be > warmup_steps, "
            f"got decay_steps={decay_steps}, warmup_steps={warmup_steps}"
        )
    cosine_steps = decay_steps - warmup_steps

    def cosine(count: Count) -> ScheduleValue:
        # Written without alpha = end / peak so that peak_value == 0 is fine.
        t, is_tensor = _as_float_tensor(count)
        s = torch.clamp(t, max=float(cosine_steps))
        c = 0.5 * (1.0 + torch.cos(math.pi * s / cosine_steps))
        return _finish(end_value + (peak_value - end_value) * c, is_tensor)

    if warmup_steps == 0:
        return cosine
    warmup = linear_schedule(init_value, peak_value, warmup_steps)
    return join_schedules([warmup, cosine], [warmup_steps])
