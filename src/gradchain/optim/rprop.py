"""Rprop: :func:`scale_by_rprop` and the ``torch.optim.Rprop`` twin :func:`rprop`."""

from __future__ import annotations

from typing import Any, NamedTuple

import optree
import torch
from torch.optim import rprop as torch_rprop

from gradchain import _checks, _ops
from gradchain._tree import Leaves
from gradchain.base import GradientTransformation, donation, expect_state
from gradchain.combine import chain
from gradchain.optim._fused import FusedPlan, bind_fused, torch_rule_plan
from gradchain.optim._sharded import elementwise
from gradchain.transforms import scale

__all__ = ["ScaleByRpropState", "scale_by_rprop", "rprop"]


class ScaleByRpropState(NamedTuple):
    """State of :func:`scale_by_rprop`.

    Attributes:
        count: int64 0-dim tensor, the number of updates done (torch's ``step``).
        prev: the previous (masked) gradients (torch's ``prev``).
        step_size: the per-element step sizes (torch's ``step_size``).

    Example:
        >>> import torch, gradchain as gc
        >>> gc.scale_by_rprop(0.1).init({"w": torch.zeros(2)})
        ScaleByRpropState(count=tensor(0), prev={'w': tensor([0., 0.])}, step_size={'w': tensor([0.1000, 0.1000])})
    """

    count: torch.Tensor  # type: ignore[assignment]  # shadows tuple.count, as in optax
    prev: Any
    step_size: Any


def _check_rprop(etas: Any, step_sizes: Any, fn: str) -> tuple[float, float, float, float]:
    if not isinstance(etas, (tuple, list)) or len(etas) != 2:
        raise ValueError(f"{fn}: etas must be a pair (etaminus, etaplus), got {etas!r}")
    etaminus, etaplus = _checks.as_float(etas[0], "etas[0]", fn), _checks.as_float(etas[1], "etas[1]", fn)
    if not 0.0 < etaminus < 1.0 < etaplus:
        raise ValueError(
            f"{fn}: invalid etas=({etaminus}, {etaplus}); expected 0 < etas[0] < 1 < etas[1]"
        )
    if not isinstance(step_sizes, (tuple, list)) or len(step_sizes) != 2:
        raise ValueError(f"{fn}: step_sizes must be a pair (min, max), got {step_sizes!r}")
    lo, hi = _checks.as_float(step_sizes[0], "step_sizes[0]", fn), _checks.as_float(step_sizes[1], "step_sizes[1]", fn)
    return etaminus, etaplus, lo, hi


