"""Learning-rate schedules: callables of the step count, with optax's names and semantics.

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
  rates of ``torch.optim.lr_scheduler`` and of optax (with ``jax_enable_x64``) to float32
  precision.

The tensor path uses only torch ops (``torch.where``, ``torch.clamp``, ...), never Python
branching on tensor values, so schedules run under ``torch.compile(fullgraph=True)`` and
``torch.func.vmap`` without host-device synchronization.

**Names, argument order and values follow optax** (``optax.schedules``; each schedule is
tested against optax over its whole range and at its boundaries, in float64). Two kinds of
deliberate difference, both loud:

* arguments optax accepts and quietly turns into something else raise here: a negative
  ``transition_steps`` or ``transition_begin`` (optax: a constant schedule, or a begin of
  0), a zero ``decay_rate`` (optax: constant), a non-positive ``power`` or ``exponent``;
* values a learning rate cannot take raise, naming the argument: a negative
  ``init_value``, ``peak_value``, ``end_value`` or ``value`` (optax would silently give a
  negative learning rate, i.e. gradient *ascent*). Use :func:`gradchain.scale` for a
  signed factor.

``exponential_decay``'s positional order is optax's, ``(init_value, transition_steps,
decay_rate)``; gradchain 0.1 had ``(init_value, decay_rate, transition_steps)`` (see the
changelog). A float passed where ``transition_steps`` now stands raises ``TypeError``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from gradchain import _checks
from gradchain._ops import scalar_dtype

__all__ = [
    "Schedule",
    "constant_schedule",
    "polynomial_schedule",
    "linear_schedule",
    "piecewise_constant_schedule",
    "piecewise_interpolate_schedule",
    "exponential_decay",
    "step_decay",
    "cosine_decay_schedule",
    "warmup_constant_schedule",
    "warmup_cosine_decay_schedule",
    "warmup_exponential_decay_schedule",
    "sgdr_schedule",
    "linear_onecycle_schedule",
    "cosine_onecycle_schedule",
    "join_schedules",
]

Count = int | torch.Tensor
ScheduleValue = float | torch.Tensor
Schedule = Callable[[Count], ScheduleValue]
"""A callable of the step count returning a learning rate (float or 0-dim tensor)."""


# --------------------------------------------------------------------------- helpers
def _as_float_tensor(count: Count) -> tuple[torch.Tensor, bool]:
    """``count`` as a float tensor for the maths, and whether the caller gave a tensor."""
    if isinstance(count, torch.Tensor):
        return count.to(scalar_dtype(count.device)), True
    if isinstance(count, bool) or not isinstance(count, int):
        raise TypeError(
            f"schedule: count must be an int or an integer tensor, got {type(count).__name__}"
        )
    return torch.tensor(float(count), dtype=torch.float64), False


def _finish(value: torch.Tensor, is_tensor: bool) -> ScheduleValue:
    if is_tensor:
        return value.to(torch.float32)
    return float(value)


def _check_nonneg_int(
    name: str, value: object, fn: str, positive: bool = False, hint: str = ""
) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{fn}: {name} must be an int, got {type(value).__name__} {value!r}{hint}")
    if positive and value <= 0:
        raise ValueError(f"{fn}: {name} must be a positive int, got {value}")
    if value < 0:
        raise ValueError(f"{fn}: {name} must be a non-negative int, got {value}")
    return value


def _check_float(name: str, value: object, fn: str) -> float:
    v = _checks.as_float(value, name, fn)
    _checks.finite(v, name, fn)
    return v


def _check_value(name: str, value: object, fn: str) -> float:
    """A learning-rate value: finite and >= 0 (optax would accept a negative one silently)."""
    v = _check_float(name, value, fn)
    if v < 0:
        raise ValueError(
            f"{fn}: {name} must be >= 0, got {v}: a schedule gives learning rates, and a "
            "negative one would step up the loss (use gradchain.scale for a signed factor)"
        )
    return v


def _check_positive(name: str, value: object, fn: str) -> float:
    v = _check_float(name, value, fn)
    if not v > 0:
        raise ValueError(f"{fn}: {name} must be > 0, got {v}")
    return v


def _check_fraction(name: str, value: object, fn: str) -> float:
    v = _check_float(name, value, fn)
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"{fn}: {name} must be in [0, 1], got {v}")
    return v


def _check_scales(boundaries_and_scales: object, fn: str) -> list[tuple[int, float]]:
    """``{step: scale}`` as sorted ``(step, scale)`` pairs; steps >= 0, scales >= 0."""
    if boundaries_and_scales is None:
        return []
    if not isinstance(boundaries_and_scales, Mapping):
        raise TypeError(
            f"{fn}: boundaries_and_scales must be a dict {{step: scale}}, "
            f"got {type(boundaries_and_scales).__name__}"
        )
    pairs = []
    for step, scale in boundaries_and_scales.items():
        _check_nonneg_int(f"boundaries_and_scales key {step!r}", step, fn)
        s = _check_float(f"boundaries_and_scales[{step}]", scale, fn)
        if s < 0:
            raise ValueError(f"{fn}: boundaries_and_scales[{step}] must be >= 0, got {s}")
        pairs.append((step, s))
    return sorted(pairs)


# --------------------------------------------------------------------------- schedules
def constant_schedule(value: float) -> Schedule:
    """The schedule that is ``value`` at every step.

    .. math:: \\mathrm{lr}(t) = \\mathrm{value}

    Args:
        value: the constant (>= 0).

    Returns:
        A schedule (float for an ``int`` count, float32 tensor shaped like a tensor count).

    Raises:
        ValueError: ``value`` is negative or not finite.

    Example:
        >>> import torch, gradchain as gc
        >>> sched = gc.constant_schedule(0.1)
        >>> sched(7)
        0.1
        >>> sched(torch.tensor(7))
        tensor(0.1000)
    """
    value = _check_value("value", value, "constant_schedule")

    def schedule(count: Count) -> ScheduleValue:
        t, is_tensor = _as_float_tensor(count)
        return _finish(torch.full_like(t, value), is_tensor)

    return schedule


def _polynomial(
    fn: str,
    init_value: float,
    end_value: float,
    power: float,
    transition_steps: int,
    transition_begin: int,
) -> Schedule:
    init_value = _check_value("init_value", init_value, fn)
    end_value = _check_value("end_value", end_value, fn)
    transition_steps = _check_nonneg_int("transition_steps", transition_steps, fn)
    transition_begin = _check_nonneg_int("transition_begin", transition_begin, fn)
    if transition_steps == 0:
        return constant_schedule(init_value)

    def schedule(count: Count) -> ScheduleValue:
        t, is_tensor = _as_float_tensor(count)
        s = torch.clamp(t - transition_begin, 0.0, float(transition_steps))
        frac = 1.0 - s / transition_steps
        if power != 1.0:
            frac = frac**power
        return _finish((init_value - end_value) * frac + end_value, is_tensor)

    return schedule


def polynomial_schedule(
    init_value: float,
    end_value: float,
    power: float,
    transition_steps: int,
    transition_begin: int = 0,
) -> Schedule:
    """Polynomial transition from ``init_value`` to ``end_value`` (``optax.polynomial_schedule``).

    .. math::
        s = \\mathrm{clip}(t - B, 0, T), \\qquad
        \\mathrm{lr}(t) = (I - E)\\left(1 - \\frac{s}{T}\\right)^{P} + E

    with ``I = init_value``, ``E = end_value``, ``P = power``, ``T = transition_steps`` and
    ``B = transition_begin``: ``I`` up to step ``B``, ``E`` from step ``B + T`` on.
    ``transition_steps == 0`` gives the constant ``init_value`` (as optax).
    ``torch.optim.lr_scheduler.PolynomialLR(total_iters, power)`` on base lr ``b`` is
    ``polynomial_schedule(b, 0.0, power, total_iters)``.

    Args:
        init_value: value before and at the start of the transition (>= 0).
        end_value: value at and after its end (>= 0).
        power: exponent of the polynomial (> 0).
        transition_steps: length of the transition in steps (>= 0).
        transition_begin: steps at ``init_value`` before the transition (>= 0).

    Returns:
        A schedule.

    Raises:
        ValueError: a value is negative, ``power <= 0``, or a step count is negative
            (optax falls back silently for the last two).

    Example:
        >>> import gradchain as gc
        >>> sched = gc.polynomial_schedule(1.0, 0.0, power=2, transition_steps=4)
        >>> [sched(t) for t in range(6)]
        [1.0, 0.5625, 0.25, 0.0625, 0.0, 0.0]
    """
    fn = "polynomial_schedule"
    power = _check_positive("power", power, fn)
    return _polynomial(fn, init_value, end_value, power, transition_steps, transition_begin)


def linear_schedule(
    init_value: float, end_value: float, transition_steps: int, transition_begin: int = 0
) -> Schedule:
    """Linear interpolation from ``init_value`` to ``end_value`` (``optax.linear_schedule``).

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
    It is :func:`polynomial_schedule` with ``power=1``.

    Args:
        init_value: value at the start (>= 0).
        end_value: value at the end (>= 0).
        transition_steps: number of steps of the ramp (>= 0).
        transition_begin: number of steps at ``init_value`` before the ramp (>= 0).

    Returns:
        A schedule.

    Raises:
        ValueError: a value or a step count is negative.

    Example:
        >>> import gradchain as gc
        >>> sched = gc.linear_schedule(1.0, 0.0, transition_steps=4, transition_begin=2)
        >>> [sched(t) for t in range(8)]
        [1.0, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    """
    return _polynomial(
        "linear_schedule", init_value, end_value, 1.0, transition_steps, transition_begin
    )


def piecewise_constant_schedule(
    init_value: float, boundaries_and_scales: Mapping[int, float] | None = None
) -> Schedule:
    """``init_value`` times every scale whose boundary has been reached
    (``optax.piecewise_constant_schedule``).

    .. math:: \\mathrm{lr}(t) = I \\prod_{i:\\, t \\ge b_i} f_i

    for ``boundaries_and_scales = {b_1: f_1, b_2: f_2, ...}``.
    ``torch.optim.lr_scheduler.MultiStepLR(milestones, gamma)`` on base lr ``b`` is
    ``piecewise_constant_schedule(b, {m: gamma for m in milestones})``.

    Args:
        init_value: value before the first boundary (>= 0).
        boundaries_and_scales: ``{step: scale}``; steps non-negative ints, scales >= 0.

    Returns:
        A schedule.

    Raises:
        ValueError: a negative value, step or scale.

    Example:
        >>> import gradchain as gc
        >>> sched = gc.piecewise_constant_schedule(1.0, {2: 0.5, 4: 0.1})
        >>> [sched(t) for t in range(6)]
        [1.0, 1.0, 0.5, 0.5, 0.05, 0.05]
    """
    fn = "piecewise_constant_schedule"
    init_value = _check_value("init_value", init_value, fn)
    pairs = _check_scales(boundaries_and_scales, fn)

    def schedule(count: Count) -> ScheduleValue:
        t, is_tensor = _as_float_tensor(count)
        value = torch.full_like(t, init_value)
        for boundary, scale in pairs:
            value = torch.where(t >= boundary, value * scale, value)
        return _finish(value, is_tensor)

    return schedule


def piecewise_interpolate_schedule(
    interpolate_type: str,
    init_value: float,
    boundaries_and_scales: Mapping[int, float] | None = None,
) -> Schedule:
    """Interpolate between the values that ``piecewise_constant_schedule`` would jump to
    (``optax.piecewise_interpolate_schedule``).

    With sorted boundaries ``b_1 < b_2 < ...`` (``b_0 = 0``) and the values
    ``v_0 = I``, ``v_i = v_{i-1} f_i``, the value at ``b_{i-1} \\le t < b_i`` goes from
    ``v_{i-1}`` to ``v_i`` linearly (``'linear'``) or along half a cosine (``'cosine'``),
    and is ``v_n`` from the last boundary on. The interpolation is between the
    *accumulated* values, not the scales.

    Args:
        interpolate_type: ``'linear'`` or ``'cosine'``.
        init_value: value at step 0 (>= 0).
        boundaries_and_scales: ``{step: scale}``; steps non-negative ints, scales >= 0.

    Returns:
        A schedule.

    Raises:
        ValueError: an unknown ``interpolate_type``, or a negative value, step or scale.

    Example:
        >>> import gradchain as gc
        >>> sched = gc.piecewise_interpolate_schedule("linear", 1.0, {4: 0.1, 8: 0.01})
        >>> [round(sched(t), 6) for t in range(0, 11, 2)]
        [1.0, 0.55, 0.1, 0.0505, 0.001, 0.001]
    """
    fn = "piecewise_interpolate_schedule"
    if interpolate_type not in ("linear", "cosine"):
        raise ValueError(
            f"{fn}: interpolate_type must be 'linear' or 'cosine', got {interpolate_type!r}"
        )
    init_value = _check_value("init_value", init_value, fn)
    pairs = _check_scales(boundaries_and_scales, fn)
    return _interpolate(interpolate_type, init_value, pairs)


def _interpolate(kind: str, init_value: float, pairs: list[tuple[int, float]]) -> Schedule:
    bounds = [0] + [b for b, _ in pairs]
    values = [init_value]
    for _, scale in pairs:
        values.append(values[-1] * scale)
    cosine = kind == "cosine"

    def schedule(count: Count) -> ScheduleValue:
        t, is_tensor = _as_float_tensor(count)
        out = torch.where(t >= bounds[-1], values[-1], torch.zeros_like(t))
        for i in range(len(bounds) - 1):
            lo, hi = bounds[i], bounds[i + 1]
            start, end = values[i], values[i + 1]
            pct = (t - lo) / max(hi - lo, 1)
            if cosine:
                value = end + (start - end) / 2.0 * (torch.cos(math.pi * pct) + 1)
            else:
                value = (end - start) * pct + start
            out = torch.where((t >= lo) & (t < hi), value, out)
        return _finish(out, is_tensor)

    return schedule


def exponential_decay(
    init_value: float,
    transition_steps: int,
    decay_rate: float,
    transition_begin: int = 0,
    staircase: bool = False,
    end_value: float | None = None,
) -> Schedule:
    """Exponential decay (``optax.exponential_decay``, same positional order).

    .. math::
        d = t - \\mathrm{transition\\_begin}, \\qquad
        p = \\frac{d}{\\mathrm{transition\\_steps}}
            \\;(\\lfloor\\cdot\\rfloor \\text{ if staircase}),\\qquad
        \\mathrm{lr}(t) = \\begin{cases} \\mathrm{init} & d \\le 0 \\\\
            \\mathrm{init}\\cdot \\mathrm{decay\\_rate}^{p} & d > 0 \\end{cases}

    clipped from below at ``end_value`` when ``decay_rate < 1`` (from above when
    ``decay_rate > 1``). ``torch.optim.lr_scheduler.ExponentialLR(gamma)`` on base lr ``b``
    is ``exponential_decay(b, 1, gamma)``.

    **Changed in the unreleased version:** the order is optax's ``(init_value,
    transition_steps, decay_rate)``; gradchain 0.1 took ``(init_value, decay_rate,
    transition_steps=1)``. Keyword calls are unaffected; a positional float decay rate
    in the old second place now raises ``TypeError``.

    Args:
        init_value: value up to step ``transition_begin`` (>= 0).
        transition_steps: number of steps per factor of ``decay_rate`` (> 0).
        decay_rate: factor per ``transition_steps`` steps (> 0).
        transition_begin: steps at ``init_value`` before the decay starts (>= 0).
        staircase: decay in discrete jumps every ``transition_steps`` steps.
        end_value: optional bound the value does not cross (>= 0).

    Returns:
        A schedule.

    Raises:
        TypeError: ``transition_steps`` is not an int (the message recalls the order).
        ValueError: ``transition_steps <= 0`` or ``decay_rate <= 0`` (optax: a constant
            schedule), a negative ``transition_begin`` (optax: 0), a negative value.

    Example:
        >>> import gradchain as gc
        >>> sched = gc.exponential_decay(1.0, 2, 0.5, staircase=True)
        >>> [sched(t) for t in range(6)]
        [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
        >>> [gc.exponential_decay(1.0, 4, 2.0)(t) for t in (0, 4, 8)]
        [1.0, 2.0, 4.0]
        >>> gc.exponential_decay(1.0, 1, 0.5, end_value=0.2)(10)
        0.2
    """
    fn = "exponential_decay"
    init_value = _check_value("init_value", init_value, fn)
    transition_steps = _check_nonneg_int(
        "transition_steps", transition_steps, fn, positive=True,
        hint=" (the positional order is optax's: exponential_decay(init_value, "
        "transition_steps, decay_rate, ...); gradchain 0.1 had decay_rate second)",
    )
    decay_rate = _check_float("decay_rate", decay_rate, fn)
    if decay_rate <= 0:
        raise ValueError(f"{fn}: decay_rate must be > 0, got {decay_rate}")
    transition_begin = _check_nonneg_int("transition_begin", transition_begin, fn)
    if not isinstance(staircase, bool):
        raise TypeError(f"{fn}: staircase must be a bool, got {type(staircase).__name__}")
    if end_value is not None:
        end_value = _check_value("end_value", end_value, fn)

    def schedule(count: Count) -> ScheduleValue:
        t, is_tensor = _as_float_tensor(count)
        d = t - transition_begin
        p = d / transition_steps
        if staircase:
            p = torch.floor(p)
        value = torch.where(d <= 0, init_value, init_value * torch.pow(decay_rate, p))
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

    The same as ``exponential_decay(init_value, step_size, gamma, staircase=True)``.

    Args:
        init_value: value at step 0 (StepLR's base lr, >= 0).
        step_size: period of the decay in steps (> 0).
        gamma: factor applied every ``step_size`` steps (>= 0).

    Returns:
        A schedule.

    Raises:
        ValueError: ``step_size <= 0``, a negative ``init_value`` or ``gamma``.

    Example:
        >>> import gradchain as gc
        >>> sched = gc.step_decay(1.0, step_size=2, gamma=0.5)
        >>> [sched(t) for t in range(5)]
        [1.0, 1.0, 0.5, 0.5, 0.25]
    """
    fn = "step_decay"
    init_value = _check_value("init_value", init_value, fn)
    step_size = _check_nonneg_int("step_size", step_size, fn, positive=True)
    gamma = _check_value("gamma", gamma, fn)

    def schedule(count: Count) -> ScheduleValue:
        t, is_tensor = _as_float_tensor(count)
        k = torch.floor(t / step_size)
        return _finish(init_value * torch.pow(gamma, k), is_tensor)

    return schedule


def cosine_decay_schedule(
    init_value: float, decay_steps: int, alpha: float = 0.0, exponent: float = 1.0
) -> Schedule:
    """Cosine decay from ``init_value`` to ``alpha * init_value`` over ``decay_steps``
    (``optax.cosine_decay_schedule``).

    .. math::
        s = \\min(t, \\mathrm{decay\\_steps}), \\qquad
        \\mathrm{lr}(t) = \\mathrm{init}\\left((1 - \\alpha)\\,
            \\left[\\tfrac12\\left(1 + \\cos\\tfrac{\\pi s}{\\mathrm{decay\\_steps}}\\right)
            \\right]^{p} + \\alpha\\right)

    with ``p = exponent``. The value stays at ``alpha * init_value`` after
    ``decay_steps`` (``torch.optim.lr_scheduler.CosineAnnealingLR(T_max, eta_min)`` is the
    same up to ``T_max`` with ``alpha = eta_min / base_lr``, but rises again after it).

    Args:
        init_value: value at step 0 (>= 0).
        decay_steps: number of steps of the decay (> 0).
        alpha: final value as a fraction of ``init_value`` (>= 0).
        exponent: power of the cosine factor (> 0).

    Returns:
        A schedule.

    Raises:
        ValueError: ``decay_steps <= 0``, a negative ``init_value`` or ``alpha``,
            ``exponent <= 0``.

    Example:
        >>> import gradchain as gc
        >>> sched = gc.cosine_decay_schedule(1.0, decay_steps=4, alpha=0.1)
        >>> [round(sched(t), 4) for t in range(6)]
        [1.0, 0.8682, 0.55, 0.2318, 0.1, 0.1]
        >>> round(gc.cosine_decay_schedule(1.0, 4, exponent=2.0)(2), 4)
        0.25
    """
    fn = "cosine_decay_schedule"
    init_value = _check_value("init_value", init_value, fn)
    decay_steps = _check_nonneg_int("decay_steps", decay_steps, fn, positive=True)
    alpha = _check_value("alpha", alpha, fn)
    exponent = _check_positive("exponent", exponent, fn)

    def schedule(count: Count) -> ScheduleValue:
        t, is_tensor = _as_float_tensor(count)
        s = torch.clamp(t, max=float(decay_steps))
        cosine = 0.5 * (1.0 + torch.cos(math.pi * s / decay_steps))
        if exponent != 1.0:
            cosine = cosine**exponent
        return _finish(init_value * ((1.0 - alpha) * cosine + alpha), is_tensor)

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

    Raises:
        ValueError: the lengths do not fit, or the boundaries decrease or are negative.
        TypeError: a schedule is not callable.

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


def warmup_constant_schedule(init_value: float, peak_value: float, warmup_steps: int) -> Schedule:
    """Linear warmup from ``init_value`` to ``peak_value``, then constant
    (``optax.warmup_constant_schedule``).

    .. math:: \\mathrm{lr}(t) = I + (P - I)\\,\\min(t, w) / w

    ``torch.optim.lr_scheduler.LinearLR(start_factor, 1.0, total_iters)`` on base lr ``b``
    is ``warmup_constant_schedule(b * start_factor, b, total_iters)``.

    Args:
        init_value: value at step 0 (>= 0).
        peak_value: value from step ``warmup_steps`` on (>= 0).
        warmup_steps: length of the warmup (>= 0; 0 gives the constant ``init_value``,
            as optax).

    Returns:
        A schedule.

    Raises:
        ValueError: a negative value or step count.

    Example:
        >>> import gradchain as gc
        >>> sched = gc.warmup_constant_schedule(0.0, 1.0, warmup_steps=4)
        >>> [sched(t) for t in range(6)]
        [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    """
    return _polynomial(
        "warmup_constant_schedule", init_value, peak_value, 1.0, warmup_steps, 0
    )


def warmup_cosine_decay_schedule(
    init_value: float,
    peak_value: float,
    warmup_steps: int,
    decay_steps: int,
    end_value: float = 0.0,
    exponent: float = 1.0,
) -> Schedule:
    """Linear warmup from ``init_value`` to ``peak_value``, then cosine decay to ``end_value``
    (``optax.warmup_cosine_decay_schedule``).

    .. math::
        \\mathrm{lr}(t) = \\begin{cases}
            \\mathrm{init} + (\\mathrm{peak} - \\mathrm{init})\\,t / w & t < w \\\\
            \\mathrm{peak}\\left((1 - \\alpha)\\left[\\tfrac12\\left(1 +
                \\cos\\tfrac{\\pi \\min(t - w,\\, D - w)}{D - w}\\right)\\right]^{p}
                + \\alpha\\right) & t \\ge w
        \\end{cases}

    with ``w = warmup_steps``, ``D = decay_steps``, ``p = exponent`` and
    ``alpha = end_value / peak_value``. As in optax, ``decay_steps`` counts the whole
    schedule *including* the warmup, and the value stays at ``end_value`` after.

    Args:
        init_value: value at step 0 (>= 0).
        peak_value: value at the end of the warmup (>= 0).
        warmup_steps: steps of linear warmup (>= 0).
        decay_steps: total steps of warmup plus decay (> ``warmup_steps``).
        end_value: final value (>= 0; must be 0 when ``peak_value`` is 0, where optax
            ignores it).
        exponent: power of the cosine factor (> 0).

    Returns:
        A schedule.

    Raises:
        ValueError: ``decay_steps <= warmup_steps``, a negative value, a nonzero
            ``end_value`` with a zero ``peak_value``, ``exponent <= 0``.

    Example:
        >>> import gradchain as gc
        >>> sched = gc.warmup_cosine_decay_schedule(0.0, 1.0, warmup_steps=2, decay_steps=6)
        >>> [round(sched(t), 4) for t in range(8)]
        [0.0, 0.5, 1.0, 0.8536, 0.5, 0.1464, 0.0, 0.0]
    """
    fn = "warmup_cosine_decay_schedule"
    init_value = _check_value("init_value", init_value, fn)
    peak_value = _check_value("peak_value", peak_value, fn)
    end_value = _check_value("end_value", end_value, fn)
    warmup_steps = _check_nonneg_int("warmup_steps", warmup_steps, fn)
    decay_steps = _check_nonneg_int("decay_steps", decay_steps, fn)
    exponent = _check_positive("exponent", exponent, fn)
    if decay_steps <= warmup_steps:
        raise ValueError(
            f"{fn}: decay_steps (total steps, warmup included) must be > warmup_steps, "
            f"got decay_steps={decay_steps}, warmup_steps={warmup_steps}"
        )
    if peak_value == 0.0 and end_value != 0.0:
        raise ValueError(
            f"{fn}: end_value must be 0 when peak_value is 0, got end_value={end_value} "
            "(optax ignores end_value then; decay from a positive peak_value instead)"
        )
    alpha = 0.0 if peak_value == 0.0 else end_value / peak_value
    cosine = cosine_decay_schedule(peak_value, decay_steps - warmup_steps, alpha, exponent)
    if warmup_steps == 0:
        return cosine
    warmup = linear_schedule(init_value, peak_value, warmup_steps)
    return join_schedules([warmup, cosine], [warmup_steps])


def warmup_exponential_decay_schedule(
    init_value: float,
    peak_value: float,
    warmup_steps: int,
    transition_steps: int,
    decay_rate: float,
    transition_begin: int = 0,
    staircase: bool = False,
    end_value: float | None = None,
) -> Schedule:
    """Linear warmup from ``init_value`` to ``peak_value``, then
    :func:`exponential_decay` from ``peak_value`` (``optax.warmup_exponential_decay_schedule``).

    The decay's step count starts at the end of the warmup: the value at step
    ``warmup_steps + k`` is ``exponential_decay(peak_value, transition_steps, decay_rate,
    transition_begin, staircase, end_value)(k)``.

    Args:
        init_value: value at step 0 (>= 0).
        peak_value: value at the end of the warmup (>= 0).
        warmup_steps: steps of linear warmup (>= 0).
        transition_steps: see :func:`exponential_decay` (> 0).
        decay_rate: see :func:`exponential_decay` (> 0).
        transition_begin: steps at ``peak_value`` after the warmup before the decay (>= 0).
        staircase: decay in discrete jumps.
        end_value: optional bound the value does not cross (>= 0).

    Returns:
        A schedule.

    Raises:
        ValueError: as :func:`exponential_decay` and :func:`linear_schedule`.

    Example:
        >>> import gradchain as gc
        >>> sched = gc.warmup_exponential_decay_schedule(0.0, 1.0, 2, 1, 0.5)
        >>> [sched(t) for t in range(6)]
        [0.0, 0.5, 1.0, 0.5, 0.25, 0.125]
    """
    fn = "warmup_exponential_decay_schedule"
    init_value = _check_value("init_value", init_value, fn)
    peak_value = _check_value("peak_value", peak_value, fn)
    warmup_steps = _check_nonneg_int("warmup_steps", warmup_steps, fn)
    decay = exponential_decay(
        peak_value, transition_steps, decay_rate, transition_begin, staircase, end_value
    )
    if warmup_steps == 0:
        return decay
    warmup = linear_schedule(init_value, peak_value, warmup_steps)
    return join_schedules([warmup, decay], [warmup_steps])


def sgdr_schedule(cosine_kwargs: Iterable[Mapping[str, Any]]) -> Schedule:
    """SGD with warm restarts: :func:`warmup_cosine_decay_schedule` cycles one after another
    (``optax.sgdr_schedule``).

    Each dict holds the keyword arguments of one cycle; its ``decay_steps`` is the cycle's
    length, after which the next cycle starts from its own step 0.
    ``torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(T_0, T_mult=1, eta_min)`` on
    base lr ``b`` is, cycle for cycle, ``dict(init_value=b, peak_value=b, warmup_steps=0,
    decay_steps=T_0, end_value=eta_min)`` (torch reaches ``eta_min`` only at the restart).

    Args:
        cosine_kwargs: one dict of :func:`warmup_cosine_decay_schedule` arguments per cycle
            (at least one; each with ``decay_steps``).

    Returns:
        A schedule.

    Raises:
        ValueError: no cycle, or a cycle without ``decay_steps`` or with invalid arguments.

    Example:
        >>> import gradchain as gc
        >>> cycle = dict(init_value=0.0, peak_value=1.0, warmup_steps=1, decay_steps=3)
        >>> sched = gc.sgdr_schedule([cycle, cycle])
        >>> [round(sched(t), 4) for t in range(7)]
        [0.0, 1.0, 0.5, 0.0, 1.0, 0.5, 0.0]
    """
    fn = "sgdr_schedule"
    cycles = [dict(kw) for kw in cosine_kwargs]
    if not cycles:
        raise ValueError(f"{fn}: cosine_kwargs must hold at least one cycle")
    schedules, boundaries, step = [], [], 0
    for i, kw in enumerate(cycles):
        if "decay_steps" not in kw:
            raise ValueError(f"{fn}: cosine_kwargs[{i}] has no 'decay_steps'")
        try:
            schedules.append(warmup_cosine_decay_schedule(**kw))
        except (TypeError, ValueError) as err:
            raise type(err)(f"{fn}: cosine_kwargs[{i}]: {err}") from err
        step += kw["decay_steps"]
        boundaries.append(step)
    return join_schedules(schedules, boundaries[:-1])


def _onecycle_checks(fn: str, transition_steps: int, peak_value: float,
                     div_factor: float, final_div_factor: float) -> float:
    _check_nonneg_int("transition_steps", transition_steps, fn, positive=True)
    peak_value = _check_value("peak_value", peak_value, fn)
    _check_positive("div_factor", div_factor, fn)
    _check_positive("final_div_factor", final_div_factor, fn)
    return peak_value


def linear_onecycle_schedule(
    transition_steps: int,
    peak_value: float,
    pct_start: float = 0.3,
    pct_final: float = 0.85,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
) -> Schedule:
    """One cycle with three linear phases (``optax.linear_onecycle_schedule``).

    With ``T = transition_steps``, ``I = peak_value / div_factor``: from ``I`` up to
    ``peak_value`` over ``[0, int(pct_start T))``, back down to ``I`` until
    ``int(pct_final T)``, then down to ``I / final_div_factor`` at ``T`` and constant after
    (optax's boundaries, including its rounding down to whole steps).
    ``torch.optim.lr_scheduler.OneCycleLR(three_phase=True, anneal_strategy='linear')``
    is the same shape with a different step convention.

    Args:
        transition_steps: length of the cycle (> 0).
        peak_value: the maximum (>= 0).
        pct_start: fraction of the cycle spent rising (in [0, 1]).
        pct_final: fraction at which the fall back to ``I`` ends (in [``pct_start``, 1]).
        div_factor: ``I = peak_value / div_factor`` (> 0).
        final_div_factor: the last value is ``I / final_div_factor`` (> 0).

    Returns:
        A schedule.

    Raises:
        ValueError: an argument out of its range.

    Example:
        >>> import gradchain as gc
        >>> sched = gc.linear_onecycle_schedule(10, 1.0, pct_start=0.2, pct_final=0.6,
        ...                                     div_factor=10.0, final_div_factor=10.0)
        >>> [round(sched(t), 4) for t in (0, 1, 2, 4, 6, 8, 10)]
        [0.1, 0.55, 1.0, 0.55, 0.1, 0.055, 0.01]
    """
    fn = "linear_onecycle_schedule"
    peak_value = _onecycle_checks(fn, transition_steps, peak_value, div_factor, final_div_factor)
    pct_start = _check_fraction("pct_start", pct_start, fn)
    pct_final = _check_fraction("pct_final", pct_final, fn)
    if pct_final < pct_start:
        raise ValueError(f"{fn}: pct_final ({pct_final}) must be >= pct_start ({pct_start})")
    # A dict, as optax builds it: equal boundaries after rounding keep the last scale.
    scales = {
        int(pct_start * transition_steps): div_factor,
        int(pct_final * transition_steps): 1.0 / div_factor,
        transition_steps: 1.0 / final_div_factor,
    }
    return _interpolate("linear", peak_value / div_factor, sorted(scales.items()))


def cosine_onecycle_schedule(
    transition_steps: int,
    peak_value: float,
    pct_start: float = 0.3,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
) -> Schedule:
    """One cycle: a half-cosine rise then a half-cosine fall (``optax.cosine_onecycle_schedule``).

    With ``T = transition_steps`` and ``I = peak_value / div_factor``: from ``I`` up to
    ``peak_value`` over ``[0, int(pct_start T))``, then down to
    ``I / final_div_factor`` at ``T``, constant after. This is
    ``torch.optim.lr_scheduler.OneCycleLR``'s default shape (cosine, two phases).

    Args:
        transition_steps: length of the cycle (> 0).
        peak_value: the maximum (>= 0).
        pct_start: fraction of the cycle spent rising (in [0, 1]).
        div_factor: ``I = peak_value / div_factor`` (> 0).
        final_div_factor: the last value is ``I / final_div_factor`` (> 0).

    Returns:
        A schedule.

    Raises:
        ValueError: an argument out of its range.

    Example:
        >>> import gradchain as gc
        >>> sched = gc.cosine_onecycle_schedule(10, 1.0, pct_start=0.2, div_factor=10.0)
        >>> [round(sched(t), 4) for t in (0, 1, 2, 6, 10)]
        [0.1, 0.55, 1.0, 0.5, 0.0]
    """
    fn = "cosine_onecycle_schedule"
    peak_value = _onecycle_checks(fn, transition_steps, peak_value, div_factor, final_div_factor)
    pct_start = _check_fraction("pct_start", pct_start, fn)
    scales = {
        int(pct_start * transition_steps): div_factor,
        int(transition_steps): 1.0 / (div_factor * final_div_factor),
    }
    return _interpolate("cosine", peak_value / div_factor, sorted(scales.items()))
