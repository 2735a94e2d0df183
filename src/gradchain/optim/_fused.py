"""How an update rule binds to torch's own kernel, for :func:`~gradchain.update_and_apply_`.

An alias in :mod:`gradchain.optim` (``adamw(...)``, ``sgd(...)``, ...) registers a *plan*
with :func:`bind_fused`. ``update_and_apply_`` asks the plan, before anything runs,
whether torch's kernel fits this call; the plan reads metadata only (structure, dtypes,
devices, shapes) and answers with a *step* or ``None`` (then the generic path runs). The
step is called after the transformations before the rule (clipping, gates) have run; it
runs the rule and the application to the params as torch's kernel, in place, and returns
the rule's new state. Each algorithm keeps its plan next to the state it reads (torch's
``optim/adam.py`` keeps its fused kernel next to the class the same way).

* ``plan(state, p_leaves, g_leaves, spec) -> step | None``: ``state`` is the rule's own
  state (a chain's tuple), the leaves are the params' and gradients' (``None`` where
  absent) in the params' flattening order, ``spec`` that flattening.
* ``step(g_leaves, keep) -> new_state``: ``g_leaves`` the processed gradients (same
  order), ``keep`` ``None`` when the step applies or a 0-dim bool tensor when a gate
  before the rule decided on device data (closed where false: the step must then leave
  the params and the state as they were, e.g. by torch's ``found_inf``).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

from gradchain._tree import PLAIN
from gradchain.base import GradientTransformation, State

FusedStep = Callable[[list[Any], "torch.Tensor | None"], State]
FusedPlan = Callable[[State, list[Any], list[Any], Any], "FusedStep | None"]

_PLANS: weakref.WeakKeyDictionary[Callable[..., Any], FusedPlan] = weakref.WeakKeyDictionary()

FUSED_DEVICES = frozenset(_get_fused_kernels_supported_devices())
_TENSOR = frozenset({torch.Tensor})
_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def bind_fused(tx: GradientTransformation, plan: FusedPlan) -> GradientTransformation:
    """Record ``plan`` as the way ``tx`` runs inside ``update_and_apply_``; returns ``tx``."""
    _PLANS[tx.update] = plan
    return tx


def fused_plan_of(tx: GradientTransformation) -> FusedPlan | None:
    """The plan bound to ``tx`` with :func:`bind_fused`, or ``None``."""
    return _PLANS.get(tx.update)


def fused_rows(
    p_leaves: Sequence[Any], g_leaves: Sequence[Any], buffers: Sequence[Sequence[Any]] = (),
    *, devices: frozenset[str] = FUSED_DEVICES,
) -> list[int] | None:
    """The positions where both a param and a gradient are present, if torch's kernels
    serve every one of them: plain tensors (params may be ``nn.Parameter``), dense, of one
    floating dtype per leaf shared by the gradient and each buffer (leaf lists aligned with
    the params), same shapes and devices, on a device in ``devices``. ``None`` otherwise.

    Metadata only, and cheap (whole-list comparisons): this runs on every step.
    """
    if torch.compiler.is_compiling():
        return None
    idx = [i for i, (p, g) in enumerate(zip(p_leaves, g_leaves)) if p is not None and g is not None]
    ps = [p_leaves[i] for i in idx]
    gs = [g_leaves[i] for i in idx]
    if not {type(p) for p in ps} <= PLAIN or not {type(g) for g in gs} <= _TENSOR:
        return None  # subclasses (DTensor, ...) take the generic path
    if {g.layout for g in gs} - {torch.strided} or any(map(_wrapped, gs)):
        return None
    dtypes = [p.dtype for p in ps]
    devices_ = [p.device for p in ps]
    if [g.dtype for g in gs] != dtypes or [g.device for g in gs] != devices_:
        return None
    shapes = [p.shape for p in ps]
    for leaves in buffers:
        xs = [leaves[i] for i in idx]
        if not {type(x) for x in xs} <= _TENSOR or [x.dtype for x in xs] != dtypes:
            return None
        if [x.shape for x in xs] != shapes or [x.device for x in xs] != devices_:
            return None
    for device, dtype in set(zip(devices_, dtypes)):
        if not dtype.is_floating_point or device.type not in devices:
            return None
    return idx


def found_inf(keep: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """torch's ``found_inf`` argument for a ``keep`` flag (1.0 where the step is closed)."""
    return None if keep is None else (~keep).to(device, torch.float32)


def advance(count: torch.Tensor, new: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """``new`` where the step applies (``keep`` is ``None`` or true), else ``count``."""
    return new if keep is None else torch.where(keep.to(new.device), new, count)
