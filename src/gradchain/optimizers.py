"""Optimizers: building blocks (``scale``, ``scale_by_learning_rate``, ``scale_by_adam``,
``trace``, ``add_decayed_weights``) and the torch.optim look-alikes ``sgd``, ``adam`` and
``adamw`` built from them with :func:`gradchain.chain`.

The aliases take ``torch.optim``'s argument names and defaults and follow the same
trajectories: the loop

.. code-block:: python

    updates, state = tx.update(grads, state, params)
    params = gc.apply_updates(params, updates)

matches ``torch.optim.SGD`` / ``Adam`` / ``AdamW`` on the same gradients to float
rounding (float32 rtol 1e-5, float64 rtol 1e-12 after 100 steps; tested). They output
*updates* (``-lr * direction``) to be added to the parameters.

Conventions shared by everything here:

* The maths runs on flat leaf lists, grouped by (device, dtype), with ``torch._foreach_*``
  kernels where they can serve (see :mod:`gradchain._ops`). Scalars (bias corrections,
  scheduled learning rates) are 0-dim tensors cast to each group's dtype, like the Python
  scalars ``torch.optim`` passes to its kernels.
* Moments and momentum buffers have the parameter's dtype for float32/float64 (as in
  ``torch.optim``) and float32 for float16/bfloat16 parameters; the maths runs in that
  dtype and the updates come out in the gradient's dtype.
* Counters are int64 0-dim tensors on the device of the first parameter. A
  transformation's ``count`` advances on every step its ``update`` runs (closed gate
  steps do not run it, see :func:`gradchain.chain`).
* A ``None`` gradient passes through as ``None`` and its moments / buffers keep their
  value bit for bit.

**Deliberate differences from torch.optim.** ``torch.optim`` keeps one ``step`` per
parameter, gradchain one ``count`` per transformation (as optax does). They agree whenever
every parameter gets a gradient on every step. For a parameter whose gradient is ``None``
on some steps, torch bias-corrects it with its own step count (Adam) and starts its
momentum buffer from a copy of its first gradient (SGD, which matters only with
``dampening != 0``); gradchain uses the shared count. Also, float16/bfloat16 parameters
get float32 moments (torch keeps them in the parameter dtype). A step on which every
gradient is ``None`` still advances ``count`` (torch would advance no parameter's step).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from gradchain import _ops
from gradchain.base import EmptyState, GradientTransformation, _expect_state, chain, donation
from gradchain.schedules import Schedule
from gradchain.tree import Leaves, _known_bool, flatten, unflatten

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

Params = Any
Updates = Any
ScalarOrSchedule = float | torch.Tensor | Schedule
TList = list[torch.Tensor]


# --------------------------------------------------------------------------- helpers
def _first_device(params: Params) -> torch.device:
    leaves, _ = flatten(params)
    for p in leaves:
        if isinstance(p, torch.Tensor):
            return p.device
    return torch.device("cpu")


def _zero_count(params: Params) -> torch.Tensor:
    return torch.zeros((), dtype=torch.int64, device=_first_device(params))


_INT64_MAX = torch.iinfo(torch.int64).max


def _next_count(count: torch.Tensor) -> torch.Tensor:
    """``count + 1``, saturating at the int64 maximum instead of wrapping to a negative
    count (two tiny ops on a 0-dim tensor; no sync)."""
    return torch.clamp(count, max=_INT64_MAX - 1) + 1


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _buffers_like(params: Params) -> Params:
    """Zeros shaped like ``params`` in the accumulator dtype (float32 for half types)."""
    leaves, spec = flatten(params)
    out = [
        None
        if p is None
        else torch.zeros_like(p, dtype=_acc_dtype(p.dtype), memory_format=torch.preserve_format)
        for p in leaves
    ]
    return unflatten(spec, out)


def _groups(xs: Sequence[torch.Tensor]) -> list[list[int]]:
    """Indices of ``xs`` grouped by (device, dtype); one group for a uniform tree."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, x in enumerate(xs):
        groups.setdefault((x.device, x.dtype), []).append(i)
    return list(groups.values())


def _pick(xs: Sequence[Any], idx: list[int]) -> list[Any]:
    if len(idx) == len(xs):
        return list(xs)
    return [xs[i] for i in idx]


def _scatter(out: list[Any], idx: list[int], values: Sequence[Any]) -> None:
    for i, v in zip(idx, values):
        out[i] = v


