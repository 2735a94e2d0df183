"""Worker for test_fsdp.py: one rank of a 2-process gloo job on CPU.

``python _fsdp_worker.py CHECKDIR name [name ...]`` runs the named checks in order on every
rank (they issue collectives, so all ranks run the same ones). Each check asserts on every
rank and returns JSON-able data; each rank prints one ``GC_RESULT {...}`` line per check.
The first failure prints its traceback and exits non-zero (the other ranks then fail on
their next collective, and the launcher kills them).
"""

from __future__ import annotations

import copy
import datetime
import json
import math
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

import torch

CHECKS: dict[str, Callable[..., Any]] = {}


def check(fn: Callable[..., Any]) -> Callable[..., Any]:
    CHECKS[fn.__name__] = fn
    return fn


# --------------------------------------------------------------------------- helpers
def make_model(seed: int = 0) -> Any:
    """A small float64 MLP; the last layer has 1 output row, so its weight's Shard(0) is
    empty on rank 1 (uneven sharding)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 8),
        torch.nn.Tanh(),
        torch.nn.Linear(8, 5),
        torch.nn.Tanh(),
        torch.nn.Linear(5, 1),
    ).double()


def shard(model: Any, mesh: Any) -> Any:
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if len(list(layer.parameters())):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def batches(steps: int, per_rank: int, world: int, seed: int = 1) -> tuple[Any, Any]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(steps, world * per_rank, 6, generator=g, dtype=torch.float64)
    y = torch.randn(steps, world * per_rank, 1, generator=g, dtype=torch.float64)
    return x, y


def local_slice(t: Any, rank: int, per_rank: int) -> Any:
    return t[rank * per_rank : (rank + 1) * per_rank]


def full(t: Any) -> Any:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def assert_close(a: Any, b: Any, **kw: Any) -> None:
    torch.testing.assert_close(full(a), full(b), **kw)


def gather(obj: Any) -> list[Any]:
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def same_on_all_ranks(t: Any) -> None:
    """``t`` (a plain tensor) is bitwise equal on every rank."""
    values = gather(t.detach().double().reshape(-1).tolist())
    assert all(v == values[0] or (_all_nan(v) and _all_nan(values[0])) for v in values), values


def _all_nan(v: list[float]) -> bool:
    return all(math.isnan(x) for x in v)


def fsdp_grads(mesh: Any, seed: int = 0) -> tuple[Any, Any, Any]:
    """(sharded model, its grads as a dict of DTensors, the unsharded grads) for one batch."""
    ref = make_model(seed)
    model = shard(copy.deepcopy(ref), mesh)
    rank, world = mesh.get_rank(), mesh.size()
    x, y = batches(1, 3, world)
    torch.nn.functional.mse_loss(
        model(local_slice(x[0], rank, 3)), local_slice(y[0], rank, 3)
    ).backward()
    torch.nn.functional.mse_loss(ref(x[0]), y[0]).backward()
    grads = {k: p.grad for k, p in model.named_parameters()}
    ref_grads = {k: p.grad for k, p in ref.named_parameters()}
    return model, grads, ref_grads


# --------------------------------------------------------------------------- checks
@check
def norms(mesh: Any, tmp: str) -> dict[str, Any]:
    """global_norm / clip_by_norm on FSDP2 gradients equal the unsharded reference."""
    from torch.distributed.tensor import DTensor

    import gradchain as gc
    from gradchain._ops import use_foreach as _use_foreach
    from gradchain.tree import global_norm

    model, grads, ref_grads = fsdp_grads(mesh)
    shapes = {k: tuple(g.to_local().shape) for k, g in grads.items()}
    assert all(isinstance(g, DTensor) for g in grads.values())
    # gradchain's foreach fast path is for plain tensors; DTensor maths goes leaf by leaf
    assert not _use_foreach(list(grads.values()))
    assert shapes["4.weight"][0] == (1 if mesh.get_rank() == 0 else 0), shapes  # uneven
    out: dict[str, Any] = {}
    for p in (1.0, 2.0, 3.0, math.inf):
        n = global_norm(list(grads.values()), p)
        assert type(n) is torch.Tensor and n.dim() == 0, type(n)
        same_on_all_ranks(n)
        expected = torch.nn.utils.get_total_norm(list(ref_grads.values()), p)
        assert_close(n, expected, rtol=1e-12, atol=0)

        tx = gc.clip_by_norm(0.05, p)
        clipped, state = tx.update(grads, tx.init(dict(model.named_parameters())))
        assert type(state.norm) is torch.Tensor
        coef = torch.clamp(0.05 / (expected + 1e-6), max=1.0)  # clip_grad_norm_'s
        ref = {k: g * coef for k, g in ref_grads.items()}
        for k in grads:
            assert isinstance(clipped[k], DTensor) and clipped[k].placements == grads[k].placements
            assert_close(clipped[k], ref[k], rtol=1e-12, atol=1e-15)
        out[str(p)] = float(n)
    return out


@check
def norms_other_placements(mesh: Any, tmp: str) -> None:
    """Replicated mesh dims are not double counted, partial leaves are summed first, plain
    tensors mix with DTensors, and a nan in one rank's shard gives nan everywhere."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    from gradchain.tree import global_norm

    rank = mesh.get_rank()
    torch.manual_seed(3)
    a, b, c = torch.randn(4, 3), torch.randn(5), torch.randn(2, 2)
    mesh2 = init_device_mesh("cpu", (2, 1), mesh_dim_names=("rep", "shard"))
    leaves = [
        distribute_tensor(a, mesh2, [Replicate(), Shard(0)]),  # HSDP-like: reduce dim 1 only
        distribute_tensor(b, mesh2, [Shard(0), Replicate()]),
        distribute_tensor(c, mesh, [Replicate()]),  # no reduction needed
        torch.ones(3),  # a plain (replicated) tensor mixed in
    ]
    # A partial DTensor whose value is the sum of the ranks' local parts.
    part = torch.full((3,), float(rank + 1))
    leaves.append(DTensor.from_local(part, mesh, [Partial()], run_check=False))
    total = torch.cat([a.flatten(), b, c.flatten(), torch.ones(3), torch.full((3,), 3.0)])
    for p in (1.0, 2.0, math.inf):
        n = global_norm(leaves, p)
        same_on_all_ranks(n)
        assert_close(n, torch.linalg.vector_norm(total, p), rtol=1e-6, atol=0)
    # nan / inf in rank 1's shard only
    for bad, expect in ((float("nan"), "nan"), (float("inf"), "inf")):
        local = torch.ones(2, 3) if rank == 0 else torch.tensor([[1.0, bad, 1.0], [1.0, 1.0, 1.0]])
        g = DTensor.from_local(local, mesh, [Shard(0)], run_check=False)
        for p in (1.0, 2.0, math.inf):
            n = global_norm([g], p)
            same_on_all_ranks(n)
            assert math.isnan(float(n)) if expect == "nan" else math.isinf(float(n)), (bad, p, n)


