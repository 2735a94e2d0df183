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

from gradchain import _checks, _ops
from gradchain._ops import known_float
from gradchain._tree import MISS, PLAIN, MetaMemo, any_none, flatten_like
from gradchain.base import GradientTransformation, State, mark_update_rule
from gradchain.transforms import ScaleByScheduleState

FusedStep = Callable[[list[Any], "torch.Tensor | None"], State]
FusedPlan = Callable[[State, list[Any], list[Any], Any], "FusedStep | None"]

_PLANS: weakref.WeakKeyDictionary[Callable[..., Any], FusedPlan] = weakref.WeakKeyDictionary()

FUSED_DEVICES = frozenset(_get_fused_kernels_supported_devices())
_TENSOR = frozenset({torch.Tensor})
_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def bind_fused(tx: GradientTransformation, plan: FusedPlan) -> GradientTransformation:
    """Record ``plan`` as the way ``tx`` runs inside ``update_and_apply_``; returns ``tx``,
    declared an update rule (:func:`~gradchain.mark_update_rule`: what has a binding is one)."""
    if not torch.compiler.is_compiling():  # compiled code never runs a plan
        _PLANS[tx.update] = plan
        mark_update_rule(tx.update)
    return tx


def fused_plan_of(tx: GradientTransformation) -> FusedPlan | None:
    """The plan bound to ``tx`` with :func:`bind_fused`, or ``None``."""
    return _PLANS.get(tx.update)


def fused_rows(
    p_leaves: Sequence[Any], g_leaves: Sequence[Any], buffers: Sequence[Sequence[Any]] = (),
    *, devices: frozenset[str] | None = FUSED_DEVICES,
) -> list[int] | None:
    """The positions where both a param and a gradient are present, if torch's kernels
    serve every one of them: plain tensors (params may be ``nn.Parameter``), dense, of one
    floating dtype per leaf shared by the gradient and each buffer (leaf lists aligned with
    the params), same shapes and devices, on a device in ``devices`` (``None``: any device,
    for torch's foreach implementations). ``None`` otherwise.

    Metadata only; runs on every step, so the answer is memoized on the leaves' metadata
    (:class:`~gradchain._tree.MetaMemo`): a step whose tensors match the last ones checks
    them in one C++ pass.
    """
    if torch.compiler.is_compiling():
        return None
    if any_none(p_leaves) or any_none(g_leaves):
        idx = [i for i, (p, g) in enumerate(zip(p_leaves, g_leaves))
               if p is not None and g is not None]
        tensors = [p_leaves[i] for i in idx]
        tensors += [g_leaves[i] for i in idx]
        for leaves in buffers:
            tensors += [leaves[i] for i in idx]
        rows: Any = tuple(idx)
    else:  # every param has a gradient (the usual case): whole lists, at C speed
        idx = list(range(len(p_leaves)))
        tensors = [*p_leaves, *g_leaves]
        for leaves in buffers:
            tensors += leaves
        rows = len(idx)
    # The answer depends on the metadata alone: computed once per (rows, metadata).
    key = (rows, len(buffers), devices)
    fits = _FITS.get(key, tensors)
    if fits is MISS:
        fits = _FITS.put(key, tensors, _fits(idx, p_leaves, g_leaves, buffers, devices))
    return idx if fits else None


_FITS = MetaMemo(16)


def _fits(
    idx: list[int], p_leaves: Sequence[Any], g_leaves: Sequence[Any],
    buffers: Sequence[Sequence[Any]], devices: frozenset[str] | None,
) -> bool:
    """:func:`fused_rows`' check, computed."""
    ps = [p_leaves[i] for i in idx]
    gs = [g_leaves[i] for i in idx]
    if not {type(p) for p in ps} <= PLAIN or not {type(g) for g in gs} <= _TENSOR:
        return False  # subclasses (DTensor, ...) take the generic path
    if {g.layout for g in gs} - {torch.strided} or any(map(_wrapped, gs)):
        return False
    dtypes = [p.dtype for p in ps]
    devices_ = [p.device for p in ps]
    if [g.dtype for g in gs] != dtypes or [g.device for g in gs] != devices_:
        return False
    shapes = [p.shape for p in ps]
    for leaves in buffers:
        xs = [leaves[i] for i in idx]
        if not {type(x) for x in xs} <= _TENSOR or [x.dtype for x in xs] != dtypes:
            return False
        if [x.shape for x in xs] != shapes or [x.device for x in xs] != devices_:
            return False
    return all(
        dtype.is_floating_point and (devices is None or device.type in devices)
        for device, dtype in set(zip(devices_, dtypes))
    )


