"""Rank worker for ``test_dcp.py``'s FSDP2 check: DCP's optimizer state-dict helpers given
the ``ChainedOptimizer`` itself, on 2 gloo processes. Reuses ``_fsdp_worker``'s model,
data and training loop (chain: loss_scale, clip_by_norm, accumulate_every(2) before AdamW).

For a checkpoint after k micro-steps (k=1: inside the first window, before any applied
step, so DCP has to initialise AdamW's state; k=3: mid-window later on): save with
``dcp.save({"model", "optim": get_optimizer_state_dict(model, opt)})``, keep training the
saver, and resume a freshly initialised model and adapter in the same processes with
``set_optimizer_state_dict``; both must end bit-identical to a run without checkpoint.
Prints ``GC_RESULT {json}`` lines.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import traceback
from typing import Any

import optree
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from _fsdp_worker import _train, full, make_model, shard
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

import gradchain as gc

TOTAL = 7


def fingerprint(model: Any, opt: Any) -> list[torch.Tensor]:
    out = [full(p.detach()) for p in model.parameters()]
    for p in model.parameters():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            out.append(full(opt.state[p][key]))
    return out


def state_leaves(opt: Any) -> list[Any]:
    return [full(x) if isinstance(x, torch.Tensor) else x
            for x in optree.tree_leaves(gc.to_state_dict(opt.tx_state), none_is_leaf=True)]


def run(mesh: Any, tmp: str, k: int) -> dict[str, Any]:
    straight, _, straight_opt = _train(mesh, TOTAL, "optimizer")
    expected = (fingerprint(straight, straight_opt), state_leaves(straight_opt))

    model, _, opt = _train(mesh, k, "optimizer")
    window = int(gc.tree_get(opt.tx_state, "mini_step"))
    had_state = bool(opt.optimizer.state)
    path = os.path.join(tmp, f"ckpt-{k}")
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
             checkpoint_id=path)
    assert int(gc.tree_get(opt.tx_state, "mini_step")) == window  # DCP left the window alone
    model, _, opt = _train(mesh, TOTAL - k, "optimizer", start=k, model=model, opt=opt)
    saver = (fingerprint(model, opt), state_leaves(opt))

    fresh = shard(make_model(99), mesh)  # another init: everything must come from disk
    fresh_opt = gc.ChainedOptimizer(
        torch.optim.AdamW(fresh.parameters(), lr=0.05, weight_decay=0.1, foreach=True),
        gc.chain(gc.loss_scale(2.0**10), gc.clip_by_norm(1.0), gc.accumulate_every(2)),
    )
    to_load = {"model": get_model_state_dict(fresh),
               "optim": get_optimizer_state_dict(fresh, fresh_opt)}
    dcp.load(to_load, checkpoint_id=path)
    set_model_state_dict(fresh, to_load["model"])
    set_optimizer_state_dict(fresh, fresh_opt, to_load["optim"])
    assert int(gc.tree_get(fresh_opt.tx_state, "mini_step")) == window
    sums = gc.tree_get(fresh_opt.tx_state, "sums")
    sharded = [s for s in optree.tree_leaves(sums) if isinstance(s, DTensor)]
    assert sharded, "the accumulator is not sharded"
    fresh, _, fresh_opt = _train(mesh, TOTAL - k, "optimizer", start=k, model=fresh,
                                 opt=fresh_opt)
    resumed = (fingerprint(fresh, fresh_opt), state_leaves(fresh_opt))
    for name, got in (("saver", saver), ("resumed", resumed)):
        for a, b in zip(expected[0], got[0]):
            assert torch.equal(a, b), name
        assert len(expected[1]) == len(got[1])
        for a, b in zip(expected[1], got[1]):
            assert (torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b), name
    return {"k": k, "window": window, "had_state": had_state}


def main(argv: list[str]) -> int:
    tmp = argv[0]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    code = 0
    for k in (1, 3):
        try:
            data = run(mesh, tmp, k)
            print(f"GC_RESULT {json.dumps({'rank': rank, 'ok': True, 'data': data})}", flush=True)
        except Exception:
            print(f"GC_RESULT {json.dumps({'rank': rank, 'ok': False, 'k': k})}")
            print(f"rank {rank}: k={k} failed:\n{traceback.format_exc()}", flush=True)
            code = 1
            break
        dist.barrier()
    return code


if __name__ == "__main__":
    rc = main(sys.argv[1:])
    sys.stdout.flush()
    os._exit(rc)  # without waiting for gloo's threads (see chains/ddp_torchrun.py)
