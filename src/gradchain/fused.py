"""Update and apply in one call, with torch's fused SGD/Adam/AdamW kernels where they fit.

:func:`update_and_apply_` is the in-place training step: ``tx.update(grads, state, params,
donate=True)`` followed by :func:`~gradchain.apply_updates_`. When the chain ends in
:func:`~gradchain.sgd`, :func:`~gradchain.adam` or :func:`~gradchain.adamw`, that last
rule and the application
to the params run as one pass of torch's fused kernel (the one
``torch.optim.AdamW(fused=True)`` runs), instead of a dozen ``torch._foreach_*`` passes.
Everything before it (clipping, gates, your own transformations) runs as usual.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from gradchain import tree as _tree
from gradchain.base import (
    Flag,
    GradientTransformation,
    _and,
    _as_tensor,
    _check_updates_fit,
    _fold_flags,
    _known_bool,
    apply_updates_,
    chain,
    chain_members,
)

__all__ = ["update_and_apply_"]


class _Rule(NamedTuple):
    """What a fused kernel needs to know about an ``sgd``/``adam``/``adamw`` chain."""

    kind: str  # "adam" (L2 added to the gradient), "adamw" (decay on the params), "sgd"
    lr: Any  # float, 1-element tensor, or schedule of the count
    state_at: int | None  # index of the ScaleByAdamState / TraceState; None: plain sgd
    lr_at: int | None  # index of the ScaleByScheduleState; None for a constant lr
    size: int  # number of members of the chain
    weight_decay: float = 0.0
    maximize: bool = False
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    amsgrad: bool = False
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False


_RULES: weakref.WeakKeyDictionary[Callable[..., Any], _Rule] = weakref.WeakKeyDictionary()
_HEADS: weakref.WeakKeyDictionary[Callable[..., Any], GradientTransformation] = (
    weakref.WeakKeyDictionary()
)


def _register(tx: GradientTransformation, rule: _Rule) -> GradientTransformation:
    """Record that ``tx`` (built by ``sgd``/``adam``/``adamw``) can run as torch's fused
    kernel."""
    _RULES[tx.update] = rule
    return tx


def _head(update: Callable[..., Any], members: tuple[GradientTransformation, ...]) -> Any:
    """``chain(*members[:-1])``, built once per chain."""
    head = _HEADS.get(update)
    if head is None:
        head = _HEADS[update] = chain(*members[:-1])
    return head


def _fused_devices() -> frozenset[str]:
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        return frozenset(_get_fused_kernels_supported_devices())
    except ImportError:  # pragma: no cover - older torch
        return frozenset({"cpu", "cuda"})


_FUSED_DEVICES = _fused_devices()
_TENSOR = frozenset({torch.Tensor})
_PLAIN = _tree._PLAIN  # plain tensors and nn.Parameter, not subclasses (DTensor, ...)
_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def _plan(
    tx: GradientTransformation, state: Any, spec: Any, p_leaves: list[Any], g_leaves: list[Any]
) -> tuple[list[tuple[GradientTransformation, Any]], _Rule] | None:
    """The chain levels down to a fusable rule, or ``None`` when the fused kernel does not
    fit (the caller then takes the generic path, which also raises the precise errors for
    malformed input). Reads metadata only; touches nothing."""
    if torch.compiler.is_compiling() or not isinstance(tx, tuple) or len(tx) != 2:
        return None
    levels: list[tuple[GradientTransformation, Any]] = []
    while True:
        rule = _RULES.get(tx.update)
        if rule is not None:
            break
        members = chain_members(tx)
        if not members or not isinstance(state, tuple) or len(state) != len(members):
            return None
        levels.append((tx, state))
        tx, state = members[-1], state[-1]
    if not isinstance(state, tuple) or len(state) != rule.size:
        return None
    if rule.lr_at is not None and type(state[rule.lr_at]).__name__ != "ScaleByScheduleState":
        return None
    if rule.state_at is not None:
        expected = "TraceState" if rule.kind == "sgd" else "ScaleByAdamState"
        if type(state[rule.state_at]).__name__ != expected:
            return None
        if not torch.is_tensor(state[rule.state_at].count):
            return None
        if rule.kind == "sgd" and rule.dampening != 0 and _first_step(state[rule.state_at]) is None:
            return None  # whether this is the first step is device data: not fused
    try:
        trees = _buffers(rule, state, spec)
    except (TypeError, ValueError):
        return None
    # Metadata only, and cheap (whole-list comparisons): this runs every step. grads'
    # shapes were checked against the params by the caller.
    idx = [i for i, (p, g) in enumerate(zip(p_leaves, g_leaves)) if p is not None and g is not None]
    ps = [p_leaves[i] for i in idx]
    gs = [g_leaves[i] for i in idx]
    if not {type(p) for p in ps} <= _PLAIN or not {type(g) for g in gs} <= _TENSOR:
        return None  # subclasses (DTensor, ...) take the generic path
    if {g.layout for g in gs} - {torch.strided} or any(map(_wrapped, gs)):
        return None
    dtypes = [p.dtype for p in ps]
    devices = [p.device for p in ps]
    if [g.dtype for g in gs] != dtypes or [g.device for g in gs] != devices:
        return None
    shapes = [p.shape for p in ps]
    for t in trees:
        xs = [t[i] for i in idx]
        if not {type(x) for x in xs} <= _TENSOR or [x.dtype for x in xs] != dtypes:
            return None
        if [x.shape for x in xs] != shapes or [x.device for x in xs] != devices:
            return None
    for device, dtype in set(zip(devices, dtypes)):
        if not dtype.is_floating_point or device.type not in _FUSED_DEVICES:
            return None
    return levels, rule


def _buffers(rule: _Rule, state: tuple[Any, ...], spec: Any) -> list[list[Any]]:
    """The rule's per-parameter state, as leaf lists aligned with the params."""
    if rule.state_at is None:
        return []
    st = state[rule.state_at]
    if rule.kind == "sgd":
        return [_tree.flatten_like(spec, st.trace, "trace", "params")]
    trees = [_tree.flatten_like(spec, st.mu, "mu", "params"),
             _tree.flatten_like(spec, st.nu, "nu", "params")]
    if rule.amsgrad:
        trees.append(_tree.flatten_like(spec, st.nu_max, "nu_max", "params"))
    return trees


