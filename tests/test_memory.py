"""Memory bounds of the built-ins (issue: speed), measured with the torch profiler's CPU
allocation events:

- a pure ``update`` allocates its outputs (new updates and new state) and at most one
  gradient-sized set of temporaries beyond them;
- a donated ``update`` (and ``update_and_apply_``) allocates nothing gradient-sized;
- ``ChainedOptimizer(transactional=False)`` adds no gradient-sized memory over the
  torch-native loop for clipping and loss scaling.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optree
import pytest
import torch

import gradchain as gc

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from speed import peak_extra_bytes  # noqa: E402

# Large enough that 0-dim scalars, norms per leaf and Python objects are noise next to one
# gradient-sized buffer (4 leaves, 1 MiB of float32 in all).
SHAPES = {"a": (256, 512), "b": (512,), "c": (128, 256), "d": (64, 1024)}
SLACK = 64 * 1024  # bytes: scalars, flags, per-leaf norms


def _params() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}


def _grads(scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {k: torch.randn(s, generator=g) * scale for k, s in SHAPES.items()}


GRAD_BYTES = sum(4 * torch.Size(s).numel() for s in SHAPES.values())


def _peak_bytes(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[int, Any]:
    """Peak of (allocated - freed) CPU bytes while ``fn(*args, **kwargs)`` runs, and its
    result; the measure of the benchmark's "peak MB" column (``benchmarks/speed.py``)."""
    box: list[Any] = []
    peak = peak_extra_bytes(lambda: box.append(fn(*args, **kwargs)))
    return peak, box[0]


def _storages(tree: Any) -> set[int]:
    return {
        x.untyped_storage().data_ptr()
        for x in optree.tree_leaves(tree, none_is_leaf=True)
        if isinstance(x, torch.Tensor)
    }


def _new_bytes(out: Any, before: set[int]) -> int:
    """Bytes of the output tensors whose memory did not exist before the call."""
    seen: set[int] = set()
    total = 0
    for x in optree.tree_leaves(out, none_is_leaf=True):
        if not isinstance(x, torch.Tensor):
            continue
        ptr = x.untyped_storage().data_ptr()
        if ptr in before or ptr in seen:
            continue
        seen.add(ptr)
        total += x.untyped_storage().nbytes()
    return total


BUILTINS: dict[str, Callable[[], gc.GradientTransformation]] = {
    "clip_by_norm": lambda: gc.clip_by_norm(1.0),
    "clip_by_value": lambda: gc.clip_by_value(0.5),
    "scale": lambda: gc.scale(0.5),
    "scale_by_learning_rate": lambda: gc.scale_by_learning_rate(gc.linear_schedule(1.0, 0.1, 4)),
    "add_decayed_weights": lambda: gc.add_decayed_weights(0.1),
    "trace": lambda: gc.trace(0.9),
    "scale_by_adam": lambda: gc.scale_by_adam(),
    "sgd": lambda: gc.sgd(0.1, momentum=0.9, weight_decay=0.01, nesterov=True),
    "adam": lambda: gc.adam(1e-3, weight_decay=0.01, amsgrad=True),
    "adamw": lambda: gc.adamw(1e-3),
    "accumulate_every": lambda: gc.accumulate_every(2),
    "skip_if_nonfinite": lambda: gc.skip_if_nonfinite(),
    "loss_scale": lambda: gc.loss_scale(init_scale=4.0),
    "clip+adamw": lambda: gc.chain(gc.clip_by_norm(1.0), gc.adamw(1e-3)),
    "gated chain": lambda: gc.chain(gc.skip_if_nonfinite(), gc.accumulate_every(2),
                                    gc.clip_by_norm(1.0), gc.adamw(1e-3)),
}


@pytest.mark.parametrize("name", list(BUILTINS))
def test_pure_update_allocates_outputs_plus_at_most_one_gradient_set(name: str) -> None:
    tx = BUILTINS[name]()
    params = _params()
    state = tx.init(params)
    for step in range(2):  # an accumulation window: a micro-step, then the closing step
        grads = _grads()
        before = _storages((grads, state, params))
        peak, (updates, new_state) = _peak_bytes(tx.update, grads, state, params)
        outputs = _new_bytes((updates, new_state), before)
        assert peak <= outputs + GRAD_BYTES + SLACK, (
            f"{name} step {step}: peak {peak} B, outputs {outputs} B, "
            f"one gradient set {GRAD_BYTES} B"
        )
        state = new_state


@pytest.mark.parametrize("name", list(BUILTINS))
def test_donated_update_allocates_nothing_gradient_sized(name: str) -> None:
    tx = BUILTINS[name]()
    params = _params()
    state = tx.init(params)
    for step in range(2):
        grads = _grads()
        peak, (_, state) = _peak_bytes(tx.update, grads, state, params, donate=True)
        closing_mean = name in ("accumulate_every", "gated chain") and step == 1
        # The mean a closing window passes on is an output that must outlive the sums.
        bound = GRAD_BYTES + SLACK if closing_mean else SLACK
        assert peak <= bound, f"{name} step {step}: peak {peak} B (bound {bound} B)"