def kernel_lr(lr: Any) -> float | torch.Tensor:
    """A learning rate as torch's kernels take it: a Python float where it can be read for
    free (a number, or a host tensor such as an injected hyperparameter: exactly the float
    ``torch.optim`` would pass), else the tensor (the kernels' tensor-``lr`` overload)."""
    known = known_float(lr)
    return lr if known is None else known


def found_inf(keep: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """torch's ``found_inf`` argument for a ``keep`` flag (1.0 where the step is closed)."""
    return None if keep is None else (~keep).to(device, torch.float32)


def advance(count: torch.Tensor, new: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """``new`` where the step applies (``keep`` is ``None`` or true), else ``count``."""
    return new if keep is None else torch.where(keep.to(new.device), new, count)


def tick(count: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """``count`` advanced by one where the step applies."""
    return advance(count, _ops.safe_increment(count), keep)


def lr_state_fits(state: Any, size: int, lr: Any) -> bool:
    """Whether ``state`` is the state of a rule chain of ``size`` members ending in
    ``scale_by_learning_rate(lr)`` (a :class:`~gradchain.ScaleByScheduleState` there when
    ``lr`` is a schedule)."""
    if not isinstance(state, tuple) or len(state) != size:
        return False
    return not _checks.is_schedule(lr) or isinstance(state[-1], ScaleByScheduleState)


def step_lr(lr: Any, new_state: list[Any], keep: torch.Tensor | None) -> Any:
    """The learning rate of this step as the kernels take it (see :func:`kernel_lr`); a
    schedule's count (the rule chain's last member, in ``new_state``) advances where the
    step applies."""
    if not _checks.is_schedule(lr):
        return kernel_lr(lr)
    lr_state = new_state[-1]
    new_state[-1] = lr_state._replace(count=tick(lr_state.count, keep))
    return kernel_lr(lr(lr_state.count))


def lr_on(lr: Any, device: torch.device) -> Any:
    """A kernel learning rate (from :func:`step_lr`) for the kernel call on ``device``."""
    return lr.to(device) if isinstance(lr, torch.Tensor) else lr


def kernel_groups(
    p_leaves: list[Any], grads: list[Any], rows: list[int], buffers: list[list[Any]]
) -> list[tuple[list[Any], ...]]:
    """Columns (params, grads, each buffer) per (device, dtype) group at ``rows`` (from
    :func:`fused_rows`, which checked that every column shares its param's dtype and
    device): one kernel call each."""
    if not rows:
        return []
    columns = (p_leaves, grads, *buffers)
    firsts = [p_leaves[i] for i in rows]
    if len({t.dtype for t in firsts}) == 1 and len({t.device for t in firsts}) == 1:
        parts = [rows]  # the common case: one group
    else:
        by: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, t in zip(rows, firsts):
            by.setdefault((t.device, t.dtype), []).append(i)
        parts = list(by.values())
    return [tuple([col[i] for i in part] for col in columns) for part in parts]


# --------------------------------------------------------------------------- torch's foreach rules
# Most torch.optim algorithms have no fused kernel; their binding runs torch's functional
# foreach implementation (``torch.optim.<name>.<name>(..., foreach=True)``, what
# ``torch.optim.<Name>(foreach=True)`` runs) on the state's own tensors, in place.
RuleKernel = Callable[[list[Any], list[Any], list[list[Any]], list[torch.Tensor], Any, Any], Any]


def gate_open(keep: torch.Tensor | None) -> bool:
    """Whether a step a gate before the rule decided on device data applies, for kernels
    without a ``found_inf`` argument: free on CPU (:func:`gradchain._ops.known_bool`),
    otherwise one host read (``bool``), as ``GradScaler`` does for optimizers without a
    fused kernel."""
    if keep is None:
        return True
    known = _ops.known_bool(keep)
    return bool(keep) if known is None else known


def copies(t: torch.Tensor, n: int) -> list[torch.Tensor]:
    """``n`` separate 0-dim copies of ``t``, for torch code that keeps one scalar tensor per
    parameter and updates each (``step``, NAdam's ``mu_product``, ASGD's ``eta``): views of
    one new buffer (one allocation, not ``n``), never the same tensor repeated."""
    return list(t.reshape(1).expand(n).clone().unbind(0))


def step_tensors(count: torch.Tensor, n: int) -> list[torch.Tensor]:
    """torch's per-parameter ``step`` tensors for a rule whose count is ``count`` (before
    this step), in torch's scalar-state dtype: :func:`copies`, since torch's foreach
    kernels increment each of them."""
    return copies(count.to(_ops.state_scalar_dtype()), n)


def torch_rule_plan(
    lr: Any, size: int, rule_at: int, cls: Any, fields: Sequence[tuple[int, str]],
    kernel: RuleKernel, *, members: Sequence[tuple[int, Any]] = (), shaped: bool = True,
) -> FusedPlan:
    """The binding of an alias ``chain(..., rule, [more members], [scale_by_learning_rate])``
    of ``size`` members whose state at ``rule_at`` is a ``cls`` to torch's ``kernel``.

    ``fields`` names the per-parameter state trees handed to the kernel, as (offset from
    ``rule_at``, field); ``members`` the other members with state the kernel updates (as
    (offset, state class), e.g. rmsprop's momentum :class:`~gradchain.TraceState`), whose
    ``count`` advances with the rule's. With ``shaped=False`` the trees are not shaped like
    the params (factored moments) and only their dtypes and devices are checked.
    ``kernel(params, grads, buffers, steps, lr, rule_state)`` runs torch's code in place
    on the rows and returns the rule state's fields it replaced (a dict).
    """
    scheduled = _checks.is_schedule(lr)

    def plan(state: Any, p_leaves: list[Any], g_leaves: list[Any], spec: Any) -> FusedStep | None:
        if not isinstance(state, tuple) or len(state) != size:
            return None
        lr_state: Any = state[-1] if scheduled and rule_at != size - 1 else None
        if lr_state is not None and not isinstance(lr_state, ScaleByScheduleState):
            return None
        st: Any = state[rule_at]
        if not isinstance(st, cls) or not torch.is_tensor(st.count):
            return None
        for offset, member_cls in members:
            if not isinstance(state[rule_at + offset], member_cls):
                return None
        try:
            buffers = [
                flatten_like(spec, getattr(state[rule_at + off], name), name, "params")
                for off, name in fields
            ]
        except (TypeError, ValueError):
            return None
        rows = fused_rows(p_leaves, g_leaves, buffers if shaped else [], devices=None)
        if not rows:
            # No gradient at all: the generic path advances the rule's scalars as the pure
            # update does (torch's code would skip them).
            return None
        if not shaped:
            for b in buffers:
                for i in rows:
                    x, p = b[i], p_leaves[i]
                    if type(x) is not torch.Tensor or x.dtype != p.dtype or x.device != p.device:
                        return None

        def step(grads: list[Any], keep: torch.Tensor | None) -> Any:
            if not gate_open(keep):
                return state
            new_state = list(state)
            lr_now: Any = lr
            if lr_state is not None:
                lr_now = lr(lr_state.count)
                new_state[-1] = lr_state._replace(count=_ops.safe_increment(lr_state.count))
            elif scheduled:
                lr_now = lr(st.count)
            # A host tensor (an injected hyperparameter, a schedule's value) is read for free:
            # torch's code then computes with the Python float its param groups hold (with a
            # tensor, some rules take another arithmetic path).
            lr_now = kernel_lr(lr_now)
            replaced = kernel(
                [p_leaves[i] for i in rows], [grads[i] for i in rows],
                [[b[i] for i in rows] for b in buffers], step_tensors(st.count, len(rows)),
                lr_now, st,
            )
            # The state's tensors were updated in place: the new state holds the same ones.
            new_state[rule_at] = st._replace(count=_ops.safe_increment(st.count), **replaced)
            for offset, _ in members:
                other: Any = state[rule_at + offset]
                new_state[rule_at + offset] = other._replace(
                    count=_ops.safe_increment(other.count)
                )
            return tuple(new_state)

        return step

    return plan

