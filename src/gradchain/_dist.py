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
        groups.setdefault((t.device_mesh, dims), []).append(t.to_local())
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
