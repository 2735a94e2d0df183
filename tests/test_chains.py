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


def test_flagship(tmp_path: Path) -> None:
    png = tmp_path / "curves.png"
    out = run("chains/flagship.py", "--epochs", "2", "--out", str(png))
    assert "2 micro-batches get a nan pixel on purpose" in out
    assert re.search(r"^run\s+test accuracy\s+updates applied\s+skipped\s+loss scale", out, re.M)
    row = r"\s+([\d.]+)%\s+(\d+)\s+(\d+)\s+(\S+)\s+[\d.]+ ms"
    functional = re.search(r"^functional \(chain \+ adamw\)" + row, out, re.M)
    adapter = re.search(r"^adapter \(ChainedOptimizer\)" + row, out, re.M)
    assert functional and adapter, out
    for m in (functional, adapter):
        assert 50.0 < float(m.group(1)) <= 100.0  # test accuracy after 2 epochs
        assert int(m.group(2)) == 2 * 11  # windows of 4 of 43 micro-batches, the last flushed
        assert int(m.group(3)) == 2  # both corrupt micro-batches skipped
    assert functional.group(4) == "-" and float(adapter.group(4)) == 2.0**14  # 2 backoffs
    assert number(r"same weights up to ([\d.e+-]+)", out) < 1e-4
    assert f"loss and accuracy curves: {png}" in out
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_adapter_loop() -> None:
    out = run("chains/adapter_loop.py", "--epochs", "2", "--poison-every", "10")
    micro = number(r"micro-batches: (\d+)", out)
    applied = number(r"applied steps: (\d+)", out)
    skipped = number(r"skipped steps: (\d+)", out)
    assert micro == 2 * 43  # 1347 training digits in micro-batches of 32
    assert skipped > 0 and applied > 0
    assert applied + skipped == 2 * 11  # windows of 4 micro-batches, the last one flushed
    assert number(r"test accuracy: ([\d.]+)", out) > 0.5


def test_amp_loss_scale() -> None:
    out = run("chains/amp_loss_scale.py", "--epochs", "2")
    assert "step    0  overflow in float16: skipped, scale 2^24 -> 2^23" in out
    assert re.search(r"good steps in a row: scale 2\^\d+ -> 2\^\d+", out)  # grew back
    steps = number(r"steps: (\d+)", out)
    applied = number(r"applied: (\d+)", out)
    skipped = number(r"skipped \(overflow\): (\d+)", out)
    assert steps == 2 * 22 and applied + skipped == steps and skipped >= 5
    assert number(r"final loss scale: 2\^(\d+)", out) < 24
    assert number(r"test accuracy: ([\d.]+)", out) > 0.5


def test_mmengine_style() -> None:
    out = run("chains/mmengine_style.py", "--iters", "30")
    assert "7 full windows and a last one of 2" in out
    rows = dict(
        (name.strip(), (int(steps), float(diff)))
        for name, steps, diff in re.findall(
            r"^((?:mmengine|gradchain).+?)\s+(\d+)\s+([\d.e+-]+)$", out, re.M
        )
    )
    assert rows["mmengine OptimWrapper + initialize_count_status"] == (8, 0.0)
    steps, diff = rows["gradchain ChainedOptimizer, flush=True at the end"]
    assert steps == 8 and diff < 1e-6  # flush=True: mmengine's last window, exactly
    assert rows["mmengine OptimWrapper, not initialized"][0] == 7
    steps, diff = rows["gradchain ChainedOptimizer, no flush"]
    assert steps == 7 and diff > 1e-4
    assert "without flush the last 2 micro-batches wait in the chain state" in out


def test_torchft_commit() -> None:
    out = run(
        "chains/torchft_commit.py", "--steps", "40", "--refuse-every", "5", "--nan-steps", "3", "20"
    )
    assert "step   3: nan gradients, skipped by the chain, no vote taken" in out
    assert "commit refused, weights, AdamW state and chain state unchanged: True" in out
    assert "unchanged: False" not in out
    assert "steps: 40, skipped by the chain: 2, votes: 38, committed: 31, refused: 7" in out
    assert "refused steps that changed nothing: 7/7" in out
    assert "committed steps: manager 31, AdamW 31, LR scheduler 31" in out
    assert "skip counter in the chain state: 2" in out


def test_vmap_ensemble() -> None:
    out = run("chains/vmap_ensemble.py", "--members", "3", "--epochs", "1", "--nan-member", "1")
    assert "3 members trained at once, 43 steps each" in out
    skips = [
        int(s) for s in re.findall(r"member \d: test accuracy [\d.]+, skipped steps (\d)", out)
    ]
    assert skips == [0, 1, 0]  # only the member that got the nan skipped its step
    accs = [float(a) for a in re.findall(r"member \d: test accuracy ([\d.]+)", out)]
    assert len(accs) == 3 and min(accs) > 0.5
    assert number(r"ensemble \(averaged probabilities\): test accuracy ([\d.]+)", out) > 0.5


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


def test_adapter_breakdown_benchmark_smoke() -> None:
    out = run("benchmarks/adapter_overhead.py", "--smoke", "--breakdown")
    assert "smoke run" in out
    for row in ("torch A / torch B", "adapter(clip) / torch", "adapter(identity) / bare AdamW"):
        assert re.search(rf"{re.escape(row)}[^\n]*\s\d+\.\d+\n", out), (row, out)


def test_speed_benchmark_smoke() -> None:
    """Every row of the speed table runs (tiny set, one round; no timing claims)."""
    out = run("benchmarks/speed.py", "--smoke")
    assert "smoke run" in out
    for row in ("1 clip_by_norm", "1' clip_by_norm donated", "2 clip+adamw pure",
                "3 clip+adamw donated", "3 clip+adamw fused", "4 ChainedOptimizer",
                "4' ChainedOptimizer", "5 accumulate micro-step", "5' accumulate micro-step",
                "6 loss_scale", "6 loss_scale donated"):
        assert re.search(rf"tiny\s+{re.escape(row)}\s+[\d.]+\s+[\d.]+\s+[\d.]+", out), row
