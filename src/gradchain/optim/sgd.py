"""SGD: the momentum block ``trace`` and the ``torch.optim.SGD`` twin ``sgd``, with its
binding to torch's fused SGD kernel.

``sgd`` takes ``torch.optim.SGD``'s argument names and defaults and follows the same
trajectory: the loop

.. code-block:: python

    updates, state = tx.update(grads, state, params)
    params = gc.apply_updates(params, updates)

matches ``torch.optim.SGD`` on the same gradients to float rounding (float32 rtol 1e-5,
float64 rtol 1e-12 after 100 steps; tested), and :func:`~gradchain.update_and_apply_`
runs it as ``torch._fused_sgd_``, equal to ``SGD(fused=True)`` bit for bit. The
conventions shared by every rule (dtypes, counters, ``None`` gradients, deliberate
differences from torch.optim) are on :mod:`gradchain.optim`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from gradchain import _checks, _ops
from gradchain._ops import known_bool, known_float
from gradchain._tree import Leaves, flatten_like
from gradchain.base import GradientTransformation, Params, Updates, donation, expect_state
from gradchain.combine import chain
from gradchain.optim._fused import (
    FusedPlan,
    FusedStep,
    bind_fused,
    found_inf,
    fused_rows,
    kernel_groups,
    lr_on,
    lr_state_fits,
    step_lr,
    tick,
)
from gradchain.optim._sharded import elementwise
from gradchain.transforms import (
    ScalarOrSchedule,
    add_decayed_weights,
    scale,
    scale_by_learning_rate,
)

__all__ = ["TraceState", "trace", "sgd"]


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
    nesterov = _checks.as_bool(nesterov, "nesterov", fn)
    momentum = _checks.nonneg(momentum, "momentum", "momentum value", fn)
    dampening = _checks.as_float(dampening, "dampening", fn)
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError(
            f"{fn}: nesterov=True requires momentum > 0 and dampening == 0, "
            f"got momentum={momentum}, dampening={dampening}"
        )

    def init(params: Params) -> TraceState:
        return TraceState(count=_ops.zero_count(params), trace=_ops.buffers_like(params))

    def update(
        updates: Updates, state: TraceState, params: Params | None = None, **extra: Any
    ) -> tuple[Updates, TraceState]:
        del params
        expect_state(state, TraceState, fn)
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
            known = known_bool(first)
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
            count=_ops.safe_increment(state.count), trace=view.put_into(state.trace, new)
        )

    return GradientTransformation(init, update)



def sgd(
    lr: ScalarOrSchedule = 1e-3,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float | torch.Tensor = 0.0,
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
    nesterov = _checks.as_bool(nesterov, "nesterov", fn)
    maximize = _checks.as_bool(maximize, "maximize", fn)
    lr = _checks.check_lr(lr, fn)
    momentum = _checks.nonneg(momentum, "momentum", "momentum value", fn)
    weight_decay = _checks.nonneg_scalar(weight_decay, "weight_decay", "weight_decay value", fn)
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError(
            f"{fn}: nesterov=True requires momentum > 0 and dampening == 0, "
            f"got momentum={momentum}, dampening={dampening}"
        )
    txs: list[GradientTransformation] = []
    if maximize:
        txs.append(scale(-1.0))
    if _checks.maybe_nonzero(weight_decay):
        txs.append(add_decayed_weights(weight_decay))
    trace_at = None
    if momentum != 0:
        trace_at = len(txs)
        txs.append(trace(momentum, dampening, nesterov))
    txs.append(scale_by_learning_rate(lr))
    return bind_fused(
        chain(*txs),
        elementwise(_sgd_plan(
            lr, trace_at, len(txs), weight_decay=weight_decay, momentum=momentum,
            dampening=float(dampening) if momentum != 0 else 0.0, nesterov=nesterov,
            maximize=maximize)),
    )


def _sgd_plan(
    lr: ScalarOrSchedule, trace_at: int | None, size: int, **hyper: Any
) -> FusedPlan:
    """``sgd``'s binding to ``torch._fused_sgd_`` (what ``torch.optim.SGD(fused=True)``
    runs), for :func:`~gradchain.update_and_apply_`; see :mod:`gradchain.optim._fused`."""

    def plan(state: Any, p_leaves: list[Any], g_leaves: list[Any], spec: Any) -> FusedStep | None:
        if not lr_state_fits(state, size, lr):
            return None
        tr = None if trace_at is None else state[trace_at]
        buffers: list[list[Any]] = []
        first: bool | None = False
        if tr is not None:
            if not isinstance(tr, TraceState) or not torch.is_tensor(tr.count):
                return None
            if hyper["dampening"] != 0:
                # From zero buffers without dampening the first step is the same sum; with
                # it, whether this is the first step must be known without a sync.
                first = known_bool(tr.count == 0)
                if first is None:
                    return None
            try:
                buffers = [flatten_like(spec, tr.trace, "trace", "params")]
            except (TypeError, ValueError):
                return None
        weight_decay = known_float(hyper["weight_decay"])  # the kernel takes a float
        if weight_decay is None:
            return None
        rows = fused_rows(p_leaves, g_leaves, buffers)
        if rows is None:
            return None

        def step(grads: list[Any], keep: torch.Tensor | None) -> Any:
            new_state = list(state)
            lr_now = step_lr(lr, new_state, keep)
            for cols in kernel_groups(p_leaves, grads, rows, buffers):
                device = cols[0][0].device
                torch._fused_sgd_(
                    cols[0], cols[1], cols[2] if tr is not None else [],
                    weight_decay=weight_decay, momentum=hyper["momentum"],
                    lr=lr_on(lr_now, device),
                    dampening=hyper["dampening"], nesterov=hyper["nesterov"],
                    maximize=hyper["maximize"], is_first_step=bool(first),
                    found_inf=found_inf(keep, device),
                )
            if tr is not None:
                # The buffers were updated in place: the new state holds the same tensors.
                new_state[trace_at] = tr._replace(count=tick(tr.count, keep))  # type: ignore[index]
            return tuple(new_state)

        return step

    return plan


