"""Smoke tests: every recipe in chains/ and the adapter benchmark run with short arguments
and print what they promise."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, *args: str, timeout: float = 150) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def number(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    assert match, f"no match for {pattern!r} in:\n{text}"
    return float(match.group(1))


def test_flagship() -> None:
    out = run("chains/flagship.py", "--epochs", "2")
    assert 0.0 <= number(r"test accuracy: ([\d.]+)", out) <= 1.0


def test_adapter_loop() -> None:
    out = run("chains/adapter_loop.py", "--epochs", "2", "--poison-every", "10")
    micro = number(r"micro-batches: (\d+)", out)
    applied = number(r"applied steps: (\d+)", out)
    skipped = number(r"skipped steps: (\d+)", out)
    assert micro == 2 * 43  # 1347 training digits in micro-batches of 32
    assert skipped > 0 and applied > 0
    assert applied + skipped == 2 * 11  # windows of 4 micro-batches, the last one flushed
    assert number(r"test accuracy: ([\d.]+)", out) > 0.5


def test_lightning_gan() -> None:
    pytest.importorskip("pytorch_lightning")
    out = run("chains/lightning_gan.py", "--epochs", "2", "--batches", "8")
    assert "applied steps: generator 8, discriminator 16 (16 batches)" in out
    before = number(r"ring distance before training ([\d.]+)", out)
    after = number(r"ring distance after training ([\d.]+)", out)
    assert after != before  # trained (a nan would not parse)


def test_adapter_overhead_benchmark_smoke() -> None:
    out = run("benchmarks/adapter_overhead.py", "--smoke")
    assert "smoke run" in out
    assert re.search(r"smoke 6 x 16\s+[\d.]+\s+[\d.]+\s+[\d.]+", out), out
