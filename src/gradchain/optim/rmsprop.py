"""RMSprop: :func:`scale_by_rmsprop` and the ``torch.optim.RMSprop`` twin :func:`rmsprop`."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch.optim import rmsprop as torch_rmsprop

from gradchain import _checks, _ops
from gradchain._tree import Leaves
from gradchain.base import GradientTransformation, donation, expect_state
from gradchain.combine import chain
from gradchain.optim._alias import rule_chain
from gradchain.optim._fused import FusedPlan, bind_fused, torch_rule_plan
from gradchain.optim._sharded import elementwise
from gradchain.optim.sgd import TraceState, trace
from gradchain.transforms import add_decayed_weights

__all__ = ["ScaleByRmspropState", "scale_by_rmsprop", "rmsprop"]


class ScaleByRmspropState(NamedTuple):
    """State of :func:`scale_by_rmsprop`.

    Attributes:
        count: int64 0-dim tensor, the number of updates done (torch's ``step``).
        nu: running average of squared gradients (torch's ``square_avg``).
        mu: running average of gradients (torch's ``grad_avg``) when ``centered``; the
            empty tuple ``()`` otherwise.

    Example:
        >>> import torch, gradchain as gc
        >>> gc.scale_by_rmsprop(centered=True).init({"w": torch.zeros(1)})
        ScaleByRmspropState(count=tensor(0), nu={'w': tensor([0.])}, mu={'w': tensor([0.])})
    """

    count: torch.Tensor  # type: ignore[assignment]  # shadows tuple.count, as in optax
    nu: Any
    mu: Any


def scale_by_rmsprop(
    alpha: float = 0.99, eps: float = 1e-8, centered: bool = False
) -> GradientTransformation:
    """RMSprop's direction, as in ``torch.optim.RMSprop``.

    .. math::
        v_t = \\alpha v_{t-1} + (1 - \\alpha) g_t^2, \\qquad
        u_t = \\frac{g_t}{\\sqrt{v_t - \\bar g_t^2} + \\epsilon}

    where :math:`\\bar g_t = \\alpha \\bar g_{t-1} + (1 - \\alpha) g_t` when ``centered``
    (and :math:`\\bar g = 0` otherwise). Note ``eps`` is added outside the square root, as
    torch does (optax's ``scale_by_rms`` adds it inside). Momentum is
    :func:`~gradchain.trace` after this block (torch's ``buf = momentum * buf + u``).

    Args:
        alpha: smoothing constant (>= 0).
        eps: added to the denominator (>= 0).
        centered: normalise by the estimated variance instead of the second moment.

    Returns:
        A :class:`~gradchain.GradientTransformation` with state :class:`ScaleByRmspropState`.

    Raises:
        ValueError: for a negative ``alpha`` or ``eps``.

    Example:
        >>> import torch, gradchain as gc
        >>> tx = gc.scale_by_rmsprop(alpha=0.75, eps=0.0)
        >>> params = {"w": torch.zeros(2)}
        >>> tx.update({"w": torch.tensor([1.0, -4.0])}, tx.init(params))[0]  # g / sqrt(g^2 / 4)
        {'w': tensor([ 2., -2.])}
    """
    fn = "scale_by_rmsprop"
    alpha = _checks.nonneg(alpha, "alpha", "alpha value", fn)
    eps = _checks.nonneg(eps, "eps", "epsilon value", fn)
    centered = _checks.as_bool(centered, "centered", fn)

    def init(params: Any) -> ScaleByRmspropState:
        return ScaleByRmspropState(
            count=_ops.zero_count(params),
            nu=_ops.buffers_like(params),
            mu=_ops.buffers_like(params) if centered else (),
        )

    def update(
        updates: Any, state: ScaleByRmspropState, params: Any = None, **extra: Any
    ) -> tuple[Any, ScaleByRmspropState]:
        del params
        expect_state(state, ScaleByRmspropState, fn)
        donation(extra, fn)
        view = Leaves(updates)
        gs = view.values
        nus: list[Any] = view.take(state.nu, "nu")
        mus: list[Any] = view.take(state.mu, "mu") if centered else []
        n = len(gs)
        out: list[Any] = [None] * n
        new_nu: list[Any] = [None] * n
        new_mu: list[Any] = [None] * n
        for idx in _ops.groups(nus):
            v = _ops.pick(nus, idx)
            g = _ops.cast(_ops.pick(gs, idx), [x.dtype for x in v])
            v = _ops.addcmul_(_ops.mul(v, alpha), g, g, 1.0 - alpha)
            if centered:
                m = _ops.lerp(_ops.pick(mus, idx), g, 1.0 - alpha)
                avg = _ops.sqrt(_ops.addcmul(v, m, m, -1.0))
                _ops.scatter(new_mu, idx, m)
            else:
                avg = _ops.sqrt(v)
            avg = _ops.add_scalar_(avg, eps)
            u = _ops.div(g, avg)
            _ops.scatter(out, idx, _ops.cast(u, [x.dtype for x in _ops.pick(gs, idx)]))
            _ops.scatter(new_nu, idx, v)
        return view.put(out), ScaleByRmspropState(
            count=_ops.safe_increment(state.count),
            nu=view.put_into(state.nu, new_nu),
            mu=view.put_into(state.mu, new_mu) if centered else state.mu,
        )

    return GradientTransformation(init, update)


def rmsprop(
    lr: Any = 1e-2,
    alpha: float = 0.99,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    centered: bool = False,
    capturable: bool = False,
    foreach: bool | None = None,
    maximize: bool = False,
    differentiable: bool = False,
) -> GradientTransformation:
    """RMSprop, as ``torch.optim.RMSprop`` (same arguments and defaults).

    .. math::
        g \\leftarrow \\pm g + \\lambda p, \\quad
        d_t = \\frac{g}{\\sqrt{v_t - \\bar g_t^2} + \\epsilon}, \\quad
        b_t = \\mu b_{t-1} + d_t, \\quad u = -\\eta_t\\, b_t

    (:math:`b_t = d_t` without momentum, :math:`\\bar g = 0` unless ``centered``).

    ``chain(scale(-1) if maximize, add_decayed_weights(weight_decay) if weight_decay,
    scale_by_rmsprop(alpha, eps, centered), trace(momentum) if momentum,
    scale_by_learning_rate(lr))``. ``foreach``, ``capturable`` and ``differentiable`` are
    accepted and change nothing.

    Args:
        lr: learning rate: float, 1-element tensor, or schedule of the update count.
        alpha: smoothing constant (>= 0).
        eps: added to the denominator (>= 0).
        weight_decay: L2 penalty added to the gradient (>= 0).
        momentum: momentum factor (>= 0).
        centered: normalise by the estimated variance of the gradient.
        capturable, foreach, differentiable: accepted, no effect.
        maximize: maximize the objective instead of minimizing.

    Returns:
        A :class:`~gradchain.GradientTransformation` (a chain).

    Raises:
        ValueError: for a negative ``lr``, ``alpha``, ``eps``, ``weight_decay`` or
            ``momentum``, as torch does.

    Example:
        >>> import torch, gradchain as gc
        >>> tx = gc.rmsprop(lr=0.01, alpha=0.75)
        >>> params = {"w": torch.tensor([1.0, -1.0])}
        >>> updates, state = tx.update({"w": torch.tensor([1.0, -4.0])}, tx.init(params), params)
        >>> gc.apply_updates(params, updates)["w"]
        tensor([ 0.9800, -0.9800])
    """
    fn = "rmsprop"
    maximize = _checks.as_bool(maximize, "maximize", fn)
    centered = _checks.as_bool(centered, "centered", fn)
    lr = _checks.check_lr(lr, fn)
    eps = _checks.nonneg(eps, "eps", "epsilon value", fn)
    momentum = _checks.nonneg(momentum, "momentum", "momentum value", fn)
    weight_decay = _checks.nonneg(weight_decay, "weight_decay", "weight_decay value", fn)
    alpha = _checks.nonneg(alpha, "alpha", "alpha value", fn)
    del capturable, foreach, differentiable
    txs, rule_at = rule_chain(
        scale_by_rmsprop(alpha, eps, centered), lr=lr, maximize=maximize,
        decay=add_decayed_weights(weight_decay) if weight_decay != 0 else None,
        after=[trace(momentum)] if momentum > 0 else [],
    )
    return bind_fused(chain(*txs), _rmsprop_plan(
        lr, rule_at, len(txs), alpha=alpha, eps=eps, weight_decay=weight_decay,
        momentum=momentum, centered=centered, maximize=maximize))


def _rmsprop_plan(lr: Any, rule_at: int, size: int, **hyper: Any) -> FusedPlan:
    """``rmsprop``'s binding to torch's foreach RMSprop (what
    ``torch.optim.RMSprop(foreach=True)`` runs), for :func:`~gradchain.update_and_apply_`:
    the block's averages and the following :func:`~gradchain.trace`'s buffers are torch's
    ``square_avg``, ``grad_avg`` and ``momentum_buffer``."""
    centered, momentum = hyper["centered"], hyper["momentum"]
    fields = [(0, "nu")] + ([(0, "mu")] if centered else []) + ([(1, "trace")] if momentum > 0 else [])
    members = [(1, TraceState)] if momentum > 0 else []

    def kernel(ps: Any, gs: Any, bufs: Any, steps: Any, lr_now: Any, st: Any) -> dict[str, Any]:
        grad_avgs = bufs[1] if centered else []
        momentum_bufs = bufs[-1] if momentum > 0 else []
        torch_rmsprop.rmsprop(ps, gs, bufs[0], grad_avgs, momentum_bufs, steps,
                                    foreach=True, lr=lr_now, **hyper)
        return {}

    return elementwise(torch_rule_plan(
        lr, size, rule_at, ScaleByRmspropState, fields, kernel, members=members
    ))