def _first_step(trace_state: Any) -> bool | None:
    """Whether the momentum buffers are still to be started (torch's ``is_first_step``),
    where that is known without a host-device sync."""
    return _known_bool(trace_state.count == 0)


def _rule_step(
    rule: _Rule, state: tuple[Any, ...], spec: Any, p_leaves: list[Any], updates: Any,
    flag: Flag,
) -> tuple[Any, ...]:
    """Run the rule and the application as torch's fused kernel; returns the rule's new
    state. ``flag`` is whether the step is applied (``True`` or a 0-dim bool tensor)."""
    from gradchain.optimizers import _next_count

    g_leaves = _tree.flatten_like(spec, updates, "updates", "params")
    trees = _buffers(rule, state, spec)
    new_state = list(state)
    keep = None if flag is True else _as_tensor(flag)

    def advance(count: torch.Tensor) -> torch.Tensor:
        new = _next_count(count)
        return new if keep is None else torch.where(keep.to(new.device), new, count)

    if rule.lr_at is None:
        lr = rule.lr
    else:
        sched = state[rule.lr_at]
        lr = rule.lr(sched.count)
        new_state[rule.lr_at] = sched._replace(count=advance(sched.count))
    rows = [
        (p, g, *(t[i] for t in trees))
        for i, (p, g) in enumerate(zip(p_leaves, g_leaves))
        if p is not None and g is not None
    ]
    st = state[rule.state_at] if rule.state_at is not None else None
    with torch.no_grad():
        for cols in _tree.group_by_device_dtype(rows):
            ps, gs = cols[0], cols[1]
            device = ps[0].device
            found_inf = None if keep is None else (~keep).to(device, torch.float32)
            lr_arg = lr.to(device) if isinstance(lr, torch.Tensor) else float(lr)
            if rule.kind == "sgd":
                torch._fused_sgd_(
                    ps, gs, cols[2] if st is not None else [],
                    weight_decay=rule.weight_decay, momentum=rule.momentum, lr=lr_arg,
                    dampening=rule.dampening, nesterov=rule.nesterov, maximize=rule.maximize,
                    # From zero buffers without dampening the first step is the same sum.
                    is_first_step=bool(rule.dampening != 0 and _first_step(st)),
                    found_inf=found_inf,
                )
            else:
                assert st is not None
                step = _next_count(st.count).to(device, torch.float32)
                kernel = torch._fused_adamw_ if rule.kind == "adamw" else torch._fused_adam_
                kernel(
                    ps, gs, cols[2], cols[3], cols[4] if rule.amsgrad else [],
                    [step] * len(ps), lr=lr_arg, beta1=rule.b1, beta2=rule.b2,
                    weight_decay=rule.weight_decay, eps=rule.eps, amsgrad=rule.amsgrad,
                    maximize=rule.maximize, found_inf=found_inf,
                )
    if st is not None:
        # The buffers were updated in place: the new state holds the same tensors.
        new_state[rule.state_at] = st._replace(count=advance(st.count))  # type: ignore[index]
    return tuple(new_state)


def _write_back(old: Any, new: Any) -> Any:
    """Copy ``new``'s tensors into ``old``'s (same structure) where they fit; ``new``'s
    tree with ``old``'s tensors in those places."""
    old_leaves, spec = _tree.flatten(old)
    new_leaves = spec.flatten_up_to(new)
    out = []
    for o, n in zip(old_leaves, new_leaves):
        if (
            isinstance(o, torch.Tensor) and isinstance(n, torch.Tensor) and o is not n
            and o.shape == n.shape and o.dtype == n.dtype and o.device == n.device
        ):
            o.copy_(n)
            out.append(o)
        else:
            out.append(n)
    return _tree.unflatten(spec, out)