@check
def gates_agree(mesh: Any, tmp: str) -> dict[str, Any]:
    """A nan/inf in one rank's shard closes skip_if_nonfinite and loss_scale on every rank;
    accumulation windows stay aligned."""
    from torch.distributed.tensor import DTensor, Shard

    import gradchain as gc

    rank = mesh.get_rank()
    model, grads, _ = fsdp_grads(mesh)
    params = {k: p.detach() for k, p in model.named_parameters()}

    def poisoned(value: float) -> dict[str, Any]:
        out = {}
        for k, g in grads.items():
            local = g.to_local().clone()
            if k == "0.weight" and rank == 1:
                local[0, 0] = value
            out[k] = DTensor.from_local(
                local,
                g.device_mesh,
                g.placements,
                run_check=False,
                shape=g.shape,
                stride=g.stride(),
            )
        return out

    seen: dict[str, Any] = {}
    for bad in (float("nan"), float("inf")):
        bad_grads = poisoned(bad)
        for name, gate in (("skip", gc.skip_if_nonfinite()), ("scale", gc.loss_scale(2.0**4))):
            tx = gc.chain(gate, gc.adamw(1e-2))
            state = tx.init(params)
            _, state = tx.update(grads, state, params)  # one good step
            adam_before = gc.tree_get(state, "mu")
            updates, state = tx.update(bad_grads, state, params)
            open_ = bool(gc.applied(state))
            assert gather(open_) == [False, False], (name, bad)
            for k, u in updates.items():
                assert isinstance(u, DTensor) and not u.to_local().any(), (name, k)
            for k, m in gc.tree_get(state, "mu").items():
                assert torch.equal(m.to_local(), adam_before[k].to_local()), (name, k)
            if name == "skip":
                assert gather(int(gc.tree_get(state, "total_skips"))) == [1, 1]
            else:
                assert gather(float(gc.tree_get(state, "scale"))) == [8.0, 8.0]
            seen[f"{name}:{bad}"] = open_
            # ... and the next finite step opens on every rank again.
            _, state = tx.update(grads, state, params)
            assert gather(bool(gc.applied(state))) == [True, True]

    # Accumulation: windows are counted on the host, identical on all ranks, and the
    # accumulated (sharded) sums give the mean of the micro-steps.
    tx = gc.chain(gc.accumulate_every(3), gc.sgd(lr=1.0))
    state = tx.init(params)
    pattern = []
    for i in range(7):
        scaled = {k: g * float(i + 1) for k, g in grads.items()}
        updates, state = tx.update(scaled, state, params, flush=(i == 6))
        pattern.append(bool(gc.applied(state)))
        if pattern[-1]:  # window means: (1+2+3)/3, (4+5+6)/3, then 7 alone (flush)
            mean = 7.0 if i == 6 else [2.0, 5.0][i // 3]
            for k, g in grads.items():
                assert_close(updates[k], -mean * g, rtol=1e-12, atol=1e-15)
    patterns = gather(pattern)
    assert patterns[0] == patterns[1] == [False, False, True, False, False, True, True], patterns
    sums = gc.tree_get(state, "sums")
    for s in sums.values():
        assert isinstance(s, DTensor) and s.placements == (Shard(0),)
    return {"pattern": pattern, "applied_on_bad_step": seen}


@check
def collective_counts(mesh: Any, tmp: str) -> dict[str, Any]:
    """The all-reduces each transformation issues per step, and torch's clip_grad_norm_."""
    from torch.distributed.tensor.debug import CommDebugMode

    import gradchain as gc

    model, grads, _ = fsdp_grads(mesh)
    params = {k: p.detach() for k, p in model.named_parameters()}
    counts: dict[str, int] = {}

    def count(name: str, fn: Callable[[], Any]) -> Any:
        mode = CommDebugMode()
        with mode:
            out = fn()
        counts[name] = mode.get_total_counts()
        return out

    def steps(name: str, tx: Any, n: int) -> None:
        state = tx.init(params)
        for i in range(n):
            _, state = count(f"{name} #{i + 1}", lambda s=state: tx.update(grads, s, params))

    # torch's clip_grad_norm_ on the same DTensors. Its inf-norm raises on an empty local
    # shard (rank 1's part of the 1-row last layer) on that rank only, leaving the other
    # rank waiting in its all-reduce; so torch gets the evenly sharded leaves here.
    even = [g for g in grads.values() if g.shape[0] >= mesh.size()]  # same list on all ranks

    def torch_clip(p: float, leaves: list[Any] = even, **kw: Any) -> Any:
        live = [torch.nn.Parameter(g.detach().clone()) for g in leaves]
        for q, g in zip(live, leaves):
            q.grad = g.clone()
        return torch.nn.utils.clip_grad_norm_(live, 1.0, p, **kw)

    for p in (2.0, 1.0, math.inf):
        pname = "inf" if math.isinf(p) else str(int(p))
        steps(f"clip_by_norm(p={pname})", gc.clip_by_norm(1.0, p), 1)
        count(f"torch clip_grad_norm_(p={pname})", lambda p=p: torch_clip(p))
        count(
            f"torch clip_grad_norm_(p={pname}, foreach=False)",
            lambda p=p: torch_clip(p, foreach=False),
        )
        # torch returns the norm as a DTensor; reading it (to log it) can add a collective.
        count(
            f"torch clip_grad_norm_(p={pname}) + full_tensor()",
            lambda p=p: torch_clip(p).full_tensor(),
        )
    steps("clip_by_value", gc.clip_by_value(0.1), 1)
    steps("skip_if_nonfinite", gc.skip_if_nonfinite(), 1)
    steps("loss_scale", gc.loss_scale(), 1)
    steps("accumulate_every(2)", gc.accumulate_every(2), 2)
    steps("adamw", gc.adamw(1e-3), 1)
    steps(
        "chain(loss_scale, clip_by_norm, accumulate_every(2), adamw)",
        gc.chain(gc.loss_scale(), gc.clip_by_norm(1.0), gc.accumulate_every(2), gc.adamw(1e-3)),
        2,
    )
    steps(
        "chain(accumulate_every(2), loss_scale, clip_by_norm, adamw)",
        gc.chain(gc.accumulate_every(2), gc.loss_scale(), gc.clip_by_norm(1.0), gc.adamw(1e-3)),
        2,
    )
    # ChainedOptimizer: the chain's reductions; the wrapped torch AdamW adds none.
    opt = gc.ChainedOptimizer(
        torch.optim.AdamW(model.parameters(), lr=1e-3),
        gc.chain(gc.loss_scale(), gc.clip_by_norm(1.0), gc.accumulate_every(2)),
    )
    for i in range(2):
        for q, g in zip(model.parameters(), grads.values()):
            q.grad = g.clone()
        count(f"ChainedOptimizer.step #{i + 1}", opt.step)
    return counts


POISONED_STEP = 2


def _train(
    mesh: Any | None,
    steps: int,
    style: str,
    *,
    start: int = 0,
    model: Any = None,
    state: Any = None,
    opt: Any = None,
) -> tuple[Any, Any, Any]:
    """Train ``steps`` micro-steps from micro-step ``start``; sharded when ``mesh`` is given,
    else the single-process reference on the full batch. Returns (model, state, opt)."""
    import gradchain as gc

    per_rank = 3
    world = 2
    rank = mesh.get_rank() if mesh is not None else 0
    x, y = batches(16, per_rank, world, seed=7)  # the same data whatever start and steps
    if model is None:
        model = make_model(1)
        if mesh is not None:
            model = shard(model, mesh)
    params = dict(model.named_parameters())
    if style in ("functional", "fast"):
        tx = gc.chain(
            gc.loss_scale(2.0**10),
            gc.clip_by_norm(1.0),
            gc.accumulate_every(2),
            gc.adamw(lr=0.05, weight_decay=0.1),
        )
        if state is None:
            state = tx.init({k: p.detach() for k, p in params.items()})
    elif opt is None:
        opt = gc.ChainedOptimizer(
            torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1, foreach=True),
            gc.chain(gc.loss_scale(2.0**10), gc.clip_by_norm(1.0), gc.accumulate_every(2)),
        )
    for s in range(start, start + steps):
        xb, yb = (
            (x[s], y[s])
            if mesh is None
            else (local_slice(x[s], rank, per_rank), local_slice(y[s], rank, per_rank))
        )
        loss = torch.nn.functional.mse_loss(model(xb), yb)
        if s == POISONED_STEP:  # an overflow: loss_scale drops this micro-step everywhere
            loss = loss * float("inf")
        if style in ("functional", "fast"):
            gc.scale_loss(loss, state).backward()
            grads = {k: p.grad for k, p in params.items()}
            if style == "fast":  # update_and_apply_: adamw's fused kernel on the shards
                state = gc.update_and_apply_(tx, grads, state, params)
            else:
                detached = {k: p.detach() for k, p in params.items()}
                updates, state = tx.update(grads, state, detached)
                gc.apply_updates_(params, updates)
            for p in params.values():
                p.grad = None
        else:
            opt.backward(loss)
            opt.step()
            opt.zero_grad()
    return model, state, opt


