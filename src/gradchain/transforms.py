"""Generic processing transformations, with optax's names and semantics.

Building blocks that update rules (:mod:`gradchain.optim`) and users' chains share:
``scale``, ``scale_by_learning_rate``, ``add_decayed_weights``; and optax's processing
transforms: ``zero_nans``, ``ema`` (of the updates), ``centralize``, ``add_noise``,
``set_to_zero``, ``freeze``, ``apply_every``, ``skip_large_updates`` (a gate),
``conditionally_mask``, ``lookahead``, ``param_ema`` (an average of the *parameters*,
with :func:`ema_params` to read it), and ``scale_by_trust_ratio`` (LARS's and LAMB's
layer-wise trust ratio). Each of the latter follows its optax namesake on the
same inputs (tested in float64) unless its docstring says otherwise. They output updates
to be added to the params with :func:`~gradchain.apply_updates`.

Shared conventions (as everywhere in gradchain): a ``None`` gradient passes through as
``None`` and the state that belongs to it does not advance; counters are int64 0-dim
tensors; decisions that depend on values (a norm, a step count in a tensor) stay on the
device (``torch.where``), so nothing here synchronizes with the host inside ``update``,
and every ``update`` traces under ``torch.compile(fullgraph=True)`` and batches under
``torch.func.vmap``. Accumulators for float16/bfloat16 gradients are float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from gradchain import _checks, _ops
from gradchain._ops import (
    acc_dtype,
    buffers_like,
    first_device,
    known_bool,
    safe_increment,
    scalar_dtype,
    zero_count,
)
from gradchain._tree import Leaves, flatten, map_tensors, unflatten
from gradchain.base import (
    READS,
    GradientTransformation,
    Params,
    Updates,
    add_roles,
    donation,
    expect_state,
    identity,
    is_transformation,
    mark_update_rule,
    stateless,
)
from gradchain.combine import masked
from gradchain.gating import gate_state, mark_gate, select_tree
from gradchain.schedules import Schedule
from gradchain.state import tree_get

__all__ = [
    "ScalarOrSchedule",
    "ScaleByScheduleState",
    "scale",
    "scale_by_learning_rate",
    "add_decayed_weights",
    "ZeroNansState",
    "zero_nans",
    "EmaState",
    "ema",
    "centralize",
    "AddNoiseState",
    "add_noise",
    "set_to_zero",
    "freeze",
    "ApplyEveryState",
    "apply_every",
    "SkipLargeUpdatesState",
    "skip_large_updates",
    "ConditionallyMaskState",
    "conditionally_mask",
    "LookaheadState",
    "lookahead",
    "ParamEmaState",
    "param_ema",
    "ema_params",
    "scale_by_trust_ratio",
]

ScalarOrSchedule = float | torch.Tensor | Schedule
"""A hyperparameter given as a float, a 0-dim tensor, or a schedule of the update count."""
TList = list[torch.Tensor]


# --------------------------------------------------------------------------- scale
def scale(step_size: float | torch.Tensor) -> GradientTransformation:
    """Multiply the updates by a constant.

    .. math:: u \\leftarrow \\mathrm{step\\_size}\\cdot u

    Args:
        step_size: a float or a 1-element tensor (differentiable: gradients flow to it).

    Returns:
        A stateless :class:`~gradchain.GradientTransformation` (state ``EmptyState()``).

    Example:
        >>> import torch, gradchain as gc
        >>> tx = gc.scale(-2.0)
        >>> tx.update({"w": torch.tensor([1.0, 2.0]), "b": None}, tx.init(None))[0]
        {'w': tensor([-2., -4.]), 'b': None}
    """
    return _scale(step_size, "scale", "step_size")


def _scale(step_size: float | torch.Tensor, who: str, name: str) -> GradientTransformation:
    factor = _checks.as_scalar(step_size, name, who)
    _checks.finite(factor, name, who)

    def scaled(updates: Updates, params: Params, **extra: Any) -> Updates:
        donated, _ = donation(extra, who)
        view = Leaves(updates)
        return view.put(_scaled(view.values, factor, donated))

    return stateless(scaled, who)


def _scaled(gs: list[torch.Tensor], factor: float | torch.Tensor, donated: bool = False) -> TList:
    """``factor * g`` leafwise, ``factor`` cast per (device, dtype) group; in the donated
    ``gs``' memory when that gives the same values."""
    mul = _ops.mul_ if donated and _ops.inplace_ok(gs) else _ops.mul
    if not isinstance(factor, torch.Tensor):
        return mul(gs, factor)
    out: list[Any] = [None] * len(gs)
    for idx in _ops.groups(gs):
        group = _ops.pick(gs, idx)
        _ops.scatter(out, idx, mul(group, _ops.scalar_for(factor, group[0])))
    return out


# --------------------------------------------------------------------------- learning rate
class ScaleByScheduleState(NamedTuple):
    """State of :func:`scale_by_learning_rate` with a schedule.

    Attributes:
        count: int64 0-dim tensor, the number of updates already applied (the argument
            of the schedule at the next update).

    Example:
        >>> import torch, gradchain as gc
        >>> gc.scale_by_learning_rate(gc.constant_schedule(0.1)).init({"w": torch.zeros(1)})
        ScaleByScheduleState(count=tensor(0))
    """

    count: torch.Tensor  # type: ignore[assignment]  # shadows tuple.count, as in optax


