"""Gradient clipping: ``clip_by_norm`` (global norm), ``clip_by_value``, and optax's
``adaptive_grad_clip`` (unit-wise, relative to the params), ``clip_by_block_rms`` (per leaf)
and ``per_example_global_norm_clip`` (DP-SGD's per-example clip and sum)."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from gradchain import _checks, _ops
from gradchain._ops import norm_dtype
from gradchain._tree import Leaves, flatten, leaf_paths, unflatten
from gradchain.base import (
    READS,
    GradientTransformation,
    add_roles,
    donation,
    expect_state,
    stateless,
)
from gradchain.gating import error_flags

__all__ = [
    "ClipByNormState",
    "clip_by_norm",
    "clip_by_value",
    "adaptive_grad_clip",
    "clip_by_block_rms",
    "per_example_global_norm_clip",
]


@error_flags("nonfinite_error")
class ClipByNormState(NamedTuple):
    """State of :func:`clip_by_norm`.

    Attributes:
        norm: the global norm of the last incoming updates, before clipping (float32, or
            float64 when the params are float64).
        nonfinite_error: with ``error_if_nonfinite=True``, whether that norm was nan or inf
            (bool; always false otherwise). This is how the error surfaces; see
            :func:`clip_by_norm`.

    Example:
        >>> import torch, gradchain as gc
        >>> tx = gc.clip_by_norm(1.0)
        >>> _, state = tx.update({"w": torch.tensor([6.0, 8.0])}, tx.init({"w": torch.zeros(2)}))
        >>> state.norm, bool(state.nonfinite_error)
        (tensor(10.), False)
    """

    norm: torch.Tensor
    nonfinite_error: torch.Tensor


def _check_norm_type(norm_type: float | str) -> float:
    if isinstance(norm_type, str):
        if norm_type.lower() != "inf":
            raise ValueError(
                f"clip_by_norm: norm_type must be a positive float or 'inf', got {norm_type!r}"
            )
        return math.inf
    p = _checks.as_float(norm_type, "norm_type", "clip_by_norm", "a positive float or inf")
    if not p > 0:
        raise ValueError(
            f"clip_by_norm: norm_type must be > 0 (1, 2, 3.5, inf, ...), got {norm_type!r}"
        )
    return p


def _check_positive(name: str, value: Any) -> float:
    v = _checks.as_float(value, name, "clip_by_norm", "a positive float")
    if not (v > 0 and math.isfinite(v)):
        raise ValueError(f"clip_by_norm: {name} must be a positive finite number, got {value!r}")
    return v


def clip_by_norm(
    max_norm: float, norm_type: float | str = 2.0, error_if_nonfinite: bool = False
) -> GradientTransformation:
    r"""Scale all updates by one coefficient so that their global norm is at most ``max_norm``.

    With :math:`\|g\|_p` the ``norm_type``-norm of all leaves together,

    .. math::  g \leftarrow g \cdot \min\!\left(1, \frac{\text{max\_norm}}{\|g\|_p + 10^{-6}}\right)

    which is exactly the coefficient of ``torch.nn.utils.clip_grad_norm_``. Unlike that
    utility, the norm is computed in float32 at least, so float16 gradients whose norm
    exceeds 65504 are clipped rather than zeroed. The pre-clip norm is kept in
    :class:`ClipByNormState` (``tree_get(state, "norm")``) for logging.

    Non-finite norms behave as in torch: a nan norm makes every update nan, an inf norm
    turns finite entries into zeros. Put ``skip_if_nonfinite()`` or ``loss_scale()``
    before the clip to drop such steps.

    **Distributed.** On DTensor gradients (FSDP2 ``fully_shard``, tensor parallel) the norm
    is over all shards: one all-reduce of a scalar per step (as ``clip_grad_norm_``), after
    which the norm is a plain tensor, equal on every rank, and each rank scales its own
    shards. Every rank must call ``update``. DDP gradients are already identical on every
    rank, so there clipping needs no communication.

    ``error_if_nonfinite=True`` cannot raise inside ``update`` without a host-device
    sync. Instead, on a non-finite norm the updates pass through unclipped (torch leaves
    the gradients untouched when it raises) and the state's ``nonfinite_error`` flag is set.
    ``ChainedOptimizer`` raises ``RuntimeError`` on that flag before calling the wrapped
    optimizer; in functional code check ``bool(gc.tree_get(state, "nonfinite_error"))``
    when you read the step's results.

    Args:
        max_norm: the largest allowed global norm (positive, finite).
        norm_type: the p of the p-norm: any float > 0, ``float('inf')`` or ``'inf'``.
        error_if_nonfinite: flag non-finite norms instead of clipping with them.

    Returns:
        A stateful :class:`GradientTransformation`.

    Example:
        >>> import torch, gradchain as gc
        >>> tx = gc.clip_by_norm(1.0)
        >>> g = {"w": torch.tensor([3.0, 4.0])}
        >>> out, state = tx.update(g, tx.init(g))
        >>> out["w"], state.norm
        (tensor([0.6000, 0.8000]), tensor(5.))
    """
    max_norm = _check_positive("max_norm", max_norm)
    p = _check_norm_type(norm_type)
    _checks.as_bool(error_if_nonfinite, "error_if_nonfinite", "clip_by_norm")

    def init(params: Any) -> ClipByNormState:
        leaves, _ = flatten(params)
        ts = [x for x in leaves if isinstance(x, torch.Tensor)]
        dtype = norm_dtype(ts)
        device = ts[0].device if ts else torch.device("cpu")
        return ClipByNormState(
            norm=torch.zeros((), dtype=dtype, device=device),
            nonfinite_error=torch.zeros((), dtype=torch.bool, device=device),
        )

    def update(
        updates: Any, state: ClipByNormState, params: Any = None, **extra: Any
    ) -> tuple[Any, ClipByNormState]:
        del params
        expect_state(state, ClipByNormState, "clip_by_norm")
        donated, _ = donation(extra, "clip_by_norm")
        view = Leaves(updates)
        gs = view.values
        if not gs:
            return updates, state
        lay = _ops.layout(gs)
        total = _ops.norm_of(gs, p, lay)
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        finite = torch.isfinite(total) if error_if_nonfinite else None
        if finite is not None:
            coef = torch.where(finite, coef, torch.ones_like(coef))
        # float16/bfloat16 keep the float32 coefficient (the multiply runs in float32 and
        # rounds once): cast to float16, a coefficient below ~6e-5 loses precision and one
        # below ~3e-8 becomes 0, zeroing the gradients.
        if len(lay.keys) == 1 and not lay.low and donated and lay.foreach:
            # The common case: one (device, dtype), multiplied in place by one coefficient
            # (what torch.nn.utils.clip_grad_norm_ runs).
            device, dtype = lay.keys[0]
            torch._foreach_mul_(gs, coef.to(device, dtype))
            clipped = gs
        else:
            # One coefficient per (device, dtype), then one multiply over all leaves.
            coefs = {
                (device, dtype): coef.to(
                    device, coef.dtype if dtype in (torch.float16, torch.bfloat16) else dtype
                )
                for device, dtype in lay.keys
            }
            factors = (
                [next(iter(coefs.values()))] * len(gs)
                if len(coefs) == 1
                else [coefs[(g.device, g.dtype)] for g in gs]
            )
            if donated and _ops.inplace_ok(gs, factors):
                clipped = _ops.mul_list_(gs, factors)
            else:
                clipped = _ops.mul_list(gs, factors)
            # A 0-dim float16 leaf times the 0-dim float32 coefficient promotes to float32.
            clipped = _ops.cast(clipped, lay.dtypes)
        new_state = ClipByNormState(
            norm=total.to(state.norm.device, state.norm.dtype),
            nonfinite_error=(
                state.nonfinite_error
                if finite is None
                else torch.logical_not(finite).to(state.nonfinite_error.device)
            ),
        )
        return view.put(clipped), new_state

    return GradientTransformation(init, add_roles(update, READS))


def clip_by_value(max_value: float, min_value: float | None = None) -> GradientTransformation:
    r"""Clamp every update entry to ``[min_value, max_value]``.

    ``min_value=None`` means ``-max_value`` (as ``torch.nn.utils.clip_grad_value_``);
    ``min_value=0.0`` means zero. nan stays nan, ``±inf`` becomes the bound.

    Args:
        max_value: the upper bound.
        min_value: the lower bound; ``None`` for ``-max_value``. Must be ``<= max_value``.

    Returns:
        A stateless :class:`GradientTransformation`.

    Example:
        >>> import torch, gradchain as gc
        >>> tx = gc.clip_by_value(0.5)
        >>> tx.update({"w": torch.tensor([-2.0, 0.1, 3.0])}, tx.init({}))[0]["w"]
        tensor([-0.5000,  0.1000,  0.5000])
    """
    for name, v in (("max_value", max_value), ("min_value", min_value)):
        if v is None and name == "min_value":
            continue
        if not (isinstance(v, (int, float)) and _checks.is_number(v)) or math.isnan(float(v)):
            raise TypeError(f"clip_by_value: {name} must be a float (not nan), got {v!r}")
    hi = float(max_value)
    lo = -hi if min_value is None else float(min_value)
    if lo > hi:
        raise ValueError(
            f"clip_by_value: min_value ({lo}) must be <= max_value ({hi})"
            + (" (with min_value=None the lower bound is -max_value)" if min_value is None else "")
        )

    def clip_by_value(updates: Any, params: Any, **extra: Any) -> Any:
        donated, _ = donation(extra, "clip_by_value")
        view = Leaves(updates)
        clamp = _ops.clamp_ if donated and _ops.inplace_ok(view.values) else _ops.clamp
        return view.put(clamp(view.values, lo, hi))

    return stateless(clip_by_value, roles=(READS,))


# --------------------------------------------------------------------------- optax's other clips
def _wide(dtype: torch.dtype) -> torch.dtype:
    """The dtype for norms: float32 at least (float16/bfloat16 would overflow)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _check_clip_float(fn: str, name: str, value: Any, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{fn}: {name} must be a float, got {type(value).__name__}")
    v = float(value)
    if math.isnan(v) or v < 0 or (positive and v == 0):
        raise ValueError(f"{fn}: {name} must be {'> 0' if positive else '>= 0'}, got {value!r}")
    return v


def _unit_dims(x: torch.Tensor, axis: int | tuple[int, ...] | None) -> tuple[int, ...]:
    if axis is not None:
        return (axis,) if isinstance(axis, int) else tuple(axis)
    if x.ndim <= 1:
        return tuple(range(x.ndim))
    return tuple(range(1, x.ndim))


def adaptive_grad_clip(
    clipping: float, eps: float = 1e-3, axis: int | tuple[int, ...] | None = None
) -> GradientTransformation:
    r"""Adaptive gradient clipping (``optax.adaptive_grad_clip``; Brock et al., 2021, NFNets):
    clip each unit's update to at most ``clipping`` times its parameter's norm.

    For each unit (a slice of a leaf, see below), with :math:`\|\cdot\|` the L2 norm over
    the unit,

    .. math::
        m = \text{clipping}\cdot\max(\|p\|, \epsilon), \qquad
        u \leftarrow \begin{cases} u & \|u\| < m \\
            u \cdot m / \max(\|u\|, 10^{-6}) & \text{else} \end{cases}

    **Units follow torch's layout.** By default a unit is a whole leaf of at most one
    dimension, and otherwise one slice along the first dimension (the norm is over all
    other dimensions): one output unit of a ``Linear`` weight ``(out, in)`` or a ``Conv``
    weight ``(out, in, kh, kw)``, as ``timm.utils.adaptive_clip_grad`` does. optax's
    default reduces over the *leading* dimensions instead, because flax stores kernels as
    ``(in, out)`` and ``(kh, kw, in, out)``: the same units, transposed. Give ``axis`` to
    choose the reduced dimensions yourself (the same for every leaf, optax's meaning).

    Args:
        clipping: the largest allowed ratio of update norm to parameter norm (> 0).
        eps: the floor of the parameter norm, so that zero-initialised params can move
            (>= 0).
        axis: the dimensions to take the unit norms over, or ``None`` for the default.

    Returns:
        A stateless :class:`GradientTransformation`; ``update`` needs ``params``.

    Raises:
        ValueError: ``clipping <= 0``, ``eps < 0``, or ``update`` without ``params``.

    Example:
        >>> import torch, gradchain as gc
        >>> tx = gc.adaptive_grad_clip(0.1)
        >>> params = {"w": torch.tensor([[3.0, 4.0], [0.0, 1.0]])}
        >>> grads = {"w": torch.tensor([[6.0, 8.0], [0.0, 0.05]])}
        >>> tx.update(grads, tx.init(params), params)[0]["w"]  # row norms 5 and 1
        tensor([[0.3000, 0.4000],
                [0.0000, 0.0500]])
    """
    fn = "adaptive_grad_clip"
    clip = _check_clip_float(fn, "clipping", clipping, positive=True)
    eps = _check_clip_float(fn, "eps", eps, positive=False)
    if axis is not None and not (
        isinstance(axis, int) or (isinstance(axis, tuple) and all(isinstance(a, int) for a in axis))
    ):
        raise TypeError(f"{fn}: axis must be None, an int or a tuple of ints, got {axis!r}")

    def adaptive_grad_clip(updates: Any, params: Any) -> Any:
        if params is None:
            raise ValueError(f"{fn}.update: params are required (clipping is relative to them)")
        view = Leaves(updates)
        ps = view.take(params, "params", dtype=False)
        out = []
        for g, p in zip(view.values, ps):
            dims = _unit_dims(g, axis)
            wide = _wide(g.dtype)
            g_norm = torch.linalg.vector_norm(g, 2, dim=dims, keepdim=True, dtype=wide)
            p_norm = torch.linalg.vector_norm(p, 2, dim=dims, keepdim=True, dtype=wide)
            max_norm = clip * torch.clamp(p_norm, min=eps)
            clipped = g * (max_norm / torch.clamp(g_norm, min=1e-6))
            out.append(torch.where(g_norm < max_norm, g, clipped.to(g.dtype)))
        return view.put(out)

    return stateless(adaptive_grad_clip, roles=(READS,))


def clip_by_block_rms(threshold: float) -> GradientTransformation:
    r"""Clip each leaf's updates to a root-mean-square of at most ``threshold``
    (``optax.clip_by_block_rms``).

    .. math::
        u \leftarrow \frac{u}{\max\left(1, \sqrt{\operatorname{mean}(u^2)} / \text{threshold}
        \right)}

    leaf by leaf (a "block" is one parameter tensor). The RMS is computed in float32 at
    least.

    Args:
        threshold: the largest allowed RMS of a leaf (> 0).

    Returns:
        A stateless :class:`GradientTransformation`.

    Raises:
        ValueError: ``threshold <= 0``.

    Example:
        >>> import torch, gradchain as gc
        >>> tx = gc.clip_by_block_rms(1.0)
        >>> g = {"a": torch.tensor([3.0, 4.0, 0.0, 0.0]), "b": torch.tensor([0.5, 0.5])}
        >>> out, _ = tx.update(g, tx.init(g))  # rms of a is 2.5, of b 0.5
        >>> out["a"], out["b"]
        (tensor([1.2000, 1.6000, 0.0000, 0.0000]), tensor([0.5000, 0.5000]))
    """
    fn = "clip_by_block_rms"
    threshold = _check_clip_float(fn, "threshold", threshold, positive=True)

    def clip_by_block_rms(updates: Any, params: Any) -> Any:
        view = Leaves(updates)
        out = []
        for g in view.values:
            wide = g.to(_wide(g.dtype))
            denom = torch.clamp(torch.sqrt(torch.mean(wide * wide)) / threshold, min=1.0)
            out.append((wide / denom).to(g.dtype))
        return view.put(out)

    return stateless(clip_by_block_rms, roles=(READS,))


def per_example_global_norm_clip(
    grads: Any, l2_norm_clip: float
) -> tuple[Any, torch.Tensor]:
    r"""Clip per-example gradients by their global norm and sum them
    (``optax.per_example_global_norm_clip``; the clipping step of DP-SGD, Abadi et al. 2016).

    Every leaf of ``grads`` holds a batch of per-example gradients along its first
    dimension (e.g. from ``torch.func.vmap(torch.func.grad(loss))``). With
    :math:`\|g_b\|` the global L2 norm of example ``b`` over all leaves,

    .. math::
        c_b = \min\left(1, \frac{\text{l2\_norm\_clip}}{\|g_b\|}\right)
        \;(1 \text{ where that is nan}), \qquad
        \text{out} = \sum_b c_b\, g_b

    Add the Gaussian noise and divide by the batch size yourself (or with
    :func:`gradchain.transforms.add_noise` and :func:`gradchain.scale`).

    Args:
        grads: a tree of per-example gradients; every tensor leaf has the same first
            dimension (``None`` leaves pass through as ``None``).
        l2_norm_clip: the largest allowed per-example norm (>= 0; ``inf`` for none).

    Returns:
        ``(clipped_sum, num_clipped)``: the tree of sums (each leaf without its batch
        dimension) and the number of examples whose coefficient was below 1 (an int64
        0-dim tensor).

    Raises:
        ValueError: a leaf without a batch dimension, batch sizes that differ, or a
            negative ``l2_norm_clip``.

    Example:
        >>> import torch, gradchain as gc
        >>> grads = [torch.tensor([[0.0, 0, 0], [0, 3, 4], [4, 0, 3], [3, 4, 0]])]
        >>> gc.per_example_global_norm_clip(grads, 1.25)
        ([tensor([1.7500, 1.7500, 1.7500])], tensor(3))
    """
    fn = "per_example_global_norm_clip"
    if isinstance(l2_norm_clip, bool) or not isinstance(l2_norm_clip, (int, float)):
        raise TypeError(f"{fn}: l2_norm_clip must be a float, got {type(l2_norm_clip).__name__}")
    if math.isnan(l2_norm_clip) or l2_norm_clip < 0:
        raise ValueError(f"{fn}: l2_norm_clip must be >= 0, got {l2_norm_clip!r}")
    leaves, spec = flatten(grads)
    present = [(i, g) for i, g in enumerate(leaves) if g is not None]
    if not present:
        raise ValueError(f"{fn}: grads has no tensor leaf")
    paths = leaf_paths(grads)
    batch = None
    for i, g in present:
        if not isinstance(g, torch.Tensor) or g.ndim < 1:
            raise ValueError(
                f"{fn}: grads{paths[i]} must be a tensor with a batch dimension first, got "
                + (f"shape {tuple(g.shape)}" if isinstance(g, torch.Tensor) else type(g).__name__)
            )
        if batch is None:
            batch = g.shape[0]
        elif g.shape[0] != batch:
            raise ValueError(
                f"{fn}: grads{paths[i]} has batch size {g.shape[0]}, the first leaf {batch}"
            )
    gs = [g for _, g in present]
    wide = norm_dtype(gs)
    device = gs[0].device
    sq = [
        torch.sum((g.to(wide) ** 2).reshape(g.shape[0], -1), dim=1).to(device) for g in gs
    ]
    norms = torch.sqrt(torch.stack(sq).sum(dim=0))
    coef = torch.nan_to_num(torch.clamp(l2_norm_clip / norms, max=1.0), nan=1.0)
    num_clipped = (coef < 1.0).sum().to(torch.int64)
    out = list(leaves)
    for (i, g) in present:
        summed = torch.tensordot(coef.to(g.device, wide), g.to(wide), dims=1)
        out[i] = summed.to(g.dtype)
    return unflatten(spec, out), num_clipped
