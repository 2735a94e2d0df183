"""Bindings to torch's kernels on DTensor (FSDP2 ``fully_shard``) params: over local shards.

A binding (see :mod:`gradchain.optim._fused`) checks plain tensors and runs torch's kernel
on them. With FSDP2 the params, gradients and the rule's moments are DTensors laid out
alike (the moments are made by ``zeros_like`` of the params, so they share the params'
mesh, placements and shapes). An *elementwise* kernel (torch's fused Adam/AdamW, SGD,
Adagrad) gives on every rank's local shards exactly what it gives on the DTensors, so here
such a binding is handed the local shards (params, gradients, the state's DTensor
leaves), checks them and runs its kernel over all of them at once: one kernel call per
(device, dtype) instead of DTensor's dispatch per op and per leaf. Nothing global is
computed by these kernels; the transformations before the rule (``clip_by_norm``'s
global norm, a gate's finite flag) run on the DTensors, each global quantity with one
all-reduce (see :mod:`gradchain._dist`).

A binding opts in with :func:`elementwise`; the others (``muon``'s orthogonalization and
``adafactor``'s factored moments need whole matrices, ``from_torch`` runs arbitrary
code) keep the generic DTensor path. So does a state whose DTensor leaves are not laid
out as their params (a mask, a replicated moment, a partial gradient).
"""

from __future__ import annotations

import weakref
from typing import Any

import optree
import torch

from gradchain import _dist
from gradchain.base import GradientTransformation
from gradchain.optim._fused import FusedPlan, FusedStep, fused_plan_of

_ELEMENTWISE: weakref.WeakSet[FusedPlan] = weakref.WeakSet()


def elementwise(plan: FusedPlan) -> FusedPlan:
    """Mark ``plan``'s kernel as elementwise over params, gradients and the state's
    params-shaped buffers (so it may run on DTensor local shards); returns ``plan``."""
    _ELEMENTWISE.add(plan)
    return plan


def _never(state: Any, p_leaves: list[Any], g_leaves: list[Any], spec: Any) -> None:
    """The plan of a binding that cannot run on local shards: it never fits."""
    del state, p_leaves, g_leaves, spec


def sharded_plan_of(tx: GradientTransformation) -> FusedPlan | None:
    """:func:`~gradchain.optim._fused.fused_plan_of` for a call whose params include
    DTensors: the binding run on local shards, a plan that never fits when the binding is
    not :func:`elementwise`, or ``None`` when ``tx`` has no binding."""
    plan = fused_plan_of(tx)
    if plan is None:
        return None
    if plan not in _ELEMENTWISE:
        return _never

    def on_shards(
        state: Any, p_leaves: list[Any], g_leaves: list[Any], spec: Any
    ) -> FusedStep | None:
        return _on_shards(plan, state, p_leaves, g_leaves, spec)

    return on_shards


class _Misfit(Exception):
    """A DTensor in the state that is not laid out as its param."""


def _local_state(state: Any, spec: Any, p_leaves: list[Any]) -> Any:
    """``state`` with each DTensor leaf replaced by its local shard. Every DTensor must sit
    in a subtree shaped like the params (``mu``, ``nu``, a momentum trace) and be laid out
    as the param it lines up with; otherwise :class:`_Misfit`."""
    single = spec.num_nodes == 1  # the params are one tensor: every leaf lines up with it

    def fits(node: Any) -> bool:
        if single or node is None or isinstance(node, torch.Tensor):
            return False
        # The params' structure with tensor (or None) leaves. (Compared as structures:
        # optree's flatten_up_to would format the whole tree into its error message.)
        if optree.tree_structure(node, none_is_leaf=True) != spec:
            return False
        return all(x is None or isinstance(x, torch.Tensor) for x in spec.flatten_up_to(node))

    def local_of(buffer: Any, param: Any) -> Any:
        if not _dist.is_dtensor(buffer):
            if _dist.is_dtensor(param) and buffer is not None and not single:
                raise _Misfit  # a plain buffer for a sharded param
            return buffer
        if not _dist.same_layout(buffer, param):
            raise _Misfit
        return _dist.local(buffer)

    def visit(node: Any) -> Any:
        if fits(node):
            leaves = spec.flatten_up_to(node)
            locals_ = [local_of(b, p) for b, p in zip(leaves, p_leaves)]
            return optree.tree_unflatten(
                optree.tree_structure(node, none_is_leaf=True), locals_
            )
        if single and isinstance(node, torch.Tensor):
            return local_of(node, p_leaves[0])
        if _dist.is_dtensor(node):
            raise _Misfit
        return node

    return optree.tree_map(visit, state, is_leaf=fits, none_is_leaf=True)


def _restore(old: Any, new: Any) -> Any:
    """The rule's new state ``new`` (computed on local shards) as DTensors where ``old``
    held DTensors: the same DTensor when the kernel updated its shard in place, a DTensor
    laid out alike around a new shard otherwise."""
    old_leaves, old_spec = optree.tree_flatten(old, none_is_leaf=True)
    new_leaves, new_spec = optree.tree_flatten(new, none_is_leaf=True)
    if old_spec != new_spec:  # the bindings keep the structure; never reached
        raise RuntimeError("update_and_apply_: a binding changed its state's structure")
    out = []
    for o, n in zip(old_leaves, new_leaves):
        if _dist.is_dtensor(o) and isinstance(n, torch.Tensor) and not _dist.is_dtensor(n):
            n = o if n is _dist.local(o) else _dist.like(n, o)
        out.append(n)
    return optree.tree_unflatten(new_spec, out)


def _on_shards(
    plan: FusedPlan, state: Any, p_leaves: list[Any], g_leaves: list[Any], spec: Any
) -> FusedStep | None:
    """``plan`` on the local shards of the params, gradients and state; its step maps the
    processed gradients to their shards and the new state back to DTensors."""
    found = _dist.local_leaves(p_leaves, g_leaves)
    if found is None:
        return None
    p_local, g_local = found
    try:
        local_state = _local_state(state, spec, p_leaves)
    except _Misfit:
        return None
    step = plan(local_state, p_local, g_local, spec)
    if step is None:
        return None

    def run(grads: list[Any], keep: torch.Tensor | None) -> Any:
        shards = []
        for p, g in zip(p_leaves, grads):
            if g is None or not (_dist.is_dtensor(p) or _dist.is_dtensor(g)):
                shards.append(g)
                continue
            if not (_dist.is_dtensor(p) and _dist.is_dtensor(g)):
                raise TypeError(
                    "update_and_apply_: a DTensor param needs a DTensor update and a plain "
                    f"param a plain one, got {type(p).__name__} and {type(g).__name__}"
                )
            if not _dist.same_layout(g, p):
                # A transformation before the rule changed the layout: back to the param's.
                g = g.redistribute(p.device_mesh, p.placements)
            shards.append(_dist.local(g))
        return _restore(state, step(shards, keep))

    return run