def scale_by_rprop(
    learning_rate: float | torch.Tensor,
    etas: tuple[float, float] = (0.5, 1.2),
    step_sizes: tuple[float, float] = (1e-6, 50.0),
) -> GradientTransformation:
    """Rprop's step (resilient backpropagation), as in ``torch.optim.Rprop``.

    Each element keeps its own step size :math:`s`, started at ``learning_rate``:

    .. math::
        \\sigma = \\mathrm{sign}(g_t\\, \\tilde g_{t-1}), \\quad
        s_t = \\mathrm{clip}(s_{t-1} \\cdot \\{\\eta_+ \\text{ if } \\sigma > 0;\\;
        \\eta_- \\text{ if } \\sigma < 0;\\; 1\\},\\; s_{\\min}, s_{\\max}),

    .. math::
        \\tilde g_t = 0 \\text{ where } \\sigma < 0 \\text{ else } g_t, \\qquad
        u_t = \\mathrm{sign}(\\tilde g_t)\\, s_t

    The output is the step's *magnitude with the gradient's sign* (a direction to
    descend against: :func:`rprop` negates it). The learning rate only sets the initial
    step sizes, as in torch (a learning-rate scheduler has no effect on
    ``torch.optim.Rprop`` after its first step), so it is not a trailing
    :func:`~gradchain.scale_by_learning_rate` and cannot be a schedule.

    The sign products, the clamp and the step run on flat foreach lists; the three
    element selects (``etaplus`` / ``etaminus`` / ``1``, and zeroing where the sign flipped)
    are one ``torch.where`` per leaf, as in torch's own foreach Rprop.

    Args:
        learning_rate: initial step size, a float or a 1-element tensor.
        etas: ``(etaminus, etaplus)``, with ``0 < etaminus < 1 < etaplus``.
        step_sizes: ``(min, max)`` step sizes.

    Returns:
        A :class:`~gradchain.GradientTransformation` with state :class:`ScaleByRpropState`.

    Raises:
        ValueError: for invalid ``etas``, a negative learning rate.
        TypeError: for a schedule as ``learning_rate``.

    Example:
        >>> import torch, gradchain as gc
        >>> tx = gc.scale_by_rprop(0.1)
        >>> params = {"w": torch.zeros(2)}
        >>> state = tx.init(params)
        >>> for _ in range(2):
        ...     updates, state = tx.update({"w": torch.tensor([3.0, -1.0])}, state)
        >>> updates["w"]  # the same sign twice: the step grew by etaplus
        tensor([ 0.1200, -0.1200])
    """
    fn = "scale_by_rprop"
    if _checks.is_schedule(learning_rate):
        raise TypeError(
            f"{fn}: learning_rate sets the initial per-element step sizes (torch.optim.Rprop "
            "ignores later learning-rate changes), so it cannot be a schedule; pass a float"
        )
    lr: Any = _checks.check_lr(learning_rate, fn)
    etaminus, etaplus, lo, hi = _check_rprop(etas, step_sizes, fn)

    def init(params: Any) -> ScaleByRpropState:
        def full(p: Any) -> Any:
            if p is None:
                return None
            value = lr if not isinstance(lr, torch.Tensor) else lr.detach()
            out = torch.zeros_like(p, dtype=_ops.acc_dtype(p.dtype), memory_format=torch.preserve_format)
            return out.add_(value) if isinstance(value, float) else out + value.to(out)

        sizes = optree.tree_map(full, params, none_is_leaf=True)
        return ScaleByRpropState(count=_ops.zero_count(params), prev=_ops.buffers_like(params), step_size=sizes)

    def update(
        updates: Any, state: ScaleByRpropState, params: Any = None, **extra: Any
    ) -> tuple[Any, ScaleByRpropState]:
        del params
        expect_state(state, ScaleByRpropState, fn)
        donation(extra, fn)
        view = Leaves(updates)
        gs = view.values
        prevs: list[Any] = view.take(state.prev, "prev")
        sizes: list[Any] = view.take(state.step_size, "step_size")
        n = len(gs)
        out: list[Any] = [None] * n
        new_prev: list[Any] = [None] * n
        new_size: list[Any] = [None] * n
        for idx in _ops.groups(prevs):
            p = _ops.pick(prevs, idx)
            g = _ops.cast(_ops.pick(gs, idx), [x.dtype for x in p])
            signs = _ops.sign(_ops.mul_list(g, p))
            factors = []
            masked = []
            for s, gi in zip(signs, g):  # torch also selects leaf by leaf
                f = torch.where(s > 0, etaplus, s)
                f = torch.where(f < 0, etaminus, f)
                f = torch.where(f == 0, 1.0, f)
                factors.append(f)
                masked.append(torch.where(f == etaminus, 0.0, gi))
            size = _ops.clamp_(_ops.mul_list(_ops.pick(sizes, idx), factors), lo, hi)
            u = _ops.mul_list_(_ops.sign(masked), size)
            _ops.scatter(out, idx, _ops.cast(u, [x.dtype for x in _ops.pick(gs, idx)]))
            _ops.scatter(new_prev, idx, masked)
            _ops.scatter(new_size, idx, size)
        return view.put(out), ScaleByRpropState(
            count=_ops.safe_increment(state.count),
            prev=view.put_into(state.prev, new_prev),
            step_size=view.put_into(state.step_size, new_size),
        )

    return GradientTransformation(init, update)