@check
def train_matches_unsharded(mesh: Any, tmp: str) -> None:
    """A full FSDP2 run (loss_scale, clip, accumulate(2), adamw) equals the unsharded one,
    functional (pure update, and update_and_apply_) and through ChainedOptimizer; moments
    are sharded like the params."""
    from torch.distributed.tensor import DTensor

    import gradchain as gc

    for style in ("functional", "fast", "optimizer"):
        model, state, opt = _train(mesh, 6, style)
        ref, ref_state, ref_opt = _train(None, 6, style)
        for (k, p), (_, r) in zip(model.named_parameters(), ref.named_parameters()):
            assert isinstance(p, DTensor)
            assert not torch.equal(r.detach(), make_model(1).get_parameter(k).detach())
            assert_close(p.detach(), r.detach(), rtol=1e-10, atol=1e-12)
        if style in ("functional", "fast"):
            assert int(gc.tree_get(state, "count")) == 3  # adam ran on 3 windows
            assert float(gc.tree_get(state, "scale")) == 2.0**9  # backed off once
            assert_close(
                gc.tree_get(state, "norm"), gc.tree_get(ref_state, "norm"), rtol=1e-10, atol=0
            )
            params = dict(model.named_parameters())
            for field in ("mu", "nu"):
                for k, m in gc.tree_get(state, field).items():
                    p = params[k]
                    assert isinstance(m, DTensor) and m.placements == p.placements, (field, k)
                    assert m.to_local().shape == p.to_local().shape, (field, k)
                    # no rank holds a full copy of a moment of a sharded (>1 row) param
                    if p.shape[0] > 1:
                        assert m.to_local().shape[0] < m.shape[0], (field, k)
                    assert_close(m, gc.tree_get(ref_state, field)[k], rtol=1e-9, atol=1e-12)
            for k, s in gc.tree_get(state, "sums").items():
                assert isinstance(s, DTensor) and s.placements == params[k].placements
        else:
            assert opt.last_step_applied
            assert float(gc.tree_get(opt.tx_state, "scale")) == 2.0**9
            for p in model.parameters():
                st = opt.state[p]
                assert isinstance(st["exp_avg"], DTensor)


