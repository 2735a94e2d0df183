"""Applying updates: ``apply_updates``, ``apply_updates_`` and ``update_and_apply_``.

:func:`update_and_apply_` is the in-place training step: ``tx.update(grads, state, params,
donate=True)`` followed by :func:`apply_updates_`. When the chain ends in an update rule
bound to a torch kernel (see :mod:`gradchain.optim._fused`), that last rule and the
application to the params run as that kernel (the one ``torch.optim.AdamW(fused=True)``
runs), instead of a dozen ``torch._foreach_*`` passes. Everything before it (clipping,
gates, your own transformations) runs as usual, under the chain's gate walk.
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Callable
from typing import Any

import torch

from gradchain import _dist, _ops, _tree
from gradchain.base import GradientTransformation, Params, Updates
from gradchain.combine import PartitionState, chain, chain_members, partition_groups
from gradchain.gating import GateWalk, as_tensor
from gradchain.optim._fused import FusedPlan, FusedStep, fused_plan_of
from gradchain.optim._sharded import sharded_plan_of

__all__ = ["apply_updates", "apply_updates_", "update_and_apply_"]


def apply_updates(params: Params, updates: Updates) -> Params:
    """Return ``params + updates`` leafwise, each result cast to its param's dtype.

    A ``None`` update leaves its parameter unchanged. Nothing is modified in place.

    Example:
        >>> import torch, gradchain as gc
        >>> gc.apply_updates({"w": torch.ones(2)}, {"w": torch.tensor([0.5, -1.0])})
        {'w': tensor([1.5000, 0.0000])}
    """
    p_leaves, spec = _tree.flatten(params)
    u_leaves = _tree.flatten_like(spec, updates, "updates", "params")
    _check_updates_fit(spec, p_leaves, u_leaves, "apply_updates")
    out = list(p_leaves)
    rows = []
    for i, (p, u) in enumerate(zip(p_leaves, u_leaves)):
        if u is None or p is None:
            continue
        if p.dtype == u.dtype and _ops.use_foreach([p, u]):
            rows.append((p, u, i))
        else:
            out[i] = (p + u).to(p.dtype)
    # Same dtypes: one foreach add per (device, dtype) group, the same sums as leaf by leaf.
    for ps, us, idx in _tree.group_by_device_dtype(rows):
        for i, x in zip(idx, torch._foreach_add(ps, us)):
            out[i] = x
    return _tree.unflatten(spec, out)


def _check_updates_fit(spec: Any, p_leaves: list[Any], u_leaves: list[Any], who: str) -> None:
    """Each update is ``None`` or a tensor of its param's shape: metadata checks, done before
    anything is changed (a broadcast would silently change the param's shape, and an
    in-place update could fail half-way)."""
    compiling = torch.compiler.is_compiling()
    both = [*p_leaves, *u_leaves]
    if not compiling and _FITS.get(len(p_leaves), both) is True:
        return  # these metadata fitted before (see MetaMemo)
    if {type(x) for x in p_leaves} <= _tree.PLAIN and {type(x) for x in u_leaves} <= _tree.PLAIN:
        # Whole-list comparison first (cheap); the loop below only runs to name a bad leaf.
        if [x.shape for x in p_leaves] == [x.shape for x in u_leaves]:
            if not compiling:
                _FITS.put(len(p_leaves), both, True)
            return
    for i, (p, u) in enumerate(zip(p_leaves, u_leaves)):
        if u is None or p is None:
            continue
        if not (isinstance(u, torch.Tensor) and isinstance(p, torch.Tensor)):
            bad, what = ("updates", u) if not isinstance(u, torch.Tensor) else ("params", p)
            raise TypeError(
                f"{who}: {bad}{_tree.leaf_path(spec, i)} must be a torch.Tensor or None, "
                f"got {type(what).__name__}"
            )
        if u.shape != p.shape:
            path = _tree.leaf_path(spec, i)
            raise ValueError(
                f"{who}: updates{path} has shape {tuple(u.shape)} but params{path} has shape "
                f"{tuple(p.shape)}"
            )


_GRAD_FN = operator.attrgetter("grad_fn")


def _check_writable(spec: Any, p_leaves: list[Any], who: str) -> None:
    """Refuse a param that is not a leaf tensor, for the in-place steps (the pure
    ``apply_updates`` may differentiate through computed params). Not metadata, so not
    memoized: one attribute read per leaf."""
    if torch.compiler.is_compiling():
        return
    try:
        computed = any(map(_GRAD_FN, p_leaves))  # (a grad_fn is truthy)
    except AttributeError:  # a None (or not a tensor) among them
        computed = any(getattr(p, "grad_fn", None) is not None for p in p_leaves)
    if computed:
        i = next(i for i, p in enumerate(p_leaves) if getattr(p, "grad_fn", None) is not None)
        raise ValueError(
            f"{who}: params{_tree.leaf_path(spec, i)} is not a leaf tensor (it was computed "
            f"from others: grad_fn={type(p_leaves[i].grad_fn).__name__}); an in-place update "
            "would change this copy, not the parameter it was computed from (torch.optim "
            "refuses it too: can't optimize a non-leaf Tensor); pass the parameters "
            "themselves (e.g. dict(model.named_parameters()))"
        )


_FITS = _tree.MetaMemo(16)  # (params, updates) leaf lists that fitted


def apply_updates_(params: Params, updates: Updates) -> Params:
    """In-place ``params += updates`` for live tensors (e.g. ``nn.Parameter``); returns ``params``.

    Runs under ``torch.no_grad()`` with ``torch._foreach_add_`` per (device, dtype) group.

    Example:
        >>> import torch, gradchain as gc
        >>> model = torch.nn.Linear(2, 1)
        >>> params = dict(model.named_parameters())
        >>> before = model.bias.detach().clone()
        >>> _ = gc.apply_updates_(params, {"weight": None, "bias": torch.ones(1)})
        >>> bool(torch.equal(model.bias.detach(), before + 1))
        True
    """
    p_leaves, spec = _tree.flatten(params)
    u_leaves = _tree.flatten_like(spec, updates, "updates", "params")
    _check_updates_fit(spec, p_leaves, u_leaves, "apply_updates_")
    _check_writable(spec, p_leaves, "apply_updates_")
    pairs = [(p, u) for p, u in zip(p_leaves, u_leaves) if p is not None and u is not None]
    with torch.no_grad():
        for ps, us in _tree.group_by_device_dtype(pairs):
            # No cast of the updates first: the add runs in the promoted dtype and rounds
            # once into the param's, exactly as ``apply_updates`` does.
            torch._foreach_add_(ps, us)
    return params


_HEADS: weakref.WeakKeyDictionary[Callable[..., Any], GradientTransformation] = (
    weakref.WeakKeyDictionary()
)


def _head(update: Callable[..., Any], members: tuple[GradientTransformation, ...]) -> Any:
    """``chain(*members[:-1])``, built once per chain."""
    head = _HEADS.get(update)
    if head is None:
        head = _HEADS[update] = chain(*members[:-1])
    return head


def _fused_step(
    tx: GradientTransformation, state: Any, spec: Any, p_leaves: list[Any], g_leaves: list[Any],
    plan_of: Callable[[GradientTransformation], FusedPlan | None] = fused_plan_of,
) -> tuple[list[tuple[GradientTransformation, Any]], FusedStep] | None:
    """The chain levels down to an update rule bound to a torch kernel, and the kernel's
    step for this call; ``None`` when there is none or it does not fit (the caller then
    takes the generic path, which also raises the precise errors for malformed input).
    Reads metadata only; touches nothing. ``plan_of`` finds a binding (DTensor params:
    :func:`~gradchain.optim._sharded.sharded_plan_of`, the binding on local shards)."""
    if torch.compiler.is_compiling() or not isinstance(tx, tuple) or len(tx) != 2:
        return None
    levels: list[tuple[GradientTransformation, Any]] = []
    while True:
        plan = plan_of(tx)
        if plan is not None:
            break
        if isinstance(state, PartitionState):
            groups = partition_groups(tx, _tree.unflatten(spec, p_leaves))
            if groups is None:
                return None
            step = _partition_step(groups, state, spec, p_leaves, g_leaves, plan_of)
            return None if step is None else (levels, step)
        members = chain_members(tx)
        if not members or not isinstance(state, tuple) or len(state) != len(members):
            return None
        levels.append((tx, state))
        tx, state = members[-1], state[-1]
    step = plan(state, p_leaves, g_leaves, spec)
    return None if step is None else (levels, step)


def _partition_step(
    groups: dict[Any, tuple[GradientTransformation, list[int]]], state: PartitionState,
    spec: Any, p_leaves: list[Any], g_leaves: list[Any],
    plan_of: Callable[[GradientTransformation], FusedPlan | None] = fused_plan_of,
) -> FusedStep | None:
    """One kernel step per parameter group of a ``partition`` whose members are all update
    rules bound to a torch kernel (the usual "no weight decay on biases and norms": two
    ``adamw`` with different ``weight_decay``), as torch's optimizer with one param group
    per label runs them; ``None`` when a member is anything else."""
    if set(groups) != set(state.inner_states):
        return None
    steps = {}
    for label, (member, index) in groups.items():
        plan = plan_of(member)
        if plan is None:
            return None
        mine = set(index)
        sub_p = [p if i in mine else None for i, p in enumerate(p_leaves)]
        sub_g = [g if i in mine else None for i, g in enumerate(g_leaves)]
        step = plan(state.inner_states[label], sub_p, sub_g, spec)
        if step is None:
            return None
        steps[label] = (step, mine)

    def run(grads: list[Any], keep: torch.Tensor | None) -> PartitionState:
        return PartitionState({
            label: step([g if i in mine else None for i, g in enumerate(grads)], keep)
            for label, (step, mine) in steps.items()
        })

    return run


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

    **Fused.** When ``tx`` is an update rule of :mod:`gradchain.optim` bound to a torch
    kernel (:func:`~gradchain.sgd`, :func:`~gradchain.adam`, :func:`~gradchain.adamw`: ``torch._fused_sgd_`` / ``_fused_adam_`` /
    ``_fused_adamw_``, what ``torch.optim.SGD/Adam/AdamW(fused=True)`` runs), or a chain
    ending in one, that rule and the application run as torch's kernel: one pass over
    params, gradients and optimizer state instead of a dozen. Its results are those of the torch optimizer with
    ``fused=True`` on the same inputs (bit for bit; they differ from the unfused gradchain
    path by rounding only, within the float32 parity tolerance). Gates before the rule keep their meaning: a step a gate closes leaves the
    params and the rule's state as they were (a closed window skips the kernel; a
    data-dependent flag on an accelerator is passed to the kernel as ``found_inf``, no
    sync). The kernel is used when every leaf's param, gradient and moments are plain
    tensors of one floating dtype on a device torch has the fused kernels for (CPU, CUDA,
    …) (and, for ``sgd`` with ``dampening``, where its first step is known without a sync:
    CPU state); otherwise, and under ``torch.compile``, the call takes the unfused path
    above, with the same meaning. On DTensor params (FSDP2 ``fully_shard``) whose
    gradients and moments are laid out alike, an elementwise rule's kernel runs over the
    local shards, one call for all of them (see "The step on local shards" in the docs'
    Scaling out page).

    The other rules of :mod:`gradchain.optim` are bound the same way to torch's own code
    for them: ``adagrad`` to ``torch._fused_adagrad_``; ``adadelta``, ``adamax``,
    ``nadam``, ``radam``, ``rmsprop``, ``rprop``, ``asgd`` and ``adafactor`` to torch's
    foreach implementation (equal to ``torch.optim.<Name>(foreach=True)`` bit for bit) and
    ``muon`` to torch's Muon step, on any device. Those kernels have no ``found_inf``: a
    gate's flag is read on the host (free on CPU, one sync on an accelerator, as
    ``GradScaler`` does for such optimizers). See the Optimizers page of the docs.

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
        ValueError: when ``donate`` is given, ``grads`` does not fit ``params`` (shape
            or structure, naming the path), or a param is not a leaf tensor (computed
            from others: an in-place update would not reach the parameter), before
            anything is changed.
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
    _check_writable(spec, p_leaves, fn)
    # FSDP2 / DTensor params: an elementwise kernel runs on the local shards. (FSDP2 shards
    # every param, so the first tells; a tree that mixes in DTensors later gets there too.)
    sharded = bool(p_leaves) and _dist.is_dtensor(p_leaves[0])
    found = None if sharded else _fused_step(tx, state, spec, p_leaves, g_leaves)
    if found is None and (sharded or _dist.has_dtensor(p_leaves)):
        found = _fused_step(tx, state, spec, p_leaves, g_leaves, sharded_plan_of)
    if found is None:
        updates, new_state = tx.update(grads, state, params, donate=True, **extra)
        apply_updates_(params, updates)
        if torch.compiler.is_compiling():
            # Traced, donation is ignored and the new state is fresh tensors. Written back
            # into the given-up state, inductor computes it in place (as for the params):
            # no gradient-sized allocations per step.
            return _write_back(state, new_state)
        return new_state
    levels, step = found
    walk = GateWalk()
    updates = grads
    heads: list[tuple[Any, ...]] = []
    for level_tx, level_state in levels:
        members = chain_members(level_tx)
        assert members is not None
        head_states: tuple[Any, ...] = ()
        if len(members) > 1:
            updates, head_states = _head(level_tx.update, members).update(
                updates, level_state[:-1], params, donate=True, **walk.keywords(), **extra
            )
            walk.fold(head_states)
        heads.append(head_states)
        if walk.open() is False:
            # Closed (a window still open, a skipped step): the rest keeps its state and
            # the params stay as they are.
            new: Any = level_state[-1]
            break
    else:
        flag = walk.open()
        new = step(
            _tree.flatten_like(spec, updates, "updates", "params"),
            None if flag is True else as_tensor(flag),
        )
    # Rebuild the nested chain states from the inside out (down to the level that closed),
    # each of its own type (a named_chain's state is a NamedTuple).
    for (_, level_state), head_states in reversed(list(zip(levels, heads))):
        items = (*head_states, new)
        new = level_state._make(items) if hasattr(level_state, "_fields") else items
    return new
