"""Adadelta: :func:`scale_by_adadelta` and the ``torch.optim.Adadelta`` twin :func:`adadelta`."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch.optim import adadelta as torch_adadelta

from gradchain import _checks, _ops
from gradchain._tree import Leaves
from gradchain.base import GradientTransformation, donation, expect_state
from gradchain.combine import chain
from gradchain.optim._alias import rule_chain
from gradchain.optim._fused import FusedPlan, bind_fused, torch_rule_plan
from gradchain.optim._sharded import elementwise
from gradchain.transforms import add_decayed_weights

__all__ = ["ScaleByAdadeltaState", "scale_by_adadelta", "adadelta"]


class ScaleByAdadeltaState(NamedTuple):
    """State of :func:`scale_by_adadelta`.

    Attributes:
        count: int64 0-dim tensor, the number of updates done (torch's ``step``).
        square_avg: running average of squared gradients (torch's ``square_avg``).
        acc_delta: running average of squared updates (torch's ``acc_delta``).

    Example:
        >>> import torch, gradchain as gc
        >>> gc.scale_by_adadelta().init({"w": torch.zeros(1)})
        ScaleByAdadeltaState(count=tensor(0), square_avg={'w': tensor([0.])}, acc_delta={'w': tensor([0.])})
    """

    count: torch.Tensor  # type: ignore[assignment]  # shadows tuple.count, as in optax
    square_avg: Any
    acc_delta: Any


def scale_by_adadelta(rho: float = 0.9, eps: float = 1e-6) -> GradientTransformation:
    """Adadelta's direction, as in ``torch.optim.Adadelta``.

    .. math::
        v_t = \\rho v_{t-1} + (1 - \\rho) g_t^2, \\quad
        u_t = \\frac{\\sqrt{a_{t-1} + \\epsilon}}{\\sqrt{v_t + \\epsilon}}\\, g_t, \\quad
        a_t = \\rho a_{t-1} + (1 - \\rho) u_t^2

    Follow with :func:`~gradchain.scale_by_learning_rate` (torch's ``lr``, default 1.0).

    Args:
        rho: decay of the running averages, in ``[0, 1]``.
        eps: added inside both square roots (>= 0).

    Returns:
        A :class:`~gradchain.GradientTransformation` with state :class:`ScaleByAdadeltaState`.

    Raises:
        ValueError: for ``rho`` outside ``[0, 1]`` or ``eps < 0``, as torch does.

    Example:
        >>> import torch, gradchain as gc
        >>> tx = gc.scale_by_adadelta(rho=0.0, eps=0.0)
        >>> params = {"w": torch.zeros(1)}
        >>> tx.update({"w": torch.tensor([2.0])}, tx.init(params))[0]  # sqrt(0) / |g| * g
        {'w': tensor([0.])}
    """
    fn = "scale_by_adadelta"
    rho = _checks.in_range(rho, "rho", fn, 0.0, 1.0)
    eps = _checks.nonneg(eps, "eps", "epsilon value", fn)

    def init(params: Any) -> ScaleByAdadeltaState:
        return ScaleByAdadeltaState(
            count=_ops.zero_count(params), square_avg=_ops.buffers_like(params), acc_delta=_ops.buffers_like(params)
        )

    def update(
        updates: Any, state: ScaleByAdadeltaState, params: Any = None, **extra: Any
    ) -> tuple[Any, ScaleByAdadeltaState]:
        del params
        expect_state(state, ScaleByAdadeltaState, fn)
        donation(extra, fn)
        view = Leaves(updates)
        gs = view.values
        sqs: list[Any] = view.take(state.square_avg, "square_avg")
        accs: list[Any] = view.take(state.acc_delta, "acc_delta")
        n = len(gs)
        out: list[Any] = [None] * n
        new_sq: list[Any] = [None] * n
        new_acc: list[Any] = [None] * n
        for idx in _ops.groups(sqs):
            v = _ops.pick(sqs, idx)
            a = _ops.pick(accs, idx)
            g = _ops.cast(_ops.pick(gs, idx), [x.dtype for x in v])
            v = _ops.addcmul_(_ops.mul(v, rho), g, g, 1.0 - rho)
            std = _ops.sqrt(_ops.add_scalar(v, eps))
            delta = _ops.sqrt(_ops.add_scalar(a, eps))
            delta = _ops.mul_list_(_ops.div_(delta, std), g)
            a = _ops.addcmul_(_ops.mul(a, rho), delta, delta, 1.0 - rho)
            _ops.scatter(out, idx, _ops.cast(delta, [x.dtype for x in _ops.pick(gs, idx)]))
            _ops.scatter(new_sq, idx, v)
            _ops.scatter(new_acc, idx, a)
        return view.put(out), ScaleByAdadeltaState(
            count=_ops.safe_increment(state.count),
            square_avg=view.put_into(state.square_avg, new_sq),
            acc_delta=view.put_into(state.acc_delta, new_acc),
        )

    return GradientTransformation(init, update)


def adadelta(
    lr: Any = 1.0,
    rho: float = 0.9,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    foreach: bool | None = None,
    *,
    capturable: bool = False,
    maximize: bool = False,
    differentiable: bool = False,
) -> GradientTransformation:
    """Adadelta, as ``torch.optim.Adadelta`` (same arguments and defaults).

    .. math::
        g \\leftarrow \\pm g + \\lambda p, \\quad
        u = -\\eta_t\\, \\frac{\\sqrt{a_{t-1} + \\epsilon}}{\\sqrt{v_t + \\epsilon}}\\, g

    with the averages of :func:`scale_by_adadelta`.

    ``chain(scale(-1) if maximize, add_decayed_weights(weight_decay) if weight_decay,
    scale_by_adadelta(rho, eps), scale_by_learning_rate(lr))``. ``foreach``,
    ``capturable`` and ``differentiable`` are accepted for signature compatibility and
    change nothing (the update never syncs and is always differentiable).

    Args:
        lr: learning rate: float, 1-element tensor, or schedule of the update count.
        rho: decay of the running averages, in ``[0, 1]``.
        eps: added inside the square roots (>= 0).
        weight_decay: L2 penalty added to the gradient (>= 0).
        foreach, capturable, differentiable: accepted, no effect.
        maximize: maximize the objective instead of minimizing.

    Returns:
        A :class:`~gradchain.GradientTransformation` (a chain).

    Raises:
        ValueError: for ``lr < 0``, ``rho`` outside ``[0, 1]``, ``eps < 0`` or
            ``weight_decay < 0``, as torch does.

    Example:
        >>> import torch, gradchain as gc
        >>> tx = gc.adadelta()
        >>> params = {"w": torch.tensor([1.0])}
        >>> updates, state = tx.update({"w": torch.tensor([1.0])}, tx.init(params), params)
        >>> updates["w"]  # -sqrt(eps) / sqrt(0.1 + eps)
        tensor([-0.0032])
    """
    fn = "adadelta"
    maximize = _checks.as_bool(maximize, "maximize", fn)
    lr = _checks.check_lr(lr, fn)
    _checks.in_range(rho, "rho", fn, 0.0, 1.0)
    _checks.nonneg(eps, "eps", "epsilon value", fn)
    weight_decay = _checks.nonneg(weight_decay, "weight_decay", "weight_decay value", fn)
    del foreach, capturable, differentiable
    txs, rule_at = rule_chain(
        scale_by_adadelta(rho, eps), lr=lr, maximize=maximize,
        decay=add_decayed_weights(weight_decay) if weight_decay != 0 else None,
    )
    return bind_fused(chain(*txs), _adadelta_plan(lr, rule_at, len(txs), rho=rho, eps=eps,
                                                  weight_decay=weight_decay, maximize=maximize))


def _adadelta_plan(lr: Any, rule_at: int, size: int, **hyper: Any) -> FusedPlan:
    """``adadelta``'s binding to torch's foreach Adadelta (what
    ``torch.optim.Adadelta(foreach=True)`` runs), for :func:`~gradchain.update_and_apply_`."""

    def kernel(ps: Any, gs: Any, bufs: Any, steps: Any, lr_now: Any, st: Any) -> dict[str, Any]:
        torch_adadelta.adadelta(ps, gs, bufs[0], bufs[1], steps, foreach=True,
                                      lr=lr_now, **hyper)
        return {}

    return elementwise(torch_rule_plan(
        lr, size, rule_at, ScaleByAdadeltaState, [(0, "square_avg"), (0, "acc_delta")], kernel
    ))
