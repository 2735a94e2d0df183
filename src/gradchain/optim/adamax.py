"""Adamax: :func:`scale_by_adamax` and the ``torch.optim.Adamax`` twin :func:`adamax`."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch.optim import adamax as torch_adamax

from gradchain import _checks, _ops
from gradchain._tree import Leaves
from gradchain.base import GradientTransformation, donation, expect_state
from gradchain.combine import chain
from gradchain.optim._alias import rule_chain
from gradchain.optim._fused import FusedPlan, bind_fused, torch_rule_plan
from gradchain.optim._sharded import elementwise
from gradchain.transforms import add_decayed_weights

__all__ = ["ScaleByAdamaxState", "scale_by_adamax", "adamax"]


class ScaleByAdamaxState(NamedTuple):
    """State of :func:`scale_by_adamax`.

    Attributes:
        count: int64 0-dim tensor, the number of updates done (torch's ``step``).
        mu: first moments (torch's ``exp_avg``).
        inf_norm: exponentially weighted infinity norms (torch's ``exp_inf``).

    Example:
        >>> import torch, gradchain as gc
        >>> gc.scale_by_adamax().init({"w": torch.zeros(1)})
        ScaleByAdamaxState(count=tensor(0), mu={'w': tensor([0.])}, inf_norm={'w': tensor([0.])})
    """

    count: torch.Tensor  # type: ignore[assignment]  # shadows tuple.count, as in optax
    mu: Any
    inf_norm: Any


def scale_by_adamax(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
) -> GradientTransformation:
    """Adamax's direction, as in ``torch.optim.Adamax``.

    .. math::
        m_t = \\beta_1 m_{t-1} + (1 - \\beta_1) g_t, \\quad
        n_t = \\max(\\beta_2 n_{t-1}, |g_t| + \\epsilon), \\quad
        u_t = \\frac{m_t}{(1 - \\beta_1^t)\\, n_t}

    (``eps`` is added to :math:`|g|` before the maximum, as torch does). The bias
    correction is computed in float64 from the step count. Follow with
    :func:`~gradchain.scale_by_learning_rate`.

    Args:
        b1: decay of the first moment (torch's ``betas[0]``), in ``[0, 1)``.
        b2: decay of the infinity norm (torch's ``betas[1]``), in ``[0, 1)``.
        eps: added to :math:`|g|` (>= 0).

    Returns:
        A :class:`~gradchain.GradientTransformation` with state :class:`ScaleByAdamaxState`.

    Raises:
        ValueError: for betas outside ``[0, 1)`` or ``eps < 0``.

    Example:
        >>> import torch, gradchain as gc
        >>> tx = gc.scale_by_adamax(eps=0.0)
        >>> params = {"w": torch.zeros(2)}
        >>> tx.update({"w": torch.tensor([0.5, -2.0])}, tx.init(params))[0]  # sign(g) at step 1
        {'w': tensor([ 1., -1.])}
    """
    fn = "scale_by_adamax"
    b1 = _checks.in_range(b1, "b1", fn, 0.0, 1.0, hi_open=True)
    b2 = _checks.in_range(b2, "b2", fn, 0.0, 1.0, hi_open=True)
    eps = _checks.nonneg(eps, "eps", "epsilon value", fn)

    def init(params: Any) -> ScaleByAdamaxState:
        return ScaleByAdamaxState(
            count=_ops.zero_count(params), mu=_ops.buffers_like(params), inf_norm=_ops.buffers_like(params)
        )

    def update(
        updates: Any, state: ScaleByAdamaxState, params: Any = None, **extra: Any
    ) -> tuple[Any, ScaleByAdamaxState]:
        del params
        expect_state(state, ScaleByAdamaxState, fn)
        donation(extra, fn)
        view = Leaves(updates)
        gs = view.values
        mus: list[Any] = view.take(state.mu, "mu")
        infs: list[Any] = view.take(state.inf_norm, "inf_norm")
        count = _ops.safe_increment(state.count)
        step = count.to(_ops.scalar_dtype(count.device))
        bias_correction = 1.0 - b1**step
        n = len(gs)
        out: list[Any] = [None] * n
        new_mu: list[Any] = [None] * n
        new_inf: list[Any] = [None] * n
        for idx in _ops.groups(mus):
            m = _ops.pick(mus, idx)
            g = _ops.cast(_ops.pick(gs, idx), [x.dtype for x in m])
            m = _ops.lerp(m, g, 1.0 - b1)
            u = _ops.maximum_(_ops.mul(_ops.pick(infs, idx), b2), _ops.add_scalar_(_ops.abs(g), eps))
            d = _ops.div_scalar_(_ops.div(m, u), _ops.scalar_for(bias_correction, m[0]))
            _ops.scatter(out, idx, _ops.cast(d, [x.dtype for x in _ops.pick(gs, idx)]))
            _ops.scatter(new_mu, idx, m)
            _ops.scatter(new_inf, idx, u)
        return view.put(out), ScaleByAdamaxState(
            count=count,
            mu=view.put_into(state.mu, new_mu),
            inf_norm=view.put_into(state.inf_norm, new_inf),
        )

    return GradientTransformation(init, update)


def adamax(
    lr: Any = 2e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    foreach: bool | None = None,
    *,
    maximize: bool = False,
    differentiable: bool = False,
    capturable: bool = False,
) -> GradientTransformation:
    """Adamax, as ``torch.optim.Adamax`` (same arguments and defaults).

    .. math::
        g \\leftarrow \\pm g + \\lambda p, \\quad
        u = -\\frac{\\eta_t}{1 - \\beta_1^t}\\,\\frac{m_t}{n_t}

    with the moments of :func:`scale_by_adamax`.

    ``chain(scale(-1) if maximize, add_decayed_weights(weight_decay) if weight_decay,
    scale_by_adamax(*betas, eps), scale_by_learning_rate(lr))``. ``foreach``,
    ``capturable`` and ``differentiable`` are accepted and change nothing.

    Args:
        lr: learning rate: float, 1-element tensor, or schedule of the update count.
        betas: ``(beta1, beta2)``, each in ``[0, 1)``.
        eps: added to :math:`|g|` (>= 0).
        weight_decay: L2 penalty added to the gradient (>= 0).
        foreach, differentiable, capturable: accepted, no effect.
        maximize: maximize the objective instead of minimizing.

    Returns:
        A :class:`~gradchain.GradientTransformation` (a chain).

    Raises:
        ValueError: for ``lr < 0``, ``eps < 0``, betas outside ``[0, 1)`` or
            ``weight_decay < 0``, as torch does.

    Example:
        >>> import torch, gradchain as gc
        >>> tx = gc.adamax(lr=0.1)
        >>> params = {"w": torch.tensor([1.0, -1.0])}
        >>> updates, state = tx.update({"w": torch.tensor([3.0, -0.5])}, tx.init(params), params)
        >>> gc.apply_updates(params, updates)["w"]
        tensor([ 0.9000, -0.9000])
    """
    fn = "adamax"
    maximize = _checks.as_bool(maximize, "maximize", fn)
    lr = _checks.check_lr(lr, fn)
    eps = _checks.nonneg(eps, "eps", "epsilon value", fn)
    b1, b2 = _checks.betas(betas, fn)
    weight_decay = _checks.nonneg(weight_decay, "weight_decay", "weight_decay value", fn)
    del foreach, differentiable, capturable
    txs, rule_at = rule_chain(
        scale_by_adamax(b1, b2, eps), lr=lr, maximize=maximize,
        decay=add_decayed_weights(weight_decay) if weight_decay != 0 else None,
    )
    return bind_fused(chain(*txs), _adamax_plan(lr, rule_at, len(txs), beta1=b1, beta2=b2, eps=eps,
                                                weight_decay=weight_decay, maximize=maximize))


def _adamax_plan(lr: Any, rule_at: int, size: int, **hyper: Any) -> FusedPlan:
    """``adamax``'s binding to torch's foreach Adamax (what ``torch.optim.Adamax(foreach=True)``
    runs), for :func:`~gradchain.update_and_apply_`."""

    def kernel(ps: Any, gs: Any, bufs: Any, steps: Any, lr_now: Any, st: Any) -> dict[str, Any]:
        torch_adamax.adamax(ps, gs, bufs[0], bufs[1], steps, foreach=True, lr=lr_now,
                                  **hyper)
        return {}

    return elementwise(torch_rule_plan(
        lr, size, rule_at, ScaleByAdamaxState, [(0, "mu"), (0, "inf_norm")], kernel
    ))