def rprop(
    lr: float | torch.Tensor = 1e-2,
    etas: tuple[float, float] = (0.5, 1.2),
    step_sizes: tuple[float, float] = (1e-6, 50.0),
    *,
    capturable: bool = False,
    foreach: bool | None = None,
    maximize: bool = False,
    differentiable: bool = False,
) -> GradientTransformation:
    """Rprop, as ``torch.optim.Rprop`` (same arguments and defaults).

    .. math:: u = -\\mathrm{sign}(\\tilde g_t)\\, s_t

    with the step sizes of :func:`scale_by_rprop` (``lr`` is the initial step size, so a
    schedule is refused: torch's Rprop ignores learning-rate changes after its first step).

    ``chain(scale(-1) if maximize, scale_by_rprop(lr, etas, step_sizes), scale(-1))``.
    ``capturable``, ``foreach`` and ``differentiable`` are accepted and change nothing.

    Args:
        lr: the initial step size, a float or a 1-element tensor.
        etas: ``(etaminus, etaplus)``, with ``0 < etaminus < 1 < etaplus``.
        step_sizes: ``(min, max)`` allowed step sizes.
        capturable, foreach, differentiable: accepted, no effect.
        maximize: maximize the objective instead of minimizing.

    Returns:
        A :class:`~gradchain.GradientTransformation` (a chain).

    Raises:
        ValueError: for ``lr < 0`` or etas outside ``0 < etaminus < 1 < etaplus``, as
            torch does.
        TypeError: for a schedule as ``lr``.

    Example:
        >>> import torch, gradchain as gc
        >>> tx = gc.rprop(lr=0.1)
        >>> params = {"w": torch.tensor([1.0, -1.0])}
        >>> updates, state = tx.update({"w": torch.tensor([3.0, -0.5])}, tx.init(params), params)
        >>> gc.apply_updates(params, updates)["w"]
        tensor([ 0.9000, -0.9000])
    """
    fn = "rprop"
    maximize = _checks.as_bool(maximize, "maximize", fn)
    if _checks.is_schedule(lr):
        raise TypeError(
            f"{fn}: lr sets the initial per-element step sizes (torch.optim.Rprop ignores "
            "later learning-rate changes), so it cannot be a schedule; pass a float"
        )
    lr = _checks.check_lr(lr, fn)  # type: ignore[assignment]
    _check_rprop(etas, step_sizes, fn)
    del capturable, foreach, differentiable
    txs: list[GradientTransformation] = []
    if maximize:
        txs.append(scale(-1.0))
    rule_at = len(txs)
    txs.append(scale_by_rprop(lr, etas, step_sizes))
    txs.append(scale(-1.0))
    etaminus, etaplus, lo, hi = _check_rprop(etas, step_sizes, fn)
    return bind_fused(chain(*txs), _rprop_plan(
        rule_at, len(txs), etaminus=etaminus, etaplus=etaplus, step_size_min=lo,
        step_size_max=hi, maximize=maximize))


def _rprop_plan(rule_at: int, size: int, **hyper: Any) -> FusedPlan:
    """``rprop``'s binding to torch's foreach Rprop (what ``torch.optim.Rprop(foreach=True)``
    runs), for :func:`~gradchain.update_and_apply_`."""

    def kernel(ps: Any, gs: Any, bufs: Any, steps: Any, lr_now: Any, st: Any) -> dict[str, Any]:
        torch_rprop.rprop(ps, gs, bufs[0], bufs[1], steps, foreach=True, **hyper)
        return {}

    return elementwise(torch_rule_plan(
        0.0, size, rule_at, ScaleByRpropState, [(0, "prev"), (0, "step_size")], kernel
    ))
