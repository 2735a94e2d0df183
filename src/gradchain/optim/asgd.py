"""ASGD: :func:`scale_by_asgd` and the ``torch.optim.ASGD`` twin :func:`asgd`."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch.optim import asgd as torch_asgd

from gradchain import _checks, _ops
from gradchain._tree import Leaves
from gradchain.base import GradientTransformation, donation, expect_state
from gradchain.combine import chain
from gradchain.optim._fused import FusedPlan, bind_fused, copies, torch_rule_plan
from gradchain.optim._sharded import elementwise
from gradchain.transforms import add_decayed_weights, scale

__all__ = ["ScaleByAsgdState", "scale_by_asgd", "asgd"]


class ScaleByAsgdState(NamedTuple):
    """State of :func:`scale_by_asgd`.

    Attributes:
        count: int64 0-dim tensor, the number of updates done (torch's ``step``).
        eta: 0-dim tensor, the step size of the next update (torch's ``eta``).
        mu: 0-dim tensor, the averaging coefficient of the next update (torch's ``mu``).
        ax: the averaged parameters (torch's ``ax``): evaluate the model with these.

    ``eta`` and ``mu`` have torch's scalar-state dtype (float32 unless the default dtype
    is float64), so they round as torch's do.

    Example:
        >>> import torch, gradchain as gc
        >>> gc.scale_by_asgd(0.01).init({"w": torch.zeros(1)})
        ScaleByAsgdState(count=tensor(0), eta=tensor(0.0100), mu=tensor(1.), ax={'w': tensor([0.])})
    """

    count: torch.Tensor  # type: ignore[assignment]  # shadows tuple.count, as in optax
    eta: torch.Tensor
    mu: torch.Tensor
    ax: Any


def scale_by_asgd(
    learning_rate: Any = 1e-2, lambd: float = 1e-4, alpha: float = 0.75, t0: float = 1e6
) -> GradientTransformation:
    """Averaged SGD's step and its running average of the iterates, as ``torch.optim.ASGD``.

    .. math::
        u_t = -\\eta_t\\, (g_t + \\lambda p_t), \\qquad
        \\bar p_t = \\bar p_{t-1} + \\mu_t\\, (p_t + u_t - \\bar p_{t-1}),

    .. math::
        \\eta_{t+1} = \\frac{\\gamma_t}{(1 + \\lambda \\gamma_t t)^{\\alpha}}, \\qquad
        \\mu_{t+1} = \\frac{1}{\\max(1, t - t_0)}

    with :math:`\\eta_1 = \\gamma_0`, :math:`\\mu_1 = 1` and :math:`\\gamma_t` the learning
    rate (a schedule is called with the number of updates already done, which reproduces
    torch's ASGD driven by ``LambdaLR``: each step's ``eta`` was computed from the
    previous step's learning rate). The output is the final update (to add to the
    params): the learning rate enters :math:`\\eta` non-linearly, so this block ends
    :func:`asgd` instead of a :func:`~gradchain.scale_by_learning_rate`. It needs
    ``params``. The averaged parameters are ``state.ax`` (read them with
    ``gc.tree_get(state, "ax")``).

    Args:
        learning_rate: :math:`\\gamma`: float, 1-element tensor or schedule.
        lambd: decay term :math:`\\lambda`.
        alpha: power for the :math:`\\eta` update.
        t0: the step at which averaging starts.

    Returns:
        A :class:`~gradchain.GradientTransformation` with state :class:`ScaleByAsgdState`.

    Raises:
        ValueError: for a negative learning rate; ``params`` missing at ``update``.

    Example:
        >>> import torch, gradchain as gc
        >>> tx = gc.scale_by_asgd(0.1, lambd=0.0)
        >>> params = {"w": torch.tensor([1.0])}
        >>> updates, state = tx.update({"w": torch.tensor([2.0])}, tx.init(params), params)
        >>> updates["w"], state.ax["w"]
        (tensor([-0.2000]), tensor([0.8000]))
    """
    fn = "scale_by_asgd"
    lr = _checks.check_lr(learning_rate, fn)
    lambd = _checks.as_float(lambd, "lambd", fn)
    alpha = _checks.as_float(alpha, "alpha", fn)
    t0 = _checks.as_float(t0, "t0", fn)
    schedule: Any = lr if _checks.is_schedule(lr) else None

    def lr_at(count: torch.Tensor) -> Any:
        if schedule is None:
            return lr
        return schedule(count)  # type: ignore[operator]

    def init(params: Any) -> ScaleByAsgdState:
        dtype = _ops.state_scalar_dtype()
        count = _ops.zero_count(params)
        first = lr_at(count)
        eta = (first.detach() if isinstance(first, torch.Tensor) else torch.tensor(first))
        return ScaleByAsgdState(
            count=count,
            eta=eta.to(device=_ops.first_device(params), dtype=dtype, copy=True).reshape(()),
            mu=torch.ones((), dtype=dtype, device=_ops.first_device(params)),
            ax=_ops.buffers_like(params),
        )

    def update(
        updates: Any, state: ScaleByAsgdState, params: Any = None, **extra: Any
    ) -> tuple[Any, ScaleByAsgdState]:
        expect_state(state, ScaleByAsgdState, fn)
        donation(extra, fn)
        view = Leaves(updates)
        gs = view.values
        axs: list[Any] = view.take(state.ax, "ax")
        ps = view.take_params(params, fn, "ASGD's decay and averaging need the parameters")
        n = len(gs)
        out: list[Any] = [None] * n
        new_ax: list[Any] = [None] * n
        for idx in _ops.groups(axs):
            ax = _ops.pick(axs, idx)
            like = ax[0]
            g = _ops.cast(_ops.pick(gs, idx), [x.dtype for x in ax])
            p = _ops.cast(_ops.pick(ps, idx), [x.dtype for x in ax])
            eta = _ops.scalar_for(state.eta, like)
            u = _ops.mul_(_ops.add(g, p, alpha=lambd), -eta)
            new_p = _ops.add(p, u)
            ax = _ops.add_(
                _ops.mul_(_ops.sub(new_p, ax), _ops.scalar_for(state.mu, like)), ax
            )
            _ops.scatter(out, idx, _ops.cast(u, [x.dtype for x in _ops.pick(gs, idx)]))
            _ops.scatter(new_ax, idx, ax)
        count = _ops.safe_increment(state.count)
        step = count.to(_ops.scalar_dtype(count.device))
        rate = lr_at(state.count)
        rate = rate.to(step) if isinstance(rate, torch.Tensor) else rate
        new_eta = rate / ((1.0 + lambd * rate * step) ** alpha)
        new_mu = 1.0 / torch.clamp(step - t0, min=1.0)
        return view.put(out), ScaleByAsgdState(
            count=count,
            eta=torch.as_tensor(new_eta).to(state.eta),
            mu=new_mu.to(state.mu),
            ax=view.put_into(state.ax, new_ax),
        )

    return GradientTransformation(init, update)


def asgd(
    lr: Any = 1e-2,
    lambd: float = 1e-4,
    alpha: float = 0.75,
    t0: float = 1e6,
    weight_decay: float = 0.0,
    foreach: bool | None = None,
    maximize: bool = False,
    differentiable: bool = False,
    capturable: bool = False,
) -> GradientTransformation:
    """Averaged SGD, as ``torch.optim.ASGD`` (same arguments and defaults).

    .. math::
        g \\leftarrow \\pm g + w p, \\quad u_t = -\\eta_t (g + \\lambda p)

    with the step sizes and parameter average of :func:`scale_by_asgd` (the average is
    ``state.ax``, torch's ``state["ax"]``).

    ``chain(scale(-1) if maximize, add_decayed_weights(weight_decay) if weight_decay,
    scale_by_asgd(lr, lambd, alpha, t0))``: the learning rate enters ASGD's
    :math:`\\eta` non-linearly, so there is no trailing
    :func:`~gradchain.scale_by_learning_rate`. ``foreach``, ``differentiable`` and
    ``capturable`` are accepted and change nothing.

    Args:
        lr: learning rate: float, 1-element tensor, or schedule of the update count.
        lambd: decay term.
        alpha: power for the eta update.
        t0: the step at which averaging starts.
        weight_decay: L2 penalty added to the gradient (>= 0).
        foreach, differentiable, capturable: accepted, no effect.
        maximize: maximize the objective instead of minimizing.

    Returns:
        A :class:`~gradchain.GradientTransformation` (a chain); its ``update`` needs
        ``params``.

    Raises:
        ValueError: for ``lr < 0`` or ``weight_decay < 0``, as torch does.

    Example:
        >>> import torch, gradchain as gc
        >>> tx = gc.asgd(lr=0.1, t0=0.0)
        >>> params = {"w": torch.tensor([1.0])}
        >>> state = tx.init(params)
        >>> for _ in range(2):
        ...     updates, state = tx.update({"w": torch.tensor([1.0])}, state, params)
        ...     params = gc.apply_updates(params, updates)
        >>> params["w"], gc.tree_get(state, "ax")["w"]
        (tensor([0.8000]), tensor([0.8000]))
    """
    fn = "asgd"
    maximize = _checks.as_bool(maximize, "maximize", fn)
    lr = _checks.check_lr(lr, fn)
    weight_decay = _checks.nonneg(weight_decay, "weight_decay", "weight_decay value", fn)
    del foreach, differentiable, capturable
    txs: list[GradientTransformation] = []
    if maximize:
        txs.append(scale(-1.0))
    if weight_decay != 0:
        txs.append(add_decayed_weights(weight_decay))
    rule_at = len(txs)
    txs.append(scale_by_asgd(lr, lambd, alpha, t0))
    return bind_fused(chain(*txs), _asgd_plan(
        lr, rule_at, len(txs), lambd=float(lambd), alpha=float(alpha), t0=float(t0),
        weight_decay=weight_decay, maximize=maximize))


def _asgd_plan(lr: Any, rule_at: int, size: int, **hyper: Any) -> FusedPlan:
    """``asgd``'s binding to torch's foreach ASGD (what ``torch.optim.ASGD(foreach=True)``
    runs), for :func:`~gradchain.update_and_apply_`. torch's foreach ASGD computes the next
    ``eta`` from its float32 step tensor, so this path departs from the pure one (which
    follows torch's single-tensor arithmetic) by ~1e-8 relative in float64."""

    def kernel(ps: Any, gs: Any, bufs: Any, steps: Any, lr_now: Any, st: Any) -> dict[str, Any]:
        etas = copies(st.eta, len(ps))
        mus = copies(st.mu, len(ps))
        torch_asgd.asgd(ps, gs, bufs[0], mus, etas, steps, foreach=True, lr=lr_now,
                              **hyper)
        return {"eta": etas[0], "mu": mus[0]}

    return elementwise(torch_rule_plan(lr, size, rule_at, ScaleByAsgdState, [(0, "ax")], kernel))
