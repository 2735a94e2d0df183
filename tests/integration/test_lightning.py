"""ChainedOptimizer inside a real PyTorch Lightning Trainer (CPU, float64).

* Automatic optimization: the chain's accumulation and clipping, with Lightning's own
  switched off, reach the same weights as Lightning's ``accumulate_grad_batches`` and
  ``gradient_clip_val``; an LR scheduler from ``configure_optimizers`` advances once per
  applied step and raises no warning.
* Manual optimization: a small GAN with two ChainedOptimizers trains.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import gradchain as gc

pl = pytest.importorskip("pytorch_lightning")
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*")  # Lightning 2.6 on torch 2.13

ACCUMULATE = 4
CLIP = 0.5
BATCH = 4
N_BATCHES = 16  # a multiple of ACCUMULATE: no partial window at the end of an epoch
EPOCHS = 2
LR = 0.1
GAMMA = 0.8


@pytest.fixture(autouse=True)
def _float64_and_restore_globals() -> Iterator[None]:
    """float64 for the test; Trainer(deterministic=True) switches torch's deterministic mode
    on globally, so put both back for the tests that run after this one."""
    dtype = torch.get_default_dtype()
    det = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    level = logging.getLogger("pytorch_lightning").level
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(dtype)
        torch.use_deterministic_algorithms(det, warn_only=warn_only)
        logging.getLogger("pytorch_lightning").setLevel(level)


_TRAINER: dict = dict(
    accelerator="cpu",
    devices=1,
    max_epochs=EPOCHS,
    enable_progress_bar=False,
    enable_model_summary=False,
    logger=False,
    enable_checkpointing=False,
    deterministic=True,
)


def trainer(**kwargs: object) -> pl.Trainer:
    return pl.Trainer(**{**_TRAINER, **kwargs})


def regression_data() -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N_BATCHES * BATCH, 5, generator=gen)
    y = (x @ torch.randn(5, 1, generator=gen)).sin() * 4 + 0.1 * torch.randn(
        N_BATCHES * BATCH, 1, generator=gen
    )
    return DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=False)


OPTIMIZERS: dict[str, Callable] = {
    "SGD": lambda params: torch.optim.SGD(params, lr=LR, momentum=0.9),
    "AdamW": lambda params: torch.optim.AdamW(params, lr=LR, weight_decay=0.01),
}


class Regressor(pl.LightningModule):
    """``chained=False``: plain torch optimizer (Lightning accumulates and clips).
    ``chained=True``: ChainedOptimizer(accumulate_every, clip_by_norm); the scheduler is
    stepped through ``step_scheduler`` so that it counts applied steps."""

    def __init__(self, make_opt: Callable, chained: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 1))
        self.make_opt = make_opt
        self.chained = chained
        self.lrs: list[float] = []

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        opt = self.make_opt(self.parameters())
        if self.chained:
            opt = gc.ChainedOptimizer(
                opt, gc.chain(gc.accumulate_every(ACCUMULATE), gc.clip_by_norm(CLIP))
            )
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=GAMMA)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def lr_scheduler_step(self, scheduler, metric) -> None:  # type: ignore[no-untyped-def]
        # Lightning calls this after every batch with interval="step" (it has no
        # accumulation here); the ChainedOptimizer steps the scheduler on applied steps only.
        # self.optimizers() is Lightning's wrapper around the ChainedOptimizer.
        stepped = self.optimizers().step_scheduler(scheduler) if self.chained else scheduler.step()
        if not self.chained or stepped:
            self.lrs.append(scheduler.get_last_lr()[0])


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_automatic_optimization_matches_lightning_accumulation_and_clipping(name: str) -> None:
    ref = Regressor(OPTIMIZERS[name], chained=False)
    with warnings.catch_warnings(record=True) as ref_warns:
        warnings.simplefilter("always")
        trainer(accumulate_grad_batches=ACCUMULATE, gradient_clip_val=CLIP).fit(
            ref, regression_data()
        )

    model = Regressor(OPTIMIZERS[name], chained=True)
    with warnings.catch_warnings(record=True) as warns:
        warnings.simplefilter("always")
        t = trainer()
        t.fit(model, regression_data())

    assert t.accumulate_grad_batches == 1 and t.gradient_clip_val is None
    start = dict(Regressor(OPTIMIZERS[name], chained=False).net.named_parameters())
    for (k, p), (_, r) in zip(model.net.named_parameters(), ref.net.named_parameters()):
        assert p.dtype == torch.float64
        assert not torch.equal(p, start[k])  # it trained
        torch.testing.assert_close(p, r, rtol=0, atol=1e-10)

    # The scheduler advanced once per applied step: 4 windows per epoch, as Lightning's.
    applied_steps = EPOCHS * N_BATCHES // ACCUMULATE
    opt = t.optimizers[0]
    assert isinstance(opt, gc.ChainedOptimizer)
    assert opt.param_groups[0]["lr"] == pytest.approx(LR * GAMMA**applied_steps, rel=1e-12)
    assert t.lr_scheduler_configs[0].scheduler.last_epoch == applied_steps
    assert len(model.lrs) == len(ref.lrs) == applied_steps
    assert model.lrs == pytest.approx(ref.lrs, rel=1e-12)
    for w in list(warns) + list(ref_warns):
        assert "lr_scheduler.step()" not in str(w.message), w


# --------------------------------------------------------------------------- manual: GAN
def ring(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    angle = torch.rand(n, generator=gen) * 2 * torch.pi
    radius = 2 + 0.1 * torch.randn(n, generator=gen)
    return torch.stack([radius * angle.cos(), radius * angle.sin()], dim=1)


class GAN(pl.LightningModule):
    D_EVERY = 2  # the discriminator accumulates two batches per update

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        torch.manual_seed(0)
        self.gen = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 2))
        self.disc = nn.Sequential(nn.Linear(2, 32), nn.LeakyReLU(0.2), nn.Linear(32, 1))
        self.g_losses: list[float] = []
        self.d_losses: list[float] = []
        self.applied = {"gen": 0, "disc": 0}

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        g = gc.ChainedOptimizer(
            torch.optim.Adam(self.gen.parameters(), lr=2e-3, betas=(0.5, 0.999)),
            gc.chain(gc.skip_if_nonfinite(), gc.clip_by_norm(1.0)),
        )
        d = gc.ChainedOptimizer(
            torch.optim.Adam(self.disc.parameters(), lr=2e-3, betas=(0.5, 0.999)),
            gc.chain(gc.accumulate_every(self.D_EVERY), gc.clip_by_norm(1.0)),
        )
        return [g, d]

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        g_opt, d_opt = self.optimizers()
        (real,) = batch
        z = torch.randn(real.shape[0], 2)
        ones = torch.ones(real.shape[0], 1)
        zeros = torch.zeros(real.shape[0], 1)

        fake = self.gen(z).detach()
        d_loss = F.binary_cross_entropy_with_logits(
            self.disc(real), ones
        ) + F.binary_cross_entropy_with_logits(self.disc(fake), zeros)
        d_opt.zero_grad()
        self.manual_backward(d_loss)
        d_opt.step()
        self.applied["disc"] += d_opt.last_step_applied

        g_loss = F.binary_cross_entropy_with_logits(self.disc(self.gen(z)), ones)
        g_opt.zero_grad()
        self.manual_backward(g_loss)
        g_opt.step()
        self.applied["gen"] += g_opt.last_step_applied

        self.d_losses.append(d_loss.item())
        self.g_losses.append(g_loss.item())


def test_manual_optimization_gan_with_two_chained_optimizers() -> None:
    n_batches = 8
    data = DataLoader(TensorDataset(ring(32 * n_batches, seed=1)), batch_size=32, shuffle=False)
    model = GAN()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    t = trainer()
    t.fit(model, data)

    steps = EPOCHS * n_batches
    assert len(model.g_losses) == len(model.d_losses) == steps
    assert all(torch.isfinite(torch.tensor(model.g_losses + model.d_losses)))
    assert model.applied == {"gen": steps, "disc": steps // GAN.D_EVERY}
    g_opt, d_opt = t.optimizers
    assert isinstance(g_opt, gc.ChainedOptimizer) and isinstance(d_opt, gc.ChainedOptimizer)
    # Adam's own step counters agree: the wrapped step ran only on applied steps.
    assert int(next(iter(g_opt.state.values()))["step"]) == steps
    assert int(next(iter(d_opt.state.values()))["step"]) == steps // GAN.D_EVERY
    for k, v in model.state_dict().items():
        assert not torch.equal(v, before[k]), k
        assert torch.isfinite(v).all(), k


# --------------------------------------------------------------------------- checkpoints
class Windowed(Regressor):
    """6 batches per epoch with windows of 4: the epoch-end checkpoint is mid-window."""

    def __init__(self) -> None:
        super().__init__(OPTIMIZERS["AdamW"], chained=True)

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        return gc.ChainedOptimizer(
            self.make_opt(self.parameters()),
            gc.chain(gc.accumulate_every(ACCUMULATE), gc.clip_by_norm(CLIP)),
        )


def test_trainer_checkpoint_mid_window_resumes_identically(tmp_path) -> None:  # type: ignore[no-untyped-def]
    def data() -> DataLoader:
        loader = regression_data()
        x, y = loader.dataset.tensors
        return DataLoader(TensorDataset(x[: 6 * BATCH], y[: 6 * BATCH]), batch_size=BATCH)

    straight = Windowed()
    pl.Trainer(**{**_TRAINER, "max_epochs": 2}).fit(straight, data())

    first = Windowed()
    t1 = pl.Trainer(**{**_TRAINER, "max_epochs": 1})
    t1.fit(first, data())
    assert int(t1.optimizers[0].tx_state[0].mini_step) == 2  # 6 micro-steps: mid-window
    t1.save_checkpoint(tmp_path / "mid.ckpt")
    ckpt = torch.load(tmp_path / "mid.ckpt", weights_only=True)
    assert ckpt["optimizer_states"][0]["gradchain"]["group_sizes"] == [4]

    resumed = Windowed()
    t2 = pl.Trainer(**{**_TRAINER, "max_epochs": 2})
    t2.fit(resumed, data(), ckpt_path=tmp_path / "mid.ckpt")
    for p, r in zip(resumed.parameters(), straight.parameters()):
        assert torch.equal(p, r)
    assert int(t2.optimizers[0].tx_state[0].mini_step) == 0  # 12 micro-steps: 3 windows


# --------------------------------------------------------------------------- LightningOptimizer
def test_methods_called_through_lightning_optimizer_act_on_the_chained_optimizer() -> None:
    """LightningOptimizer re-classes itself as a subclass of the wrapped optimizer's class and
    forwards attribute reads; ChainedOptimizer methods called through it must act on the
    real object (not store copies on the wrapper, not nest the state dict)."""
    from pytorch_lightning.core.optimizer import LightningOptimizer

    w = nn.Parameter(torch.ones(3))
    opt = gc.ChainedOptimizer(
        torch.optim.SGD([w], lr=0.1),
        gc.chain(gc.accumulate_every(2), gc.loss_scale(init_scale=8.0)),
    )
    lopt = LightningOptimizer(opt)
    assert isinstance(lopt, gc.ChainedOptimizer) and lopt.param_groups is opt.param_groups
    lopt.backward(w.sum())  # scaled by the chain's loss scale
    assert torch.equal(w.grad, torch.full((3,), 8.0))
    opt.step()
    assert lopt.last_step_applied is False and lopt.will_apply() is True

    sd = lopt.state_dict()
    assert list(sd["optimizer"]) == ["state", "param_groups"]  # not a nested ChainedOptimizer
    assert sd["gradchain"] == opt.state_dict()["gradchain"]
    lopt.load_state_dict(opt.state_dict())
    extra = nn.Parameter(torch.zeros(2))
    lopt.add_param_group({"params": [extra]})
    assert "tx_state" not in vars(lopt)  # no stale copy on the wrapper
    assert len(opt.tx_state[0].sums) == 2 and len(opt.param_groups) == 2
