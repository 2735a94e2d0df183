"""AMP recipe: float16 mixed precision with dynamic loss scaling, in functional style.

The forward runs under ``torch.autocast(float16)`` (on the CPU too: small sizes keep it
fast), the weights stay float32, and one chain does what ``torch.amp.GradScaler`` plus
``clip_grad_norm_`` do around an optimizer:

    chain(loss_scale(init_scale, growth_interval), clip_by_norm(1.0), adamw(lr=3e-3))

* The gradients are taken of ``gc.scale_loss(loss, state)``, the loss times the current
  scale, so that small float16 gradients do not underflow to zero.
* ``loss_scale`` unscales them (in float32) and checks them: when the scale was too large,
  some float16 intermediate overflowed to inf, the step is skipped (AdamW's moments, its
  step count and the weights stay as they were) and the scale halves. After
  ``growth_interval`` good steps in a row it doubles again, and so on: the scale hovers
  around the largest value at which the float16 gradients still fit.
* ``clip_by_norm`` comes after ``loss_scale``, so it always clips unscaled gradients.

The run starts with a deliberately large scale (2**24) so that the first steps overflow,
and uses a short growth interval so that the scale keeps probing upwards. It prints every
step on which the scale changed, the applied and skipped step counts, and the test accuracy.

Run: ``python chains/amp_loss_scale.py`` (``--help`` for options); a few seconds on a CPU.
"""

from __future__ import annotations

import argparse
import math

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.func import functional_call, grad_and_value
from torch.nn import functional as F

import gradchain as gc


def pow2(x: float) -> str:
    """``2^k`` when ``x`` is a power of two (loss scales are), else ``x``."""
    k = math.log2(x)
    return f"2^{k:.0f}" if k == int(k) else f"{x:g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--init-scale", type=float, default=2.0**24)
    parser.add_argument("--growth-interval", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.set_num_threads(1)  # a model this small gains nothing from more threads
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.25, random_state=args.seed, stratify=y
    )
    x_train, x_test = (
        torch.tensor(a / 16, dtype=torch.float32, device=device) for a in (x_train, x_test)
    )
    y_train, y_test = (torch.tensor(a, device=device) for a in (y_train, y_test))

    model = torch.nn.Sequential(
        torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10)
    ).to(device)
    params = {k: v.detach() for k, v in model.named_parameters()}  # float32 master weights
    tx = gc.chain(
        gc.loss_scale(init_scale=args.init_scale, growth_interval=args.growth_interval),
        gc.clip_by_norm(1.0),
        gc.adamw(lr=3e-3, weight_decay=1e-4),
    )
    state = tx.init(params)

    def scaled_loss(p, x, y, state):
        with torch.autocast(device.type, dtype=torch.float16):
            logits = functional_call(model, p, (x,))  # float16 matmuls
        loss = F.cross_entropy(logits.float(), y)
        return gc.scale_loss(loss, state), loss  # differentiate loss * scale; report loss

    grad_fn = grad_and_value(scaled_loss, has_aux=True)

    # Record per step, read at the end: no host-device sync inside the loop.
    scales, applied, losses = [], [], []
    per_epoch = math.ceil(len(x_train) / args.batch_size)
    for _ in range(args.epochs):
        perm = torch.randperm(len(x_train), device=device)
        for i in range(per_epoch):
            idx = perm[i * args.batch_size : (i + 1) * args.batch_size]
            scales.append(gc.tree_get(state, "scale"))  # the scale this step's loss used
            grads, (_, loss) = grad_fn(params, x_train[idx], y_train[idx], state)
            updates, state = tx.update(grads, state, params)
            params = gc.apply_updates(params, updates)
            applied.append(gc.applied(state))
            losses.append(loss)

    scales_ = torch.stack(scales + [gc.tree_get(state, "scale")]).tolist()
    applied_ = torch.stack(applied).tolist()
    print(
        f"float16 autocast on {device.type}, loss_scale(init_scale={pow2(args.init_scale)}, "
        f"growth_interval={args.growth_interval}) -> clip_by_norm(1.0) -> adamw"
    )
    for step, ok in enumerate(applied_):
        before, after = scales_[step], scales_[step + 1]
        if not ok:
            print(
                f"step {step:4d}  overflow in float16: skipped, scale {pow2(before)} -> {pow2(after)}"
            )
        elif after != before:
            print(
                f"step {step:4d}  {args.growth_interval} good steps in a row: "
                f"scale {pow2(before)} -> {pow2(after)}"
            )
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.float16):
        logits = functional_call(model, params, (x_test,))
    accuracy = (logits.argmax(dim=1) == y_test).float().mean().item()
    n_applied = sum(applied_)
    print(
        f"steps: {len(applied_)}, applied: {n_applied}, skipped (overflow): "
        f"{len(applied_) - n_applied}"
    )
    print(f"final loss scale: {pow2(scales_[-1])}")
    print(f"training loss, last epoch: {torch.stack(losses[-per_epoch:]).mean().item():.4f}")
    print(f"test accuracy: {accuracy:.4f}")


if __name__ == "__main__":
    main()
