"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"): the sign of
an interpolated momentum, with decoupled weight decay.

Two references implement it with different conventions; :func:`lion` takes the
torch-style names of ``lion_pytorch.Lion`` and follows both:

* learning rate: lion-pytorch ``lr=1e-4``; optax ``learning_rate`` (required);
  gradchain ``lr=1e-4``.
* betas: lion-pytorch ``betas=(0.9, 0.99)``; optax ``b1=0.9, b2=0.99``; gradchain
  ``betas=(0.9, 0.99)`` (``scale_by_lion(b1, b2)`` for the building block).
* weight decay: lion-pytorch ``weight_decay=0.0`` applied as ``p *= 1 - lr * wd``; optax
  ``weight_decay=1e-3`` added to the direction (``u = -lr * (sign + wd * p)``, the same
  maths); gradchain ``weight_decay=0.0``, optax's form.
* lion-pytorch's ``decoupled_weight_decay=True`` (decay ``wd / lr_0``, lr_0 the initial
  learning rate): gradchain's flag of the same name; optax has none.
* optax's ``mu_dtype``: gradchain keeps the momentum in float32 for float16/bfloat16
  params and in the param dtype otherwise (no option).

So ``optax.lion(learning_rate=a, b1=x, b2=y, weight_decay=w)`` is
``gc.lion(lr=a, betas=(x, y), weight_decay=w)`` (mind optax's default ``1e-3`` weight
decay), and ``lion_pytorch.Lion(params, **kw)`` is ``gc.lion(**kw)``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from gradchain import _checks, _ops
from gradchain._tree import Leaves
from gradchain.base import GradientTransformation, Params, Updates, donation, expect_state
from gradchain.combine import chain
from gradchain.transforms import ScalarOrSchedule, add_decayed_weights, scale_by_learning_rate

__all__ = ["ScaleByLionState", "scale_by_lion", "lion"]


class ScaleByLionState(NamedTuple):
    """State of :func:`scale_by_lion`.

    Attributes:
        count: int64 0-dim tensor, the number of updates done.
        mu: the momentum (``lion_pytorch``'s ``exp_avg``, optax's ``mu``), shaped like
            the params; float32 for float16/bfloat16 params.

    Example:
        >>> import torch, gradchain as gc
        >>> gc.scale_by_lion().init({"w": torch.zeros(2)})
        ScaleByLionState(count=tensor(0), mu={'w': tensor([0., 0.])})
    """

    count: torch.Tensor  # type: ignore[assignment]  # shadows tuple.count, as in optax
    mu: Updates


def scale_by_lion(b1: float = 0.9, b2: float = 0.99) -> GradientTransformation:
    """Lion's direction: the sign of an interpolation of momentum and gradient.

    .. math::
        u_t = \\mathrm{sign}(\\beta_1 m_{t-1} + (1 - \\beta_1) g_t), \\qquad
        m_t = \\beta_2 m_{t-1} + (1 - \\beta_2) g_t

    with :math:`\\mathrm{sign}(0) = 0`. Computed with the operations of
    ``lion_pytorch`` (``m * b + g * (1 - b)`` as one ``add`` with ``alpha``), so the
    momentum matches it bit for bit. Follow with :func:`~gradchain.scale_by_learning_rate`
    (as :func:`lion` does); the output is ``optax.scale_by_lion``'s.

    Args:
        b1: interpolation weight of the momentum in the direction, in ``[0, 1)``.
        b2: decay of the momentum, in ``[0, 1)``.

    Returns:
        A :class:`~gradchain.GradientTransformation` with state :class:`ScaleByLionState`.

    Raises:
        ValueError: a beta outside ``[0, 1)``.

    Example:
        >>> import torch, gradchain as gc
        >>> tx = gc.scale_by_lion()
        >>> params = {"w": torch.zeros(3)}
        >>> updates, state = tx.update({"w": torch.tensor([0.5, -2.0, 0.0])}, tx.init(params))
        >>> updates["w"], state.mu["w"]
        (tensor([ 1., -1.,  0.]), tensor([ 0.0050, -0.0200,  0.0000]))
    """
    fn = "scale_by_lion"
    b1 = _checks.beta(b1, "b1", fn)
    b2 = _checks.beta(b2, "b2", fn)

    def init(params: Params) -> ScaleByLionState:
        return ScaleByLionState(count=_ops.zero_count(params), mu=_ops.buffers_like(params))

    def update(
        updates: Updates, state: ScaleByLionState, params: Params | None = None, **extra: Any
    ) -> tuple[Updates, ScaleByLionState]:
        del params
        expect_state(state, ScaleByLionState, fn)
        _, donated_s = donation(extra, fn)
        view = Leaves(updates)
        gs = view.values
        mus: list[Any] = view.take(state.mu, "mu")
        g = _ops.cast(gs, [m.dtype for m in mus])
        direction = _ops.add_(_ops.mul(mus, b1), g, alpha=1.0 - b1)
        # sign in place on the fresh intermediate (foreach where it serves)
        if _ops.use_foreach(direction) and not torch.compiler.is_compiling():
            torch._foreach_sign_(direction)
        else:
            direction = [torch.sign(d) for d in direction]
        decayed = _ops.mul_(mus, b2) if donated_s else _ops.mul(mus, b2)
        new_mu = _ops.add_(decayed, g, alpha=1.0 - b2)
        out = _ops.cast(direction, [x.dtype for x in gs])
        return view.put(out), ScaleByLionState(
            count=_ops.safe_increment(state.count), mu=view.put_into(state.mu, new_mu)
        )

    return GradientTransformation(init, update)


