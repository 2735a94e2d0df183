"""Schedule-free AdamW and SGD (Defazio et al. 2024, "The Road Less Scheduled"), as the
authors' ``schedulefree.AdamWScheduleFree`` and ``schedulefree.SGDScheduleFree``.

**The functional design.** Schedule-free keeps three sequences: ``z`` (the SGD/Adam
iterate), ``x`` (a weighted average of the ``z``, the parameters to evaluate) and
``y = (1 - \\beta_1) z + \\beta_1 x`` (where gradients are taken). The authors' optimizer
keeps ``y`` or ``x`` in the live parameters and switches between them with
``optimizer.train()`` / ``optimizer.eval()``. Here there is no mode:

* the **params are always ``y``** (train mode): ``update(grads, state, params)`` takes
  gradients at ``y`` and returns ``updates = y_new - y``, so
  ``apply_updates(params, updates)`` is the next ``y``;
* the state (:class:`ScheduleFreeState`) holds ``z``, the second moment (AdamW), the
  running averaging weights and ``\\beta_1``;
* :func:`schedule_free_eval_params` is a pure function that returns ``x`` (what the
  authors' ``optimizer.eval()`` puts into the parameters) from ``y`` and the state, for
  evaluation and for the final model; the training params stay ``y``.

Checkpoint ``y`` and the state (not ``x``): that is the train-mode snapshot, and
:func:`schedule_free_eval_params` rebuilds ``x`` from it at any time.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from gradchain import _checks, _ops
from gradchain._tree import Leaves, flatten, flatten_like, unflatten
from gradchain.base import (
    GradientTransformation,
    Params,
    Updates,
    expect_state,
    mark_update_rule,
)
from gradchain.transforms import ScalarOrSchedule

__all__ = [
    "ScheduleFreeState",
    "schedule_free_adamw",
    "schedule_free_sgd",
    "schedule_free_eval_params",
]


class ScheduleFreeState(NamedTuple):
    """State of :func:`schedule_free_adamw` and :func:`schedule_free_sgd`.

    Attributes:
        count: int64 0-dim tensor, the number of updates done (the reference's ``k``).
        z: the base iterate (the reference's ``state['z']``), shaped like the params;
            starts as a copy of the params given to ``init``; float32 for half params.
        nu: the second moment (``exp_avg_sq``) for AdamW; ``()`` for SGD.
        weight_sum: float64 0-dim, the sum of the averaging weights so far.
        lr_max: float64 0-dim, the largest (warmed-up) learning rate so far (``-1`` before
            the first update, as in the reference).
        b1: float64 0-dim, :math:`\\beta_1` (AdamW's ``betas[0]``, SGD's ``momentum``): the
            interpolation weight, read by :func:`schedule_free_eval_params`.

    Example:
        >>> import torch, gradchain as gc
        >>> gc.schedule_free_sgd().init({"w": torch.ones(2)})
        ScheduleFreeState(count=tensor(0), z={'w': tensor([1., 1.])}, nu=(), weight_sum=tensor(0., dtype=torch.float64), lr_max=tensor(-1., dtype=torch.float64), b1=tensor(0.9000, dtype=torch.float64))
    """

    count: torch.Tensor  # type: ignore[assignment]  # shadows tuple.count, as in optax
    z: Updates
    nu: Updates
    weight_sum: torch.Tensor
    lr_max: torch.Tensor
    b1: torch.Tensor


def _copy_like(params: Params) -> Params:
    leaves, spec = flatten(params)
    return unflatten(spec, [
        None if p is None else p.detach().to(_ops.acc_dtype(p.dtype), copy=True) for p in leaves
    ])


def _toward(ys: list[torch.Tensor], zs: list[torch.Tensor], w: torch.Tensor) -> list[torch.Tensor]:
    """``y + w (z - y)`` leafwise with a 0-dim tensor weight (cast to the leaves' dtype).

    The reference calls ``torch.lerp``, which switches to ``z - (z - y)(1 - w)`` for
    ``w >= 0.5``; inductor's lerp does not switch, so at infinite values compiled and eager
    lerp disagree (``nan`` against ``inf``). One formula keeps ``torch.compile`` equal to
    eager; for finite values the two differ by a rounding (parity with the reference is
    unchanged: float64 within 1e-15, see the tests)."""
    w = w.to(device=ys[0].device, dtype=ys[0].dtype)
    return _ops.add_(_ops.mul_(_ops.add(zs, ys, alpha=-1.0), w), ys)


def _schedule_free(
    fn: str,
    lr: ScalarOrSchedule,
    b1: float,
    b2: float | None,
    eps: float,
    weight_decay: float,
    warmup_steps: int,
    r: float,
    weight_lr_power: float,
) -> GradientTransformation:
    def init(params: Params) -> ScheduleFreeState:
        if params is None:
            raise ValueError(f"{fn}.init: params is None; schedule-free starts z at the params")
        zeros = _ops.zero_count(params)
        device = _ops.first_device(params)
        f64 = torch.float64
        return ScheduleFreeState(
            count=zeros,
            z=_copy_like(params),
            nu=(_ops.buffers_like(params) if b2 is not None else ()),
            weight_sum=torch.zeros((), dtype=f64, device=device),
            lr_max=torch.full((), -1.0, dtype=f64, device=device),
            b1=torch.full((), b1, dtype=f64, device=device),
        )

    def update(
        updates: Updates, state: ScheduleFreeState, params: Params | None = None, **extra: Any
    ) -> tuple[Updates, ScheduleFreeState]:
        expect_state(state, ScheduleFreeState, fn)
        view = Leaves(updates)
        gs = view.values
        ys = view.take_params(params, fn, "schedule-free needs the (train-mode) parameters y")
        zs: list[Any] = view.take(state.z, "z")
        nus: list[Any] = view.take(state.nu, "nu") if b2 is not None else []

        # The scalars of the reference's step, in float64 on the state's device (no sync).
        k = state.count.to(torch.float64)
        lr_t = lr(state.count) if _checks.is_schedule(lr) else lr  # type: ignore[operator]
        if not isinstance(lr_t, torch.Tensor):
            lr_t = torch.tensor(float(lr_t), dtype=torch.float64, device=k.device)  # type: ignore[arg-type]
        lr_t = lr_t.to(device=k.device, dtype=torch.float64)
        if warmup_steps > 0:
            lr_t = lr_t * torch.where(k < warmup_steps, (k + 1) / warmup_steps, 1.0)
        lr_max = torch.maximum(lr_t, state.lr_max)
        weight = (k + 1) ** r * lr_max**weight_lr_power
        weight_sum = state.weight_sum + weight
        zero_sum = weight_sum == 0
        ckp1 = torch.where(zero_sum, 0.0, weight / torch.where(zero_sum, 1.0, weight_sum))
        coef = lr_t * (state.b1 * (1 - ckp1) - 1)
        neg_lr = -lr_t
        if b2 is not None:
            bias_correction2 = 1 - b2 ** (k + 1)

        out: list[Any] = [None] * len(gs)
        new_zs: list[Any] = [None] * len(gs)
        new_nus: list[Any] = [None] * len(gs)
        for idx in _ops.groups(zs):
            z = _ops.pick(zs, idx)
            like = z[0]
            g = _ops.cast(_ops.pick(gs, idx), [x.dtype for x in z])
            y = _ops.cast(_ops.pick(ys, idx), [x.dtype for x in z])
            if b2 is not None:
                v = _ops.addcmul_(_ops.mul(_ops.pick(nus, idx), b2), g, g, 1.0 - b2)
                denom = _ops.div_scalar(v, _ops.scalar_for(bias_correction2, like))
                denom = _ops.add_scalar_(_ops.sqrt(denom), eps)
                g = _ops.div(g, denom)
                _ops.scatter(new_nus, idx, v)
            if weight_decay != 0:
                g = _ops.add(g, y, alpha=weight_decay)
            y_new = _ops.add_(_toward(y, z, ckp1), _ops.mul(g, _ops.scalar_for(coef, like)))
            _ops.scatter(new_zs, idx, _ops.add(z, _ops.mul(g, _ops.scalar_for(neg_lr, like))))
            u = _ops.add_(y_new, y, alpha=-1.0)
            _ops.scatter(out, idx, _ops.cast(u, [x.dtype for x in _ops.pick(gs, idx)]))

        return view.put(out), ScheduleFreeState(
            count=_ops.safe_increment(state.count),
            z=view.put_into(state.z, new_zs),
            nu=view.put_into(state.nu, new_nus) if b2 is not None else state.nu,
            weight_sum=weight_sum,
            lr_max=lr_max,
            b1=state.b1,
        )

    return GradientTransformation(init, mark_update_rule(update))




def _check_schedule_args(
    fn: str, warmup_steps: int, r: float, weight_lr_power: float
) -> tuple[int, float, float]:
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"{fn}: warmup_steps must be an int >= 0, got {warmup_steps!r}")
    r = _checks.nonneg(r, "r", "polynomial weighting power", fn)
    weight_lr_power = _checks.nonneg(weight_lr_power, "weight_lr_power", "power", fn)
    return warmup_steps, r, weight_lr_power


def _check_b1(value: float, name: str, fn: str) -> float:
    value = _checks.beta(value, name, fn)
    if value == 0:
        raise ValueError(
            f"{fn}: {name} must be > 0 (the eval params x = z + (y - z) / {name} need it)"
        )
    return value


def schedule_free_adamw(
    lr: ScalarOrSchedule = 0.0025,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    warmup_steps: int = 0,
    r: float = 0.0,
    weight_lr_power: float = 2.0,
) -> GradientTransformation:
    """Schedule-free AdamW, as ``schedulefree.AdamWScheduleFree`` (same arguments and
    defaults; ``foreach`` is chosen automatically).

    With the params ``y`` (train mode, see the module docstring), step ``k`` (from 0) and
    :math:`\\eta_k = \\mathrm{lr} \\cdot \\min(1, (k+1)/\\mathrm{warmup})`:

    .. math::
        v \\leftarrow \\beta_2 v + (1-\\beta_2) g^2, \\quad
        d = \\frac{g}{\\sqrt{v / (1-\\beta_2^{k+1})} + \\epsilon} + \\lambda y

    .. math::
        w_k = (k+1)^r\\, (\\max_{j \\le k} \\eta_j)^{p}, \\quad
        c = \\frac{w_k}{\\sum_{j \\le k} w_j}, \\quad
        y \\leftarrow \\mathrm{lerp}(y, z, c) + \\eta_k(\\beta_1 (1 - c) - 1)\\, d, \\quad
        z \\leftarrow z - \\eta_k d

    (:math:`p` is ``weight_lr_power``; :math:`c = 0` while the weights sum to 0). The
    updates are ``y_new - y``; the eval params are
    :math:`x = z + (y - z)/\\beta_1` (:func:`schedule_free_eval_params`). The scalars are
    computed on the device in float64 (no host sync).

    Args:
        lr: learning rate: float, 1-element tensor, or schedule of the update count
            (schedule-free needs none; a schedule multiplies the warmup).
        betas: ``(beta1, beta2)``: ``beta1`` in ``(0, 1)`` is the interpolation weight
            (the momentum), ``beta2`` in ``[0, 1)`` the second-moment decay.
        eps: added to the denominator (>= 0).
        weight_decay: weight decay evaluated at ``y``, added to the normalised gradient.
        warmup_steps: linear learning-rate warmup over this many steps.
        r: power of the polynomial weighting of the average (``0``: uniform).
        weight_lr_power: the averaging weights are ``lr_max ** weight_lr_power``.

    Returns:
        A :class:`~gradchain.GradientTransformation` with state :class:`ScheduleFreeState`;
        ``init`` and ``update`` need the params.

    Raises:
        ValueError: an argument out of range (``beta1 == 0`` included).

    Example:
        >>> import torch, gradchain as gc
        >>> tx = gc.schedule_free_adamw(lr=0.1)
        >>> y = {"w": torch.tensor([1.0, -1.0])}
        >>> state = tx.init(y)
        >>> for _ in range(2):
        ...     updates, state = tx.update({"w": torch.tensor([1.0, -1.0])}, state, y)
        ...     y = gc.apply_updates(y, updates)
        >>> y["w"], gc.schedule_free_eval_params(y, state)["w"]
        (tensor([ 0.8450, -0.8450]), tensor([ 0.8500, -0.8500]))
    """
    fn = "schedule_free_adamw"
    lr = _checks.check_lr(lr, fn)
    b1, b2 = _checks.betas(betas, fn)
    b1 = _check_b1(b1, "betas[0]", fn)
    eps = _checks.nonneg(eps, "eps", "epsilon value", fn)
    weight_decay = _checks.nonneg(weight_decay, "weight_decay", "weight_decay value", fn)
    warmup_steps, r, weight_lr_power = _check_schedule_args(fn, warmup_steps, r, weight_lr_power)
    return _schedule_free(fn, lr, b1, b2, eps, weight_decay, warmup_steps, r, weight_lr_power)


def schedule_free_sgd(
    lr: ScalarOrSchedule = 1.0,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    warmup_steps: int = 0,
    r: float = 0.0,
    weight_lr_power: float = 2.0,
) -> GradientTransformation:
    """Schedule-free SGD, as ``schedulefree.SGDScheduleFree`` (same arguments and defaults).

    As :func:`schedule_free_adamw` with :math:`d = g + \\lambda y` and
    :math:`\\beta_1 =` ``momentum``:

    .. math::
        y \\leftarrow \\mathrm{lerp}(y, z, c) + \\eta_k(\\beta_1 (1 - c) - 1)\\, d, \\quad
        z \\leftarrow z - \\eta_k d

    Args:
        lr: learning rate: float, 1-element tensor, or schedule of the update count.
        momentum: the interpolation weight :math:`\\beta_1`, in ``(0, 1)``.
        weight_decay: weight decay evaluated at ``y`` (>= 0).
        warmup_steps: linear learning-rate warmup over this many steps.
        r: power of the polynomial weighting of the average.
        weight_lr_power: the averaging weights are ``lr_max ** weight_lr_power``.

    Returns:
        A :class:`~gradchain.GradientTransformation` with state :class:`ScheduleFreeState`.

    Raises:
        ValueError: an argument out of range (``momentum`` must be in ``(0, 1)``, as the
            reference requires).

    Example:
        >>> import torch, gradchain as gc
        >>> tx = gc.schedule_free_sgd(lr=0.1, momentum=0.5)
        >>> y = {"w": torch.tensor([1.0])}
        >>> state = tx.init(y)
        >>> for _ in range(2):
        ...     updates, state = tx.update({"w": torch.tensor([1.0])}, state, y)
        ...     y = gc.apply_updates(y, updates)
        >>> y["w"], gc.schedule_free_eval_params(y, state)["w"]
        (tensor([0.8250]), tensor([0.8500]))
    """
    fn = "schedule_free_sgd"
    lr = _checks.check_lr(lr, fn)
    momentum = _check_b1(momentum, "momentum", fn)
    weight_decay = _checks.nonneg(weight_decay, "weight_decay", "weight_decay value", fn)
    warmup_steps, r, weight_lr_power = _check_schedule_args(fn, warmup_steps, r, weight_lr_power)
    return _schedule_free(fn, lr, momentum, None, 0.0, weight_decay, warmup_steps, r,
                          weight_lr_power)


def _find_states(node: Any, found: list[ScheduleFreeState]) -> None:
    if isinstance(node, ScheduleFreeState):
        found.append(node)
    elif isinstance(node, (tuple, list)):
        for child in node:
            _find_states(child, found)
    elif isinstance(node, dict):
        for child in node.values():
            _find_states(child, found)


def schedule_free_eval_params(params: Params, state: Any) -> Params:
    """The evaluation params ``x`` of a schedule-free run, from its train params ``y``.

    .. math:: x = \\mathrm{lerp}(y, z, 1 - 1/\\beta_1) = z + (y - z) / \\beta_1

    what the authors' ``optimizer.eval()`` writes into the parameters. Pure: ``params``
    and ``state`` are not modified. ``state`` is the state of
    :func:`schedule_free_adamw` / :func:`schedule_free_sgd` or of any chain, ``masked``
    or ``partition`` that contains them (each :class:`ScheduleFreeState` found is applied
    to the leaves it covers); leaves no schedule-free rule covers come back unchanged
    (the same tensors). Note the argument order (params first), the reverse of
    ``optax.contrib.schedule_free_eval_params(state, params)``.

    Args:
        params: the train-mode params ``y`` (those the updates were applied to).
        state: a state containing at least one :class:`ScheduleFreeState`.

    Returns:
        A tree like ``params`` with the eval params.

    Raises:
        TypeError: ``params`` is a state (arguments swapped), or ``state`` holds no
            :class:`ScheduleFreeState`.

    Example:
        >>> import torch, gradchain as gc
        >>> tx = gc.chain(gc.clip_by_norm(1.0), gc.schedule_free_sgd(lr=1.0, momentum=0.5))
        >>> y = {"w": torch.tensor([0.0])}
        >>> state = tx.init(y)
        >>> for _ in range(2):
        ...     updates, state = tx.update({"w": torch.tensor([1.0])}, state, y)
        ...     y = gc.apply_updates(y, updates)
        >>> x = gc.schedule_free_eval_params(y, state)  # y = lerp(x, z, 1 - momentum)
        >>> y["w"], x["w"], state[1].z["w"]
        (tensor([-1.7500]), tensor([-1.5000]), tensor([-2.0000]))
    """
    fn = "schedule_free_eval_params"
    probe: list[ScheduleFreeState] = []
    _find_states(params, probe)
    if probe:
        raise TypeError(f"{fn}: the first argument is a state; call {fn}(params, state)")
    found: list[ScheduleFreeState] = []
    _find_states(state, found)
    if not found:
        raise TypeError(
            f"{fn}: no ScheduleFreeState in the state; pass the state of schedule_free_adamw "
            "or schedule_free_sgd (or of a chain containing one)"
        )
    leaves, spec = flatten(params)
    out = list(leaves)
    for sf in found:
        zs = flatten_like(spec, sf.z, "state.z", "the params")
        weight = 1.0 - 1.0 / sf.b1
        for i, (y, z) in enumerate(zip(leaves, zs)):
            if y is None or z is None:
                continue
            x = torch.lerp(y.detach().to(z.dtype), z, weight.to(device=z.device, dtype=z.dtype))
            out[i] = x.to(y.dtype)
    return unflatten(spec, out)
