"""DTensor support: reductions over sharded leaves, through DTensor's own collectives.

Elementwise maths runs on DTensors unchanged (DTensor dispatches it shard by shard), but
a *global* quantity (the norm of all gradients, whether all are finite) needs every rank's
shards. Here such a quantity is computed on each rank's local shards with plain tensor
kernels and then reduced once per group of leaves that share a mesh and a sharding
pattern, by ``DTensor.from_local(part, mesh, [Partial(op), ...]).full_tensor()``: the
all-reduce torch.distributed itself issues for a partial DTensor. The result is a plain
tensor, equal on every rank, usable in arithmetic with the local shards and storable in a
transformation state.

Every rank must run the same reductions in the same order, so grouping depends only on
the leaves' meshes and placements (the same on all ranks), never on local data or shapes.

Plain tensors never reach this module: :func:`has_dtensor` answers ``False`` without a loop
while ``torch.distributed.tensor`` has not been imported (no DTensor can exist then).

*Local views.* An elementwise kernel (torch's fused AdamW, ...) gives on each rank's local
shards exactly what it gives on the DTensors (DTensor runs it shard by shard), as long as
the tensors it combines are laid out alike (:func:`same_layout`). :func:`local_leaves`
maps params and gradients to their local shards (``t._local_tensor``: free, where
``to_local()`` is an autograd function costing microseconds per leaf) so that such kernels
run over all of them at once, without DTensor's dispatch per op and per leaf.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch

Group = tuple[Any, tuple[int, ...], list[torch.Tensor]]  # (mesh, reduced mesh dims, locals)


def has_dtensor(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether any of ``tensors`` is a DTensor (free when DTensor was never imported)."""
    module = sys.modules.get("torch.distributed.tensor")
    if module is None:
        return False
    dtensor = module.DTensor
    return any(issubclass(kind, dtensor) for kind in {type(t) for t in tensors})


def local_parts(
    tensors: Sequence[torch.Tensor], *, exact: bool
) -> tuple[list[torch.Tensor], list[Group]]:
    """Split ``tensors`` into plain ones and groups of DTensor local shards.

    A group holds the local shards of the DTensors on one mesh that are sharded (or
    partial) on the same mesh dims; a quantity over the group is its local value reduced
    over those dims. Replicated mesh dims are not reduced (every rank there holds the
    same values). With ``exact=True`` partial placements are first made replicated (one
    collective per such leaf; FSDP2 gradients are never partial), because a norm of a
    partial sum is not the sum of the local norms; ``exact=False`` keeps them (a
    non-finite partial value makes the sum non-finite).
    """
    # Only reached when has_dtensor said yes, so torch.distributed.tensor is imported.
    dt = sys.modules["torch.distributed.tensor"]
    DTensor, Replicate = dt.DTensor, dt.Replicate
    plain: list[torch.Tensor] = []
    groups: dict[tuple[Any, tuple[int, ...]], list[torch.Tensor]] = {}
    for t in tensors:
        if not isinstance(t, DTensor):
            plain.append(t)
            continue
        placements = tuple(t.placements)
        if exact and any(p.is_partial() for p in placements):
            placements = tuple(Replicate() if p.is_partial() else p for p in placements)
            t = t.redistribute(t.device_mesh, placements)
        dims = tuple(i for i, p in enumerate(placements) if not p.is_replicate())
        # The shard itself when no gradient flows (to_local is an autograd function).
        shard = t.to_local() if torch.is_grad_enabled() and t.requires_grad else local(t)
        groups.setdefault((t.device_mesh, dims), []).append(shard)
    return plain, [(mesh, dims, locs) for (mesh, dims), locs in groups.items()]