def _step_on(mesh: Any, kind: str, tx: Any = None, steps: int = 4, poison: int = -1) -> Any:
    """Train a sharded copy of ``make_model(2)`` for ``steps`` steps with ``kind``: "torch
    foreach" / "torch fused" (clip_grad_norm_ + AdamW), "new" (``update_and_apply_``) or
    "old" (``tx.update(donate=True)`` + ``apply_updates_``: the leaf-by-leaf DTensor path).
    Returns (model, state or optimizer, all-reduces per step, the moments at init)."""
    from torch.distributed.tensor.debug import CommDebugMode

    import gradchain as gc

    rank, world = mesh.get_rank(), mesh.size()
    x, y = batches(steps, 3, world, seed=5)
    model = shard(make_model(2), mesh)
    live = dict(model.named_parameters())
    if kind.startswith("torch"):
        decay = [p for p in live.values() if p.ndim > 1]
        rest = [p for p in live.values() if p.ndim <= 1]
        groups = [{"params": decay}, {"params": rest, "weight_decay": 0.0 if tx else 0.1}]
        state: Any = torch.optim.AdamW(
            groups, lr=0.05, weight_decay=0.1, **{kind.split()[1]: True}
        )
        first = None
    else:
        state = tx.init(live)
        first = gc.tree_get(state, "mu")
    counts = []
    for s in range(steps):
        loss = torch.nn.functional.mse_loss(
            model(local_slice(x[s], rank, 3)), local_slice(y[s], rank, 3)
        )
        if s == poison:
            loss = loss * float("nan")
        loss.backward()
        grads = {k: p.grad for k, p in live.items()}
        mode = CommDebugMode()
        with mode:
            if kind.startswith("torch"):
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05, foreach=True)
                state.step()
            elif kind == "new":
                state = gc.update_and_apply_(tx, grads, state, live)
            else:
                updates, state = tx.update(grads, state, live, donate=True)
                gc.apply_updates_(live, updates)
        counts.append(mode.get_total_counts())
        model.zero_grad()
    return model, state, counts, first


