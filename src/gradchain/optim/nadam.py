"""NAdam: :func:`scale_by_nadam` and the ``torch.optim.NAdam`` twin :func:`nadam`."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch.optim import nadam as torch_nadam

from gradchain import _checks, _ops
from gradchain._tree import Leaves
from gradchain.base import GradientTransformation, donation, expect_state
from gradchain.combine import chain
from gradchain.optim._alias import rule_chain
from gradchain.optim._fused import FusedPlan, bind_fused, copies, torch_rule_plan
from gradchain.optim._sharded import elementwise
from gradchain.transforms import add_decayed_weights

__all__ = ["ScaleByNadamState", "scale_by_nadam", "nadam"]


class ScaleByNadamState(NamedTuple):
    """State of :func:`scale_by_nadam`.

    Attributes:
        count: int64 0-dim tensor, the number of updates done (torch's ``step``).
        mu_product: 0-dim tensor, the product of the momentum coefficients so far
            (torch's ``mu_product``, in torch's scalar-state dtype: float32 unless the
            default dtype is float64, so it rounds as torch's does).
        mu: first moments (torch's ``exp_avg``).
        nu: second moments (torch's ``exp_avg_sq``).

    Example:
        >>> import torch, gradchain as gc
        >>> gc.scale_by_nadam().init({"w": torch.zeros(1)})
        ScaleByNadamState(count=tensor(0), mu_product=tensor(1.), mu={'w': tensor([0.])}, nu={'w': tensor([0.])})
    """

    count: torch.Tensor  # type: ignore[assignment]  # shadows tuple.count, as in optax
    mu_product: torch.Tensor
    mu: Any
    nu: Any


def scale_by_nadam(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, momentum_decay: float = 4e-3
) -> GradientTransformation:
    """NAdam's direction (Adam with Nesterov momentum and momentum decay), as in
    ``torch.optim.NAdam``.

    .. math::
        \\mu_t = \\beta_1 (1 - \\tfrac12\\, 0.96^{t\\psi}), \\quad
        \\Pi_t = \\prod_{i \\le t} \\mu_i, \\quad
        m_t = \\beta_1 m_{t-1} + (1-\\beta_1) g_t, \\quad
        v_t = \\beta_2 v_{t-1} + (1-\\beta_2) g_t^2,

    .. math::
        u_t = \\frac{1}{\\sqrt{v_t / (1 - \\beta_2^t)} + \\epsilon}
              \\left(\\frac{1 - \\mu_t}{1 - \\Pi_t}\\, g_t
              + \\frac{\\mu_{t+1}}{1 - \\Pi_t \\mu_{t+1}}\\, m_t\\right)

    with :math:`\\psi` = ``momentum_decay``. The scalars are computed in float64 from the
    step count; :math:`\\Pi_t` lives in the state and is rounded as torch rounds its
    ``mu_product``. Follow with :func:`~gradchain.scale_by_learning_rate`.

    Args:
        b1: decay of the first moment (torch's ``betas[0]``), in ``[0, 1)``.
        b2: decay of the second moment (torch's ``betas[1]``), in ``[0, 1)``.
        eps: added to the denominator (>= 0).
        momentum_decay: :math:`\\psi` (>= 0).

    Returns:
        A :class:`~gradchain.GradientTransformation` with state :class:`ScaleByNadamState`.

    Raises:
        ValueError: for betas outside ``[0, 1)`` or a negative ``eps`` / ``momentum_decay``.

    Example:
        >>> import torch, gradchain as gc
        >>> tx = gc.scale_by_nadam()
        >>> params = {"w": torch.zeros(2)}
        >>> updates, state = tx.update({"w": torch.tensor([1.0, -1.0])}, tx.init(params))
        >>> updates["w"]  # the Nesterov look-ahead makes the first step a bit longer than 1
        tensor([ 1.0565, -1.0565])
    """
    fn = "scale_by_nadam"
    b1 = _checks.in_range(b1, "b1", fn, 0.0, 1.0, hi_open=True)
    b2 = _checks.in_range(b2, "b2", fn, 0.0, 1.0, hi_open=True)
    eps = _checks.nonneg(eps, "eps", "epsilon value", fn)
    momentum_decay = _checks.nonneg(momentum_decay, "momentum_decay", "momentum_decay value", fn)

    def init(params: Any) -> ScaleByNadamState:
        return ScaleByNadamState(
            count=_ops.zero_count(params),
            mu_product=torch.ones((), dtype=_ops.state_scalar_dtype(), device=_ops.first_device(params)),
            mu=_ops.buffers_like(params),
            nu=_ops.buffers_like(params),
        )

    def update(
        updates: Any, state: ScaleByNadamState, params: Any = None, **extra: Any
    ) -> tuple[Any, ScaleByNadamState]:
        del params
        expect_state(state, ScaleByNadamState, fn)
        donation(extra, fn)
        view = Leaves(updates)
        gs = view.values
        mus: list[Any] = view.take(state.mu, "mu")
        nus: list[Any] = view.take(state.nu, "nu")
        count = _ops.safe_increment(state.count)
        step = count.to(_ops.scalar_dtype(count.device))
        bias_correction2 = 1.0 - b2**step
        mu = b1 * (1.0 - 0.5 * 0.96 ** (step * momentum_decay))
        mu_next = b1 * (1.0 - 0.5 * 0.96 ** ((step + 1.0) * momentum_decay))
        # torch: ``mu_product *= mu`` in the state's dtype (the factor rounded to it first).
        mu_product = state.mu_product * mu.to(state.mu_product.dtype)
        prod = mu_product.to(step.dtype)
        coef_g = (1.0 - mu) / (1.0 - prod)
        coef_m = mu_next / (1.0 - prod * mu_next)
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
            denom = _ops.add_scalar_(
                _ops.sqrt(_ops.div_scalar(v, _ops.scalar_for(bias_correction2, like))), eps
            )
            num = _ops.add_(
                _ops.mul(g, _ops.scalar_for(coef_g, like)), _ops.mul(m, _ops.scalar_for(coef_m, like))
            )
            d = _ops.div_(num, denom)
            _ops.scatter(out, idx, _ops.cast(d, [x.dtype for x in _ops.pick(gs, idx)]))
            _ops.scatter(new_mu, idx, m)
            _ops.scatter(new_nu, idx, v)
        return view.put(out), ScaleByNadamState(
            count=count,
            mu_product=mu_product,
            mu=view.put_into(state.mu, new_mu),
            nu=view.put_into(state.nu, new_nu),
        )

    return GradientTransformation(init, update)


def nadam(
    lr: Any = 2e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    momentum_decay: float = 4e-3,
    decoupled_weight_decay: bool = False,
    *,
    foreach: bool | None = None,
    maximize: bool = False,
    capturable: bool = False,
    differentiable: bool = False,
) -> GradientTransformation:
    """NAdam, as ``torch.optim.NAdam`` (same arguments and defaults).

    .. math::
        u = -\\eta_t\\, \\mathrm{nadam}(g) \\;\\; (- \\eta_t \\lambda p \\text{ when decoupled})

    with the direction of :func:`scale_by_nadam`; ``weight_decay`` is an L2 penalty added
    to the gradient, or with ``decoupled_weight_decay=True`` torch's
    ``p \\leftarrow p (1 - \\eta\\lambda)`` (NAdamW), written as the update term
    :math:`-\\eta_t\\lambda p`.

    ``chain(scale(-1) if maximize, add_decayed_weights(weight_decay) if coupled,
    scale_by_nadam(*betas, eps, momentum_decay), add_decayed_weights(weight_decay) if
    decoupled, scale_by_learning_rate(lr))``. ``foreach``, ``capturable`` and
    ``differentiable`` are accepted and change nothing.

    Args:
        lr: learning rate: float, 1-element tensor, or schedule of the update count.
        betas: ``(beta1, beta2)``, each in ``[0, 1)``.
        eps: added to the denominator (>= 0).
        weight_decay: weight decay factor (>= 0).
        momentum_decay: momentum decay :math:`\\psi` (>= 0).
        decoupled_weight_decay: decay the weights directly (AdamW style).
        foreach, capturable, differentiable: accepted, no effect.
        maximize: maximize the objective instead of minimizing.

    Returns:
        A :class:`~gradchain.GradientTransformation` (a chain).

    Raises:
        ValueError: for ``lr``, ``eps``, ``weight_decay`` or ``momentum_decay`` below 0 or
            betas outside ``[0, 1)``, as torch does.

    Example:
        >>> import torch, gradchain as gc
        >>> tx = gc.nadam(lr=0.1)
        >>> params = {"w": torch.tensor([1.0, -1.0])}
        >>> updates, state = tx.update({"w": torch.tensor([3.0, -0.5])}, tx.init(params), params)
        >>> gc.apply_updates(params, updates)["w"]
        tensor([ 0.8944, -0.8944])
    """
    fn = "nadam"
    maximize = _checks.as_bool(maximize, "maximize", fn)
    decoupled_weight_decay = _checks.as_bool(decoupled_weight_decay, "decoupled_weight_decay", fn)
    lr = _checks.check_lr(lr, fn)
    eps = _checks.nonneg(eps, "eps", "epsilon value", fn)
    b1, b2 = _checks.betas(betas, fn)
    weight_decay = _checks.nonneg(weight_decay, "weight_decay", "weight_decay value", fn)
    momentum_decay = _checks.nonneg(momentum_decay, "momentum_decay", "momentum_decay value", fn)
    del foreach, capturable, differentiable
    txs, rule_at = rule_chain(
        scale_by_nadam(b1, b2, eps, momentum_decay), lr=lr, maximize=maximize,
        decay=add_decayed_weights(weight_decay) if weight_decay != 0 else None,
        decoupled=decoupled_weight_decay,
    )
    return bind_fused(chain(*txs), _nadam_plan(
        lr, rule_at, len(txs), beta1=b1, beta2=b2, eps=eps, weight_decay=weight_decay,
        momentum_decay=momentum_decay, decoupled_weight_decay=decoupled_weight_decay, maximize=maximize))


def _nadam_plan(lr: Any, rule_at: int, size: int, **hyper: Any) -> FusedPlan:
    """``nadam``'s binding to torch's foreach Nadam (what
    ``torch.optim.Nadam(foreach=True)`` runs), for :func:`~gradchain.update_and_apply_`."""

    def kernel(ps: Any, gs: Any, bufs: Any, steps: Any, lr_now: Any, st: Any) -> dict[str, Any]:
        mu_products = copies(st.mu_product, len(ps))
        torch_nadam.nadam(ps, gs, bufs[0], bufs[1], mu_products, steps, foreach=True,
                                lr=lr_now, **hyper)
        return {"mu_product": mu_products[0]}

    return elementwise(torch_rule_plan(
        lr, size, rule_at, ScaleByNadamState, [(0, "mu"), (0, "nu")], kernel
    ))
