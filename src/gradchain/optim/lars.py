"""LARS (You et al. 2017, "Large Batch Training of Convolutional Networks") and the
layer-wise trust ratio it shares with LAMB, as ``optax.lars`` / ``optax.scale_by_trust_ratio``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from gradchain import _ops
from gradchain.base import EmptyState, GradientTransformation, chain
from gradchain.optimizers import (
    ScalarOrSchedule,
    _acc_dtype,
    _check_bool,
    _check_lr,
    _check_nonneg,
    _groups,
    _pick,
    _scatter,
    add_decayed_weights,
    scale_by_learning_rate,
    trace,
)
from gradchain.partition import masked
from gradchain.tree import Leaves

__all__ = ["scale_by_trust_ratio", "lars"]

Params = Any
Updates = Any
Mask = Any | Callable[[Params], Any]


def _norms(xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """The 2-norm of each tensor (flattened), in float32 at least, one foreach kernel per
    (device, dtype) group where foreach serves."""
    out: list[Any] = [None] * len(xs)
    for idx in _groups(xs):
        group = _pick(xs, idx)
        acc = _acc_dtype(group[0].dtype)
        if acc == group[0].dtype and _ops._fe(group):
            norms = list(torch._foreach_norm(group))
        else:
            norms = [torch.linalg.vector_norm(x, dtype=acc) for x in group]
        _scatter(out, idx, norms)
    return out


def scale_by_trust_ratio(
    min_norm: float = 0.0, trust_coefficient: float = 1.0, eps: float = 0.0
) -> GradientTransformation:
    """Scale each leaf's update by its trust ratio, the ratio of the param's norm to the
    update's (layer-wise adaptation, as LARS and LAMB do), as ``optax.scale_by_trust_ratio``.

    For each leaf, with :math:`\\|\\cdot\\|` the 2-norm of the flattened tensor:

    .. math::
        r = c\\, \\frac{\\max(\\|p\\|, n_{\\min})}{\\max(\\|u\\|, n_{\\min}) + \\epsilon}, \\qquad
        u \\leftarrow r\\, u

    and :math:`r = 1` where either norm (after the floor :math:`n_{\\min}`) is zero, so a
    zero-initialised param still moves. The norms are computed in float32 at least
    (float32 for float16/bfloat16 leaves), one ``torch._foreach_norm`` per (device, dtype)
    group; no host-device sync.

    Args:
        min_norm: floor :math:`n_{\\min}` for both norms (>= 0; default no floor).
        trust_coefficient: the multiplier :math:`c` (>= 0).
        eps: added to the update's norm in the denominator (>= 0).

    Returns:
        A stateless :class:`~gradchain.GradientTransformation`. Its ``update`` needs
        ``params``.

    Raises:
        ValueError: a negative argument; at ``update``, ``params`` is ``None``.

    Example:
        >>> import torch
        >>> from gradchain.optim.lars import scale_by_trust_ratio
        >>> tx = scale_by_trust_ratio()
        >>> params = {"w": torch.tensor([3.0, 4.0]), "z": torch.zeros(2)}
        >>> grads = {"w": torch.tensor([0.0, 0.5]), "z": torch.ones(2)}
        >>> tx.update(grads, tx.init(params), params)[0]  # |p| / |g| = 5 / 0.5; z: ratio 1
        {'w': tensor([0., 5.]), 'z': tensor([1., 1.])}
    """
    fn = "scale_by_trust_ratio"
    min_norm = _check_nonneg(min_norm, "min_norm", "min_norm value", fn)
    trust_coefficient = _check_nonneg(
        trust_coefficient, "trust_coefficient", "trust_coefficient value", fn
    )
    eps = _check_nonneg(eps, "eps", "epsilon value", fn)

    def init(params: Params) -> EmptyState:
        del params
        return EmptyState()

    def update(
        updates: Updates, state: EmptyState, params: Params | None = None, **extra: Any
    ) -> tuple[Updates, EmptyState]:
        view = Leaves(updates)
        us = view.values
        if not us:
            return updates, state
        if params is None:
            raise ValueError(
                f"{fn}: params is None; the trust ratio needs the parameters, call "
                "tx.update(grads, state, params)"
            )
        ps = view.take(params, "params", dtype=False)
        out: list[Any] = [None] * len(us)
        for idx in _groups(us):
            u = _pick(us, idx)
            acc = _acc_dtype(u[0].dtype)
            u_norm = torch.stack([n.to(acc) for n in _norms(u)])
            p_norm = torch.stack([n.to(device=u[0].device, dtype=acc) for n in _norms(_pick(ps, idx))])
            if min_norm > 0:
                u_norm = torch.clamp(u_norm, min=min_norm)
                p_norm = torch.clamp(p_norm, min=min_norm)
            ratio = trust_coefficient * p_norm / (u_norm + eps)
            ratio = torch.where((p_norm == 0) | (u_norm == 0), torch.ones_like(ratio), ratio)
            scaled = _ops.mul_list(u, list(torch.unbind(ratio)))
            _scatter(out, idx, _ops.cast(scaled, [x.dtype for x in u]))
        return view.put(out), state

    return GradientTransformation(init, update)


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
        >>> from gradchain.optim.lars import lars
        >>> tx = lars(lr=1.0, trust_coefficient=0.1)
        >>> params = {"w": torch.tensor([3.0, 4.0])}
        >>> updates, state = tx.update({"w": torch.tensor([0.0, 2.0])}, tx.init(params), params)
        >>> updates["w"]  # -lr * 0.1 * |p| / |g| * g
        tensor([ 0.0000, -0.5000])
    """
    fn = "lars"
    lr = _check_lr(lr, fn)
    momentum = _check_nonneg(momentum, "momentum", "momentum value", fn)
    weight_decay = _check_nonneg(weight_decay, "weight_decay", "weight_decay value", fn)
    nesterov = _check_bool(nesterov, "nesterov", fn)
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
