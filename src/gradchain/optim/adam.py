"""Adam: the block ``scale_by_adam`` and the ``torch.optim.Adam`` / ``AdamW`` twins
``adam`` and ``adamw``, with their binding to torch's fused Adam/AdamW kernels.

The aliases take ``torch.optim``'s argument names and defaults and follow the same
trajectories (float32 rtol 1e-5, float64 rtol 1e-12 after 100 steps; tested);
:func:`~gradchain.update_and_apply_` runs them as ``torch._fused_adam_`` /
``torch._fused_adamw_``, equal to ``Adam/AdamW(fused=True)`` bit for bit. The
conventions shared by every rule are on :mod:`gradchain.optim`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from gradchain import _checks, _ops
from gradchain._ops import known_float
from gradchain._tree import Leaves, flatten_like, unflatten
from gradchain.base import GradientTransformation, Params, Updates, donation, expect_state
from gradchain.combine import chain, is_params_function, masked
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
    ScalarOrSchedule,
    add_decayed_weights,
)

__all__ = ["ScaleByAdamState", "scale_by_adam", "adam", "adamw"]


# --------------------------------------------------------------------------- adam
class ScaleByAdamState(NamedTuple):
    """State of :func:`scale_by_adam`.

    Attributes:
        count: int64 0-dim tensor, the number of updates done (torch's ``step``).
        mu: first moments (torch's ``exp_avg``), a tree shaped like the params.
        nu: second moments (torch's ``exp_avg_sq``), a tree shaped like the params.
        nu_max: running maximum of ``nu`` (torch's ``max_exp_avg_sq``) when
            ``amsgrad=True``; the empty tuple ``()`` otherwise (an empty tree, so the state
            round-trips through :func:`~gradchain.to_state_dict` and batches under
            ``torch.func.vmap``).

    Example:
        >>> import torch, gradchain as gc
        >>> state = gc.scale_by_adam().init({"w": torch.zeros(2)})
        >>> state.count, state.mu, state.nu_max
        (tensor(0), {'w': tensor([0., 0.])}, ())
    """

    count: torch.Tensor  # type: ignore[assignment]  # shadows tuple.count, as in optax
    mu: Updates
    nu: Updates
    nu_max: Updates


def scale_by_adam(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, amsgrad: bool = False
) -> GradientTransformation:
    """Rescale updates by Adam's bias-corrected moment estimates.

    With ``t`` the step (``count`` after the increment, starting at 1):

    .. math::
        m_t = \\mathrm{lerp}(m_{t-1}, g, 1 - \\beta_1), \\quad
        v_t = \\beta_2 v_{t-1} + (1 - \\beta_2) g^2, \\quad
        \\hat v_t = \\max(\\hat v_{t-1}, v_t) \\text{ (amsgrad) else } v_t

    .. math::
        u = \\frac{m_t / (1 - \\beta_1^t)}{\\sqrt{\\hat v_t} / \\sqrt{1 - \\beta_2^t} + \\epsilon}

    The moment updates are those of ``torch.optim.Adam`` (same operations, same order);
    the direction is computed as :math:`m_t / ((\\sqrt{\\hat v_t}/\\sqrt{1-\\beta_2^t} +
    \\epsilon)(1-\\beta_1^t))`, which equals torch's up to rounding (float32 parity within
    1e-5 relative after 100 steps) and needs one buffer, or none with ``donate``. The bias
    corrections are computed in float64 and cast to each leaf group's dtype. Follow with
    :func:`scale_by_learning_rate` for the step (as :func:`adam` does).

    Args:
        b1: decay of the first moment (torch's ``betas[0]``), in ``[0, 1)``.
        b2: decay of the second moment (torch's ``betas[1]``), in ``[0, 1)``.
        eps: added to the denominator for numerical stability (>= 0).
        amsgrad: use the running maximum of the second moment (AMSGrad).

    Returns:
        A :class:`~gradchain.GradientTransformation` with state :class:`ScaleByAdamState`.

    Example:
        >>> import torch, gradchain as gc
        >>> tx = gc.scale_by_adam()
        >>> params = {"w": torch.zeros(2)}
        >>> updates, state = tx.update({"w": torch.tensor([0.5, -2.0])}, tx.init(params))
        >>> updates["w"]  # the first Adam direction is sign(g) (up to eps)
        tensor([ 1.0000, -1.0000])
        >>> state.count
        tensor(1)
    """
    fn = "scale_by_adam"
    amsgrad = _checks.as_bool(amsgrad, "amsgrad", fn)
    b1 = _checks.beta(b1, "b1", fn)
    b2 = _checks.beta(b2, "b2", fn)
    eps = _checks.nonneg(eps, "eps", "epsilon value", fn)

    def init(params: Params) -> ScaleByAdamState:
        return ScaleByAdamState(
            count=_ops.zero_count(params),
            mu=_ops.buffers_like(params),
            nu=_ops.buffers_like(params),
            nu_max=_ops.buffers_like(params) if amsgrad else (),
        )

    def update(
        updates: Updates, state: ScaleByAdamState, params: Params | None = None, **extra: Any
    ) -> tuple[Updates, ScaleByAdamState]:
        del params
        expect_state(state, ScaleByAdamState, fn)
        donated_u, donated_s = donation(extra, fn)
        view = Leaves(updates)
        gs = view.values
        mus: list[Any] = view.take(state.mu, "mu")
        nus: list[Any] = view.take(state.nu, "nu")
        maxs: list[Any] = view.take(state.nu_max, "nu_max") if amsgrad else []
        out: list[Any] = [None] * len(gs)
        new_mus: list[Any] = [None] * len(gs)
        new_nus: list[Any] = [None] * len(gs)
        new_maxs: list[Any] = [None] * len(gs)

        count = _ops.safe_increment(state.count)
        step = count.to(_ops.scalar_dtype(count.device))
        bias_correction1 = 1.0 - b1**step
        bias_correction2 = 1.0 - b2**step
        bias_correction2_sqrt = torch.sqrt(bias_correction2)

        for idx in _ops.groups(mus):
            m = _ops.pick(mus, idx)
            v = _ops.pick(nus, idx)
            g = _ops.cast(_ops.pick(gs, idx), [x.dtype for x in m])
            # Fresh intermediates are updated in place (_ops.*_); the state only when
            # donated, with the same operations (so the same values).
            if donated_s:
                m = _ops.lerp_(m, g, 1.0 - b1)
                v = _ops.addcmul_(_ops.mul_(v, b2), g, g, 1.0 - b2)
            else:
                m = _ops.lerp(m, g, 1.0 - b1)
                v = _ops.addcmul_(_ops.mul(v, b2), g, g, 1.0 - b2)
            if amsgrad:
                old_max = _ops.pick(maxs, idx)
                vmax = _ops.maximum_(old_max, v) if donated_s else _ops.maximum(old_max, v)
                _ops.scatter(new_maxs, idx, vmax)
            else:
                vmax = v
            # u = m / ((sqrt(v) / sqrt(bc2) + eps) * bc1), built in one buffer: a fresh one,
            # or g's memory when donated (g, the updates or a cast copy of them, is no
            # longer needed), so a donated step allocates nothing gradient-sized.
            if donated_u and _ops.inplace_ok(g, m):
                denom = _ops.sqrt_into(g, vmax)
            else:
                denom = _ops.sqrt(vmax)
            denom = _ops.div_scalar_(denom, _ops.scalar_for(bias_correction2_sqrt, m[0]))
            denom = _ops.add_scalar_(denom, eps)
            denom = _ops.mul_(denom, _ops.scalar_for(bias_correction1, m[0]))
            u = _ops.rdiv_(denom, m)
            _ops.scatter(out, idx, _ops.cast(u, [x.dtype for x in _ops.pick(gs, idx)]))
            _ops.scatter(new_mus, idx, m)
            _ops.scatter(new_nus, idx, v)

        new_state = ScaleByAdamState(
            count=count,
            mu=view.put_into(state.mu, new_mus),
            nu=view.put_into(state.nu, new_nus),
            nu_max=view.put_into(state.nu_max, new_maxs) if amsgrad else state.nu_max,
        )
        return view.put(out), new_state

    return GradientTransformation(init, update)



def adam(
    lr: ScalarOrSchedule = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float | torch.Tensor = 0.0,
    amsgrad: bool = False,
    maximize: bool = False,
) -> GradientTransformation:
    """Adam, as ``torch.optim.Adam`` (same arguments and defaults).

    .. math::
        g \\leftarrow \\pm g + \\lambda p, \\quad
        u = -\\eta_t \\frac{m_t / (1 - \\beta_1^t)}{\\sqrt{\\hat v_t / (1 - \\beta_2^t)} + \\epsilon}

    with the moments of :func:`scale_by_adam`. ``weight_decay`` is the L2 penalty added
    to the gradient before the moments, as torch does (for decoupled decay see
    :func:`adamw`).

    ``chain(scale(-1) if maximize, add_decayed_weights(weight_decay) if weight_decay,
    scale_by_adam(*betas, eps, amsgrad), scale_by_learning_rate(lr))``.

    Args:
        lr: learning rate: float, 1-element tensor, or schedule of the update count.
        betas: ``(beta1, beta2)``, each in ``[0, 1)``.
        eps: term added to the denominator (>= 0).
        weight_decay: L2 penalty (>= 0).
        amsgrad: use the AMSGrad variant.
        maximize: maximize the objective instead of minimizing.

    Returns:
        A :class:`~gradchain.GradientTransformation` (a chain) whose updates are added to
        the params with :func:`~gradchain.apply_updates`.

    Raises:
        ValueError: for ``lr < 0``, ``eps < 0``, betas outside ``[0, 1)`` or
            ``weight_decay < 0``, as ``torch.optim.Adam`` does.

    Example:
        >>> import torch, gradchain as gc
        >>> tx = gc.adam(lr=0.1)
        >>> params = {"w": torch.tensor([1.0, -1.0])}
        >>> updates, state = tx.update({"w": torch.tensor([3.0, -0.5])}, tx.init(params), params)
        >>> gc.apply_updates(params, updates)["w"]
        tensor([ 0.9000, -0.9000])
    """
    return _adam_rule("adam", False, lr, betas, eps, weight_decay, amsgrad, maximize)


def adamw(
    lr: ScalarOrSchedule = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float | torch.Tensor = 1e-2,
    amsgrad: bool = False,
    maximize: bool = False,
    mask: Any | Callable[[Params], Any] | None = None,
) -> GradientTransformation:
    """AdamW (decoupled weight decay), as ``torch.optim.AdamW`` (same arguments and defaults).

    .. math::
        u = -\\eta_t \\left(\\frac{m_t / (1 - \\beta_1^t)}
            {\\sqrt{\\hat v_t / (1 - \\beta_2^t)} + \\epsilon} + \\lambda p\\right)

    i.e. ``p + u = p (1 - \\eta_t \\lambda) - \\eta_t\\,\\mathrm{adam}``, torch's
    ``param.mul_(1 - lr * weight_decay)`` followed by the Adam step; with a schedule the
    decay uses the scheduled learning rate, as torch does with a scheduler.

    torch multiplies by the factor ``1 - lr * weight_decay`` rounded to the parameter
    dtype; gradchain computes the decay term ``lr * weight_decay * p`` directly. In
    float32 the two differ by at most half an ulp of 1 (3e-8) relative per step, well
    inside the parity tolerance (1e-5 after 100 steps).

    ``chain(scale(-1) if maximize, scale_by_adam(*betas, eps, amsgrad),
    add_decayed_weights(weight_decay) if weight_decay, scale_by_learning_rate(lr))``;
    with ``mask``, the decay is ``masked(add_decayed_weights(weight_decay), mask)``.

    **No decay on biases and norms.** ``mask`` (optax's ``adamw(mask=...)``) is a tree of
    bools shaped like the params, or a function ``params -> tree``: the weight decay
    applies where it is ``True`` only. It is the two param groups of
    ``AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}])`` in one
    transformation, and :func:`~gradchain.update_and_apply_` still runs it as torch's fused
    kernel (one call per subset), equal to that optimizer with ``fused=True`` bit for bit.

    Args:
        lr: learning rate: float, 1-element tensor, or schedule of the update count.
        betas: ``(beta1, beta2)``, each in ``[0, 1)``.
        eps: term added to the denominator (>= 0).
        weight_decay: decoupled weight decay factor (>= 0): a float or a 1-element tensor.
        amsgrad: use the AMSGrad variant.
        maximize: maximize the objective instead of minimizing.
        mask: where to decay: ``None`` (everywhere), a tree of bools shaped like the params,
            or a function of the params giving one (see :func:`~gradchain.masked`).

    Returns:
        A :class:`~gradchain.GradientTransformation` (a chain) whose updates are added to
        the params with :func:`~gradchain.apply_updates`.

    Raises:
        ValueError: for ``lr < 0``, ``eps < 0``, betas outside ``[0, 1)`` or
            ``weight_decay < 0``, as ``torch.optim.AdamW`` does.

    Example:
        >>> import torch, gradchain as gc
        >>> tx = gc.adamw(lr=0.1, weight_decay=0.5)
        >>> params = {"w": torch.tensor([1.0, -1.0])}
        >>> updates, state = tx.update({"w": torch.tensor([3.0, -0.5])}, tx.init(params), params)
        >>> gc.apply_updates(params, updates)["w"]  # p * (1 - 0.05) - 0.1 * sign(g)
        tensor([ 0.8500, -0.8500])

        Decay on matrices only:

        >>> tx = gc.adamw(lr=0.1, weight_decay=0.5,
        ...               mask=lambda ps: {k: p.ndim > 1 for k, p in ps.items()})
        >>> params = {"w": torch.ones(1, 2), "b": torch.ones(2)}
        >>> grads = {"w": torch.ones(1, 2), "b": torch.ones(2)}
        >>> updates, state = tx.update(grads, tx.init(params), params)
        >>> updates["w"], updates["b"]
        (tensor([[-0.1500, -0.1500]]), tensor([-0.1000, -0.1000]))
    """
    return _adam_rule("adamw", True, lr, betas, eps, weight_decay, amsgrad, maximize, mask)


def _adam_rule(
    fn: str, decoupled: bool, lr: ScalarOrSchedule, betas: tuple[float, float], eps: float,
    weight_decay: float | torch.Tensor, amsgrad: bool, maximize: bool, mask: Any = None,
) -> GradientTransformation:
    """``adam`` (L2 ``weight_decay`` added to the gradient) or ``adamw`` (``decoupled``:
    the decay added to the direction, where ``mask`` says), validated as torch validates
    them, as a chain bound to torch's fused kernel."""
    amsgrad = _checks.as_bool(amsgrad, "amsgrad", fn)
    maximize = _checks.as_bool(maximize, "maximize", fn)
    lr = _checks.check_lr(lr, fn)
    eps = _checks.nonneg(eps, "eps", "epsilon value", fn)
    b1, b2 = _checks.betas(betas, fn)
    weight_decay = _checks.nonneg_scalar(weight_decay, "weight_decay", "weight_decay value", fn)
    decay = None
    if _checks.maybe_nonzero(weight_decay):
        decay = add_decayed_weights(weight_decay)
        decay = decay if mask is None else masked(decay, mask)
    txs, adam_at = rule_chain(
        scale_by_adam(b1, b2, eps, amsgrad), lr=lr, maximize=maximize, decay=decay,
        decoupled=decoupled,
    )
    plan = _adam_plan(decoupled, lr, adam_at, len(txs), b1=b1, b2=b2, eps=eps,
                      weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize, mask=mask)
    if not is_params_function(mask):
        # (A mask function reads the params: on DTensors it must see them whole.)
        plan = elementwise(plan)
    return bind_fused(chain(*txs), plan)


def _adam_plan(
    decoupled: bool, lr: ScalarOrSchedule, adam_at: int, size: int, **hyper: Any
) -> FusedPlan:
    """``adam``'s / ``adamw``'s binding to ``torch._fused_adam_`` / ``_fused_adamw_`` (what
    ``torch.optim.Adam/AdamW(fused=True)`` runs), for :func:`~gradchain.update_and_apply_`;
    see :mod:`gradchain.optim._fused`."""
    amsgrad = hyper["amsgrad"]
    mask = hyper["mask"]

    def plan(state: Any, p_leaves: list[Any], g_leaves: list[Any], spec: Any) -> FusedStep | None:
        if not lr_state_fits(state, size, lr):
            return None
        st = state[adam_at]
        if not isinstance(st, ScaleByAdamState) or not torch.is_tensor(st.count):
            return None
        try:
            buffers = [flatten_like(spec, st.mu, "mu", "params"),
                       flatten_like(spec, st.nu, "nu", "params")]
            if amsgrad:
                buffers.append(flatten_like(spec, st.nu_max, "nu_max", "params"))
        except (TypeError, ValueError):
            return None
        weight_decay = known_float(hyper["weight_decay"])  # the kernel takes a float
        if weight_decay is None:
            return None
        decays = _decay_flags(mask, p_leaves, spec)
        if decays is None:
            return None  # a mask that does not fit: the generic path names the problem
        rows = fused_rows(p_leaves, g_leaves, buffers)
        if rows is None:
            return None

        def step(grads: list[Any], keep: torch.Tensor | None) -> Any:
            new_state = list(state)
            lr_now = step_lr(lr, new_state, keep)
            count = _ops.safe_increment(st.count)
            kernel = torch._fused_adamw_ if decoupled else torch._fused_adam_
            # With a mask, the leaves without decay are a second group (torch's param group
            # with weight_decay=0), each run by the same kernel.
            subsets = [(True, rows)] if mask is None else [
                (decayed, [i for i in rows if decays[i] is decayed]) for decayed in (True, False)
            ]
            for decayed, subset in subsets:
                for cols in kernel_groups(p_leaves, grads, subset, buffers):
                    device = cols[0][0].device
                    step_t = count.to(device, torch.float32)
                    kernel(
                        cols[0], cols[1], cols[2], cols[3], cols[4] if amsgrad else [],
                        [step_t] * len(cols[0]),
                        lr=lr_on(lr_now, device),
                        beta1=hyper["b1"], beta2=hyper["b2"],
                        weight_decay=weight_decay if decayed else 0.0,
                        eps=hyper["eps"], amsgrad=amsgrad, maximize=hyper["maximize"],
                        found_inf=found_inf(keep, device),
                    )
            # The moments were updated in place: the new state holds the same tensors.
            new_state[adam_at] = st._replace(count=advance(st.count, count, keep))
            return tuple(new_state)

        return step

    return plan


def _decay_flags(mask: Any, p_leaves: list[Any], spec: Any) -> list[bool] | None:
    """Whether each leaf is decayed (``adamw``'s ``mask`` read for the params' leaves, as
    :func:`~gradchain.masked` reads it); ``None`` when the mask does not fit."""
    if mask is None:
        return [True] * len(p_leaves)
    try:
        tree = mask(unflatten(spec, p_leaves)) if is_params_function(mask) else mask
        flags = spec.flatten_up_to(tree)
    except (TypeError, ValueError):
        return None
    return flags if all(isinstance(f, bool) for f in flags) else None