def _scalar_for(s: float | torch.Tensor, like: torch.Tensor) -> float | torch.Tensor:
    """``s`` as a scalar for a kernel on tensors like ``like``: a float stays a float, a
    tensor is cast to their device and dtype (what torch does with a Python scalar)."""
    if isinstance(s, torch.Tensor):
        return s.to(device=like.device, dtype=like.dtype)
    return s


def _is_schedule(value: object) -> bool:
    return callable(value) and not isinstance(value, torch.Tensor)


def _as_scalar(value: float | torch.Tensor, name: str, fn: str) -> float | torch.Tensor:
    """Validate a float or 1-element tensor hyperparameter; tensors become 0-dim."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"{fn}: Tensor {name} must be 1-element, got shape {tuple(value.shape)}"
            )
        if not value.is_floating_point():
            raise TypeError(f"{fn}: Tensor {name} must be floating point, got {value.dtype}")
        return value.reshape(())
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"{fn}: {name} must be a float or a 1-element tensor, got {type(value).__name__}"
        )
    return float(value)


def _check_lr(lr: ScalarOrSchedule, fn: str) -> ScalarOrSchedule:
    if _is_schedule(lr):
        return lr
    value = _as_scalar(lr, "lr", fn)  # type: ignore[arg-type]
    if not 0.0 <= value:
        raise ValueError(f"{fn}: invalid learning rate lr={float(value)}; expected lr >= 0")
    return value


def _check_nonneg(value: float, name: str, what: str, fn: str) -> float:
    value = _as_scalar(value, name, fn)  # type: ignore[assignment]
    if isinstance(value, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a float, got a tensor")
    if not 0.0 <= value:
        raise ValueError(f"{fn}: invalid {what} {name}={value}; expected {name} >= 0")
    return value


def _check_beta(value: float, name: str, fn: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{fn}: {name} must be a float, got {type(value).__name__}")
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{fn}: invalid beta parameter {name}={value}; expected 0 <= {name} < 1")
    return float(value)


def _check_bool(value: object, name: str, fn: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{fn}: {name} must be a bool, got {type(value).__name__}")
    return value


def _check_finite(value: float | torch.Tensor, name: str, fn: str) -> None:
    """A float hyperparameter must be finite (a tensor one is not read: that would sync)."""
    if not isinstance(value, torch.Tensor) and not math.isfinite(value):
        raise ValueError(f"{fn}: {name} must be finite, got {value}")


def _check_betas(betas: tuple[float, float], fn: str) -> tuple[float, float]:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"{fn}: betas must be a pair (beta1, beta2), got {betas!r}")
    return _check_beta(betas[0], "betas[0]", fn), _check_beta(betas[1], "betas[1]", fn)


def _scalar_dtype(device: torch.device) -> torch.dtype:
    # Bias corrections in double, as torch.optim computes them on the host.
    return torch.float32 if device.type == "mps" else torch.float64


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
    factor = _as_scalar(step_size, "step_size", "scale")
    _check_finite(factor, "step_size", "scale")

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
    for idx in _groups(gs):
        group = _pick(gs, idx)
        _scatter(out, idx, mul(group, _scalar_for(factor, group[0])))
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
    if _is_schedule(learning_rate):
        schedule: Callable[[torch.Tensor], Any] = learning_rate  # type: ignore[assignment]

        def init_s(params: Params) -> ScaleByScheduleState:
            return ScaleByScheduleState(count=_zero_count(params))

        def update_s(
            updates: Updates,
            state: ScaleByScheduleState,
            params: Params | None = None,
            **extra: Any,
        ) -> tuple[Updates, ScaleByScheduleState]:
            del params
            _expect_state(state, ScaleByScheduleState, "scale_by_learning_rate")
            donated, _ = donation(extra, "scale_by_learning_rate")
            lr = schedule(state.count)
            factor = lr * sign if isinstance(lr, torch.Tensor) else float(lr) * sign
            view = Leaves(updates)
            out = _scaled(view.values, factor, donated)
            return view.put(out), ScaleByScheduleState(count=_next_count(state.count))

        return GradientTransformation(init_s, update_s)

    lr = _as_scalar(learning_rate, "learning_rate", "scale_by_learning_rate")  # type: ignore[arg-type]
    _check_finite(lr, "learning_rate", "scale_by_learning_rate")
    inner = scale(-lr if flip_sign else lr)
    return GradientTransformation(inner.init, inner.update)


# --------------------------------------------------------------------------- adam
class ScaleByAdamState(NamedTuple):
    """State of :func:`scale_by_adam`.

    Attributes:
        count: int64 0-dim tensor, the number of updates done (torch's ``step``).
        mu: first moments (torch's ``exp_avg``), a tree shaped like the params.
        nu: second moments (torch's ``exp_avg_sq``), a tree shaped like the params.
        nu_max: running maximum of ``nu`` (torch's ``max_exp_avg_sq``) when
            ``amsgrad=True``; the empty tuple ``()`` otherwise (an empty tree, so the state
            round-trips through :func:`~gradchain.to_state_dict` and batches under
            ``torch.func.vmap``).

    Example:
        >>> import torch, gradchain as gc
        >>> state = gc.scale_by_adam().init({"w": torch.zeros(2)})
        >>> state.count, state.mu, state.nu_max
        (tensor(0), {'w': tensor([0., 0.])}, ())
    """

    count: torch.Tensor  # type: ignore[assignment]  # shadows tuple.count, as in optax
    mu: Updates
    nu: Updates
    nu_max: Updates


def scale_by_adam(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, amsgrad: bool = False
) -> GradientTransformation:
    """Rescale updates by Adam's bias-corrected moment estimates.

    With ``t`` the step (``count`` after the increment, starting at 1):

    .. math::
        m_t = \\mathrm{lerp}(m_{t-1}, g, 1 - \\beta_1), \\quad
        v_t = \\beta_2 v_{t-1} + (1 - \\beta_2) g^2, \\quad
        \\hat v_t = \\max(\\hat v_{t-1}, v_t) \\text{ (amsgrad) else } v_t

    .. math::
        u = \\frac{m_t / (1 - \\beta_1^t)}{\\sqrt{\\hat v_t} / \\sqrt{1 - \\beta_2^t} + \\epsilon}

    The moment updates are those of ``torch.optim.Adam`` (same operations, same order);
    the direction is computed as :math:`m_t / ((\\sqrt{\\hat v_t}/\\sqrt{1-\\beta_2^t} +
    \\epsilon)(1-\\beta_1^t))`, which equals torch's up to rounding (float32 parity within
    1e-5 relative after 100 steps) and needs one buffer, or none with ``donate``. The bias
    corrections are computed in float64 and cast to each leaf group's dtype. Follow with
    :func:`scale_by_learning_rate` for the step (as :func:`adam` does).

    Args:
        b1: decay of the first moment (torch's ``betas[0]``), in ``[0, 1)``.
        b2: decay of the second moment (torch's ``betas[1]``), in ``[0, 1)``.
        eps: added to the denominator for numerical stability (>= 0).
        amsgrad: use the running maximum of the second moment (AMSGrad).

    Returns:
        A :class:`~gradchain.GradientTransformation` with state :class:`ScaleByAdamState`.

    Example:
        >>> import torch, gradchain as gc
        >>> tx = gc.scale_by_adam()
        >>> params = {"w": torch.zeros(2)}
        >>> updates, state = tx.update({"w": torch.tensor([0.5, -2.0])}, tx.init(params))
        >>> updates["w"]  # the first Adam direction is sign(g) (up to eps)
        tensor([ 1.0000, -1.0000])
        >>> state.count
        tensor(1)
    """
    fn = "scale_by_adam"
    amsgrad = _check_bool(amsgrad, "amsgrad", fn)
    b1 = _check_beta(b1, "b1", fn)
    b2 = _check_beta(b2, "b2", fn)
    eps = _check_nonneg(eps, "eps", "epsilon value", fn)

    def init(params: Params) -> ScaleByAdamState:
        return ScaleByAdamState(
            count=_zero_count(params),
            mu=_buffers_like(params),
            nu=_buffers_like(params),
            nu_max=_buffers_like(params) if amsgrad else (),
        )

    def update(
        updates: Updates, state: ScaleByAdamState, params: Params | None = None, **extra: Any
    ) -> tuple[Updates, ScaleByAdamState]:
        del params
        _expect_state(state, ScaleByAdamState, fn)
        donated_u, donated_s = donation(extra, fn)
        view = Leaves(updates)
        gs = view.values
        mus: list[Any] = view.take(state.mu, "mu")
        nus: list[Any] = view.take(state.nu, "nu")
        maxs: list[Any] = view.take(state.nu_max, "nu_max") if amsgrad else []
        out: list[Any] = [None] * len(gs)
        new_mus: list[Any] = [None] * len(gs)
        new_nus: list[Any] = [None] * len(gs)
        new_maxs: list[Any] = [None] * len(gs)

        count = _next_count(state.count)
        step = count.to(_scalar_dtype(count.device))
        bias_correction1 = 1.0 - b1**step
        bias_correction2 = 1.0 - b2**step
        bias_correction2_sqrt = torch.sqrt(bias_correction2)

        for idx in _groups(mus):
            m = _pick(mus, idx)
            v = _pick(nus, idx)
            g = _ops.cast(_pick(gs, idx), [x.dtype for x in m])
            # Fresh intermediates are updated in place (_ops.*_); the state only when
            # donated, with the same operations (so the same values).
            if donated_s:
                m = _ops.lerp_(m, g, 1.0 - b1)
                v = _ops.addcmul_(_ops.mul_(v, b2), g, g, 1.0 - b2)
            else:
                m = _ops.lerp(m, g, 1.0 - b1)
                v = _ops.addcmul_(_ops.mul(v, b2), g, g, 1.0 - b2)
            if amsgrad:
                old_max = _pick(maxs, idx)
                vmax = _ops.maximum_(old_max, v) if donated_s else _ops.maximum(old_max, v)
                _scatter(new_maxs, idx, vmax)
            else:
                vmax = v
            # u = m / ((sqrt(v) / sqrt(bc2) + eps) * bc1), built in one buffer: a fresh one,
            # or g's memory when donated (g, the updates or a cast copy of them, is no
            # longer needed), so a donated step allocates nothing gradient-sized.
            if donated_u and _ops.inplace_ok(g, m):
                denom = _ops.sqrt_into(g, vmax)
            else:
                denom = _ops.sqrt(vmax)
            denom = _ops.div_scalar_(denom, _scalar_for(bias_correction2_sqrt, m[0]))
            denom = _ops.add_scalar_(denom, eps)
            denom = _ops.mul_(denom, _scalar_for(bias_correction1, m[0]))
            u = _ops.rdiv_(denom, m)
            _scatter(out, idx, _ops.cast(u, [x.dtype for x in _pick(gs, idx)]))
            _scatter(new_mus, idx, m)
            _scatter(new_nus, idx, v)

        new_state = ScaleByAdamState(
            count=count,
            mu=view.put_into(state.mu, new_mus),
            nu=view.put_into(state.nu, new_nus),
            nu_max=view.put_into(state.nu_max, new_maxs) if amsgrad else state.nu_max,
        )
        return view.put(out), new_state

    return GradientTransformation(init, update)


# --------------------------------------------------------------------------- momentum
class TraceState(NamedTuple):
    """State of :func:`trace`.

    Attributes:
        count: int64 0-dim tensor, the number of updates done.
        trace: the momentum buffers (torch's ``momentum_buffer``), shaped like the params.

    Example:
        >>> import torch, gradchain as gc
        >>> gc.trace(0.9).init({"w": torch.zeros(2)})
        TraceState(count=tensor(0), trace={'w': tensor([0., 0.])})
    """

    count: torch.Tensor  # type: ignore[assignment]  # shadows tuple.count, as in optax
    trace: Updates


def trace(
    momentum: float, dampening: float = 0.0, nesterov: bool = False
) -> GradientTransformation:
    """Momentum with ``torch.optim.SGD`` semantics.

    .. math::
        b_1 = g_1, \\qquad
        b_t = \\mu\\, b_{t-1} + (1 - \\tau)\\, g_t \\;(t > 1), \\qquad
        u_t = g_t + \\mu\\, b_t \\text{ (nesterov) else } b_t

    with momentum :math:`\\mu` and dampening :math:`\\tau`: the first step copies the
    gradient into the buffer without dampening, as torch does.

    The non-Nesterov output shares storage with the new buffer in the state (as inside
    ``torch.optim.SGD``); do not modify it in place.

    Args:
        momentum: the momentum factor (>= 0).
        dampening: dampening for momentum.
        nesterov: use Nesterov momentum (needs ``momentum > 0`` and ``dampening == 0``).

    Returns:
        A :class:`~gradchain.GradientTransformation` with state :class:`TraceState`.

    Example:
        >>> import torch, gradchain as gc
        >>> tx = gc.trace(0.5, dampening=0.5)
        >>> params = {"w": torch.zeros(1)}
        >>> state = tx.init(params)
        >>> for _ in range(3):
        ...     updates, state = tx.update({"w": torch.ones(1)}, state, params)
        ...     print(updates["w"])
        tensor([1.])
        tensor([1.])
        tensor([1.])
        >>> tx = gc.trace(0.5)
        >>> state = tx.init(params)
        >>> for _ in range(3):
        ...     updates, state = tx.update({"w": torch.ones(1)}, state, params)
        ...     print(updates["w"])
        tensor([1.])
        tensor([1.5000])
        tensor([1.7500])
    """
    fn = "trace"
    nesterov = _check_bool(nesterov, "nesterov", fn)
    momentum = _check_nonneg(momentum, "momentum", "momentum value", fn)
    if isinstance(dampening, bool) or not isinstance(dampening, (int, float)):
        raise TypeError(f"{fn}: dampening must be a float, got {type(dampening).__name__}")
    dampening = float(dampening)
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError(
            f"{fn}: nesterov=True requires momentum > 0 and dampening == 0, "
            f"got momentum={momentum}, dampening={dampening}"
        )

    def init(params: Params) -> TraceState:
        return TraceState(count=_zero_count(params), trace=_buffers_like(params))

    def update(
        updates: Updates, state: TraceState, params: Params | None = None, **extra: Any
    ) -> tuple[Updates, TraceState]:
        del params
        _expect_state(state, TraceState, fn)
        donated_u, donated_s = donation(extra, fn)
        view = Leaves(updates)
        gs = view.values
        bufs: list[Any] = view.take(state.trace, "trace")
        g = _ops.cast(gs, [b.dtype for b in bufs])
        # From a zero buffer this is exactly g when dampening == 0; otherwise the first
        # step takes the undamped g, as torch does (copied: the state never aliases the
        # incoming updates).
        decayed = _ops.mul_(bufs, momentum) if donated_s else _ops.mul(bufs, momentum)
        new = _ops.add_(decayed, g, alpha=1.0 - dampening)
        if dampening != 0.0:
            first = state.count == 0
            known = _known_bool(first)
            if known is None:
                new = _ops.where(first, g, new)
            elif known:
                new = _ops.copy_(new, g)
        if nesterov:
            owned = donated_u and _ops.inplace_ok(g, new)
            out = _ops.add_(g, new, alpha=momentum) if owned else _ops.add(g, new, alpha=momentum)
        elif donated_u:
            # The output must not alias the new state: a later member may write into it.
            out = _ops.copy_(g, new) if _ops.inplace_ok(g, new) else [x.clone() for x in new]
        else:
            out = new
        out = _ops.cast(out, [x.dtype for x in gs])
        return view.put(out), TraceState(
            count=_next_count(state.count), trace=view.put_into(state.trace, new)
        )

    return GradientTransformation(init, update)


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
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)):
        raise TypeError(f"{fn}: weight_decay must be a float, got {type(weight_decay).__name__}")
    weight_decay = float(weight_decay)
    _check_finite(weight_decay, "weight_decay", fn)

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


# --------------------------------------------------------------------------- aliases
def sgd(
    lr: ScalarOrSchedule = 1e-3,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
) -> GradientTransformation:
    """Stochastic gradient descent, as ``torch.optim.SGD`` (same arguments and defaults).

    .. math::
        g \\leftarrow \\pm g + \\lambda p, \\quad
        b_t = \\mu b_{t-1} + (1 - \\tau) g \\;(b_1 = g), \\quad
        d = g + \\mu b_t \\text{ (nesterov) else } b_t, \\quad
        u = -\\eta_t\\, d

    (:math:`-g` when ``maximize``; without momentum :math:`d = g`).

    ``chain(scale(-1) if maximize, add_decayed_weights(weight_decay) if weight_decay,
    trace(momentum, dampening, nesterov) if momentum, scale_by_learning_rate(lr))``.

    Args:
        lr: learning rate: float, 1-element tensor, or schedule of the update count.
        momentum: momentum factor (>= 0).
        dampening: dampening for momentum.
        weight_decay: L2 penalty added to the gradient (>= 0).
        nesterov: Nesterov momentum (needs ``momentum > 0`` and ``dampening == 0``).
        maximize: maximize the objective instead of minimizing.

    Returns:
        A :class:`~gradchain.GradientTransformation` (a chain) whose updates are added to
        the params with :func:`~gradchain.apply_updates`.

    Raises:
        ValueError: for ``lr < 0``, ``momentum < 0``, ``weight_decay < 0`` or an invalid
            ``nesterov`` combination, as ``torch.optim.SGD`` does.

    Example:
        >>> import torch, gradchain as gc
        >>> tx = gc.sgd(lr=0.1, momentum=0.9)
        >>> params = {"w": torch.tensor([1.0, 2.0])}
        >>> state = tx.init(params)
        >>> for _ in range(2):
        ...     updates, state = tx.update({"w": torch.ones(2)}, state, params)
        ...     params = gc.apply_updates(params, updates)
        >>> params["w"]
        tensor([0.7100, 1.7100])
    """
    fn = "sgd"
    nesterov = _check_bool(nesterov, "nesterov", fn)
    maximize = _check_bool(maximize, "maximize", fn)
    lr = _check_lr(lr, fn)
    momentum = _check_nonneg(momentum, "momentum", "momentum value", fn)
    weight_decay = _check_nonneg(weight_decay, "weight_decay", "weight_decay value", fn)
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError(
            f"{fn}: nesterov=True requires momentum > 0 and dampening == 0, "
            f"got momentum={momentum}, dampening={dampening}"
        )
    txs: list[GradientTransformation] = []
    if maximize:
        txs.append(scale(-1.0))
    if weight_decay != 0:
        txs.append(add_decayed_weights(weight_decay))
    trace_at = None
    if momentum != 0:
        trace_at = len(txs)
        txs.append(trace(momentum, dampening, nesterov))
    txs.append(scale_by_learning_rate(lr))
    return _fusable(txs, "sgd", lr, trace_at, weight_decay=weight_decay, maximize=maximize,
                    momentum=momentum, dampening=float(dampening) if momentum != 0 else 0.0,
                    nesterov=nesterov)


def adam(
    lr: ScalarOrSchedule = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    amsgrad: bool = False,
    maximize: bool = False,
) -> GradientTransformation:
    """Adam, as ``torch.optim.Adam`` (same arguments and defaults).

    .. math::
        g \\leftarrow \\pm g + \\lambda p, \\quad
        u = -\\eta_t \\frac{m_t / (1 - \\beta_1^t)}{\\sqrt{\\hat v_t / (1 - \\beta_2^t)} + \\epsilon}

    with the moments of :func:`scale_by_adam`. ``weight_decay`` is the L2 penalty added
    to the gradient before the moments, as torch does (for decoupled decay see
    :func:`adamw`).

    ``chain(scale(-1) if maximize, add_decayed_weights(weight_decay) if weight_decay,
    scale_by_adam(*betas, eps, amsgrad), scale_by_learning_rate(lr))``.

    Args:
        lr: learning rate: float, 1-element tensor, or schedule of the update count.
        betas: ``(beta1, beta2)``, each in ``[0, 1)``.
        eps: term added to the denominator (>= 0).
        weight_decay: L2 penalty (>= 0).
        amsgrad: use the AMSGrad variant.
        maximize: maximize the objective instead of minimizing.

    Returns:
        A :class:`~gradchain.GradientTransformation` (a chain) whose updates are added to
        the params with :func:`~gradchain.apply_updates`.

    Raises:
        ValueError: for ``lr < 0``, ``eps < 0``, betas outside ``[0, 1)`` or
            ``weight_decay < 0``, as ``torch.optim.Adam`` does.

    Example:
        >>> import torch, gradchain as gc
        >>> tx = gc.adam(lr=0.1)
        >>> params = {"w": torch.tensor([1.0, -1.0])}
        >>> updates, state = tx.update({"w": torch.tensor([3.0, -0.5])}, tx.init(params), params)
        >>> gc.apply_updates(params, updates)["w"]
        tensor([ 0.9000, -0.9000])
    """
    fn = "adam"
    amsgrad = _check_bool(amsgrad, "amsgrad", fn)
    maximize = _check_bool(maximize, "maximize", fn)
    lr = _check_lr(lr, fn)
    eps = _check_nonneg(eps, "eps", "epsilon value", fn)
    b1, b2 = _check_betas(betas, fn)
    weight_decay = _check_nonneg(weight_decay, "weight_decay", "weight_decay value", fn)
    txs: list[GradientTransformation] = []
    if maximize:
        txs.append(scale(-1.0))
    if weight_decay != 0:
        txs.append(add_decayed_weights(weight_decay))
    adam_at = len(txs)
    txs.append(scale_by_adam(b1, b2, eps, amsgrad))
    txs.append(scale_by_learning_rate(lr))
    return _fusable(txs, "adam", lr, adam_at, b1=b1, b2=b2, eps=eps,
                    weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize)


def adamw(
    lr: ScalarOrSchedule = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    amsgrad: bool = False,
    maximize: bool = False,
) -> GradientTransformation:
    """AdamW (decoupled weight decay), as ``torch.optim.AdamW`` (same arguments and defaults).

    .. math::
        u = -\\eta_t \\left(\\frac{m_t / (1 - \\beta_1^t)}
            {\\sqrt{\\hat v_t / (1 - \\beta_2^t)} + \\epsilon} + \\lambda p\\right)

    i.e. ``p + u = p (1 - \\eta_t \\lambda) - \\eta_t\\,\\mathrm{adam}``, torch's
    ``param.mul_(1 - lr * weight_decay)`` followed by the Adam step; with a schedule the
    decay uses the scheduled learning rate, as torch does with a scheduler.

    torch multiplies by the factor ``1 - lr * weight_decay`` rounded to the parameter
    dtype; gradchain computes the decay term ``lr * weight_decay * p`` directly. In
    float32 the two differ by at most half an ulp of 1 (3e-8) relative per step, well
    inside the parity tolerance (1e-5 after 100 steps).

    ``chain(scale(-1) if maximize, scale_by_adam(*betas, eps, amsgrad),
    add_decayed_weights(weight_decay) if weight_decay, scale_by_learning_rate(lr))``.

    Args:
        lr: learning rate: float, 1-element tensor, or schedule of the update count.
        betas: ``(beta1, beta2)``, each in ``[0, 1)``.
        eps: term added to the denominator (>= 0).
        weight_decay: decoupled weight decay factor (>= 0).
        amsgrad: use the AMSGrad variant.
        maximize: maximize the objective instead of minimizing.

    Returns:
        A :class:`~gradchain.GradientTransformation` (a chain) whose updates are added to
        the params with :func:`~gradchain.apply_updates`.

    Raises:
        ValueError: for ``lr < 0``, ``eps < 0``, betas outside ``[0, 1)`` or
            ``weight_decay < 0``, as ``torch.optim.AdamW`` does.

    Example:
        >>> import torch, gradchain as gc
        >>> tx = gc.adamw(lr=0.1, weight_decay=0.5)
        >>> params = {"w": torch.tensor([1.0, -1.0])}
        >>> updates, state = tx.update({"w": torch.tensor([3.0, -0.5])}, tx.init(params), params)
        >>> gc.apply_updates(params, updates)["w"]  # p * (1 - 0.05) - 0.1 * sign(g)
        tensor([ 0.8500, -0.8500])
    """
    fn = "adamw"
    amsgrad = _check_bool(amsgrad, "amsgrad", fn)
    maximize = _check_bool(maximize, "maximize", fn)
    lr = _check_lr(lr, fn)
    eps = _check_nonneg(eps, "eps", "epsilon value", fn)
    b1, b2 = _check_betas(betas, fn)
    weight_decay = _check_nonneg(weight_decay, "weight_decay", "weight_decay value", fn)
    txs: list[GradientTransformation] = []
    if maximize:
        txs.append(scale(-1.0))
    adam_at = len(txs)
    txs.append(scale_by_adam(b1, b2, eps, amsgrad))
    if weight_decay != 0:
        txs.append(add_decayed_weights(weight_decay))
    txs.append(scale_by_learning_rate(lr))
    return _fusable(txs, "adamw", lr, adam_at, b1=b1, b2=b2, eps=eps,
                    weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize)



def _fusable(
    txs: list[GradientTransformation], kind: str, lr: ScalarOrSchedule, state_at: int | None,
    **hyper: Any,
) -> GradientTransformation:
    """``chain(*txs)``, recorded as runnable by torch's fused kernel in
    :func:`~gradchain.update_and_apply_`."""
    from gradchain.fused import _register, _Rule

    rule = _Rule(kind=kind, lr=lr, state_at=state_at,
                 lr_at=len(txs) - 1 if _is_schedule(lr) else None, size=len(txs), **hyper)
    return _register(chain(*txs), rule)