@check
def shards_match_torch(mesh: Any, tmp: str) -> dict[str, Any]:
    """update_and_apply_ on FSDP2 params runs torch's fused AdamW over the local shards:
    bit for bit clip_grad_norm_ + AdamW(fused=True) on the same sharded model (also with
    a no-decay mask: two param groups), within rounding of AdamW(foreach=True) and of the
    leaf-by-leaf DTensor path; one all-reduce per step; the moments stay the DTensors the
    state was made with (updated in place), laid out as the params. A gate before the rule
    (a nan step) skips the kernel on every rank, as the leaf-by-leaf path does."""
    from torch.distributed.tensor import DTensor

    import gradchain as gc

    out: dict[str, Any] = {}
    for masked in (False, True):
        mask = {k: p.ndim > 1 for k, p in make_model(2).named_parameters()} if masked else None
        tx = gc.chain(gc.clip_by_norm(0.05), gc.adamw(lr=0.05, weight_decay=0.1, mask=mask))
        new, state, counts, first = _step_on(mesh, "new", tx)
        fused, opt, _, _ = _step_on(mesh, "torch fused", masked)
        foreach, _, _, _ = _step_on(mesh, "torch foreach", masked)
        old, _, _, _ = _step_on(mesh, "old", tx)
        assert counts == [1, 1, 1, 1], counts
        mu, nu = gc.tree_get(state, "mu"), gc.tree_get(state, "nu")
        for (k, p), f, e, o in zip(
            new.named_parameters(), fused.parameters(), foreach.parameters(), old.parameters()
        ):
            assert isinstance(p, DTensor) and isinstance(mu[k], DTensor)
            assert mu[k] is first[k] and mu[k].placements == p.placements, k
            assert torch.equal(p.to_local(), f.to_local()), (masked, k)
            assert torch.equal(mu[k].to_local(), opt.state[f]["exp_avg"].to_local()), k
            assert torch.equal(nu[k].to_local(), opt.state[f]["exp_avg_sq"].to_local()), k
            assert_close(p.detach(), e.detach(), rtol=1e-12, atol=1e-15)
            assert_close(p.detach(), o.detach(), rtol=1e-12, atol=1e-15)
        out[f"masked={masked}"] = counts

    # A nan step closes skip_if_nonfinite on every rank: the kernel is skipped (found_inf).
    tx = gc.chain(gc.skip_if_nonfinite(), gc.clip_by_norm(0.05), gc.adamw(0.05))
    new, state, counts, _ = _step_on(mesh, "new", tx, poison=1)
    old, old_state, _, _ = _step_on(mesh, "old", tx, poison=1)
    assert int(gc.tree_get(state, "count")) == int(gc.tree_get(old_state, "count")) == 3
    # The finite flag and the norm; on the nan step the closed gate skips the clip.
    assert counts == [2, 1, 2, 2], counts
    for p, o in zip(new.parameters(), old.parameters()):
        assert_close(p.detach(), o.detach(), rtol=1e-12, atol=1e-15)
    out["gated"] = counts

    # A rule whose binding is not marked elementwise (here inject_hyperparams) takes the
    # generic path of update_and_apply_ on the live DTensor params: the same result.
    tx = gc.chain(
        gc.clip_by_norm(0.05), gc.inject_hyperparams(gc.adamw)(lr=0.05, weight_decay=0.1)
    )
    new, _, _, _ = _step_on(mesh, "new", tx)
    old, _, _, _ = _step_on(mesh, "old", tx)
    for p, o in zip(new.parameters(), old.parameters()):
        assert torch.equal(p.to_local(), o.to_local())
    return out


