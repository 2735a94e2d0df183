"""Adafactor (torch's variant): :func:`scale_by_adafactor` and the ``torch.optim.Adafactor``
twin :func:`adafactor`."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import optree
import torch
from torch.optim import _adafactor as torch_adafactor

from gradchain import _checks, _ops
from gradchain._tree import Leaves
from gradchain.base import GradientTransformation, donation, expect_state
from gradchain.combine import chain
from gradchain.optim._fused import FusedPlan, bind_fused, torch_rule_plan
from gradchain.transforms import scale

__all__ = ["ScaleByAdafactorState", "scale_by_adafactor", "adafactor"]


class ScaleByAdafactorState(NamedTuple):
    """State of :func:`scale_by_adafactor`.

    Each tree is shaped like the params; which of its leaves are real depends on the
    parameter: a parameter with two or more dimensions keeps factored second moments
    (``row``: shape ``(..., n, 1)``, ``col``: shape ``(..., 1, m)``; torch's ``row_var``
    and ``col_var``) and an empty ``variance``; a vector or scalar keeps a full
    ``variance`` (torch's ``variance``) and empty ``row`` / ``col``.

    Attributes:
        count: int64 0-dim tensor, the number of updates done (torch's ``step``).
        row: row factors of the second moments.
        col: column factors of the second moments.
        variance: unfactored second moments.

    Example:
        >>> import torch, gradchain as gc
        >>> state = gc.scale_by_adafactor().init({"w": torch.zeros(3, 2), "b": torch.zeros(2)})
        >>> state.row["w"].shape, state.col["w"].shape, state.variance["b"].shape
        (torch.Size([3, 1]), torch.Size([1, 2]), torch.Size([2]))
    """

    count: torch.Tensor  # type: ignore[assignment]  # shadows tuple.count, as in optax
    row: Any
    col: Any
    variance: Any


def _empty(p: torch.Tensor) -> torch.Tensor:
    return torch.zeros(0, dtype=_ops.acc_dtype(p.dtype), device=p.device)


def scale_by_adafactor(
    learning_rate: Any = 1e-2,
    beta2_decay: float = -0.8,
    eps: tuple[float | None, float] = (None, 1e-3),
    d: float = 1.0,
    weight_decay: float = 0.0,
) -> GradientTransformation:
    """The Adafactor update of ``torch.optim.Adafactor`` (torch's own variant, which
    applies :math:`\\epsilon_1` to the variance estimate rather than to the squared
    gradient, and uses means instead of sums), including its step size.

    With :math:`\\hat\\beta_{2,t} = 1 - t^{c}` (:math:`c` = ``beta2_decay``), for a
    parameter with two or more dimensions (factored over its last two):

    .. math::
        R_t = \\hat\\beta_{2,t} R_{t-1} + (1 - \\hat\\beta_{2,t})\\,\\mathrm{mean}_{-1}(g^2),
        \\quad
        C_t = \\hat\\beta_{2,t} C_{t-1} + (1 - \\hat\\beta_{2,t})\\,\\mathrm{mean}_{-2}(g^2),
        \\quad
        \\hat V_t = \\frac{R_t C_t}{\\max(\\mathrm{mean}_{-2}(R_t), \\epsilon_1)}

    and :math:`\\hat V_t = \\hat\\beta_{2,t} \\hat V_{t-1} + (1-\\hat\\beta_{2,t}) g^2`
    otherwise. Then

    .. math::
        U_t = \\frac{g}{\\sqrt{\\max(\\hat V_t, \\epsilon_1^2)}}, \\quad
        \\alpha_t = \\max(\\epsilon_2, \\mathrm{RMS}(p))\\,\\min(\\gamma_t, 1/\\sqrt t),
        \\quad
        u_t = -\\frac{\\alpha_t}{\\max(1, \\mathrm{RMS}(U_t)/d)}\\, U_t - \\gamma_t \\lambda p

    where :math:`\\gamma_t` is the learning rate and :math:`\\lambda` the (decoupled)
    weight decay. ``eps[0] = None`` means the machine epsilon of the parameter's dtype.

    The output is the final update (to add to the params): the learning rate enters
    through :math:`\\min(\\gamma_t, 1/\\sqrt t)` and the parameter's RMS, so it cannot be a
    trailing :func:`~gradchain.scale_by_learning_rate`, and the decay uses the
    learning rate, not :math:`\\alpha_t`; both live here. ``update`` needs ``params``.
    torch reads the per-parameter norms on the host (``.item()``); here they stay 0-dim
    tensors (no sync). The factored moments are per-parameter maths (row and column
    reductions, a matrix product), so this rule loops over the leaves, as torch does.

    Args:
        learning_rate: :math:`\\gamma`: float, 1-element tensor or schedule.
        beta2_decay: :math:`c` (<= 0).
        eps: ``(eps1, eps2)``: eps1 (``None`` or >= 0) bounds the variance estimate,
            eps2 (>= 0) bounds the parameter scale.
        d: clipping threshold on the update's RMS (>= 1).
        weight_decay: decoupled weight decay :math:`\\lambda` (>= 0).

    Returns:
        A :class:`~gradchain.GradientTransformation` with state :class:`ScaleByAdafactorState`.

    Raises:
        ValueError: for arguments outside torch's ranges; ``params`` missing at ``update``.

    Example:
        >>> import torch, gradchain as gc
        >>> tx = gc.scale_by_adafactor(learning_rate=0.1)
        >>> params = {"w": torch.ones(2, 2)}
        >>> updates, state = tx.update({"w": torch.full((2, 2), 3.0)}, tx.init(params), params)
        >>> updates["w"]  # -max(eps2, RMS(p)) * min(lr, 1) * sign(g) at the first step
        tensor([[-0.1000, -0.1000],
                [-0.1000, -0.1000]])
    """
    fn = "scale_by_adafactor"
    lr: Any = _checks.check_lr(learning_rate, fn)
    beta2_decay, eps1, eps2, d, weight_decay = _check(beta2_decay, eps, d, weight_decay, fn)
    schedule: Any = lr if _checks.is_schedule(lr) else None

    def init(params: Any) -> ScaleByAdafactorState:
        def row(p: Any) -> Any:
            if p is None:
                return None
            if p.dim() < 2:
                return _empty(p)
            return torch.zeros((*p.shape[:-1], 1), dtype=_ops.acc_dtype(p.dtype), device=p.device)

        def col(p: Any) -> Any:
            if p is None:
                return None
            if p.dim() < 2:
                return _empty(p)
            shape = (*p.shape[:-2], 1, p.shape[-1])
            return torch.zeros(shape, dtype=_ops.acc_dtype(p.dtype), device=p.device)

        def var(p: Any) -> Any:
            if p is None:
                return None
            if p.dim() >= 2:
                return _empty(p)
            return torch.zeros_like(p, dtype=_ops.acc_dtype(p.dtype))

        return ScaleByAdafactorState(
            count=_ops.zero_count(params),
            row=optree.tree_map(row, params, none_is_leaf=True),
            col=optree.tree_map(col, params, none_is_leaf=True),
            variance=optree.tree_map(var, params, none_is_leaf=True),
        )

    def update(
        updates: Any, state: ScaleByAdafactorState, params: Any = None, **extra: Any
    ) -> tuple[Any, ScaleByAdafactorState]:
        expect_state(state, ScaleByAdafactorState, fn)
        donation(extra, fn)
        view = Leaves(updates)
        gs = view.values
        rows: list[Any] = view.take(state.row, "row", check=False)
        cols: list[Any] = view.take(state.col, "col", check=False)
        variances: list[Any] = view.take(state.variance, "variance", check=False)
        if gs and params is None:
            raise ValueError(
                f"{fn}: params is None; Adafactor's step size and weight decay need the "
                "parameters, call tx.update(grads, state, params)"
            )
        ps: list[Any] = view.take(params, "params", dtype=False) if gs else []
        count = _ops.safe_increment(state.count)
        step = count.to(_ops.scalar_dtype(count.device))
        rate = schedule(state.count) if schedule is not None else lr
        rate = torch.as_tensor(rate, dtype=step.dtype, device=step.device)
        one_minus_beta2 = step**beta2_decay
        rho = torch.minimum(rate, 1.0 / step.sqrt())
        out: list[Any] = []
        new_rows: list[Any] = []
        new_cols: list[Any] = []
        new_vars: list[Any] = []
        for g, p, r, c, v in zip(gs, ps, rows, cols, variances):
            work = r.dtype if g.dim() >= 2 else v.dtype
            e1 = torch.finfo(g.dtype).eps if eps1 is None else eps1
            gw, pw = g.to(work), p.to(work)
            size = math.sqrt(max(g.numel(), 1))
            p_rms = torch.linalg.vector_norm(pw).to(step.dtype) / size
            alpha = torch.clamp(p_rms, min=eps2) * rho
            weight = one_minus_beta2.to(work)
            if g.dim() >= 2:
                row_mean = torch.linalg.vector_norm(gw, dim=-1, keepdim=True).square() / g.size(-1)
                r = torch.lerp(r, row_mean, weight)
                col_mean = torch.linalg.vector_norm(gw, dim=-2, keepdim=True).square() / g.size(-2)
                c = torch.lerp(c, col_mean, weight)
                estimate = (r @ c) / r.mean(dim=-2, keepdim=True).clamp(min=e1)
            else:
                v = torch.lerp(v, gw * gw, weight)
                estimate = v
            u = estimate.clamp(min=e1 * e1).rsqrt() * gw
            u_rms = torch.linalg.vector_norm(u).to(step.dtype) / (size * d)
            coef = -alpha / torch.clamp(u_rms, min=1.0)
            u = u * coef.to(work)
            if weight_decay != 0.0:
                u = u + pw * (-(rate * weight_decay)).to(work)
            out.append(u.to(g.dtype))
            new_rows.append(r)
            new_cols.append(c)
            new_vars.append(v)
        return view.put(out), ScaleByAdafactorState(
            count=count,
            row=view.put_into(state.row, new_rows),
            col=view.put_into(state.col, new_cols),
            variance=view.put_into(state.variance, new_vars),
        )

    return GradientTransformation(init, update)


def _check(
    beta2_decay: Any, eps: Any, d: Any, weight_decay: Any, fn: str
) -> tuple[float, float | None, float, float, float]:
    beta2_decay = _checks.as_float(beta2_decay, "beta2_decay", fn)
    if not beta2_decay <= 0.0:
        raise ValueError(f"{fn}: invalid beta2_decay={beta2_decay}; expected beta2_decay <= 0")
    if not isinstance(eps, (tuple, list)) or len(eps) != 2:
        raise ValueError(f"{fn}: eps must be a pair (eps1 or None, eps2), got {eps!r}")
    eps1 = None if eps[0] is None else _checks.nonneg(eps[0], "eps[0]", "epsilon value", fn)
    eps2 = _checks.nonneg(eps[1], "eps[1]", "epsilon value", fn)
    d = _checks.as_float(d, "d", fn)
    if not d >= 1.0:
        raise ValueError(f"{fn}: invalid clipping threshold d={d}; expected d >= 1")
    weight_decay = _checks.nonneg(weight_decay, "weight_decay", "weight_decay value", fn)
    return beta2_decay, eps1, eps2, d, weight_decay


def adafactor(
    lr: Any = 1e-2,
    beta2_decay: float = -0.8,
    eps: tuple[float | None, float] = (None, 1e-3),
    d: float = 1.0,
    weight_decay: float = 0.0,
    *,
    foreach: bool | None = None,
    maximize: bool = False,
) -> GradientTransformation:
    """Adafactor, as ``torch.optim.Adafactor`` (same arguments and defaults).

    ``chain(scale(-1) if maximize, scale_by_adafactor(lr, beta2_decay, eps, d,
    weight_decay))``: see :func:`scale_by_adafactor` for the maths and why the learning
    rate and the decay live in the block. ``foreach`` is accepted and changes nothing.

    Args:
        lr: learning rate: float, 1-element tensor, or schedule of the update count.
        beta2_decay: decay rate of the second-moment coefficient (<= 0).
        eps: ``(eps1, eps2)``; ``eps1=None`` means the parameter dtype's machine epsilon.
        d: clipping threshold on the update's RMS (>= 1).
        weight_decay: decoupled weight decay (>= 0).
        foreach: accepted, no effect.
        maximize: maximize the objective instead of minimizing.

    Returns:
        A :class:`~gradchain.GradientTransformation` (a chain); its ``update`` needs
        ``params``.

    Raises:
        ValueError: for ``lr < 0``, ``beta2_decay > 0``, a negative epsilon, ``d < 1`` or
            ``weight_decay < 0``, as torch does.

    Example:
        >>> import torch, gradchain as gc
        >>> tx = gc.adafactor(lr=0.1)
        >>> params = {"w": torch.ones(2, 2), "b": torch.ones(2)}
        >>> grads = {"w": torch.full((2, 2), 3.0), "b": torch.tensor([1.0, -1.0])}
        >>> updates, state = tx.update(grads, tx.init(params), params)
        >>> gc.apply_updates(params, updates)["b"]
        tensor([0.9000, 1.1000])
    """
    fn = "adafactor"
    maximize = _checks.as_bool(maximize, "maximize", fn)
    lr = _checks.check_lr(lr, fn)
    _check(beta2_decay, eps, d, weight_decay, fn)
    del foreach
    txs: list[GradientTransformation] = []
    if maximize:
        txs.append(scale(-1.0))
    rule_at = len(txs)
    txs.append(scale_by_adafactor(lr, beta2_decay, eps, d, weight_decay))
    b2d, eps1, eps2, d, weight_decay = _check(beta2_decay, eps, d, weight_decay, fn)
    return bind_fused(chain(*txs), _adafactor_plan(
        lr, rule_at, len(txs), beta2_decay=b2d, eps1=eps1, eps2=eps2, d=d,
        weight_decay=weight_decay, maximize=maximize))


def _adafactor_plan(lr: Any, rule_at: int, size: int, **hyper: Any) -> FusedPlan:
    """``adafactor``'s binding to torch's foreach Adafactor (what
    ``torch.optim.Adafactor(foreach=True)`` runs), for :func:`~gradchain.update_and_apply_`.
    torch's code reads the per-parameter norms on the host (``.item()``), as it does itself."""

    def kernel(ps: Any, gs: Any, bufs: Any, steps: Any, lr_now: Any, st: Any) -> dict[str, Any]:
        rows = [r if p.dim() >= 2 else None for r, p in zip(bufs[0], ps)]
        cols = [c if p.dim() >= 2 else None for c, p in zip(bufs[1], ps)]
        variances = [v if p.dim() < 2 else None for v, p in zip(bufs[2], ps)]
        torch_adafactor.adafactor(ps, gs, rows, cols, variances, steps, foreach=True,
                                         lr=lr_now, **hyper)
        return {}

    return torch_rule_plan(lr, size, rule_at, ScaleByAdafactorState,
                           [(0, "row"), (0, "col"), (0, "variance")], kernel, shaped=False)
