"""Gradient clipping: ``clip_by_norm`` (global norm) and ``clip_by_value``."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from gradchain import _checks, _ops
from gradchain._ops import global_norm, norm_dtype
from gradchain._tree import Leaves, flatten
from gradchain.base import EmptyState, GradientTransformation, donation, expect_state
from gradchain.gating import error_flags

__all__ = ["ClipByNormState", "clip_by_norm", "clip_by_value"]


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
        total = global_norm(gs, p)
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        finite = torch.isfinite(total)
        if error_if_nonfinite:
            coef = torch.where(finite, coef, torch.ones_like(coef))
        # One coefficient per (device, dtype), then one multiply over all leaves.
        coefs: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        for g in gs:
            if (g.device, g.dtype) not in coefs:
                # float16/bfloat16 keep the float32 coefficient (the multiply runs in float32
                # and rounds once): cast to float16, a coefficient below ~6e-5 loses precision
                # and one below ~3e-8 becomes 0, zeroing the gradients.
                low = g.dtype in (torch.float16, torch.bfloat16)
                coefs[(g.device, g.dtype)] = coef.to(g.device, coef.dtype if low else g.dtype)
        factors = [coefs[(g.device, g.dtype)] for g in gs]
        if donated and _ops.inplace_ok(gs, factors):
            clipped = _ops.mul_list_(gs, factors)
        else:
            clipped = _ops.mul_list(gs, factors)
        # A 0-dim float16 leaf times the 0-dim float32 coefficient promotes to float32.
        clipped = _ops.cast(clipped, [g.dtype for g in gs])
        new_state = ClipByNormState(
            norm=total.to(state.norm.device, state.norm.dtype),
            nonfinite_error=(
                torch.logical_not(finite).to(state.nonfinite_error.device)
                if error_if_nonfinite
                else state.nonfinite_error
            ),
        )
        return view.put(clipped), new_state

    return GradientTransformation(init, update)


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

    def init(params: Any) -> EmptyState:
        del params
        return EmptyState()

    def update(
        updates: Any, state: EmptyState, params: Any = None, **extra: Any
    ) -> tuple[Any, EmptyState]:
        del params
        donated, _ = donation(extra, "clip_by_value")
        view = Leaves(updates)
        clamp = _ops.clamp_ if donated and _ops.inplace_ok(view.values) else _ops.clamp
        return view.put(clamp(view.values, lo, hi)), state

    return GradientTransformation(init, update)
