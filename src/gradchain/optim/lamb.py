"""LAMB (You et al. 2020, "Large Batch Optimization for Deep Learning: Training BERT in
76 minutes"): Adam's direction plus decoupled weight decay, scaled per layer by the trust
ratio, as ``optax.lamb``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gradchain import _checks
from gradchain.base import GradientTransformation, Params
from gradchain.combine import chain, masked
from gradchain.optim.adam import scale_by_adam
from gradchain.transforms import (
    ScalarOrSchedule,
    add_decayed_weights,
    scale_by_learning_rate,
    scale_by_trust_ratio,
)

__all__ = ["lamb"]

Mask = Any | Callable[[Params], Any]


def lamb(
    lr: ScalarOrSchedule = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    mask: Mask | None = None,
) -> GradientTransformation:
    """LAMB, as ``optax.lamb``.

    .. math::
        d = \\frac{\\hat m_t}{\\sqrt{\\hat v_t} + \\epsilon} + \\lambda p, \\quad
        u = -\\eta_t\\, \\frac{\\|p\\|}{\\|d\\|}\\, d

    per leaf (ratio 1 where a norm is zero), with Adam's bias-corrected moments
    :math:`\\hat m_t, \\hat v_t` (:func:`~gradchain.scale_by_adam`).

    ``chain(scale_by_adam(*betas, eps), masked(add_decayed_weights(weight_decay), mask),
    scale_by_trust_ratio(), scale_by_learning_rate(lr))``, optax's chain.

    Mapping from ``optax.lamb(learning_rate, b1, b2, eps, eps_root, weight_decay, mask)``:
    ``learning_rate`` is ``lr`` and ``(b1, b2)`` is ``betas``, defaults alike; optax's
    ``eps_root`` (default 0) is not offered. The ``lr=1e-3`` default is that of the
    common torch implementations (optax has none).

    Args:
        lr: learning rate: float, 1-element tensor, or schedule of the update count.
        betas: ``(beta1, beta2)``, each in ``[0, 1)``.
        eps: added to the denominator of the Adam direction (>= 0).
        weight_decay: decoupled weight decay added to the direction before the trust
            ratio (>= 0).
        mask: ``None`` (all leaves), or a tree of bools shaped like the params or a
            callable giving one: the leaves that get weight decay.

    Returns:
        A :class:`~gradchain.GradientTransformation` (a chain).

    Raises:
        ValueError: ``lr < 0``, ``eps < 0``, betas outside ``[0, 1)`` or
            ``weight_decay < 0``.

    Example:
        >>> import torch, gradchain as gc
        >>> tx = gc.lamb(lr=0.1)
        >>> params = {"w": torch.tensor([3.0, 4.0])}
        >>> updates, state = tx.update({"w": torch.tensor([1.0, -1.0])}, tx.init(params), params)
        >>> updates["w"]  # Adam's first direction is sign(g), scaled to |p| = 5
        tensor([-0.3536,  0.3536])
    """
    fn = "lamb"
    lr = _checks.check_lr(lr, fn)
    b1, b2 = _checks.betas(betas, fn)
    eps = _checks.nonneg(eps, "eps", "epsilon value", fn)
    weight_decay = _checks.nonneg(weight_decay, "weight_decay", "weight_decay value", fn)
    txs = [scale_by_adam(b1, b2, eps)]
    if weight_decay != 0:
        wd = add_decayed_weights(weight_decay)
        txs.append(wd if mask is None else masked(wd, mask))
    txs.append(scale_by_trust_ratio())
    txs.append(scale_by_learning_rate(lr))
    return chain(*txs)
