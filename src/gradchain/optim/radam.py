"""RAdam: :func:`scale_by_radam` and the ``torch.optim.RAdam`` twin :func:`radam`."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch.optim import radam as torch_radam

from gradchain import _checks, _ops
from gradchain._tree import Leaves
from gradchain.base import GradientTransformation, donation, expect_state
from gradchain.combine import chain
from gradchain.optim._alias import rule_chain
from gradchain.optim._fused import FusedPlan, bind_fused, torch_rule_plan
from gradchain.optim._sharded import elementwise
from gradchain.transforms import add_decayed_weights

__all__ = ["ScaleByRadamState", "scale_by_radam", "radam"]


class ScaleByRadamState(NamedTuple):
    """State of :func:`scale_by_radam`.

    Attributes:
        count: int64 0-dim tensor, the number of updates done (torch's ``step``).
        mu: first moments (torch's ``exp_avg``).
        nu: second moments (torch's ``exp_avg_sq``).

    Example:
        >>> import torch, gradchain as gc
        >>> gc.scale_by_radam().init({"w": torch.zeros(1)})
        ScaleByRadamState(count=tensor(0), mu={'w': tensor([0.])}, nu={'w': tensor([0.])})
    """

    count: torch.Tensor  # type: ignore[assignment]  # shadows tuple.count, as in optax
    mu: Any
    nu: Any


def scale_by_radam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> GradientTransformation:
    """RAdam's direction (rectified Adam), as in ``torch.optim.RAdam``.

    .. math::
        \\rho_\\infty = \\frac{2}{1-\\beta_2} - 1, \\quad
        \\rho_t = \\rho_\\infty - \\frac{2t\\beta_2^t}{1-\\beta_2^t}, \\quad
        \\hat m_t = \\frac{m_t}{1-\\beta_1^t},

    .. math::
        u_t = \\begin{cases}
            \\hat m_t\\, r_t \\frac{\\sqrt{1-\\beta_2^t}}{\\sqrt{v_t} + \\epsilon},
            & \\rho_t > 5, \\quad
            r_t = \\sqrt{\\frac{(\\rho_t-4)(\\rho_t-2)\\rho_\\infty}{(\\rho_\\infty-4)
            (\\rho_\\infty-2)\\rho_t}} \\\\
            \\hat m_t & \\text{otherwise}
        \\end{cases}

    with Adam's moments :math:`m_t, v_t`. The branch depends on the step count only; it
    is taken as a 0-dim tensor select on the scalars (float64), so there is no host
    read and no graph break. Follow with :func:`~gradchain.scale_by_learning_rate`.

    Args:
        b1: decay of the first moment (torch's ``betas[0]``), in ``[0, 1)``.
        b2: decay of the second moment (torch's ``betas[1]``), in ``[0, 1)``.
        eps: added to the denominator (>= 0).

    Returns:
        A :class:`~gradchain.GradientTransformation` with state :class:`ScaleByRadamState`.

    Raises:
        ValueError: for betas outside ``[0, 1)`` or ``eps < 0``.

    Example:
        >>> import torch, gradchain as gc
        >>> tx = gc.scale_by_radam()
        >>> params = {"w": torch.zeros(2)}
        >>> updates, state = tx.update({"w": torch.tensor([1.0, -2.0])}, tx.init(params))
        >>> updates["w"]  # the first steps are un-rectified: the bias-corrected momentum
        tensor([ 1., -2.])
    """
    fn = "scale_by_radam"
    b1 = _checks.in_range(b1, "b1", fn, 0.0, 1.0, hi_open=True)
    b2 = _checks.in_range(b2, "b2", fn, 0.0, 1.0, hi_open=True)
    eps = _checks.nonneg(eps, "eps", "epsilon value", fn)
    rho_inf = 2.0 / (1.0 - b2) - 1.0

    def init(params: Any) -> ScaleByRadamState:
        return ScaleByRadamState(
            count=_ops.zero_count(params), mu=_ops.buffers_like(params), nu=_ops.buffers_like(params)
        )

    def update(
        updates: Any, state: ScaleByRadamState, params: Any = None, **extra: Any
    ) -> tuple[Any, ScaleByRadamState]:
        del params
        expect_state(state, ScaleByRadamState, fn)
        donation(extra, fn)
        view = Leaves(updates)
        gs = view.values
        mus: list[Any] = view.take(state.mu, "mu")
        nus: list[Any] = view.take(state.nu, "nu")
        count = _ops.safe_increment(state.count)
        step = count.to(_ops.scalar_dtype(count.device))
        b2t = b2**step
        bias_correction1 = 1.0 - b1**step
        bias_correction2 = 1.0 - b2t
        rho_t = rho_inf - 2.0 * step * b2t / bias_correction2
        rectified = rho_t > 5.0
        # Both branches' scalars are finite (rect is clamped where it is not used).
        rho_safe = torch.where(rectified, rho_t, torch.full_like(rho_t, 6.0))
        rect = torch.sqrt(
            (rho_safe - 4.0) * (rho_safe - 2.0) * rho_inf
            / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_safe)
        )
        adaptive = torch.where(rectified, rect * torch.sqrt(bias_correction2), 0.0)
        plain = torch.where(rectified, 0.0, 1.0).to(step.dtype)
        n = len(gs)
        out: list[Any] = [None] * n
        new_mu: list[Any] = [None] * n
        new_nu: list[Any] = [None] * n
        for idx in _ops.groups(mus):
            m = _ops.pick(mus, idx)
            g = _ops.cast(_ops.pick(gs, idx), [x.dtype for x in m])
            m = _ops.lerp(m, g, 1.0 - b1)
            v = _ops.addcmul_(_ops.mul(_ops.pick(nus, idx), b2), g, g, 1.0 - b2)
            like = m[0]
            # torch's foreach form: m / bc1 * (adaptive / (sqrt(v) + eps) + plain)
            factor = _ops.add_scalar_(_ops.sqrt(v), eps)
            factor = _ops.rdiv_scalar_(factor, _ops.scalar_for(adaptive, like))
            factor = _ops.add_scalar_(factor, _ops.scalar_for(plain, like))
            d = _ops.mul_list_(_ops.div_scalar(m, _ops.scalar_for(bias_correction1, like)), factor)
            _ops.scatter(out, idx, _ops.cast(d, [x.dtype for x in _ops.pick(gs, idx)]))
            _ops.scatter(new_mu, idx, m)
            _ops.scatter(new_nu, idx, v)
        return view.put(out), ScaleByRadamState(
            count=count, mu=view.put_into(state.mu, new_mu), nu=view.put_into(state.nu, new_nu)
        )

    return GradientTransformation(init, update)


def radam(
    lr: Any = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = False,
    *,
    foreach: bool | None = None,
    maximize: bool = False,
    capturable: bool = False,
    differentiable: bool = False,
) -> GradientTransformation:
    """RAdam, as ``torch.optim.RAdam`` (same arguments and defaults).

    .. math::
        u = -\\eta_t\\, \\mathrm{radam}(g) \\;\\; (- \\eta_t \\lambda p \\text{ when decoupled})

    with the direction of :func:`scale_by_radam`; ``weight_decay`` is an L2 penalty added
    to the gradient, or with ``decoupled_weight_decay=True`` torch's
    ``p \\leftarrow p (1 - \\eta\\lambda)``, written as the update term :math:`-\\eta_t\\lambda p`.

    ``chain(scale(-1) if maximize, add_decayed_weights(weight_decay) if coupled,
    scale_by_radam(*betas, eps), add_decayed_weights(weight_decay) if decoupled,
    scale_by_learning_rate(lr))``. ``foreach``, ``capturable`` and ``differentiable``
    are accepted and change nothing.

    Args:
        lr: learning rate: float, 1-element tensor, or schedule of the update count.
        betas: ``(beta1, beta2)``, each in ``[0, 1)``.
        eps: added to the denominator (>= 0).
        weight_decay: weight decay factor (>= 0).
        decoupled_weight_decay: decay the weights directly (AdamW style).
        foreach, capturable, differentiable: accepted, no effect.
        maximize: maximize the objective instead of minimizing.

    Returns:
        A :class:`~gradchain.GradientTransformation` (a chain).

    Raises:
        ValueError: for ``lr``, ``eps`` or ``weight_decay`` below 0 or betas outside
            ``[0, 1)``, as torch does.

    Example:
        >>> import torch, gradchain as gc
        >>> tx = gc.radam(lr=0.1)
        >>> params = {"w": torch.tensor([1.0, -1.0])}
        >>> updates, state = tx.update({"w": torch.tensor([3.0, -0.5])}, tx.init(params), params)
        >>> gc.apply_updates(params, updates)["w"]
        tensor([ 0.7000, -0.9500])
    """
    fn = "radam"
    maximize = _checks.as_bool(maximize, "maximize", fn)
    decoupled_weight_decay = _checks.as_bool(decoupled_weight_decay, "decoupled_weight_decay", fn)
    lr = _checks.check_lr(lr, fn)
    eps = _checks.nonneg(eps, "eps", "epsilon value", fn)
    b1, b2 = _checks.betas(betas, fn)
    weight_decay = _checks.nonneg(weight_decay, "weight_decay", "weight_decay value", fn)
    del foreach, capturable, differentiable
    txs, rule_at = rule_chain(
        scale_by_radam(b1, b2, eps), lr=lr, maximize=maximize,
        decay=add_decayed_weights(weight_decay) if weight_decay != 0 else None,
        decoupled=decoupled_weight_decay,
    )
    return bind_fused(chain(*txs), _radam_plan(
        lr, rule_at, len(txs), beta1=b1, beta2=b2, eps=eps, weight_decay=weight_decay,
        decoupled_weight_decay=decoupled_weight_decay, maximize=maximize))


def _radam_plan(lr: Any, rule_at: int, size: int, **hyper: Any) -> FusedPlan:
    """``radam``'s binding to torch's foreach Radam (what
    ``torch.optim.Radam(foreach=True)`` runs), for :func:`~gradchain.update_and_apply_`."""

    def kernel(ps: Any, gs: Any, bufs: Any, steps: Any, lr_now: Any, st: Any) -> dict[str, Any]:
        torch_radam.radam(ps, gs, bufs[0], bufs[1], steps, foreach=True, lr=lr_now,
                                **hyper)
        return {}

    return elementwise(torch_rule_plan(
        lr, size, rule_at, ScaleByRadamState, [(0, "mu"), (0, "nu")], kernel
    ))