# (gradchain rule, torch.optim class, kwargs for both, torch's implementation). torch has no
# DTensor support for SGD and Adagrad with fused=True (no sharding strategy for _fused_sgd_ /
# _fused_adagrad_): gradchain's kernels on the shards are compared there with the foreach
# twins, within rounding; the others bit for bit. torch's Rprop runs on no DTensor (foreach:
# no strategy for _foreach_copy_; single tensor: index_put_), so gradchain's rprop on the
# shards is compared with gradchain's leaf-by-leaf DTensor path (None below), within rounding.
ROUNDING_ONLY = {"sgd", "adagrad", "rprop"}
RULES_ON_SHARDS = [
    ("sgd", "SGD", {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.1}, {"foreach": True}),
    ("adagrad", "Adagrad", {"lr": 0.05}, {"foreach": True}),
    ("adam", "Adam", {"lr": 0.05, "amsgrad": True}, {"fused": True}),
    ("nadam", "NAdam", {"lr": 0.05}, {"foreach": True}),
    ("radam", "RAdam", {"lr": 0.05, "weight_decay": 0.1}, {"foreach": True}),
    ("adamax", "Adamax", {"lr": 0.05}, {"foreach": True}),
    ("adadelta", "Adadelta", {"lr": 0.5}, {"foreach": True}),
    ("rmsprop", "RMSprop", {"lr": 0.01, "momentum": 0.9, "centered": True}, {"foreach": True}),
    ("rprop", None, {"lr": 0.01}, {}),
    ("asgd", "ASGD", {"lr": 0.05, "t0": 1.0}, {"foreach": True}),
]