def scale_by_learning_rate(
    learning_rate: ScalarOrSchedule, flip_sign: bool = True
) -> GradientTransformation:
    """Multiply the updates by ``-learning_rate`` (by ``learning_rate`` if not ``flip_sign``).

    .. math:: u \\leftarrow -\\eta_t\\, u, \\qquad \\eta_t = \\mathrm{lr}(t)
              \\text{ for a schedule, else } \\eta

    where ``t`` is the number of updates already applied (``0`` at the first update).

    Args:
        learning_rate: a float, a 1-element tensor (differentiable: gradients flow to it)
            or a schedule, i.e. a callable of the int64 0-dim count tensor returning a
            float or 0-dim tensor (see :mod:`gradchain.schedules`).
        flip_sign: negate, so that the result is a descent step to add to the params.

    Returns:
        A :class:`~gradchain.GradientTransformation`; its state is
        :class:`ScaleByScheduleState` for a schedule and ``EmptyState()`` otherwise.

    Example:
        >>> import torch, gradchain as gc
        >>> tx = gc.scale_by_learning_rate(gc.linear_schedule(1.0, 0.0, transition_steps=2))
        >>> params = {"w": torch.zeros(1)}
        >>> state = tx.init(params)
        >>> for _ in range(3):
        ...     updates, state = tx.update({"w": torch.ones(1)}, state, params)
        ...     print(updates["w"])
        tensor([-1.])
        tensor([-0.5000])
        tensor([-0.])
    """
    sign = -1.0 if flip_sign else 1.0
    if _checks.is_schedule(learning_rate):
        schedule: Callable[[torch.Tensor], Any] = learning_rate  # type: ignore[assignment]

        def init_s(params: Params) -> ScaleByScheduleState:
            return ScaleByScheduleState(count=_ops.zero_count(params))

        def update_s(
            updates: Updates,
            state: ScaleByScheduleState,
            params: Params | None = None,
            **extra: Any,
        ) -> tuple[Updates, ScaleByScheduleState]:
            del params
            expect_state(state, ScaleByScheduleState, "scale_by_learning_rate")
            donated, _ = donation(extra, "scale_by_learning_rate")
            lr = schedule(state.count)
            factor = lr * sign if isinstance(lr, torch.Tensor) else float(lr) * sign
            view = Leaves(updates)
            out = _scaled(view.values, factor, donated)
            return view.put(out), ScaleByScheduleState(count=_ops.safe_increment(state.count))

        # flip_sign: the descent step (the rule's last act); without, a plain factor.
        return GradientTransformation(init_s, mark_update_rule(update_s) if flip_sign else update_s)

    lr = _checks.as_scalar(learning_rate, "learning_rate", "scale_by_learning_rate")  # type: ignore[arg-type]
    inner = _scale(-lr if flip_sign else lr, "scale_by_learning_rate", "learning_rate")
    return GradientTransformation(
        inner.init, mark_update_rule(inner.update) if flip_sign else inner.update
    )


# --------------------------------------------------------------------------- weight decay
def add_decayed_weights(weight_decay: float | torch.Tensor) -> GradientTransformation:
    """Add ``weight_decay * params`` to the updates.

    .. math:: u \\leftarrow u + \\lambda\\, p

    Placed before an optimizer it is L2 regularisation (``torch.optim.Adam``'s
    ``weight_decay``); placed after the direction and before
    :func:`scale_by_learning_rate` it is decoupled weight decay (``AdamW``).

    Args:
        weight_decay: the factor :math:`\\lambda`: a float or a 1-element tensor (e.g. an
            injected hyperparameter, see :func:`~gradchain.inject_hyperparams`).

    Returns:
        A stateless :class:`~gradchain.GradientTransformation`. Its ``update`` needs
        ``params`` and raises ``ValueError`` without them.

    Example:
        >>> import torch, gradchain as gc
        >>> tx = gc.add_decayed_weights(0.1)
        >>> params = {"w": torch.tensor([10.0, 20.0])}
        >>> tx.update({"w": torch.ones(2)}, tx.init(params), params)[0]
        {'w': tensor([2., 3.])}
    """
    fn = "add_decayed_weights"
    weight_decay = _checks.as_scalar(weight_decay, "weight_decay", fn)
    known = _ops.known_float(weight_decay)
    if known is not None:
        _checks.finite(known, "weight_decay", fn)

    def decayed(updates: Updates, params: Params, **extra: Any) -> Updates:
        donated, _ = donation(extra, fn)
        view = Leaves(updates)
        gs = view.values
        if not gs:
            # No gradient to decay (e.g. a partition member whose subset is empty: for a
            # single-leaf tree its params are then ``None`` too).
            return updates
        ps = view.take_params(params, fn, "weight decay needs the parameters")
        add = _ops.add_ if donated and _ops.inplace_ok(gs, ps) else _ops.add
        if not isinstance(weight_decay, torch.Tensor):
            return view.put(_ops.cast(add(gs, ps, alpha=weight_decay), [g.dtype for g in gs]))
        # A tensor factor (cast per (device, dtype) group, as a Python scalar would be).
        out: list[Any] = [None] * len(gs)
        for idx in _ops.groups(ps):
            group = _ops.pick(ps, idx)
            decay = _ops.mul(group, _ops.scalar_for(weight_decay, group[0]))
            _ops.scatter(out, idx, add(_ops.pick(gs, idx), decay))
        return view.put(_ops.cast(out, [g.dtype for g in gs]))

    return stateless(decayed, fn, roles=(READS,))


# --------------------------------------------------------------------------- optax's processing: helpers
def _copy_tree(params: Params, dtype: Callable[[torch.dtype], torch.dtype]) -> Params:
    """A detached copy of ``params`` (``None`` stays ``None``), leaf dtype mapped by ``dtype``."""
    return map_tensors(params, lambda p: p.detach().to(dtype(p.dtype), copy=True))