def all_reduce(value: torch.Tensor, mesh: Any, dims: tuple[int, ...], op: str) -> torch.Tensor:
    """``value`` (this rank's part, a small plain tensor) reduced with ``op`` (``"sum"``,
    ``"max"``, ``"min"``) over the mesh dims ``dims``: one all-reduce per dim, issued by
    DTensor. Returns a plain tensor, the same on every rank of the group."""
    if not dims:
        return value
    dt = sys.modules["torch.distributed.tensor"]
    DTensor, Partial, Replicate = dt.DTensor, dt.Partial, dt.Replicate
    placements = [Partial(op) if i in dims else Replicate() for i in range(mesh.ndim)]
    out = DTensor.from_local(value, mesh, placements, run_check=False).full_tensor()
    # full_tensor may hand back a wrapper that waits lazily; give callers a plain tensor.
    return out if type(out) is torch.Tensor else out.clone().as_subclass(torch.Tensor)


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a DTensor (``False`` while DTensor was never imported)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def same_layout(a: Any, b: Any) -> bool:
    """Whether DTensors ``a`` and ``b`` have the same global shape, mesh and placements, none
    partial: then their local shards line up element for element on every rank."""
    if not (is_dtensor(a) and is_dtensor(b)):
        return False
    sa, sb = a._spec, b._spec  # (the public properties cost microseconds each)
    if sa is not sb and not (
        sa.mesh == sb.mesh and sa.placements == sb.placements
        and sa.shard_order == sb.shard_order and a.shape == b.shape
    ):
        return False
    return not any(p.is_partial() for p in sa.placements)


def local(t: Any) -> torch.Tensor:
    """The local shard of DTensor ``t``, a plain tensor sharing its memory."""
    return t._local_tensor  # type: ignore[no-any-return]


def like(shard: torch.Tensor, ref: Any) -> Any:
    """The DTensor laid out as DTensor ``ref`` whose local shard is ``shard``."""
    dt = sys.modules["torch.distributed.tensor"]
    return dt.DTensor.from_local(
        shard, ref.device_mesh, ref.placements, run_check=False, shape=ref.shape,
        stride=ref.stride(),
    )


def local_leaves(
    p_leaves: Sequence[Any], g_leaves: Sequence[Any]
) -> tuple[list[Any], list[Any]] | None:
    """The local shards of params and gradients (aligned lists, ``None`` kept), when every
    gradient of a DTensor param is a DTensor laid out alike (:func:`same_layout`) and no
    plain param has a DTensor gradient; ``None`` otherwise."""
    ps: list[Any] = []
    gs: list[Any] = []
    for p, g in zip(p_leaves, g_leaves):
        if is_dtensor(p):
            if g is not None and not same_layout(p, g):
                return None
            if g is None and any(q.is_partial() for q in p.placements):
                return None
            ps.append(local(p))
            gs.append(None if g is None else local(g))
        elif is_dtensor(g):
            return None
        else:
            ps.append(p)
            gs.append(g)
    return ps, gs


def inplace_shards(
    xs: Sequence[torch.Tensor], *others: Sequence[torch.Tensor]
) -> tuple[list[torch.Tensor], ...] | None:
    """The local shards of ``xs`` and ``others`` for an elementwise in-place kernel on
    ``xs`` (``torch._foreach_mul_(xs, ys)`` on the shards updates the DTensors ``xs``): when
    every ``x`` is a DTensor (no partial placement, no autograd) and every entry of
    ``others`` is a DTensor laid out as its ``x`` or a plain 0-dim tensor (a scalar, the
    same on every rank); ``None`` otherwise."""
    module = sys.modules.get("torch.distributed.tensor")
    if module is None or not xs:
        return None
    dtensor = module.DTensor
    grad = torch.is_grad_enabled()
    out_x = []
    for x in xs:
        if type(x) is not dtensor or (grad and x.requires_grad):
            return None
        if any(p.is_partial() for p in x._spec.placements):  # type: ignore[attr-defined]
            return None
        out_x.append(local(x))
    out: list[list[torch.Tensor]] = [out_x]
    for ys in others:
        if len(ys) != len(xs):
            return None
        shards = []
        for x, y in zip(xs, ys):
            if type(y) is dtensor and same_layout(x, y):
                shards.append(local(y))
            elif type(y) is torch.Tensor and y.dim() == 0 and not (grad and y.requires_grad):
                shards.append(y)
            else:
                return None
        out.append(shards)
    return tuple(out)
