"""Adagrad: :func:`scale_by_adagrad` and the ``torch.optim.Adagrad`` twin :func:`adagrad`."""

from __future__ import annotations

from typing import Any, NamedTuple

import optree
import torch

from gradchain import _checks, _ops
from gradchain._tree import Leaves, flatten_like
from gradchain.base import GradientTransformation, donation, expect_state
from gradchain.combine import chain
from gradchain.optim._alias import rule_chain
from gradchain.optim._fused import (
    FusedPlan,
    FusedStep,
    advance,
    bind_fused,
    found_inf,
    fused_rows,
    kernel_groups,
    lr_on,
    lr_state_fits,
    step_lr,
)
from gradchain.optim._sharded import elementwise
from gradchain.transforms import (
    add_decayed_weights,
)

__all__ = ["ScaleByAdagradState", "scale_by_adagrad", "adagrad"]


class ScaleByAdagradState(NamedTuple):
    """State of :func:`scale_by_adagrad`.

    Attributes:
        count: int64 0-dim tensor, the number of updates done (torch's ``step``).
        sum_of_squares: the running sums of squared gradients (torch's ``sum``), shaped
            like the params.

    Example:
        >>> import torch, gradchain as gc
        >>> gc.scale_by_adagrad(initial_accumulator_value=0.1).init({"w": torch.zeros(2)})
        ScaleByAdagradState(count=tensor(0), sum_of_squares={'w': tensor([0.1000, 0.1000])})
    """

    count: torch.Tensor  # type: ignore[assignment]  # shadows tuple.count, as in optax
    sum_of_squares: Any


def scale_by_adagrad(
    lr_decay: float = 0.0, initial_accumulator_value: float = 0.0, eps: float = 1e-10
) -> GradientTransformation:
    """Adagrad's direction, as in ``torch.optim.Adagrad``.

    .. math::
        s_t = s_{t-1} + g_t^2, \\qquad
        u_t = \\frac{1}{1 + (t - 1)\\,\\delta}\\;\\frac{g_t}{\\sqrt{s_t} + \\epsilon}

    with :math:`s_0` = ``initial_accumulator_value`` and :math:`\\delta` = ``lr_decay``
    (torch's learning-rate decay ``clr = lr / (1 + (t - 1) lr_decay)``, kept here because
    it depends on the step count; the learning rate itself comes from
    :func:`~gradchain.scale_by_learning_rate`). Element-wise, on flat leaf lists grouped
    by (device, dtype).

    Args:
        lr_decay: learning-rate decay :math:`\\delta` (>= 0).
        initial_accumulator_value: the starting value of the sums (>= 0).
        eps: added to the denominator (>= 0).

    Returns:
        A :class:`~gradchain.GradientTransformation` with state :class:`ScaleByAdagradState`.

    Raises:
        ValueError: for a negative argument, as ``torch.optim.Adagrad``.

    Example:
        >>> import torch, gradchain as gc
        >>> tx = gc.scale_by_adagrad()
        >>> params = {"w": torch.zeros(2)}
        >>> updates, state = tx.update({"w": torch.tensor([3.0, -4.0])}, tx.init(params))
        >>> updates["w"]
        tensor([ 1., -1.])
    """
    fn = "scale_by_adagrad"
    lr_decay = _checks.nonneg(lr_decay, "lr_decay", "lr_decay value", fn)
    initial_accumulator_value = _checks.nonneg(
        initial_accumulator_value, "initial_accumulator_value", "initial_accumulator_value", fn
    )
    eps = _checks.nonneg(eps, "eps", "epsilon value", fn)

    def init(params: Any) -> ScaleByAdagradState:
        sums = optree.tree_map(
            lambda p: None if p is None else torch.full_like(
                p, initial_accumulator_value, dtype=_ops.acc_dtype(p.dtype),
                memory_format=torch.preserve_format,
            ),
            params,
            none_is_leaf=True,
        )
        return ScaleByAdagradState(count=_ops.zero_count(params), sum_of_squares=sums)

    def update(
        updates: Any, state: ScaleByAdagradState, params: Any = None, **extra: Any
    ) -> tuple[Any, ScaleByAdagradState]:
        del params
        expect_state(state, ScaleByAdagradState, fn)
        donation(extra, fn)
        view = Leaves(updates)
        gs = view.values
        sums: list[Any] = view.take(state.sum_of_squares, "sum_of_squares")
        count = _ops.safe_increment(state.count)
        decay = None
        if lr_decay != 0.0:
            step = count.to(_ops.scalar_dtype(count.device))
            decay = 1.0 / (1.0 + (step - 1.0) * lr_decay)
        out: list[Any] = [None] * len(gs)
        new: list[Any] = [None] * len(gs)
        for idx in _ops.groups(sums):
            s = _ops.pick(sums, idx)
            g = _ops.cast(_ops.pick(gs, idx), [x.dtype for x in s])
            s = _ops.addcmul(s, g, g, 1.0)
            std = _ops.add_scalar_(_ops.sqrt(s), eps)
            u = _ops.div(g, std)
            if decay is not None:
                u = _ops.mul_(u, _ops.scalar_for(decay, s[0]))
            _ops.scatter(out, idx, _ops.cast(u, [x.dtype for x in _ops.pick(gs, idx)]))
            _ops.scatter(new, idx, s)
        return view.put(out), ScaleByAdagradState(
            count=count, sum_of_squares=view.put_into(state.sum_of_squares, new)
        )

    return GradientTransformation(init, update)