def lion(
    lr: ScalarOrSchedule = 1e-4,
    betas: tuple[float, float] = (0.9, 0.99),
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = False,
) -> GradientTransformation:
    """Lion, as ``lion_pytorch.Lion`` (same arguments and defaults) and ``optax.lion``.

    .. math::
        u_t = -\\eta_t \\left(\\mathrm{sign}(\\beta_1 m_{t-1} + (1 - \\beta_1) g_t)
              + \\lambda\\, p_t\\right), \\qquad
        m_t = \\beta_2 m_{t-1} + (1 - \\beta_2) g_t

    so ``p + u = p (1 - \\eta_t \\lambda) - \\eta_t \\mathrm{sign}(\\cdot)``, lion-pytorch's
    ``p.mul_(1 - lr * wd)`` followed by its step. With ``decoupled_weight_decay`` the decay
    is :math:`\\lambda / \\eta_0` (lion-pytorch divides by the initial learning rate, so the
    per-step decay is :math:`\\lambda\\,\\eta_t / \\eta_0`, i.e. :math:`\\lambda` at
    constant ``lr``). See the module docstring for the mapping to ``optax.lion``.

    ``chain(scale_by_lion(*betas), add_decayed_weights(weight_decay) if weight_decay,
    scale_by_learning_rate(lr))``, optax's chain.

    Args:
        lr: learning rate: float, 1-element tensor, or schedule of the update count.
        betas: ``(beta1, beta2)``: the interpolation weight of the direction and the
            momentum decay, each in ``[0, 1)``.
        weight_decay: decoupled weight decay, multiplied by the learning rate (>= 0).
        decoupled_weight_decay: divide ``weight_decay`` by the initial learning rate
            (``lr``, or the schedule at count 0), as lion-pytorch's flag does.

    Returns:
        A :class:`~gradchain.GradientTransformation` (a chain) whose updates are added to
        the params with :func:`~gradchain.apply_updates`.

    Raises:
        ValueError: ``lr < 0``, ``weight_decay < 0``, betas outside ``[0, 1)``, or
            ``decoupled_weight_decay`` with an initial learning rate of 0.

    Example:
        >>> import torch, gradchain as gc
        >>> tx = gc.lion(lr=0.1, weight_decay=0.5)
        >>> params = {"w": torch.tensor([1.0, -1.0])}
        >>> updates, state = tx.update({"w": torch.tensor([3.0, -0.5])}, tx.init(params), params)
        >>> gc.apply_updates(params, updates)["w"]  # p * (1 - 0.05) - 0.1 * sign(g)
        tensor([ 0.8500, -0.8500])
    """
    fn = "lion"
    lr = _checks.check_lr(lr, fn)
    b1, b2 = _checks.betas(betas, fn)
    weight_decay = _checks.nonneg(weight_decay, "weight_decay", "weight_decay value", fn)
    decoupled_weight_decay = _checks.as_bool(decoupled_weight_decay, "decoupled_weight_decay", fn)
    if decoupled_weight_decay and weight_decay != 0:
        lr0 = lr(torch.zeros((), dtype=torch.int64)) if _checks.is_schedule(lr) else lr  # type: ignore[operator]
        lr0 = float(lr0)  # type: ignore[arg-type]
        if lr0 == 0:
            raise ValueError(
                f"{fn}: decoupled_weight_decay=True divides weight_decay by the initial "
                "learning rate, which is 0"
            )
        weight_decay = weight_decay / lr0
    txs = [scale_by_lion(b1, b2)]
    if weight_decay != 0:
        txs.append(add_decayed_weights(weight_decay))
    txs.append(scale_by_learning_rate(lr))
    return chain(*txs)