def test_update_and_apply_allocates_nothing_gradient_sized() -> None:
    tx = gc.chain(gc.skip_if_nonfinite(), gc.clip_by_norm(1.0), gc.adamw(1e-3))
    params = _params()
    state = tx.init(params)
    for _ in range(2):
        grads = _grads()
        peak, state = _peak_bytes(gc.update_and_apply_, tx, grads, state, params)
        assert peak <= SLACK, peak


@pytest.mark.parametrize(
    "make",
    [lambda: gc.clip_by_norm(1.0), lambda: gc.chain(gc.loss_scale(init_scale=4.0),
                                                    gc.clip_by_norm(1.0))],
    ids=["clip", "loss_scale+clip"],
)
def test_adapter_fast_path_adds_no_gradient_sized_memory_over_the_torch_loop(make: Any) -> None:
    params = _params()
    ours = [torch.nn.Parameter(p.clone()) for p in params.values()]
    theirs = [torch.nn.Parameter(p.clone()) for p in params.values()]
    adapter = gc.ChainedOptimizer(torch.optim.AdamW(ours, lr=1e-3, fused=True), make(),
                                  transactional=False)
    torch_opt = torch.optim.AdamW(theirs, lr=1e-3, fused=True)

    def ours_step() -> None:
        for p, g in zip(ours, _grads(4.0).values()):
            p.grad = g
        adapter.step()

    def torch_step() -> None:
        for p, g in zip(theirs, _grads(4.0).values()):
            p.grad = g
        torch.nn.utils.clip_grad_norm_(theirs, 1.0, foreach=True)
        torch_opt.step()

    for _ in range(2):  # the optimizer state exists from the first step on
        ours_step()
        torch_step()
    ours_peak, _ = _peak_bytes(ours_step)
    torch_peak, _ = _peak_bytes(torch_step)
    assert ours_peak <= torch_peak + SLACK, (ours_peak, torch_peak)


def test_the_measure_sees_temporaries() -> None:
    """Negative control: a transformation that makes two gradient-sized temporaries
    beyond its output is over the bound the built-ins keep."""

    def update(updates: Any, state: Any, params: Any = None, **extra: Any) -> Any:
        first = {k: v * 2 for k, v in updates.items()}
        second = {k: v + 1 for k, v in first.items()}
        return {k: v - 1 for k, v in second.items()}, state

    grads, before = _grads(), set()
    peak, out = _peak_bytes(update, grads, gc.EmptyState())
    assert peak > _new_bytes(out, before) + GRAD_BYTES + SLACK


# The update rules added after the built-ins above: the pure update's temporaries beyond its
# outputs and new state, in gradient sets. The target is at most one (as for the built-ins);
# the rules listed with more are over it today (measured, not a goal).
RULES: dict[str, tuple[Callable[[], gc.GradientTransformation], float]] = {
    "adagrad": (lambda: gc.adagrad(1e-2), 1),
    "adadelta": (lambda: gc.adadelta(), 1),
    "adamax": (lambda: gc.adamax(), 1),
    "radam": (lambda: gc.radam(), 1),
    "rmsprop": (lambda: gc.rmsprop(centered=True, momentum=0.9), 1),
    "asgd": (lambda: gc.asgd(), 1),
    "adafactor": (lambda: gc.adafactor(), 1),
    "lion": (lambda: gc.lion(), 1),
    "lamb": (lambda: gc.lamb(), 1),
    "lars": (lambda: gc.lars(0.1), 1),
    "schedule_free_sgd": (lambda: gc.schedule_free_sgd(1e-2), 1),
    "nadam": (lambda: gc.nadam(), 2),  # over the target
    "rprop": (lambda: gc.rprop(), 2),  # over the target
    "schedule_free_adamw": (lambda: gc.schedule_free_adamw(1e-3), 3),  # over the target
}


@pytest.mark.parametrize("name", list(RULES))
def test_pure_rule_update_temporaries(name: str) -> None:
    make, sets = RULES[name]
    tx = make()
    params = _params()
    state = tx.init(params)
    for step in range(2):
        grads = _grads()
        before = _storages((grads, state, params))
        peak, (updates, new_state) = _peak_bytes(tx.update, grads, state, params)
        outputs = _new_bytes((updates, new_state), before)
        assert peak <= outputs + sets * GRAD_BYTES + SLACK, (
            f"{name} step {step}: peak {peak} B, outputs {outputs} B, "
            f"bound {sets} gradient set(s) of {GRAD_BYTES} B"
        )
        state = new_state