def adagrad(
    lr: Any = 1e-2,
    lr_decay: float = 0.0,
    weight_decay: float = 0.0,
    initial_accumulator_value: float = 0.0,
    eps: float = 1e-10,
    foreach: bool | None = None,
    *,
    maximize: bool = False,
    differentiable: bool = False,
    fused: bool | None = None,
) -> GradientTransformation:
    """Adagrad, as ``torch.optim.Adagrad`` (same arguments and defaults).

    .. math::
        g \\leftarrow \\pm g + \\lambda p, \\quad s_t = s_{t-1} + g^2, \\quad
        u = -\\frac{\\eta_t}{1 + (t-1)\\delta}\\,\\frac{g}{\\sqrt{s_t} + \\epsilon}

    ``chain(scale(-1) if maximize, add_decayed_weights(weight_decay) if weight_decay,
    scale_by_adagrad(lr_decay, initial_accumulator_value, eps), scale_by_learning_rate(lr))``.

    ``foreach``, ``fused`` and ``differentiable`` are accepted for signature compatibility
    and change nothing: the pure update runs foreach kernels where they serve and is
    always differentiable; :func:`~gradchain.update_and_apply_` runs torch's fused kernel.

    Args:
        lr: learning rate: float, 1-element tensor, or schedule of the update count.
        lr_decay: learning-rate decay (>= 0).
        weight_decay: L2 penalty added to the gradient (>= 0).
        initial_accumulator_value: starting value of the sums of squares (>= 0).
        eps: added to the denominator (>= 0).
        foreach, differentiable, fused: accepted, no effect (see above).
        maximize: maximize the objective instead of minimizing.

    Returns:
        A :class:`~gradchain.GradientTransformation` (a chain).

    Raises:
        ValueError: for ``lr``, ``lr_decay``, ``weight_decay``,
            ``initial_accumulator_value`` or ``eps`` below 0, as torch does.

    Example:
        >>> import torch, gradchain as gc
        >>> tx = gc.adagrad(lr=0.1)
        >>> params = {"w": torch.tensor([1.0, -1.0])}
        >>> updates, state = tx.update({"w": torch.tensor([3.0, -0.5])}, tx.init(params), params)
        >>> gc.apply_updates(params, updates)["w"]
        tensor([ 0.9000, -0.9000])
    """
    fn = "adagrad"
    maximize = _checks.as_bool(maximize, "maximize", fn)
    lr = _checks.check_lr(lr, fn)
    weight_decay = _checks.nonneg(weight_decay, "weight_decay", "weight_decay value", fn)
    txs, rule_at = rule_chain(
        scale_by_adagrad(lr_decay, initial_accumulator_value, eps), lr=lr, maximize=maximize,
        decay=add_decayed_weights(weight_decay) if weight_decay != 0 else None,
    )
    del foreach, differentiable, fused
    return bind_fused(chain(*txs), elementwise(_adagrad_plan(
        lr, rule_at, len(txs), lr_decay=float(lr_decay), weight_decay=weight_decay,
        eps=float(eps), maximize=maximize)))


def _adagrad_plan(lr: Any, rule_at: int, size: int, **hyper: Any) -> FusedPlan:
    """``adagrad``'s binding to ``torch._fused_adagrad_`` (what
    ``torch.optim.Adagrad(fused=True)`` runs), for :func:`~gradchain.update_and_apply_`; a
    gate's device flag goes to the kernel as ``found_inf`` (no sync)."""

    def plan(state: Any, p_leaves: list[Any], g_leaves: list[Any], spec: Any) -> FusedStep | None:
        if not lr_state_fits(state, size, lr):
            return None
        st = state[rule_at]
        if not isinstance(st, ScaleByAdagradState) or not torch.is_tensor(st.count):
            return None
        try:
            buffers = [flatten_like(spec, st.sum_of_squares, "sum_of_squares", "params")]
        except (TypeError, ValueError):
            return None
        rows = fused_rows(p_leaves, g_leaves, buffers)
        if rows is None:
            return None

        def step(grads: list[Any], keep: torch.Tensor | None) -> Any:
            new_state = list(state)
            lr_now = step_lr(lr, new_state, keep)
            count = _ops.safe_increment(st.count)
            for cols in kernel_groups(p_leaves, grads, rows, buffers):
                device = cols[0][0].device
                # torch's fused Adagrad increments its float32 steps before the kernel,
                # which only reads them.
                step_t = count.to(device, torch.float32)
                torch._fused_adagrad_(
                    cols[0], cols[1], cols[2], [step_t] * len(cols[0]),
                    lr=lr_on(lr_now, device), grad_scale=None,
                    found_inf=found_inf(keep, device), **hyper,
                )
            # The sums were updated in place: the new state holds the same tensors.
            new_state[rule_at] = st._replace(count=advance(st.count, count, keep))
            return tuple(new_state)

        return step

    return plan
