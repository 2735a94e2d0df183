"""Adapter recipe: gradchain in front of torch.optim.AdamW in a plain PyTorch loop.

The loop is the one you already have (forward, backward, ``step``, ``zero_grad``). Loss
scaling, accumulation over micro-batches and clipping move out of it into one chain that
``ChainedOptimizer`` runs on the gradients before AdamW:

    chain(accumulate_every(4), loss_scale(), clip_by_norm(1.0))

* ``accumulate_every(4)``: AdamW steps once per 4 micro-batches, on their mean gradient.
* ``loss_scale()``: ``opt.backward(loss)`` backpropagates the loss times the current scale;
  the chain unscales, and a window with an inf/nan gradient is skipped (AdamW's state and
  the weights are untouched) while the scale backs off, as ``torch.amp.GradScaler`` does.
  Placed after the accumulator, the scale stays constant within a window.
* ``clip_by_norm(1.0)``: clips the unscaled mean gradient, as ``clip_grad_norm_`` would.

The LR scheduler is stepped with ``opt.step_scheduler(sched)``: only on applied steps, so
skipped windows and micro-batches do not advance it. ``--poison-every`` multiplies the loss
of every k-th micro-batch by inf to show skipping. On CUDA the forward runs under
``torch.autocast(float16)`` (disable with ``--no-amp``); on CPU it runs in float32 (the
loss scale then changes nothing numerically, but skipping and backoff work the same).

Run: ``python chains/adapter_loop.py`` (``--help`` for options). Prints the test accuracy
(about 95% with the defaults, in a few seconds on a CPU) and the applied and skipped step counts.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import gradchain as gc


def load_data(seed: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.25, random_state=seed, stratify=y
    )
    return (
        torch.tensor(x_train, dtype=torch.float32, device=device) / 16.0,
        torch.tensor(y_train, dtype=torch.long, device=device),
        torch.tensor(x_test, dtype=torch.float32, device=device) / 16.0,
        torch.tensor(y_test, dtype=torch.long, device=device),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32, help="micro-batch size")
    parser.add_argument("--accumulate", type=int, default=4, help="micro-batches per step")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--poison-every", type=int, default=97,
                        help="multiply every k-th micro-batch loss by inf (0: never)")
    parser.add_argument("--no-amp", action="store_true", help="no float16 autocast on CUDA")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = device.type == "cuda" and not args.no_amp
    x_train, y_train, x_test, y_test = load_data(args.seed, device)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10)
    ).to(device)

    opt = gc.ChainedOptimizer(
        torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4),
        gc.chain(
            gc.accumulate_every(args.accumulate),
            gc.loss_scale(init_scale=2.0**12, growth_interval=50),
            gc.clip_by_norm(1.0),
        ),
    )
    micro_per_epoch = math.ceil(len(x_train) / args.batch_size)
    windows = args.epochs * math.ceil(micro_per_epoch / args.accumulate)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=windows)

    applied = skipped = micro = 0
    start = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(x_train), device=device)
        for i in range(micro_per_epoch):
            idx = perm[i * args.batch_size : (i + 1) * args.batch_size]
            with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                loss = torch.nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
            micro += 1
            if args.poison_every and micro % args.poison_every == 0:
                loss = loss * math.inf  # an overflow, as fp16 training meets now and then
            opt.backward(loss)  # backward of loss * current scale
            # The epoch's last window may be short: flush=True closes it with its exact mean.
            window_closes = opt.will_apply(flush=i == micro_per_epoch - 1)
            opt.step(flush=i == micro_per_epoch - 1)
            opt.zero_grad()
            if opt.step_scheduler(sched):
                applied += 1
            elif window_closes:
                skipped += 1
        model.eval()
        with torch.no_grad():
            train_loss = torch.nn.functional.cross_entropy(model(x_train), y_train).item()
        scale = gc.tree_get(opt.tx_state, "scale").item()
        print(f"epoch {epoch + 1:2d}  train loss {train_loss:.4f}  loss scale {scale:g}")
    elapsed = time.perf_counter() - start

    with torch.no_grad():
        accuracy = (model(x_test).argmax(dim=1) == y_test).float().mean().item()
    print(f"micro-batches: {micro}, applied steps: {applied}, skipped steps: {skipped}")
    print(f"time: {elapsed:.1f}s")
    print(f"test accuracy: {accuracy:.4f}")


if __name__ == "__main__":
    main()