class _Leafwise:
    """gradchain's leaf-by-leaf DTensor path (``tx.update`` + ``apply_updates_`` on detached
    params) with an optimizer's ``step()``."""

    def __init__(self, tx: Any, model: Any) -> None:
        self.tx, self.model = tx, model
        self.params = {k: p.detach() for k, p in model.named_parameters()}
        self.state = tx.init(self.params)

    def step(self) -> None:
        import gradchain as gc

        grads = {k: p.grad for k, p in self.model.named_parameters()}
        updates, self.state = self.tx.update(grads, self.state, self.params)
        gc.apply_updates_(self.params, updates)


@check
def rules_on_shards(mesh: Any, tmp: str) -> list[str]:
    """Every rule marked elementwise runs through update_and_apply_ on the local shards of
    FSDP2 params, equal bit for bit to its torch.optim twin (fused or foreach) on the same
    sharded model over 3 steps; its state stays DTensors laid out as the params."""
    from torch.distributed.tensor import DTensor

    import gradchain as gc

    rank, world = mesh.get_rank(), mesh.size()
    x, y = batches(3, 3, world, seed=9)
    done = []
    for name, cls, kwargs, impl in RULES_ON_SHARDS:
        ours, theirs = shard(make_model(3), mesh), shard(make_model(3), mesh)
        live = dict(ours.named_parameters())
        tx = getattr(gc, name)(**kwargs)
        state = tx.init(live)
        if cls is None:
            opt: Any = _Leafwise(getattr(gc, name)(**kwargs), theirs)
        else:
            opt = getattr(torch.optim, cls)(theirs.parameters(), **kwargs, **impl)
        for s in range(3):
            for model in (ours, theirs):
                torch.nn.functional.mse_loss(
                    model(local_slice(x[s], rank, 3)), local_slice(y[s], rank, 3)
                ).backward()
            state = gc.update_and_apply_(tx, {k: p.grad for k, p in live.items()}, state, live)
            opt.step()
            ours.zero_grad()
            theirs.zero_grad()
        for (k, p), q in zip(ours.named_parameters(), theirs.parameters()):
            if name in ROUNDING_ONLY:
                assert_close(p.detach(), q.detach(), rtol=1e-12, atol=1e-15)
            else:
                assert torch.equal(p.to_local(), q.to_local()), (name, k)
        for leaf in _leaves(state):
            if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
                assert isinstance(leaf, DTensor) and leaf.placements == p.placements, name
        done.append(name)
    return done


