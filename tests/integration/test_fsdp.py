"""gradchain on FSDP2 (``fully_shard``) / DTensor gradients: 2 CPU processes, gloo.

All checks run in one spawned job (``_fsdp_worker.py``; starting torch twice is most of
its cost), bounded by a timeout; each test below asserts one check's result on both ranks.
What is checked, against an unsharded single-process float64 reference:

* ``global_norm`` / ``clip_by_norm`` give the true global norm (p = 1, 2, 3, inf) as a
  plain tensor equal on all ranks, also with uneven (empty) local shards, replicated mesh
  dims, partial DTensors, plain tensors mixed in, and nan/inf in one rank's shard;
* a nan/inf in one rank's shard closes ``skip_if_nonfinite`` and ``loss_scale`` on every
  rank; accumulation windows stay aligned;
* the collectives each transformation issues per step (asserted below);
* a full training run, functional and through ``ChainedOptimizer``, matches the
  unsharded one; moments and accumulators are sharded like the params;
* saving with ``torch.distributed.checkpoint`` at step k and resuming is bit-identical.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from _spawn import ROOT, run_ranks

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="needs torch.distributed with gloo",
)

WORKER = Path(__file__).with_name("_fsdp_worker.py")
CHECKS = [
    "norms",
    "norms_other_placements",
    "gates_agree",
    "collective_counts",
    "train_matches_unsharded",
    "shards_match_torch",
    "rules_on_shards",
    "checkpoint_resume",
]

# All-reduces per call on FSDP2 gradients (one mesh, Shard(0)), counted with DTensor's
# CommDebugMode; "#2" is the second call of a stateful transformation / chain.
EXPECTED_COUNTS = {
    "clip_by_norm(p=2) #1": 1,
    "clip_by_norm(p=1) #1": 1,
    "clip_by_norm(p=inf) #1": 1,
    "torch clip_grad_norm_(p=2)": 1,
    "torch clip_grad_norm_(p=1)": 1,
    "torch clip_grad_norm_(p=inf)": 1,
    "torch clip_grad_norm_(p=2, foreach=False)": 1,
    "torch clip_grad_norm_(p=1, foreach=False)": 1,
    "torch clip_grad_norm_(p=inf, foreach=False)": 1,
    # torch returns a DTensor norm; reading it adds one more for inf (Partial(max)).
    "torch clip_grad_norm_(p=2) + full_tensor()": 1,
    "torch clip_grad_norm_(p=1) + full_tensor()": 1,
    "torch clip_grad_norm_(p=inf) + full_tensor()": 2,
    "clip_by_value #1": 0,
    "skip_if_nonfinite #1": 1,
    "loss_scale #1": 1,
    "accumulate_every(2) #1": 0,
    "accumulate_every(2) #2": 0,
    "adamw #1": 0,
    # gates before accumulate run every micro-step; after it, only when the window closes
    "chain(loss_scale, clip_by_norm, accumulate_every(2), adamw) #1": 2,
    "chain(loss_scale, clip_by_norm, accumulate_every(2), adamw) #2": 2,
    "chain(accumulate_every(2), loss_scale, clip_by_norm, adamw) #1": 0,
    "chain(accumulate_every(2), loss_scale, clip_by_norm, adamw) #2": 2,
    "ChainedOptimizer.step #1": 2,
    "ChainedOptimizer.step #2": 2,
}


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("fsdp")
    job = run_ranks(WORKER, [str(tmp), *CHECKS], nprocs=2, timeout=120)
    found: dict[str, list[dict[str, Any]]] = {}
    for out in job.outputs:
        for line in out.splitlines():
            if line.startswith("GC_RESULT "):
                r = json.loads(line[len("GC_RESULT ") :])
                found.setdefault(r["check"], []).append(r)
    return {"job": job, "found": found}


def _result(results: dict[str, Any], name: str) -> Any:
    rs = results["found"].get(name, [])
    if len(rs) != 2 or not all(r["ok"] for r in rs):
        pytest.fail(f"check {name!r} did not pass on both ranks\n{results['job'].report()}")
    return [r["data"] for r in rs]


@pytest.mark.parametrize("name", [c for c in CHECKS if c != "collective_counts"])
def test_check(results: dict[str, Any], name: str) -> None:
    _result(results, name)


def test_collective_counts(results: dict[str, Any]) -> None:
    counts = _result(results, "collective_counts")
    assert counts[0] == counts[1]
    assert counts[0] == EXPECTED_COUNTS


def test_job_clean(results: dict[str, Any]) -> None:
    results["job"].check()


def test_fsdp_speed_benchmark_smoke() -> None:
    """``benchmarks/fsdp_speed.py`` runs (tiny MLP, one round; no timing claims): every row,
    as the two ranks of a gloo job."""
    job = run_ranks(ROOT / "benchmarks" / "fsdp_speed.py", ["--smoke"], timeout=120).check()
    out = job.outputs[0]  # rank 0 prints the table
    assert "smoke run" in out, out
    for row in ("torch clip_grad_norm_ + AdamW(foreach=True)",
                "gradchain update_and_apply_(clip, adamw)",
                "gradchain update(donate) + apply_updates_",
                "torch clip_grad_norm_ + AdamW(fused=True)"):
        assert re.search(rf"{re.escape(row)}\s+[\d.]+\s+[\d.]+", out), (row, out)
