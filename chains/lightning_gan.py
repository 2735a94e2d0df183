"""Lightning recipe: manual optimization with two ChainedOptimizers (a small GAN on 2-D data).

A generator learns to put points on a ring of radius 2 against a discriminator. Each
network has its own ``ChainedOptimizer`` around ``torch.optim.Adam``, returned from
``configure_optimizers`` as any torch optimizer would be; ``training_step`` is the usual
manual-optimization loop (``zero_grad``, ``manual_backward``, ``step``), and the gradient
processing lives in the chains:

* discriminator: ``chain(skip_if_nonfinite(), clip_by_norm(1.0))``: one update per batch,
  clipped, and a batch with a nan/inf gradient is dropped instead of poisoning Adam;
* generator: ``chain(accumulate_every(2), clip_by_norm(1.0))``: one update per two batches
  on their mean gradient (a larger effective batch for the noisier generator signal).

``self.optimizers()`` hands back Lightning's wrappers; gradchain's extras
(``last_step_applied``, ``step_scheduler``, ``backward``, ``no_sync``) work through them.
The generator's LR follows a cosine schedule stepped with ``step_scheduler``, so it counts
the generator's applied updates, not batches.

Run: ``python chains/lightning_gan.py`` (``--help`` for options; about 10 s on 2 CPU cores).
Prints the losses, the applied update counts and how close generated points are to the ring.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
import warnings

import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import gradchain as gc

RADIUS = 2.0
Z_DIM = 8


def ring(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    angle = torch.rand(n, generator=gen) * 2 * math.pi
    radius = RADIUS + 0.05 * torch.randn(n, generator=gen)
    return torch.stack([radius * angle.cos(), radius * angle.sin()], dim=1)


class GAN(pl.LightningModule):
    def __init__(self, lr: float, generator_every: int, total_generator_steps: int) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.lr = lr
        self.generator_every = generator_every
        self.total_generator_steps = total_generator_steps
        self.generator = nn.Sequential(
            nn.Linear(Z_DIM, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2)
        )
        self.discriminator = nn.Sequential(
            nn.Linear(2, 64), nn.LeakyReLU(0.2), nn.Linear(64, 64), nn.LeakyReLU(0.2),
            nn.Linear(64, 1),
        )
        self.applied = {"generator": 0, "discriminator": 0}

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        g_opt = gc.ChainedOptimizer(
            torch.optim.Adam(self.generator.parameters(), lr=self.lr, betas=(0.5, 0.999)),
            gc.chain(gc.accumulate_every(self.generator_every), gc.clip_by_norm(1.0)),
        )
        d_opt = gc.ChainedOptimizer(
            torch.optim.Adam(self.discriminator.parameters(), lr=self.lr, betas=(0.5, 0.999)),
            gc.chain(gc.skip_if_nonfinite(), gc.clip_by_norm(1.0)),
        )
        g_sched = torch.optim.lr_scheduler.CosineAnnealingLR(
            g_opt, T_max=self.total_generator_steps, eta_min=self.lr / 10
        )
        return [g_opt, d_opt], [g_sched]

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        g_opt, d_opt = self.optimizers()
        g_sched = self.lr_schedulers()
        (real,) = batch
        z = torch.randn(real.shape[0], Z_DIM)
        ones = torch.ones(real.shape[0], 1)
        zeros = torch.zeros(real.shape[0], 1)

        # Discriminator: real -> 1, generated -> 0.
        fake = self.generator(z).detach()
        d_loss = F.binary_cross_entropy_with_logits(
            self.discriminator(real), ones
        ) + F.binary_cross_entropy_with_logits(self.discriminator(fake), zeros)
        d_opt.zero_grad()
        self.manual_backward(d_loss)
        d_opt.step()
        self.applied["discriminator"] += d_opt.last_step_applied

        # Generator: make the discriminator say 1 on generated points.
        g_loss = F.binary_cross_entropy_with_logits(self.discriminator(self.generator(z)), ones)
        g_opt.zero_grad()
        self.manual_backward(g_loss)
        g_opt.step()
        self.applied["generator"] += g_opt.last_step_applied
        g_opt.step_scheduler(g_sched)  # only after an applied generator update

        self.log_dict({"d_loss": d_loss, "g_loss": g_loss}, on_epoch=True, on_step=False)

    def on_train_epoch_end(self) -> None:
        m = self.trainer.callback_metrics
        if (self.current_epoch + 1) % max(1, self.trainer.max_epochs // 5) == 0:
            print(
                f"epoch {self.current_epoch + 1:3d}  d_loss {m['d_loss']:.3f}  "
                f"g_loss {m['g_loss']:.3f}  ring distance {self.ring_distance():.3f}"
            )

    @torch.no_grad()
    def ring_distance(self, n: int = 2000) -> float:
        """Mean |radius - 2| of generated points (0 for a perfect generator)."""
        points = self.generator(torch.randn(n, Z_DIM, generator=torch.Generator().manual_seed(0)))
        return (points.norm(dim=1) - RADIUS).abs().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batches", type=int, default=32, help="batches per epoch")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--generator-every", type=int, default=2,
                        help="batches accumulated per generator update")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.set_num_threads(1)  # tiny networks: threads cost more than they give
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")  # Lightning 2.6 on recent torch
    pl.seed_everything(args.seed, verbose=False)

    data = DataLoader(
        TensorDataset(ring(args.batches * args.batch_size, args.seed)),
        batch_size=args.batch_size,
        shuffle=True,
    )
    generator_steps = args.epochs * math.ceil(args.batches / args.generator_every)
    model = GAN(args.lr, args.generator_every, generator_steps)
    print(f"ring distance before training {model.ring_distance():.3f}")
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=args.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    start = time.perf_counter()
    trainer.fit(model, data)
    elapsed = time.perf_counter() - start

    g_opt = trainer.optimizers[0]
    print(
        f"applied steps: generator {model.applied['generator']}, "
        f"discriminator {model.applied['discriminator']} "
        f"({args.epochs * args.batches} batches)"
    )
    print(f"generator lr {g_opt.param_groups[0]['lr']:.2e} (cosine over applied updates)")
    print(f"time: {elapsed:.1f}s")
    print(f"ring distance after training {model.ring_distance():.3f}")


if __name__ == "__main__":
    main()
