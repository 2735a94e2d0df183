"""Smoke test of ``chains/ddp_torchrun.py``: launched with torchrun on 2 CPU processes.

Runs the documented command (``torchrun --nproc-per-node 2 chains/ddp_torchrun.py``, as
``python -m torch.distributed.run`` on a free local port) in DDP and FSDP2 mode, bounded in
time, and checks what the recipe prints: replicas agree, the model learned, and both modes
trained the same model (they process the same data with the same arithmetic).
"""

from __future__ import annotations

import re
import sys

import pytest
import torch
from _spawn import ROOT, free_port, run_commands

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="needs torch.distributed with gloo",
)
pytest.importorskip("sklearn")

RECIPE = ROOT / "chains" / "ddp_torchrun.py"


def _torchrun(*args: str) -> str:
    argv = [
        sys.executable, "-m", "torch.distributed.run",
        "--nproc-per-node", "2",
        "--master-addr", "127.0.0.1",
        "--master-port", str(free_port()),
        str(RECIPE), "--epochs", "3", *args,
    ]  # fmt: skip
    return run_commands([(argv, {})], timeout=120).check().outputs[0]


@pytest.fixture(scope="module")
def outputs() -> dict[str, str]:
    return {"ddp": _torchrun(), "fsdp": _torchrun("--fsdp")}


def _losses(out: str) -> list[float]:
    return [float(x) for x in re.findall(r"^epoch +\d+ +train loss ([\d.]+)$", out, re.M)]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_recipe_trains(outputs: dict[str, str], mode: str) -> None:
    out = outputs[mode]
    assert f"{'FSDP2' if mode == 'fsdp' else 'DDP'} on 2 processes" in out, out
    assert "replicas agree: True" in out, out
    losses = _losses(out)
    assert len(losses) == 3 and losses[-1] < 0.7 * losses[0], out
    accuracy = float(re.search(r"test accuracy: ([\d.]+)", out).group(1))  # type: ignore[union-attr]
    assert accuracy > 0.7, out
    # 3 epochs of ceil(674 / 16) = 43 micro-batches, windows of 4 flushed at epoch end
    assert "33 updates applied" in out, out


def test_ddp_and_fsdp_agree(outputs: dict[str, str]) -> None:
    assert _losses(outputs["ddp"]) == pytest.approx(_losses(outputs["fsdp"]), abs=2e-4)