def _check_decay(value: object, name: str, fn: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{fn}: {name} must be a float, got {type(value).__name__}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{fn}: {name} must be in [0, 1], got {value}")
    return float(value)


def _check_transformation(value: object, name: str, fn: str) -> GradientTransformation:
    if not is_transformation(value):
        raise TypeError(
            f"{fn}: {name} must be a GradientTransformation (init, update), "
            f"got {type(value).__name__}"
        )
    return value  # type: ignore[return-value]


def _in(xs: TList, like: TList) -> TList:
    """``xs`` in the dtypes of ``like`` (the maths dtype: accumulators' for half grads)."""
    return [x if x.dtype == y.dtype else x.to(y.dtype) for x, y in zip(xs, like)]


def _ema_step(old: TList, new: TList, decay: float | torch.Tensor) -> TList:
    """``(1 - decay) * new + decay * old`` leafwise, as optax's ``update_moment(order=1)``."""
    if isinstance(decay, torch.Tensor):
        return [(1 - decay).to(o.dtype) * n + decay.to(o.dtype) * o for o, n in zip(old, new)]
    return _ops.add(_ops.mul(new, 1.0 - decay), _ops.mul(old, decay))


# --------------------------------------------------------------------------- zero_nans
class ZeroNansState(NamedTuple):
    """State of :func:`zero_nans`.

    Attributes:
        found_nan: a tree shaped like the params of 0-dim bools: whether the last update
            of that leaf had a nan (kept as it was for a ``None`` gradient).

    Example:
        >>> import torch, gradchain as gc
        >>> gc.zero_nans().init({"w": torch.zeros(2)})
        ZeroNansState(found_nan={'w': tensor(False)})
    """

    found_nan: Any


def zero_nans() -> GradientTransformation:
    """Replace nan entries of the updates with 0 (``optax.zero_nans``); ``±inf`` stay.

    .. math:: u \\leftarrow \\begin{cases} 0 & u \\text{ is nan} \\\\ u & \\text{else}\\end{cases}

    The state records, per leaf, whether a nan was found (for logging); the
    transformation itself does not read it.

    Returns:
        A :class:`~gradchain.GradientTransformation` with :class:`ZeroNansState`.

    Example:
        >>> import torch, gradchain as gc
        >>> tx = gc.zero_nans()
        >>> g = {"w": torch.tensor([1.0, float("nan"), float("inf")])}
        >>> out, state = tx.update(g, tx.init(g))
        >>> out["w"], state.found_nan["w"]
        (tensor([1., 0., inf]), tensor(True))
    """

    def init(params: Params) -> ZeroNansState:
        leaves, spec = flatten(params)
        flags = [
            None if p is None else torch.zeros((), dtype=torch.bool, device=p.device)
            for p in leaves
        ]
        return ZeroNansState(found_nan=unflatten(spec, flags))

    def update(
        updates: Updates, state: ZeroNansState, params: Params | None = None, **extra: Any
    ) -> tuple[Updates, ZeroNansState]:
        del params
        expect_state(state, ZeroNansState, "zero_nans")
        view = Leaves(updates)
        gs = view.values
        old = view.take(state.found_nan, "state.found_nan", check=False)
        nan = [torch.isnan(g) for g in gs]
        found = [m.any().to(o.device) for m, o in zip(nan, old)]
        out = [torch.where(m, torch.zeros((), dtype=g.dtype, device=g.device), g)
               for m, g in zip(nan, gs)]
        return view.put(out), ZeroNansState(found_nan=view.put_into(state.found_nan, found))

    return GradientTransformation(init, add_roles(update, READS))


# --------------------------------------------------------------------------- ema
class EmaState(NamedTuple):
    """State of :func:`ema`.

    Attributes:
        count: int64 0-dim, the number of updates averaged so far.
        ema: the (not debiased) moving average, shaped like the params; float32 for
            float16/bfloat16 params unless ``accumulator_dtype`` says otherwise.

    Example:
        >>> import torch, gradchain as gc
        >>> gc.ema(0.9).init({"w": torch.zeros(2)})
        EmaState(count=tensor(0), ema={'w': tensor([0., 0.])})
    """

    count: torch.Tensor  # type: ignore[assignment]  # shadows tuple.count, as in optax
    ema: Any


def ema(
    decay: float, debias: bool = True, accumulator_dtype: torch.dtype | None = None
) -> GradientTransformation:
    """Exponential moving average of the updates (``optax.ema``).

    .. math::
        m_t = (1 - \\beta)\\, u_t + \\beta\\, m_{t-1}, \\quad m_0 = 0, \\qquad
        u_t \\leftarrow \\begin{cases} m_t / (1 - \\beta^t) & \\text{debias} \\\\
                                      m_t & \\text{else} \\end{cases}

    with ``β = decay`` and ``t`` the number of updates so far, this one included. It is
    :func:`gradchain.trace`'s sibling with a ``(1 - β)`` on the new term (and a debias).

    Args:
        decay: ``β`` in [0, 1].
        debias: divide by ``1 - β^t`` (Adam's bias correction), so early outputs are not
            shrunk towards the zero start.
        accumulator_dtype: dtype of ``m`` in the state (default: the param's dtype,
            float32 for float16/bfloat16 params).

    Returns:
        A :class:`~gradchain.GradientTransformation` with :class:`EmaState`.

    Raises:
        ValueError: ``decay`` outside [0, 1].

    Example:
        >>> import torch, gradchain as gc
        >>> tx = gc.ema(0.5)
        >>> params = {"w": torch.zeros(1)}
        >>> state = tx.init(params)
        >>> for g in (1.0, 3.0):
        ...     out, state = tx.update({"w": torch.tensor([g])}, state, params)
        ...     print(out["w"], state.ema["w"])
        tensor([1.]) tensor([0.5000])
        tensor([2.3333]) tensor([1.7500])
    """
    fn = "ema"
    decay = _check_decay(decay, "decay", fn)
    if not isinstance(debias, bool):
        raise TypeError(f"{fn}: debias must be a bool, got {type(debias).__name__}")
    if accumulator_dtype is not None and not (
        isinstance(accumulator_dtype, torch.dtype) and accumulator_dtype.is_floating_point
    ):
        raise TypeError(f"{fn}: accumulator_dtype must be a floating torch.dtype or None, "
                        f"got {accumulator_dtype!r}")

    def init(params: Params) -> EmaState:
        return EmaState(count=zero_count(params), ema=buffers_like(params, accumulator_dtype))

    def update(
        updates: Updates, state: EmaState, params: Params | None = None, **extra: Any
    ) -> tuple[Updates, EmaState]:
        del params
        expect_state(state, EmaState, fn)
        view = Leaves(updates)
        gs = view.values
        ms = view.take(state.ema, "state.ema", dtype=accumulator_dtype is None)
        # The maths in the wider of the two dtypes; the state keeps its own.
        work = [torch.promote_types(g.dtype, m.dtype) for g, m in zip(gs, ms)]
        new = _ema_step([m.to(w) for m, w in zip(ms, work)],
                        [g.to(w) for g, w in zip(gs, work)], decay)
        count = safe_increment(state.count)
        out = new
        if debias:
            bias = 1.0 - decay ** count.to(scalar_dtype(count.device))
            out = [n / bias.to(n.device, n.dtype) for n in new]
        out = [o.to(g.dtype) for o, g in zip(out, gs)]
        kept = [n.to(m.dtype) for n, m in zip(new, ms)]
        return view.put(out), EmaState(count=count, ema=view.put_into(state.ema, kept))

    return GradientTransformation(init, update)


# --------------------------------------------------------------------------- centralize
def centralize() -> GradientTransformation:
    """Gradient centralization (``optax.centralize``): subtract from every leaf of two or
    more dimensions its mean over all dimensions but the first.

    .. math:: u_{i,\\dots} \\leftarrow u_{i,\\dots} - \\operatorname{mean}_{\\dots}(u_{i,\\dots})

    For a ``torch.nn.Linear`` weight ``(out, in)`` this centres each output unit's row, as
    in the paper (Yong et al., 2020) for torch's layout; vectors and scalars pass
    unchanged.

    Returns:
        A stateless :class:`~gradchain.GradientTransformation`.

    Example:
        >>> import torch, gradchain as gc
        >>> tx = gc.centralize()
        >>> g = {"w": torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]), "b": torch.ones(2)}
        >>> out, _ = tx.update(g, tx.init(g))
        >>> out["w"], out["b"]
        (tensor([[-1.,  0.,  1.],
                [-1.,  0.,  1.]]), tensor([1., 1.]))
    """

    def centralize(updates: Updates, params: Params) -> Updates:
        view = Leaves(updates)
        return view.put([
            g - g.mean(dim=tuple(range(1, g.ndim)), keepdim=True) if g.ndim > 1 else g
            for g in view.values
        ])

    return stateless(centralize)


# --------------------------------------------------------------------------- add_noise
class AddNoiseState(NamedTuple):
    """State of :func:`add_noise`.

    Attributes:
        count: int64 0-dim, the number of updates so far.
        seed: int64 0-dim, the seed the noise is derived from (with ``count`` and the
            leaf's position); give ensemble members different seeds under ``vmap``.

    Example:
        >>> import torch, gradchain as gc
        >>> gc.add_noise(0.01, 0.55, seed=3).init({"w": torch.zeros(2)})
        AddNoiseState(count=tensor(0), seed=tensor(3))
    """

    count: torch.Tensor  # type: ignore[assignment]  # shadows tuple.count, as in optax
    seed: torch.Tensor


# splitmix64 (Steele et al. 2014): a counter-based generator from int64 torch ops only, so
# the noise is a pure function of (seed, count, leaf, element): the same on every device,
# traceable (no torch.Generator object) and batched by vmap. Multiplications wrap mod 2**64.
_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15 as a signed int64
_MIX1 = -4658895280553007687  # 0xBF58476D1CE4E5B9
_MIX2 = -7723592293110705685  # 0x94D049BB133111EB


def _wrap(x: int) -> int:
    """A Python int as the int64 it wraps to (mod 2**64, two's complement)."""
    return (x + 2**63) % 2**64 - 2**63


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 ``x`` (torch's ``>>`` is arithmetic)."""
    return torch.bitwise_and(torch.bitwise_right_shift(x, k), (1 << (64 - k)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    x = torch.bitwise_xor(x, _shr(x, 30)) * _MIX1
    x = torch.bitwise_xor(x, _shr(x, 27)) * _MIX2
    return torch.bitwise_xor(x, _shr(x, 31))


def _normal_like(g: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Standard normal noise shaped like ``g`` from the int64 0-dim ``key`` (Box-Muller on
    two splitmix64 outputs per element, 53-bit uniforms, computed in float64)."""
    idx = torch.arange(g.numel(), dtype=torch.int64, device=g.device).reshape(g.shape)
    # The xor first: inductor folds constant arithmetic on an arange into an index
    # expression, where a 64-bit overflow is an error rather than a wrap.
    base = torch.bitwise_xor(2 * idx, key.to(g.device)) * _GOLDEN
    h1, h2 = _mix(base), _mix(base + _GOLDEN)
    dt = scalar_dtype(g.device)
    scale = 2.0**-53
    u1 = 1.0 - _shr(h1, 11).to(dt) * scale  # (0, 1]: log is finite
    u2 = _shr(h2, 11).to(dt) * scale
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)


def add_noise(eta: float, gamma: float, seed: int) -> GradientTransformation:
    """Add annealed Gaussian noise to the updates (``optax.add_noise``).

    .. math::
        u_t \\leftarrow u_t + \\sigma_t\\, \\xi_t, \\qquad
        \\sigma_t = \\sqrt{\\eta / t^{\\gamma}}, \\qquad \\xi_t \\sim \\mathcal N(0, I)

    with ``t`` the number of updates so far, this one included (Neelakantan et al., 2015).

    **Randomness.** The noise is a pure function of ``(seed, count, leaf position, element
    index)``: a counter-based generator (splitmix64 and Box-Muller, torch integer ops only)
    instead of a stateful ``torch.Generator``, so ``update`` stays pure and deterministic,
    traces under ``torch.compile``, batches under ``vmap`` (a different ``seed`` per
    ensemble member: stack the states) and gives the same bits on every device. The bits
    differ from jax's PRNG: the distribution and the variance schedule are optax's
    (tested), the samples are not.

    Args:
        eta: base variance ``η`` (>= 0).
        gamma: decay exponent ``γ`` of the variance (>= 0).
        seed: an int (optax's ``key``); stored in the state as an int64 tensor.

    Returns:
        A :class:`~gradchain.GradientTransformation` with :class:`AddNoiseState`.

    Raises:
        ValueError: a negative ``eta`` or ``gamma``.

    Example:
        >>> import torch, gradchain as gc
        >>> tx = gc.add_noise(eta=0.01, gamma=0.55, seed=0)
        >>> g = {"w": torch.zeros(100_000)}
        >>> out, state = tx.update(g, tx.init(g))
        >>> round(float(out["w"].std()), 2), int(state.count)
        (0.1, 1)
    """
    fn = "add_noise"
    for name, v in (("eta", eta), ("gamma", gamma)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise TypeError(f"{fn}: {name} must be a finite float, got {v!r}")
        if v < 0:
            raise ValueError(f"{fn}: {name} must be >= 0, got {v}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{fn}: seed must be an int, got {type(seed).__name__}")
    eta, gamma = float(eta), float(gamma)

    def init(params: Params) -> AddNoiseState:
        device = first_device(params)
        return AddNoiseState(
            count=torch.zeros((), dtype=torch.int64, device=device),
            seed=torch.tensor(seed, dtype=torch.int64, device=device),
        )

    def update(
        updates: Updates, state: AddNoiseState, params: Params | None = None, **extra: Any
    ) -> tuple[Updates, AddNoiseState]:
        del params
        expect_state(state, AddNoiseState, fn)
        view = Leaves(updates)
        count = safe_increment(state.count)
        c = count.to(scalar_dtype(count.device))
        std = torch.sqrt(eta / c**gamma)
        step_key = _mix(_mix(state.seed) + count * _GOLDEN)
        out = []
        for i, g in zip(view.index, view.values):
            key = _mix(step_key + _wrap((i + 1) * _MIX2))
            noise = _normal_like(g, key) * std.to(g.device)
            out.append((g.to(noise.dtype) + noise).to(g.dtype))
        return view.put(out), AddNoiseState(count=count, seed=state.seed)

    return GradientTransformation(init, update)


# --------------------------------------------------------------------------- set_to_zero, freeze
def set_to_zero() -> GradientTransformation:
    """Map every update to zeros (``optax.set_to_zero``); ``None`` stays ``None``.

    With :func:`gradchain.masked` or :func:`gradchain.partition` it freezes part of the
    params (see :func:`freeze`).

    Returns:
        A stateless :class:`~gradchain.GradientTransformation`.

    Example:
        >>> import torch, gradchain as gc
        >>> tx = gc.set_to_zero()
        >>> tx.update({"w": torch.ones(2), "b": None}, tx.init({}))[0]
        {'w': tensor([0., 0.]), 'b': None}
    """

    def set_to_zero(updates: Updates, params: Params) -> Updates:
        view = Leaves(updates)
        return view.put(_ops.zeros_like(view.values))

    return stateless(set_to_zero)


def freeze(mask: bool | Any) -> GradientTransformation:
    """Zero the updates of the leaves where ``mask`` is ``True`` (``optax.freeze``).

    ``freeze(mask)`` is ``masked(set_to_zero(), mask)``: frozen leaves get zero updates,
    the others pass unchanged. Put it last in a chain (after the optimizer) to keep the
    frozen params exactly where they are, as optax does.

    Args:
        mask: ``True`` (freeze everything), ``False`` (freeze nothing; a 0-dim bool
            tensor is read as either), or a tree of Python bools with the params' structure (one per leaf), or a callable
            ``params -> mask`` (see :func:`gradchain.masked`).

    Returns:
        A :class:`~gradchain.GradientTransformation`.

    Example:
        >>> import torch, gradchain as gc
        >>> tx = gc.chain(gc.sgd(lr=0.1), gc.freeze({"w": True, "b": False}))
        >>> params = {"w": torch.ones(2), "b": torch.ones(1)}
        >>> out, _ = tx.update({"w": torch.ones(2), "b": torch.ones(1)}, tx.init(params), params)
        >>> out
        {'w': tensor([0., 0.]), 'b': tensor([-0.1000])}
    """
    if isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and mask.ndim == 0:
        mask = bool(mask)  # optax accepts a 0-d bool array; read once, at construction
    if mask is True:
        return set_to_zero()
    if mask is False:
        return identity()
    return masked(set_to_zero(), mask)


# --------------------------------------------------------------------------- apply_every
class ApplyEveryState(NamedTuple):
    """State of :func:`apply_every`.

    Attributes:
        count: int64 0-dim, the position in the window (0 .. k-1).
        grad_acc: the running sum of the window's updates, shaped like the params
            (float32 for float16/bfloat16 params).

    Example:
        >>> import torch, gradchain as gc
        >>> gc.apply_every(2).init({"w": torch.zeros(1)})
        ApplyEveryState(count=tensor(0), grad_acc={'w': tensor([0.])})
    """

    count: torch.Tensor  # type: ignore[assignment]  # shadows tuple.count, as in optax
    grad_acc: Any


def apply_every(k: int = 1) -> GradientTransformation:
    """Sum the updates of ``k`` steps and emit the sum on every ``k``-th step, zeros on
    the others (``optax.apply_every``).

    .. math::
        a_t = u_t + [t \\bmod k \\ne 0]\\, a_{t-1}, \\qquad
        u_t \\leftarrow [t \\bmod k = k - 1]\\, a_t

    This is **not a gate**: as in optax, transformations after it still run and advance
    their state on the zero steps. To hold the rest of the chain back (MultiSteps'
    semantics, and no work on micro-steps), use :func:`gradchain.accumulate_every`
    ``(k, mean=False)``. Where optax multiplies by the 0/1 flags (``0 * inf = nan``),
    this selects, so a non-finite sum does not leak into the zero steps.

    Args:
        k: the window length (>= 1).

    Returns:
        A :class:`~gradchain.GradientTransformation` with :class:`ApplyEveryState`.

    Raises:
        ValueError: ``k < 1``.

    Example:
        >>> import torch, gradchain as gc
        >>> tx = gc.apply_every(2)
        >>> params = {"w": torch.zeros(1)}
        >>> state = tx.init(params)
        >>> for g in (1.0, 2.0, 3.0, 4.0):
        ...     out, state = tx.update({"w": torch.tensor([g])}, state, params)
        ...     print(out["w"])
        tensor([0.])
        tensor([3.])
        tensor([0.])
        tensor([7.])
    """
    fn = "apply_every"
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{fn}: k must be an int, got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"{fn}: k must be >= 1, got {k}")

    def init(params: Params) -> ApplyEveryState:
        return ApplyEveryState(count=zero_count(params), grad_acc=buffers_like(params))

    def update(
        updates: Updates, state: ApplyEveryState, params: Params | None = None, **extra: Any
    ) -> tuple[Updates, ApplyEveryState]:
        del params
        expect_state(state, ApplyEveryState, fn)
        view = Leaves(updates)
        gs = view.values
        accs = view.take(state.grad_acc, "state.grad_acc")
        c = torch.remainder(state.count, k)
        keep, emit = c != 0, c == k - 1
        summed = _ops.add(accs, _in(gs, accs))
        new_acc = _ops.where(keep, summed, _in(gs, accs))
        out = _ops.where_zeros(emit, new_acc)
        out = [o.to(g.dtype) for o, g in zip(out, gs)]
        count = torch.remainder(safe_increment(state.count), k)
        return view.put(out), ApplyEveryState(count, view.put_into(state.grad_acc, new_acc))

    return GradientTransformation(init, update)


# --------------------------------------------------------------------------- skip_large_updates
@gate_state()
class SkipLargeUpdatesState(NamedTuple):
    """State of :func:`skip_large_updates`.

    Attributes:
        is_open: whether the last step was let through (bool).
        norm_squared: the squared global norm of the last incoming updates (float32 at
            least, float64 for float64 updates).
        total_skips: the steps refused so far (int64, saturating).

    Example:
        >>> import torch, gradchain as gc
        >>> gc.skip_large_updates(1.0).init({"w": torch.zeros(1)})
        SkipLargeUpdatesState(is_open=tensor(True), norm_squared=tensor(0.), total_skips=tensor(0))
    """

    is_open: torch.Tensor
    norm_squared: torch.Tensor
    total_skips: torch.Tensor


def skip_large_updates(max_squared_norm: float) -> GradientTransformation:
    """Gate: drop a step whose updates' squared global norm is not below ``max_squared_norm``
    (optax's ``skip_large_updates`` for ``MultiSteps(should_skip_update_fn=...)``).

    .. math:: \\text{skip} \\iff \\neg\\left(\\sum_i \\|u_i\\|^2 < \\text{max\\_squared\\_norm}\\right)

    so a nan or inf norm is skipped too. On a skipped step it emits zeros and everything
    after it in a chain keeps its state (it is a gate, like
    :func:`gradchain.skip_if_nonfinite`); ``chain(skip_large_updates(x), opt)`` is the
    gradchain form of ``MultiSteps(opt, 1, should_skip_update_fn=partial(
    skip_large_updates, max_squared_norm=x))``. The decision is a device tensor
    (``torch.where``); no host sync. The norm is computed as :func:`gradchain.clip_by_norm`
    computes it (float32 at least) and squared.

    Args:
        max_squared_norm: the bound (> 0).

    Returns:
        A gate :class:`~gradchain.GradientTransformation` with :class:`SkipLargeUpdatesState`.

    Raises:
        ValueError: ``max_squared_norm`` not positive.

    Example:
        >>> import torch, gradchain as gc
        >>> tx = gc.chain(gc.skip_large_updates(4.0), gc.sgd(lr=1.0))
        >>> params = {"w": torch.zeros(2)}
        >>> out, state = tx.update({"w": torch.tensor([3.0, 4.0])}, tx.init(params), params)
        >>> out["w"], bool(gc.applied(state))
        (tensor([0., 0.]), False)
    """
    fn = "skip_large_updates"
    if isinstance(max_squared_norm, bool) or not isinstance(max_squared_norm, (int, float)):
        raise TypeError(f"{fn}: max_squared_norm must be a float, "
                        f"got {type(max_squared_norm).__name__}")
    if not max_squared_norm > 0:
        raise ValueError(f"{fn}: max_squared_norm must be > 0, got {max_squared_norm}")
    bound = float(max_squared_norm)

    def init(params: Params) -> SkipLargeUpdatesState:
        leaves = [p for p in flatten(params)[0] if isinstance(p, torch.Tensor)]
        device = first_device(params)
        dtype = torch.float64 if any(p.dtype == torch.float64 for p in leaves) else torch.float32
        return SkipLargeUpdatesState(
            is_open=torch.ones((), dtype=torch.bool, device=device),
            norm_squared=torch.zeros((), dtype=dtype, device=device),
            total_skips=torch.zeros((), dtype=torch.int64, device=device),
        )

    def update(
        updates: Updates,
        state: SkipLargeUpdatesState,
        params: Params | None = None,
        *,
        gate_open: torch.Tensor | None = None,
        **extra: Any,
    ) -> tuple[Updates, SkipLargeUpdatesState]:
        del params
        expect_state(state, SkipLargeUpdatesState, fn)
        donated, _ = donation(extra, fn)
        view = Leaves(updates)
        gs = view.values
        device = state.is_open.device
        if gs:
            norm = _ops.global_norm(gs, 2.0)
            norm_sq = (norm * norm).to(device, state.norm_squared.dtype)
        else:
            norm_sq = torch.zeros_like(state.norm_squared)
        ok = norm_sq < bound
        total = torch.where(ok, state.total_skips, safe_increment(state.total_skips))
        new = SkipLargeUpdatesState(ok, norm_sq, total)
        if gate_open is not None:
            # A step an earlier gate closed leaves this gate's own state as it was.
            new = select_tree(gate_open, new, state)
        return view.put(_ops.where_zeros(ok, gs, donated)), new

    return GradientTransformation(init, mark_gate(update))


# --------------------------------------------------------------------------- conditionally_mask
class ConditionallyMaskState(NamedTuple):
    """State of :func:`conditionally_mask`.

    Attributes:
        step: int64 0-dim, the number of calls so far (the argument of the condition).
        inner_state: the inner transformation's state (advanced only on steps the
            condition holds).

    Example:
        >>> import torch, gradchain as gc
        >>> gc.conditionally_mask(gc.identity(), lambda step: step % 2 == 0).init({})
        ConditionallyMaskState(step=tensor(0), inner_state=EmptyState())
    """

    step: torch.Tensor
    inner_state: Any


def conditionally_mask(
    inner: GradientTransformation,
    should_transform_fn: Callable[..., Any],
    forward_extra_args: bool = False,
) -> GradientTransformation:
    """Run ``inner`` only on steps where ``should_transform_fn(step)`` holds; emit zeros
    and keep ``inner``'s state on the others (``optax.transforms.conditionally_mask``).

    ``step`` is the number of earlier calls (an int64 0-dim tensor, 0 at the first call).
    The condition must return a 0-dim bool tensor (or a Python bool) computed with torch
    ops, e.g. ``lambda step: step % 4 == 0``: it is never read on the host. ``inner``
    runs on every call and its results are selected with ``torch.where`` (optax's
    ``lax.cond`` under ``jit`` also evaluates both sides), so there is no host sync and
    the whole thing traces under ``torch.compile``.

    Args:
        inner: the transformation to run conditionally.
        should_transform_fn: ``step -> bool tensor``; with ``forward_extra_args``, it
            also receives the extra keyword arguments given to ``update``.
        forward_extra_args: pass ``update``'s extra keyword arguments to the condition.

    Returns:
        A :class:`~gradchain.GradientTransformation` with :class:`ConditionallyMaskState`.

    Example:
        >>> import torch, gradchain as gc
        >>> tx = gc.conditionally_mask(gc.sgd(lr=1.0), lambda step: step % 2 == 1)
        >>> params = {"w": torch.zeros(1)}
        >>> state = tx.init(params)
        >>> for _ in range(3):
        ...     out, state = tx.update({"w": torch.ones(1)}, state, params)
        ...     print(out["w"])
        tensor([0.])
        tensor([-1.])
        tensor([0.])
    """
    fn = "conditionally_mask"
    inner = _check_transformation(inner, "inner", fn)
    if not callable(should_transform_fn):
        raise TypeError(f"{fn}: should_transform_fn must be callable, "
                        f"got {type(should_transform_fn).__name__}")

    def init(params: Params) -> ConditionallyMaskState:
        return ConditionallyMaskState(step=zero_count(params), inner_state=inner.init(params))

    def update(
        updates: Updates, state: ConditionallyMaskState, params: Params | None = None,
        **extra: Any
    ) -> tuple[Updates, ConditionallyMaskState]:
        expect_state(state, ConditionallyMaskState, fn)
        extra.pop("donate", None)  # the old inner state may be kept: nothing is given up
        cond_kwargs = extra if forward_extra_args else {}
        flag = should_transform_fn(state.step, **cond_kwargs)
        flag = torch.as_tensor(flag, device=state.step.device)
        if flag.dtype != torch.bool or flag.ndim != 0:
            raise TypeError(f"{fn}: should_transform_fn must return a 0-dim bool, "
                            f"got dtype {flag.dtype} and shape {tuple(flag.shape)}")
        known = known_bool(flag)
        if known is False:
            # Decided on the host for free (a Python bool): skip the inner work.
            view = Leaves(updates)
            new_u, inner_state = view.put(_ops.zeros_like(view.values)), state.inner_state
        else:
            new_u, new_inner = inner.update(updates, state.inner_state, params, **extra)
            if known is True:
                inner_state = new_inner
            else:
                inner_state = select_tree(flag, new_inner, state.inner_state)
                view = Leaves(new_u)
                new_u = view.put(_ops.where_zeros(flag, view.values))
        return new_u, ConditionallyMaskState(safe_increment(state.step), inner_state)

    return GradientTransformation(init, update)


# --------------------------------------------------------------------------- lookahead
class LookaheadState(NamedTuple):
    """State of :func:`lookahead`.

    Attributes:
        fast_state: the fast optimizer's state.
        steps_since_sync: int64 0-dim, fast steps since the last synchronization
            (0 .. ``sync_period - 1``).
        slow: the slow params, shaped like the params (the params' dtypes); read them
            with ``gc.tree_get(state, "slow")`` to evaluate with the slow weights.

    Example:
        >>> import torch, gradchain as gc
        >>> gc.lookahead(gc.sgd(lr=0.1), 2, 0.5).init({"w": torch.ones(1)})
        LookaheadState(fast_state=(EmptyState(),), steps_since_sync=tensor(0), slow={'w': tensor([1.])})
    """

    fast_state: Any
    steps_since_sync: torch.Tensor
    slow: Any


def lookahead(
    fast_optimizer: GradientTransformation,
    sync_period: int,
    slow_step_size: float,
    reset_state: bool = False,
) -> GradientTransformation:
    """Lookahead (``optax.lookahead``; Zhang et al., 2019): ``k`` steps forward with the fast
    optimizer, then the slow params move a fraction ``α`` towards the fast ones and the
    fast params restart from there.

    .. math::
        \\phi_{t} = \\theta_{t-1} + u_t \\text{ (fast step)}; \\quad
        \\text{every } k\\text{-th step: } s \\leftarrow s + \\alpha(\\phi_t - s),\\;
        \\theta_t = s, \\text{ else } \\theta_t = \\phi_t

    **Where the slow params live.** optax passes ``LookaheadParams(fast, slow)`` as the
    params and returns updates for both. Here the params are the fast params (the model's
    weights, as in any other chain), and the slow params are kept in the state
    (:class:`LookaheadState` ``.slow``, a copy made by ``init``). The updates returned
    move the fast params, on synchronization steps onto the new slow params; the values
    are optax's (tested in float64). ``update`` needs ``params``. Use it in the functional
    loop (``apply_updates``): in :class:`~gradchain.ChainedOptimizer` the wrapped torch
    optimizer takes the step after the chain, so the chain cannot see it.

    Args:
        fast_optimizer: the inner optimizer (e.g. ``gc.adam(1e-3)``).
        sync_period: ``k``, fast steps between synchronizations (>= 1).
        slow_step_size: ``α``, how far the slow params move (in [0, 1]).
        reset_state: re-``init`` the fast optimizer's state after each synchronization
            (with the params given to that step, as optax). The whole fast state is
            reset, also the part that belongs to a param whose gradient is ``None`` on
            that step.

    Returns:
        A :class:`~gradchain.GradientTransformation` with :class:`LookaheadState`.

    Raises:
        ValueError: ``sync_period < 1``, ``slow_step_size`` outside [0, 1], or ``update``
            without ``params``.

    Example:
        >>> import torch, gradchain as gc
        >>> tx = gc.lookahead(gc.sgd(lr=1.0), sync_period=2, slow_step_size=0.5)
        >>> params = {"w": torch.zeros(1)}
        >>> state = tx.init(params)
        >>> for _ in range(2):
        ...     updates, state = tx.update({"w": torch.ones(1)}, state, params)
        ...     params = gc.apply_updates(params, updates)
        >>> params["w"], gc.tree_get(state, "slow")["w"]
        (tensor([-1.]), tensor([-1.]))
    """
    fn = "lookahead"
    fast_optimizer = _check_transformation(fast_optimizer, "fast_optimizer", fn)
    if isinstance(sync_period, bool) or not isinstance(sync_period, int):
        raise TypeError(f"{fn}: sync_period must be an int, got {type(sync_period).__name__}")
    if sync_period < 1:
        raise ValueError(f"{fn}: sync_period must be >= 1, got {sync_period}")
    alpha = _check_decay(slow_step_size, "slow_step_size", fn)
    if not isinstance(reset_state, bool):
        raise TypeError(f"{fn}: reset_state must be a bool, got {type(reset_state).__name__}")

    def init(params: Params) -> LookaheadState:
        return LookaheadState(
            fast_state=fast_optimizer.init(params),
            steps_since_sync=zero_count(params),
            slow=_copy_tree(params, lambda d: d),
        )

    def update(
        updates: Updates, state: LookaheadState, params: Params | None = None, **extra: Any
    ) -> tuple[Updates, LookaheadState]:
        expect_state(state, LookaheadState, fn)
        if params is None:
            raise ValueError(f"{fn}.update: params are required (the fast params)")
        extra.pop("donate", None)  # the old fast state may be kept: nothing is given up
        u, fast_state = fast_optimizer.update(updates, state.fast_state, params, **extra)
        sync = state.steps_since_sync == sync_period - 1
        view = Leaves(u)
        us = view.values
        ps = view.take(params, "params", dtype=False)
        ss = view.take(state.slow, "state.slow", dtype=False)
        # optax's maths: diff = fast + u - slow; slow += α·diff; u -= (1 - α)·diff.
        diff = [p + x - s for p, x, s in zip(ps, us, ss)]
        new_slow = [(s + alpha * d).to(s.dtype) for s, d in zip(ss, diff)]
        new_u = [(x - (1.0 - alpha) * d).to(x.dtype) for x, d in zip(us, diff)]
        out = _ops.where(sync, new_u, us)
        slow = _ops.where(sync, new_slow, ss)
        if reset_state:
            fast_state = select_tree(sync, fast_optimizer.init(params), fast_state)
        steps = torch.remainder(state.steps_since_sync + 1, sync_period)
        return view.put(out), LookaheadState(fast_state, steps, view.put_into(state.slow, slow))

    return GradientTransformation(init, update)


# --------------------------------------------------------------------------- param_ema
class ParamEmaState(NamedTuple):
    """State of :func:`param_ema`.

    Attributes:
        count: int64 0-dim, the number of averaging steps so far.
        ema: the averaged params, shaped like the params (float32 for float16/bfloat16
            params); read with :func:`ema_params`.

    Example:
        >>> import torch, gradchain as gc
        >>> gc.param_ema(0.9).init({"w": torch.ones(2)})
        ParamEmaState(count=tensor(0), ema={'w': tensor([1., 1.])})
    """

    count: torch.Tensor  # type: ignore[assignment]  # shadows tuple.count, as in optax
    ema: Any


def param_ema(decay: float, track: str = "next") -> GradientTransformation:
    """Exponential moving average of the *parameters* (Polyak/EMA weights), kept in the
    state; the updates pass through unchanged.

    .. math:: \\bar\\theta \\leftarrow \\bar\\theta + (1 - \\beta)(\\theta - \\bar\\theta),
              \\qquad \\bar\\theta_0 = \\theta_0

    the formula (and ``lerp`` kernel) of ``torch.optim.swa_utils.AveragedModel`` with
    ``get_ema_multi_avg_fn(decay)``, and ``optax.incremental_update(θ, θ̄, 1 - β)``. The
    average starts from a copy of the params made by ``init``, so it needs no debias.

    ``track`` says which params are averaged at each ``update``:

    * ``"next"`` (default): ``params + updates``, the params after this step. Put
      ``param_ema`` **last** in a functional chain (after the optimizer), so the updates
      it sees are the ones ``apply_updates`` will add.
    * ``"given"``: the ``params`` passed to ``update`` as they are. This is the form for
      :class:`~gradchain.ChainedOptimizer`, whose chain runs *before* the wrapped torch
      optimizer's step and sees gradients, not steps: the average then includes the
      params up to the one before the latest step (one step behind).

    Read the average with :func:`ema_params` (``ema_params(opt.tx_state)`` for a
    ``ChainedOptimizer``, whose average is a list of lists like its param groups); evaluate
    a model with it through ``torch.func.functional_call(model, ema_params(state), x)``.

    Args:
        decay: ``β`` in [0, 1] (e.g. 0.999).
        track: ``"next"`` or ``"given"``.

    Returns:
        A :class:`~gradchain.GradientTransformation` with :class:`ParamEmaState`.

    Raises:
        ValueError: ``decay`` outside [0, 1], an unknown ``track``, or ``update`` without
            ``params``.

    Example:
        >>> import torch, gradchain as gc
        >>> tx = gc.chain(gc.sgd(lr=1.0), gc.param_ema(0.5))
        >>> params = {"w": torch.zeros(1)}
        >>> state = tx.init(params)
        >>> for _ in range(2):
        ...     updates, state = tx.update({"w": torch.ones(1)}, state, params)
        ...     params = gc.apply_updates(params, updates)
        >>> params["w"], gc.ema_params(state)["w"]
        (tensor([-2.]), tensor([-1.2500]))
    """
    fn = "param_ema"
    decay = _check_decay(decay, "decay", fn)
    if track not in ("next", "given"):
        raise ValueError(f"{fn}: track must be 'next' or 'given', got {track!r}")
    weight = 1.0 - decay

    def init(params: Params) -> ParamEmaState:
        return ParamEmaState(count=zero_count(params), ema=_copy_tree(params, acc_dtype))

    def update(
        updates: Updates, state: ParamEmaState, params: Params | None = None, **extra: Any
    ) -> tuple[Updates, ParamEmaState]:
        expect_state(state, ParamEmaState, fn)
        if params is None:
            raise ValueError(f"{fn}.update: params are required")
        view = Leaves(updates)
        ms = view.take(state.ema, "state.ema", dtype=False)
        ps = view.take(params, "params", dtype=False)
        if track == "next":
            ps = [(p + u).to(p.dtype) for p, u in zip(ps, view.values)]
        new = _ops.lerp(ms, _in(ps, ms), weight)
        return updates, ParamEmaState(safe_increment(state.count), view.put_into(state.ema, new))

    return GradientTransformation(init, update)


def ema_params(state: Any) -> Any:
    """The averaged params held by the one :func:`param_ema` in a (chain) state.

    Args:
        state: a state containing exactly one :class:`ParamEmaState`.

    Returns:
        The tree of averaged params (float32 leaves for float16/bfloat16 params).

    Raises:
        KeyError: no or several :class:`ParamEmaState` in ``state``.

    Example:
        >>> import torch, gradchain as gc
        >>> tx = gc.chain(gc.clip_by_norm(1.0), gc.param_ema(0.9, track="given"))
        >>> gc.ema_params(tx.init({"w": torch.ones(2)}))
        {'w': tensor([1., 1.])}
    """
    return tree_get(state, ParamEmaState).ema


# --------------------------------------------------------------------------- trust ratio
def _norms(xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """The 2-norm of each tensor (flattened), in float32 at least, one foreach kernel per
    (device, dtype) group where foreach serves."""
    out: list[Any] = [None] * len(xs)
    for idx in _ops.groups(xs):
        group = _ops.pick(xs, idx)
        acc = _ops.acc_dtype(group[0].dtype)
        if acc == group[0].dtype and _ops._fe(group):
            norms = list(torch._foreach_norm(group))
        else:
            norms = [torch.linalg.vector_norm(x, dtype=acc) for x in group]
        _ops.scatter(out, idx, norms)
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
        >>> import torch, gradchain as gc
        >>> tx = gc.scale_by_trust_ratio()
        >>> params = {"w": torch.tensor([3.0, 4.0]), "z": torch.zeros(2)}
        >>> grads = {"w": torch.tensor([0.0, 0.5]), "z": torch.ones(2)}
        >>> tx.update(grads, tx.init(params), params)[0]  # |p| / |g| = 5 / 0.5; z: ratio 1
        {'w': tensor([0., 5.]), 'z': tensor([1., 1.])}
    """
    fn = "scale_by_trust_ratio"
    min_norm = _checks.nonneg(min_norm, "min_norm", "min_norm value", fn)
    trust_coefficient = _checks.nonneg(
        trust_coefficient, "trust_coefficient", "trust_coefficient value", fn
    )
    eps = _checks.nonneg(eps, "eps", "epsilon value", fn)

    def scale_by_trust_ratio(updates: Updates, params: Params) -> Updates:
        view = Leaves(updates)
        us = view.values
        if not us:
            return updates
        ps = view.take_params(params, fn, "the trust ratio needs the parameters")
        out: list[Any] = [None] * len(us)
        for idx in _ops.groups(us):
            u = _ops.pick(us, idx)
            acc = _ops.acc_dtype(u[0].dtype)
            u_norm = torch.stack([n.to(acc) for n in _norms(u)])
            p_norm = torch.stack([n.to(device=u[0].device, dtype=acc) for n in _norms(_ops.pick(ps, idx))])
            if min_norm > 0:
                u_norm = torch.clamp(u_norm, min=min_norm)
                p_norm = torch.clamp(p_norm, min=min_norm)
            ratio = trust_coefficient * p_norm / (u_norm + eps)
            ratio = torch.where((p_norm == 0) | (u_norm == 0), torch.ones_like(ratio), ratio)
            scaled = _ops.mul_list(u, list(torch.unbind(ratio)))
            _ops.scatter(out, idx, _ops.cast(scaled, [x.dtype for x in u]))
        return view.put(out)

    return stateless(scale_by_trust_ratio)
