"""LARS (You et al. 2017, "Large Batch Training of Convolutional Networks"), as
``optax.lars``. Its layer-wise trust ratio, shared with LAMB, is
:func:`gradchain.transforms.scale_by_trust_ratio`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gradchain import _checks
from gradchain.base import GradientTransformation, Params
from gradchain.combine import chain, masked
from gradchain.optim.sgd import trace
from gradchain.transforms import (
    ScalarOrSchedule,
    add_decayed_weights,
    scale_by_learning_rate,
    scale_by_trust_ratio,
)

__all__ = ["lars"]

Mask = Any | Callable[[Params], Any]


def lars(
    lr: ScalarOrSchedule,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    trust_coefficient: float = 0.001,
    eps: float = 0.0,
    nesterov: bool = False,
    weight_decay_mask: Mask | None = None,
    trust_ratio_mask: Mask | None = None,
) -> GradientTransformation:
    """LARS, as ``optax.lars``: SGD with momentum on trust-ratio-scaled gradients.

    .. math::
        d = r\\,(g + \\lambda p), \\quad
        r = c\\, \\frac{\\|p\\|}{\\|g + \\lambda p\\| + \\epsilon}, \\quad
        b_t = \\mu\\, b_{t-1} - \\eta_t d, \\quad
        u = -\\eta_t d + \\mu\\, b_t \\text{ (nesterov) else } b_t

    (per leaf; :math:`r = 1` where a norm is zero). As in optax, the momentum buffer
    accumulates learning-rate-scaled steps (the learning rate is applied before the
    momentum), so a schedule changes the step of new gradients only.

    ``chain(masked(add_decayed_weights(weight_decay), weight_decay_mask),
    masked(scale_by_trust_ratio(trust_coefficient=trust_coefficient, eps=eps),
    trust_ratio_mask), scale_by_learning_rate(lr), trace(momentum, nesterov=nesterov))``.

    Mapping from ``optax.lars(learning_rate, weight_decay, weight_decay_mask,
    trust_coefficient, eps, trust_ratio_mask, momentum, nesterov)``: ``learning_rate`` is
    ``lr``; the rest keep their names and defaults, except that a mask of ``None`` (the
    default) means every leaf (optax's ``True``).

    Args:
        lr: learning rate: float, 1-element tensor, or schedule of the update count.
        momentum: momentum factor (>= 0; ``0`` for none).
        weight_decay: L2 penalty added to the gradient before the trust ratio (>= 0).
        trust_coefficient: the trust-ratio multiplier :math:`c`.
        eps: added to the update norm in the trust ratio's denominator.
        nesterov: Nesterov momentum (needs ``momentum > 0``).
        weight_decay_mask: ``None`` (all leaves), or a tree of bools shaped like the
            params or a callable giving one: the leaves that get weight decay.
        trust_ratio_mask: likewise, the leaves scaled by the trust ratio (commonly all
            but biases and norm layers).

    Returns:
        A :class:`~gradchain.GradientTransformation` (a chain).

    Raises:
        ValueError: a negative ``lr``, ``momentum``, ``weight_decay``,
            ``trust_coefficient`` or ``eps``; ``nesterov`` without momentum.

    Example:
        >>> import torch, gradchain as gc
        >>> tx = gc.lars(lr=1.0, trust_coefficient=0.1)
        >>> params = {"w": torch.tensor([3.0, 4.0])}
        >>> updates, state = tx.update({"w": torch.tensor([0.0, 2.0])}, tx.init(params), params)
        >>> updates["w"]  # -lr * 0.1 * |p| / |g| * g
        tensor([ 0.0000, -0.5000])
    """
    fn = "lars"
    lr = _checks.check_lr(lr, fn)
    momentum = _checks.nonneg(momentum, "momentum", "momentum value", fn)
    weight_decay = _checks.nonneg(weight_decay, "weight_decay", "weight_decay value", fn)
    nesterov = _checks.as_bool(nesterov, "nesterov", fn)
    if nesterov and momentum <= 0:
        raise ValueError(f"{fn}: nesterov=True requires momentum > 0, got momentum={momentum}")
    txs: list[GradientTransformation] = []
    if weight_decay != 0:
        wd = add_decayed_weights(weight_decay)
        txs.append(wd if weight_decay_mask is None else masked(wd, weight_decay_mask))
    trust = scale_by_trust_ratio(trust_coefficient=trust_coefficient, eps=eps)
    txs.append(trust if trust_ratio_mask is None else masked(trust, trust_ratio_mask))
    txs.append(scale_by_learning_rate(lr))
    if momentum != 0:
        txs.append(trace(momentum, nesterov=nesterov))
    return chain(*txs)