@check
def checkpoint_resume(mesh: Any, tmp: str) -> dict[str, Any]:
    """Save model + transformation state with torch.distributed.checkpoint (DCP) after k
    steps, load into fresh objects, continue: bit-identical to the uninterrupted run.
    Functional style, and ChainedOptimizer with DCP's optimizer state-dict helpers."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.tensor import DTensor

    import gradchain as gc

    k, more = 3, 4  # k odd: saved in the middle of an accumulation window
    out: dict[str, Any] = {}
    for style in ("functional", "optimizer"):
        straight, straight_state, straight_opt = _train(mesh, k + more, style)

        model, state, opt = _train(mesh, k, style)
        path = os.path.join(tmp, f"ckpt-{style}")
        if style == "functional":
            assert int(gc.tree_get(state, "mini_step")) == 1
            to_save = {"model": model.state_dict(), "tx": gc.to_state_dict(state)}
        else:
            to_save = {
                "model": model.state_dict(),
                "optim": get_optimizer_state_dict(model, opt.optimizer),
                "tx": gc.to_state_dict(opt.tx_state),
            }
        dcp.save(to_save, checkpoint_id=path)
        del model, state, opt, to_save

        fresh = shard(make_model(99), mesh)  # another init: everything must come from disk
        if style == "functional":
            tx = gc.chain(
                gc.loss_scale(2.0**10),
                gc.clip_by_norm(1.0),
                gc.accumulate_every(2),
                gc.adamw(lr=0.05, weight_decay=0.1),
            )
            template = tx.init({k: p.detach() for k, p in fresh.named_parameters()})
            to_load = {"model": fresh.state_dict(), "tx": gc.to_state_dict(template)}
            dcp.load(to_load, checkpoint_id=path)
            fresh.load_state_dict(to_load["model"])
            state = gc.from_state_dict(template, to_load["tx"])
            resumed, resumed_state, _ = _train(mesh, more, style, start=k, model=fresh, state=state)
        else:
            fresh_opt = gc.ChainedOptimizer(
                torch.optim.AdamW(fresh.parameters(), lr=0.05, weight_decay=0.1, foreach=True),
                gc.chain(gc.loss_scale(2.0**10), gc.clip_by_norm(1.0), gc.accumulate_every(2)),
            )
            to_load = {
                "model": fresh.state_dict(),
                "optim": get_optimizer_state_dict(fresh, fresh_opt.optimizer),
                "tx": gc.to_state_dict(fresh_opt.tx_state),
            }
            dcp.load(to_load, checkpoint_id=path)
            fresh.load_state_dict(to_load["model"])
            set_optimizer_state_dict(fresh, fresh_opt.optimizer, to_load["optim"])
            fresh_opt.tx_state = gc.from_state_dict(fresh_opt.tx_state, to_load["tx"])
            resumed, _, resumed_opt = _train(mesh, more, style, start=k, model=fresh, opt=fresh_opt)
            straight_state, resumed_state = straight_opt.tx_state, resumed_opt.tx_state
            for a, b in zip(straight.parameters(), resumed.parameters()):
                sa, sb = straight_opt.state[a], resumed_opt.state[b]
                for key in ("exp_avg", "exp_avg_sq", "step"):
                    assert torch.equal(full(sa[key]), full(sb[key])), key

        for (name, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
            assert isinstance(b, DTensor) and b.placements == a.placements
            assert torch.equal(a.to_local(), b.to_local()), (style, name)
        a_leaves = _leaves(gc.to_state_dict(straight_state))
        b_leaves = _leaves(gc.to_state_dict(resumed_state))
        assert len(a_leaves) == len(b_leaves)
        for x, y in zip(a_leaves, b_leaves):
            assert type(x) is type(y), (style, type(x), type(y))
            if isinstance(x, DTensor):
                assert x.placements == y.placements and torch.equal(x.to_local(), y.to_local())
            elif isinstance(x, torch.Tensor):
                assert torch.equal(x, y)
            else:
                assert x == y
        out[style] = sorted(os.listdir(path)) if mesh.get_rank() == 0 else []
    return out


def _leaves(tree: Any) -> list[Any]:
    import optree

    return optree.tree_leaves(tree, none_is_leaf=True)


# --------------------------------------------------------------------------- main
def main(argv: list[str]) -> int:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    tmp, names = argv[0], argv[1:]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    code = 0
    try:
        for name in names:
            try:
                data = CHECKS[name](mesh, tmp)
            except Exception:
                print(f"GC_RESULT {json.dumps({'check': name, 'rank': rank, 'ok': False})}")
                print(f"rank {rank}: check {name} failed:\n{traceback.format_exc()}", flush=True)
                code = 1
                break
            print(
                f"GC_RESULT {json.dumps({'check': name, 'rank': rank, 'ok': True, 'data': data})}",
                flush=True,
            )
            dist.barrier()
    finally:
        if code == 0:
            dist.destroy_process_group()
    return code


if __name__ == "__main__":
    # Exit without waiting for gloo threads when a check failed (the peer may be gone).
    rc = main(sys.argv[1:])
    sys.stdout.flush()
    os._exit(rc)
