"""gradchain._dist: the DTensor path costs plain tensors nothing.

The distributed behaviour itself (2 processes, gloo) is in tests/integration/test_fsdp.py.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import torch

from gradchain import _dist


def test_plain_tensors_are_not_dtensors() -> None:
    assert not _dist.has_dtensor([torch.zeros(2), torch.nn.Parameter(torch.ones(1))])
    assert not _dist.has_dtensor([])


def test_plain_path_never_imports_dtensor() -> None:
    # While torch.distributed.tensor is not imported no DTensor can exist, and the check
    # is a dict lookup: norms and finiteness on plain tensors do not load it.
    code = textwrap.dedent(
        """
        import sys, torch, gradchain as gc
        g = {"w": torch.tensor([3.0, float("nan")]), "b": torch.ones(2)}
        tx = gc.chain(gc.loss_scale(), gc.skip_if_nonfinite(), gc.clip_by_norm(1.0))
        tx.update(g, tx.init(g))
        gc.tree.global_norm(list(g.values()), float("inf"))
        assert "torch.distributed.tensor" not in sys.modules, "DTensor was imported"
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