@torch.no_grad()
def update_and_apply_(
    tx: GradientTransformation, grads: Any, state: Any, params: Any, **extra: Any
) -> Any:
    """One in-place training step: update with ``tx`` and add the updates to ``params``.

    Equivalent to::

        updates, state = tx.update(grads, state, params, donate=True, **extra)
        gc.apply_updates_(params, updates)

    and returns the new state. ``grads`` and ``state`` are given up (as with
    ``donate=True``: their memory may be reused, use only the returned state), and
    ``params`` (live tensors, e.g. ``dict(model.named_parameters())``) are updated in place.
    It runs under ``torch.no_grad()`` (an optimizer step, not recorded by autograd).

    **Fused.** When ``tx`` is :func:`~gradchain.sgd`, :func:`~gradchain.adam` or
    :func:`~gradchain.adamw`, or a chain ending in one, that rule and the application run as
    torch's fused kernel (``torch._fused_sgd_`` / ``_fused_adam_`` / ``_fused_adamw_``, what
    ``torch.optim.SGD/Adam/AdamW(fused=True)`` runs): one pass over params, gradients and
    optimizer state instead of a dozen. Its results are those of the torch optimizer with
    ``fused=True`` on the same inputs (bit for bit; they differ from the unfused gradchain
    path by rounding only, within the float32 parity tolerance). Gates before the rule keep their meaning: a step a gate closes leaves the
    params and the rule's state as they were (a closed window skips the kernel; a
    data-dependent flag on an accelerator is passed to the kernel as ``found_inf``, no
    sync). The kernel is used when every leaf's param, gradient and moments are plain
    tensors of one floating dtype on a device torch has the fused kernels for (CPU, CUDA,
    …) (and, for ``sgd`` with ``dampening``, where its first step is known without a sync:
    CPU state); otherwise, and under ``torch.compile``, the call takes the unfused path
    above, with the same meaning.

    Args:
        tx: the transformation (usually a chain).
        grads: gradients, a tree shaped like ``params`` (``None`` leaves are skipped).
        state: ``tx``'s state; given up.
        params: the live parameters, updated in place.
        **extra: passed to every member's ``update`` (e.g. ``flush=True``); ``donate``
            is implied and may not be given.

    Returns:
        The new state.

    Raises:
        ValueError: when ``donate`` is given, or ``grads`` does not fit ``params`` (shape
            or structure, naming the path), before anything is changed.
        TypeError: when a leaf is neither a tensor nor ``None``.

    Example:
        >>> import torch, gradchain as gc
        >>> model = torch.nn.Linear(3, 1)
        >>> params = dict(model.named_parameters())
        >>> tx = gc.chain(gc.clip_by_norm(1.0), gc.adamw(1e-3))
        >>> state = tx.init(params)
        >>> model(torch.ones(1, 3)).sum().backward()
        >>> grads = {k: p.grad for k, p in params.items()}
        >>> state = gc.update_and_apply_(tx, grads, state, params)
        >>> int(gc.tree_get(state, gc.ScaleByAdamState).count)
        1
    """
    fn = "update_and_apply_"
    if "donate" in extra:
        raise ValueError(
            f"{fn}: donate is implied (grads and state are given up); do not pass it"
        )
    p_leaves, spec = _tree.flatten(params)
    g_leaves = _tree.flatten_like(spec, grads, "grads", "params")
    _check_updates_fit(spec, p_leaves, g_leaves, fn)
    plan = _plan(tx, state, spec, p_leaves, g_leaves)
    if plan is None:
        updates, new_state = tx.update(grads, state, params, donate=True, **extra)
        apply_updates_(params, updates)
        if torch.compiler.is_compiling():
            # Traced, donation is ignored and the new state is fresh tensors. Written back
            # into the given-up state, inductor computes it in place (as for the params):
            # no gradient-sized allocations per step.
            return _write_back(state, new_state)
        return new_state
    levels, rule = plan
    host: Flag = True
    data: Flag = True
    updates = grads
    heads: list[tuple[Any, ...]] = []
    for level_tx, level_state in levels:
        members = chain_members(level_tx)
        assert members is not None
        if len(members) > 1:
            both = _and(host, data)
            updates, head_states = _head(level_tx.update, members).update(
                updates, level_state[:-1], params, donate=True,
                gate_open=None if both is True else _as_tensor(both),
                host_open=None if host is True else _as_tensor(host), **extra,
            )
            host, data = _fold_flags(host, data, head_states)
            if isinstance(data, torch.Tensor):
                known = _known_bool(data)
                data = data if known is None else known
        else:
            head_states = ()
        heads.append(head_states)
        if _and(host, data) is False:
            # Closed (a window still open, a skipped step): the rest keeps its state and
            # the params stay as they are.
            new: Any = level_state[-1]
            break
    else:
        new = _rule_step(rule, state if not levels else levels[-1][1][-1], spec, p_leaves,
                         updates, _and(host, data))
    # Rebuild the nested chain states from the inside out (down to the level that closed).
    for head_states in reversed(heads):
        new = (*head_states, new)
    return new
