"""Ensemble recipe: train several models at once with ``torch.func.vmap`` over the chain.

The members' parameters are stacked along a new first dimension
(``torch.func.stack_module_state``), and ``vmap`` runs the forward and backward,
``tx.init`` and ``tx.update`` for all of them at once: no Python loop over members. Each member has its own initial weights, its own shuffling of the data and its
own chain state (its own clip norm, Adam moments and skip counter):

    chain(skip_if_nonfinite(), clip_by_norm(1.0), adamw(lr=schedule))

Because ``update`` is pure and its decisions are tensors, a gate decides per member: one
member gets a nan gradient on purpose (``--nan-member``), and only that member skips the
step.

Run: ``python chains/vmap_ensemble.py`` (``--help`` for options); a few seconds on a CPU.
Prints each member's test accuracy, its skip count, and the accuracy of the averaged
prediction.
"""

from __future__ import annotations

import argparse
import copy
import math

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.func import functional_call, grad_and_value, stack_module_state, vmap
from torch.nn import functional as F

import gradchain as gc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument(
        "--nan-member", type=int, default=2, help="member whose gradient gets a nan once (-1: none)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    k = args.members

    torch.set_num_threads(1)  # small matmuls: more threads do not help
    torch.manual_seed(args.seed)
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.25, random_state=args.seed, stratify=y
    )
    x_train, x_test = (torch.tensor(a / 16, dtype=torch.float32) for a in (x_train, x_test))
    y_train, y_test = torch.tensor(y_train), torch.tensor(y_test)

    def make_model() -> torch.nn.Module:
        return torch.nn.Sequential(
            torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)
        )

    models = [make_model() for _ in range(k)]  # k different initializations
    params, _ = stack_module_state(models)  # {"0.weight": [k, 64, 64], ...}
    params = {name: p.detach() for name, p in params.items()}
    skeleton = copy.deepcopy(models[0]).to("meta")  # structure only, for functional_call

    def loss_fn(p, x, y):
        return F.cross_entropy(functional_call(skeleton, p, (x,)), y)

    per_epoch = math.ceil(len(x_train) / args.batch_size)
    tx = gc.chain(
        gc.skip_if_nonfinite(),
        gc.clip_by_norm(1.0),
        gc.adamw(lr=gc.cosine_decay_schedule(args.lr, args.epochs * per_epoch), weight_decay=1e-4),
    )
    state = vmap(tx.init)(params)  # one state per member, stacked
    grads_of_all = vmap(grad_and_value(loss_fn))  # member i: its params, its batch
    update_all = vmap(tx.update)
    predict_all = vmap(lambda p, x: functional_call(skeleton, p, (x,)), in_dims=(0, None))

    nan_step = per_epoch * args.epochs // 2
    step = 0
    for epoch in range(args.epochs):
        # Each member sees the data in its own order: a [k, n] batch of permutations.
        perms = torch.stack([torch.randperm(len(x_train)) for _ in range(k)])
        epoch_loss = torch.zeros(k)
        for i in range(per_epoch):
            idx = perms[:, i * args.batch_size : (i + 1) * args.batch_size]  # [k, batch]
            grads, losses = grads_of_all(params, x_train[idx], y_train[idx])
            if step == nan_step and 0 <= args.nan_member < k:
                grads["2.bias"][args.nan_member, 0] = float("nan")  # one member's bad step
            updates, state = update_all(grads, state, params)
            params = gc.apply_updates(params, updates)  # leafwise: works on stacked trees
            epoch_loss += losses * len(idx[0]) / len(x_train)
            step += 1
        with torch.no_grad():
            acc = (predict_all(params, x_test).argmax(-1) == y_test).float().mean(-1)
        print(
            f"epoch {epoch + 1}: training loss {epoch_loss.min():.4f} .. {epoch_loss.max():.4f}, "
            f"test accuracy {acc.min():.3f} .. {acc.max():.3f} (range over members)"
        )

    with torch.no_grad():
        logits = predict_all(params, x_test)  # [k, n_test, 10]
    member_acc = (logits.argmax(-1) == y_test).float().mean(-1)
    skips = gc.tree_get(state, "total_skips")  # shape [k]: one counter per member
    print(f"{k} members trained at once, {step} steps each")
    for m in range(k):
        print(f"member {m}: test accuracy {member_acc[m]:.4f}, skipped steps {int(skips[m])}")
    ensemble = (logits.softmax(-1).mean(0).argmax(-1) == y_test).float().mean()
    print(f"ensemble (averaged probabilities): test accuracy {ensemble:.4f}")


if __name__ == "__main__":
    main()
