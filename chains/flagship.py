"""Flagship recipe: train a digits classifier with gradchain, functionally and through torch.optim.

Trains a small MLP on the handwritten digits that scikit-learn ships (no download) twice,
with the same gradient processing, and compares the two runs:

* **functional**: parameters are a plain dict, gradients come from ``torch.func`` and one
  pure chain turns them into updates:

      chain(skip_if_nonfinite(), clip_by_norm(1.0), accumulate_every(4), adamw(lr=schedule))

* **adapter**: an ordinary ``nn.Module`` loop (``backward``, ``step``, ``zero_grad``) with
  ``torch.optim.AdamW`` wrapped in ``ChainedOptimizer``, the same processing in front of it,
  and the same schedule as a ``LambdaLR`` stepped only on applied steps:

      ChainedOptimizer(AdamW(...), chain(loss_scale(), clip_by_norm(1.0), accumulate_every(4)))

  ``loss_scale()`` takes the place of ``skip_if_nonfinite()``: it also drops non-finite
  micro-batches, and shows the loss scale of mixed-precision training (GradScaler's
  defaults; on CPU in float32 scaling by a power of two changes no number).

A couple of micro-batches get a nan pixel on purpose (``--corrupt``): both runs drop them
and carry on. At the end it prints a summary table (test accuracy, updates applied,
micro-batches skipped, final loss scale, time per micro-batch) and writes a PNG of the loss
and accuracy curves (``--out``, default ``runs/flagship.png``).

Run: ``python chains/flagship.py`` (``--help`` for options); a few seconds on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.func import functional_call, grad_and_value
from torch.nn import functional as F
from tqdm import tqdm

import gradchain as gc


class Data(NamedTuple):
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


class Run(NamedTuple):
    name: str
    accuracy: float
    applied: int
    skipped: int
    loss_scale: float | None
    ms_per_step: float
    losses: list[float]  # mean training loss of each epoch (finite micro-batches)
    accuracies: list[float]  # test accuracy after each epoch
    weights: dict[str, torch.Tensor]


def load_data(seed: int) -> Data:
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.25, random_state=seed, stratify=y
    )
    to_x = lambda a: torch.tensor(a, dtype=torch.float32) / 16.0  # noqa: E731
    to_y = lambda a: torch.tensor(a, dtype=torch.long)  # noqa: E731
    return Data(to_x(x_train), to_y(y_train), to_x(x_test), to_y(y_test))


def make_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)  # both runs start from the same weights
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))


def micro_batches(
    data: Data, args: argparse.Namespace, corrupt: set[int]
) -> Iterator[tuple[torch.Tensor, torch.Tensor, bool]]:
    """Yield ``(x, y, end_of_epoch)``: the same sequence for both runs."""
    gen = torch.Generator().manual_seed(args.seed)
    n, per_epoch = len(data.x_train), args.per_epoch
    for epoch in range(args.epochs):
        perm = torch.randperm(n, generator=gen)
        for i in range(per_epoch):
            idx = perm[i * args.batch_size : (i + 1) * args.batch_size]
            x, y = data.x_train[idx], data.y_train[idx]
            if epoch * per_epoch + i in corrupt:
                x = x.clone()
                x[0, 0] = math.nan  # a corrupt sample: every gradient of this batch is nan
            yield x, y, i == per_epoch - 1


def schedule(args: argparse.Namespace) -> gc.schedules.Schedule:
    """Linear warmup over the first 10% of updates, then cosine decay to zero."""
    updates = args.epochs * math.ceil(args.per_epoch / args.accumulate)
    return gc.warmup_cosine_decay_schedule(0.0, args.lr, max(1, updates // 10), updates)


class Log:
    """Bookkeeping shared by both runs: progress bar, epoch losses, test accuracy, step time."""

    def __init__(self, name: str, args: argparse.Namespace) -> None:
        # disable=None: a bar on a terminal, none when the output is piped (CI logs).
        self.bar = tqdm(
            total=args.epochs * args.per_epoch,
            desc=name.rjust(10),
            unit="batch",
            disable=True if args.no_progress else None,
        )
        self.batch_losses: list[torch.Tensor] = []
        self.losses: list[float] = []
        self.accuracies: list[float] = []
        self.seconds = 0.0
        self.steps = 0

    def step(self, loss: torch.Tensor, seconds: float) -> None:
        self.batch_losses.append(loss.detach())  # read once per epoch, not per step
        self.seconds += seconds
        self.steps += 1
        self.bar.update()

    def end_epoch(self, logits: torch.Tensor, y: torch.Tensor) -> None:
        losses = torch.stack(self.batch_losses)
        self.losses.append(losses[torch.isfinite(losses)].mean().item())  # nan batches left out
        self.accuracies.append((logits.argmax(dim=1) == y).float().mean().item())
        self.batch_losses = []
        self.bar.set_postfix_str(f"loss {self.losses[-1]:.3f}, test acc {self.accuracies[-1]:.1%}")

    def done(self, **fields: Any) -> Run:
        self.bar.close()
        return Run(
            accuracy=self.accuracies[-1],
            ms_per_step=1e3 * self.seconds / self.steps,
            losses=self.losses,
            accuracies=self.accuracies,
            **fields,
        )


def train_functional(data: Data, args: argparse.Namespace, corrupt: set[int]) -> Run:
    model = make_model(args.seed)  # only its structure is used: the weights live in `params`
    params = {k: v.detach() for k, v in model.named_parameters()}
    tx = gc.chain(
        gc.skip_if_nonfinite(),  # a nan/inf micro-batch is dropped (counted in total_skips)
        gc.clip_by_norm(1.0),  # each micro-batch's gradient, as clip_grad_norm_
        gc.accumulate_every(args.accumulate),  # pass on the mean of 4 micro-batches
        gc.adamw(lr=schedule(args), weight_decay=1e-4),  # the schedule counts applied updates
    )
    state = tx.init(params)

    def loss_fn(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, p, (x,)), y)

    grad_fn = grad_and_value(loss_fn)  # (params, x, y) -> (grads shaped like params, loss)
    grad_fn(params, data.x_train[:1], data.y_train[:1])  # warm-up: torch.func loads lazily
    applied = torch.zeros((), dtype=torch.long)  # a tensor: counting does not sync
    log = Log("functional", args)
    for x, y, end_of_epoch in micro_batches(data, args, corrupt):
        start = time.perf_counter()
        grads, loss = grad_fn(params, x, y)
        # flush=True closes the epoch's last, short window with the exact mean of its batches.
        updates, state = tx.update(grads, state, params, flush=end_of_epoch)
        params = gc.apply_updates(params, updates)
        applied += gc.applied(state)
        log.step(loss, time.perf_counter() - start)
        if end_of_epoch:
            with torch.no_grad():
                log.end_epoch(functional_call(model, params, (data.x_test,)), data.y_test)
    return log.done(
        name="functional",
        applied=int(applied),
        skipped=int(gc.tree_get(state, "total_skips")),
        loss_scale=None,
        weights=params,
    )


def train_adapter(data: Data, args: argparse.Namespace, corrupt: set[int]) -> Run:
    model = make_model(args.seed)
    opt = gc.ChainedOptimizer(
        torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4),
        gc.chain(
            gc.loss_scale(),  # unscale; drop nan/inf micro-batches and back the scale off
            gc.clip_by_norm(1.0),
            gc.accumulate_every(args.accumulate),
        ),
    )
    lr = schedule(args)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda n: lr(n) / args.lr)
    applied = skipped = torch.zeros((), dtype=torch.long)
    log = Log("adapter", args)
    for x, y, end_of_epoch in micro_batches(data, args, corrupt):
        start = time.perf_counter()
        model.train()
        loss = F.cross_entropy(model(x), y)
        opt.backward(loss)  # backward of loss * the current loss scale
        opt.step(flush=end_of_epoch)  # AdamW steps once per window, on its mean gradient
        opt.zero_grad()
        opt.step_scheduler(sched)  # only if AdamW stepped
        applied = applied + opt.last_step_applied
        skipped = skipped + ~gc.tree_get(opt.tx_state, gc.LossScaleState).is_open
        log.step(loss, time.perf_counter() - start)
        if end_of_epoch:
            model.eval()
            with torch.no_grad():
                log.end_epoch(model(data.x_test), data.y_test)
    return log.done(
        name="adapter",
        applied=int(applied),
        skipped=int(skipped),
        loss_scale=float(gc.tree_get(opt.tx_state, "scale")),
        weights={k: v.detach() for k, v in model.named_parameters()},
    )


def summary(runs: list[Run]) -> str:
    labels = {"functional": "functional (chain + adamw)", "adapter": "adapter (ChainedOptimizer)"}
    lines = [
        f"{'run':<28}{'test accuracy':>14}{'updates applied':>17}{'skipped':>9}"
        f"{'loss scale':>12}{'time/batch':>12}"
    ]
    for r in runs:
        scale = "-" if r.loss_scale is None else f"{r.loss_scale:g}"
        lines.append(
            f"{labels[r.name]:<28}{100 * r.accuracy:>13.1f}%{r.applied:>17d}{r.skipped:>9d}"
            f"{scale:>12}{r.ms_per_step:>9.2f} ms"
        )
    return "\n".join(lines)


def plot(runs: list[Run], corrupt_at: list[float], out: Path) -> None:
    """Loss and test accuracy per epoch; ``corrupt_at``: where the nan batches were (epochs)."""
    import matplotlib

    matplotlib.use("Agg")  # write files only; no display needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, LogLocator, MaxNLocator

    labels = {"functional": "functional chain", "adapter": "ChainedOptimizer(AdamW)"}
    styles = {"functional": dict(marker="o", ls="-", lw=2.5), "adapter": dict(marker="x", ls="--")}
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    for r in runs:
        epochs = range(1, len(r.losses) + 1)
        kw = dict(label=labels[r.name], ms=5, **styles[r.name])
        ax_loss.plot(epochs, r.losses, **kw)
        ax_acc.plot(epochs, [100 * a for a in r.accuracies], **kw)
    for ax in (ax_loss, ax_acc):
        for k, e in enumerate(corrupt_at):
            ax.axvline(
                e,
                color="tab:red",
                lw=1,
                ls=":",
                label="nan micro-batch (skipped)" if k == 0 else None,
            )
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.set_xlabel("epoch")
    ax_loss.set(
        title="training loss (epoch mean)", ylabel="cross-entropy (log scale)", yscale="log"
    )
    ax_loss.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax_loss.yaxis.set_minor_locator(LogLocator(subs=(2.0, 3.0, 5.0)))
    ax_loss.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    ax_acc.axhline(90, color="gray", lw=1, ls="--")
    ax_acc.set(
        title="test accuracy",
        ylabel="accuracy (%)",
        ylim=(min(80, *(100 * a for r in runs for a in r.accuracies)) - 2, 100),
    )
    ax_loss.legend()
    ax_acc.legend(loc="lower right")
    fig.suptitle(
        "gradchain on scikit-learn digits: one chain, used functionally and as an "
        "optimizer (the curves coincide)"
    )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32, help="micro-batch size")
    parser.add_argument("--accumulate", type=int, default=4, help="micro-batches per update")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    parser.add_argument(
        "--corrupt", type=int, default=2, help="micro-batches to corrupt with a nan pixel (0: none)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("runs/flagship.png"),
        help="where to write the curves (PNG)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (a model this small is fastest on one)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    data = load_data(args.seed)
    args.per_epoch = per_epoch = math.ceil(len(data.x_train) / args.batch_size)
    total = args.epochs * per_epoch
    # Evenly spaced through training; the same micro-batches in both runs.
    corrupt = {total * (k + 1) // (args.corrupt + 1) for k in range(args.corrupt)}

    print(
        f"gradchain flagship: an MLP on scikit-learn's digits ({len(data.x_train)} train / "
        f"{len(data.x_test)} test images)\n{args.epochs} epochs x {per_epoch} micro-batches of "
        f"{args.batch_size}, one update per {args.accumulate} micro-batches"
    )
    if corrupt:
        where = ", ".join(
            f"epoch {c // per_epoch + 1} batch {c % per_epoch + 1}" for c in sorted(corrupt)
        )
        print(
            f"{len(corrupt)} micro-batches get a nan pixel on purpose ({where}): both runs "
            "should skip them"
        )
    runs = [train_functional(data, args, corrupt), train_adapter(data, args, corrupt)]
    plot(runs, [(c + 1) / per_epoch for c in sorted(corrupt)], args.out)

    diff = max((w - runs[1].weights[k]).abs().max().item() for k, w in runs[0].weights.items())
    print(f"\nthe two runs end with the same weights up to {diff:.1e} (float32 rounding)")
    print(
        f"updates applied = AdamW steps (one per {args.accumulate} micro-batches, each epoch's "
        "last window flushed)\nskipped = nan micro-batches dropped\n"
    )
    print(summary(runs))
    print(f"loss and accuracy curves: {args.out}")


if __name__ == "__main__":
    main()
