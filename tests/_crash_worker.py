"""A small training run that checkpoints every ``k`` steps, for the crash-and-resume tests.

It trains two models side by side, in float64 on deterministic data (batch ``i`` is drawn
from a generator seeded with ``i``), so that an interrupted and resumed run can be compared
bit for bit with an uninterrupted one:

* functional: params in a dict, ``chain(loss_scale, skip_if_nonfinite, accumulate_every(3),
  clip_by_norm, adamw with a schedule)``; every 7th batch has a nan gradient (skipped);
* adapter: ``nn.Linear`` with ``ChainedOptimizer(Adam, chain(accumulate_every(2),
  clip_by_norm))`` and a ``LambdaLR`` scheduler stepped on applied steps only.

Each checkpoint (``gradchain.checkpoint.save``, atomic) holds the step, both models'
parameters, ``gc.to_state_dict`` of the functional state, ``ChainedOptimizer.state_dict()``
and the scheduler's state dict. The process prints ``step <i>`` after each step and
``saving <i>`` / ``saved <i>`` around each checkpoint (flushed), so a test can kill it at
a chosen moment.

Usage: ``python _crash_worker.py DIR --steps N --every K [--resume] [--slow-save-at S]``.
``--slow-save-at S`` makes the save of step ``S`` stop for a minute between writing the
temporary file and renaming it (it prints ``renaming <S>`` first): a window to kill it in.
``train(DIR, ...)`` runs the same thing in-process and returns the final state.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

import gradchain as gc

DT = torch.float64


def _functional_tx() -> gc.GradientTransformation:
    return gc.chain(
        gc.loss_scale(init_scale=2.0**4, growth_interval=3),
        gc.skip_if_nonfinite(),
        gc.accumulate_every(3),
        gc.clip_by_norm(1.0),
        gc.adamw(lr=gc.cosine_decay_schedule(0.05, decay_steps=20), weight_decay=0.01),
    )


def _batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + i)
    return torch.randn(8, 3, generator=gen, dtype=DT), torch.randn(8, 2, generator=gen, dtype=DT)


def _fresh() -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    params = {
        "w": torch.randn(3, 2, generator=gen, dtype=DT),
        "b": torch.zeros(2, dtype=DT),
    }
    tx = _functional_tx()
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2).to(DT)
    opt = gc.ChainedOptimizer(
        torch.optim.Adam(model.parameters(), lr=0.05),
        gc.chain(gc.accumulate_every(2), gc.clip_by_norm(0.5)),
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda n: 1.0 / (1.0 + 0.1 * n))
    return {"params": params, "tx": tx, "state": tx.init(params), "model": model, "opt": opt,
            "sched": sched, "step": 0}


def _snapshot(run: dict[str, Any]) -> dict[str, Any]:
    return {
        "step": run["step"],
        "params": run["params"],
        "state": gc.to_state_dict(run["state"]),
        "model": run["model"].state_dict(),
        "opt": run["opt"].state_dict(),
        "sched": run["sched"].state_dict(),
    }


def _restore(run: dict[str, Any], ckpt: dict[str, Any]) -> None:
    run["step"] = ckpt["step"]
    run["params"] = {k: v.clone() for k, v in ckpt["params"].items()}
    run["state"] = gc.from_state_dict(run["state"], ckpt["state"])
    run["model"].load_state_dict(ckpt["model"])
    run["opt"].load_state_dict(ckpt["opt"])
    run["sched"].load_state_dict(ckpt["sched"])


def _one_step(run: dict[str, Any], i: int) -> None:
    x, y = _batch(i)
    # functional
    params = {k: v.clone().requires_grad_(True) for k, v in run["params"].items()}
    loss = ((x @ params["w"] + params["b"] - y) ** 2).mean()
    scaled = gc.scale_loss(loss, run["state"])
    grads = dict(zip(params, torch.autograd.grad(scaled, list(params.values()))))
    if i % 7 == 6:
        grads["w"] = grads["w"].clone()
        grads["w"][0, 0] = float("nan")
    updates, run["state"] = run["tx"].update(grads, run["state"], run["params"])
    run["params"] = gc.apply_updates(run["params"], updates)
    # adapter
    model, opt = run["model"], run["opt"]
    opt.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    opt.step()
    opt.step_scheduler(run["sched"])
    run["step"] = i + 1


def train(
    directory: str | os.PathLike[str],
    steps: int,
    every: int,
    resume: bool = False,
    slow_save_at: int | None = None,
    log: Any = None,
) -> dict[str, Any]:
    """Run (or resume) the training to ``steps``; returns the final snapshot."""
    torch.set_num_threads(1)
    path = Path(directory) / "ckpt.pt"
    run = _fresh()
    if resume and path.exists():
        _restore(run, gc.checkpoint.load(path))
    say = log or (lambda msg: None)
    for i in range(run["step"], steps):
        _one_step(run, i)
        say(f"step {i}")
        if run["step"] % every == 0:
            say(f"saving {run['step']}")
            if run["step"] == slow_save_at:
                real_replace = os.replace

                def slow_replace(
                    src: Any, dst: Any, _at: int = run["step"], _real: Any = real_replace
                ) -> None:
                    say(f"renaming {_at}")
                    time.sleep(60)
                    _real(src, dst)

                os.replace = slow_replace  # type: ignore[assignment]
                try:
                    gc.checkpoint.save(path, _snapshot(run))
                finally:
                    os.replace = real_replace
            else:
                gc.checkpoint.save(path, _snapshot(run))
            say(f"saved {run['step']}")
    return _snapshot(run)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("directory")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--every", type=int, required=True)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--slow-save-at", type=int, default=None)
    args = parser.parse_args()

    def log(msg: str) -> None:
        print(msg, flush=True)

    final = train(args.directory, args.steps, args.every, args.resume, args.slow_save_at, log)
    gc.checkpoint.save(Path(args.directory) / "final.pt", final)
    log("done")


if __name__ == "__main__":
    sys.exit(main())
