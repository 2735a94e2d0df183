"""Lightning automatic optimization with ``ChainedOptimization`` (issue 13, item 3), in a
real ``Trainer`` (CPU, float64) against Lightning's native ``accumulate_grad_batches`` +
``gradient_clip_val`` on the same model and data: the same weights (1e-10), the same
learning rates step by step, ``global_step``, ``max_steps`` and
``estimated_stepping_batches`` counting applied updates, and clear errors for the
combinations that would accumulate or clip twice.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import gradchain as gc

pl = pytest.importorskip("pytorch_lightning")
from gradchain.integrations.lightning import ChainedOptimization  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*")  # Lightning 2.6 on torch 2.13

ACCUMULATE = 4
CLIP = 0.5
BATCH = 4
LR = 0.1
GAMMA = 0.8


@pytest.fixture(autouse=True)
def _float64_and_restore_globals() -> Iterator[None]:
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


def trainer(**kwargs: Any) -> Any:
    base: dict[str, Any] = dict(
        accelerator="cpu", devices=1, max_epochs=2, enable_progress_bar=False,
        enable_model_summary=False, logger=False, enable_checkpointing=False,
        deterministic=True,
    )
    return pl.Trainer(**{**base, **kwargs})


def data(batches: int) -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batches * BATCH, 5, generator=gen)
    y = (x @ torch.randn(5, 1, generator=gen)).sin() * 4
    return DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=False)


class Regressor(pl.LightningModule):
    """``chain=None``: the plain optimizer (Lightning accumulates and clips); otherwise a
    ChainedOptimizer with that chain. The scheduler is Lightning's plain ``interval="step"``
    one in both: no hook overridden."""

    def __init__(self, chain: gc.GradientTransformation | None, opt: str = "AdamW") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 1))
        self.chain = chain
        self.opt = opt
        self.lrs: list[float] = []
        self.steps_seen: list[int] = []
        self.applied: list[bool] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        self.steps_seen.append(self.trainer.global_step)
        return F.mse_loss(self.net(x), y)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        opt = self.trainer.optimizers[0]
        self.lrs.append(opt.param_groups[0]["lr"])
        if self.chain is not None:
            self.applied.append(opt.last_step_applied)

    def configure_optimizers(self) -> Any:
        if self.opt == "AdamW":
            opt: torch.optim.Optimizer = torch.optim.AdamW(self.parameters(), lr=LR,
                                                           weight_decay=0.01)
        else:
            opt = torch.optim.SGD(self.parameters(), lr=LR, momentum=0.9)
        if self.chain is not None:
            opt = gc.ChainedOptimizer(opt, self.chain)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=GAMMA)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def window_chain() -> gc.GradientTransformation:
    return gc.chain(gc.accumulate_every(ACCUMULATE), gc.clip_by_norm(CLIP))


def fit_pair(batches: int, opt: str = "AdamW", **kw: Any) -> tuple[Any, Any, Any, Any]:
    ref = Regressor(None, opt)
    ref_trainer = trainer(accumulate_grad_batches=ACCUMULATE, gradient_clip_val=CLIP, **kw)
    ref_trainer.fit(ref, data(batches))
    ours = Regressor(window_chain(), opt)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        our_trainer = trainer(callbacks=[ChainedOptimization()], **kw)
        our_trainer.fit(ours, data(batches))
    for w in caught:
        assert "lr_scheduler.step()" not in str(w.message), w
    return ref, ref_trainer, ours, our_trainer


@pytest.mark.parametrize("opt", ["AdamW", "SGD"])
def test_matches_lightning_native_accumulation_and_clipping(opt: str) -> None:
    batches = 16  # whole windows: Lightning's sum/n equals the chain's mean
    ref, ref_trainer, ours, our_trainer = fit_pair(batches, opt)
    start = dict(Regressor(None).net.named_parameters())
    for (k, p), (_, r) in zip(ours.net.named_parameters(), ref.net.named_parameters()):
        assert p.dtype == torch.float64
        assert not torch.equal(p, start[k])  # it trained
        torch.testing.assert_close(p, r, rtol=0, atol=1e-10)
    applied = 2 * batches // ACCUMULATE
    assert our_trainer.global_step == ref_trainer.global_step == applied
    assert sum(ours.applied) == applied
    assert our_trainer.estimated_stepping_batches == ref_trainer.estimated_stepping_batches
    assert our_trainer.estimated_stepping_batches == applied
    # The scheduler stepped once per applied update, at the same batches as Lightning's.
    assert ours.lrs == pytest.approx(ref.lrs, rel=1e-12)
    assert ours.steps_seen == ref.steps_seen
    sched = our_trainer.lr_scheduler_configs[0].scheduler
    assert sched.last_epoch == applied
    assert our_trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(LR * GAMMA**applied)


def test_max_steps_counts_applied_updates() -> None:
    ref, ref_trainer, ours, our_trainer = fit_pair(16, max_steps=3)
    assert our_trainer.global_step == ref_trainer.global_step == 3
    assert len(ours.steps_seen) == len(ref.steps_seen) == 3 * ACCUMULATE
    for p, r in zip(ours.net.parameters(), ref.net.parameters()):
        torch.testing.assert_close(p, r, rtol=0, atol=1e-10)


def test_a_partial_last_window_is_stepped_and_counted_as_lightning_does() -> None:
    batches = 17  # 4 whole windows and a window of 1 per epoch
    ref, ref_trainer, ours, our_trainer = fit_pair(batches)
    assert our_trainer.global_step == ref_trainer.global_step == 2 * 5
    # the adapter applied exactly at the batches Lightning counted as steps
    epoch = [False, False, False, True] * 4 + [True]
    assert ours.applied == epoch * 2
    assert ours.steps_seen == ref.steps_seen
    assert ours.lrs == pytest.approx(ref.lrs, rel=1e-12)
    # Lightning divides a partial window's sum by the window length, the chain takes the
    # exact mean of what it holds: the weights differ after the first partial window only.
    opt = our_trainer.optimizers[0]
    assert int(gc.tree_get(opt.tx_state, "mini_step")) == 0  # flushed at the epoch's end


def test_without_the_callback_lightning_counts_micro_batches() -> None:
    """Negative control: what the callback fixes."""
    model = Regressor(window_chain())
    t = trainer()
    t.fit(model, data(16))
    assert t.global_step == 2 * 16  # one "step" per micro-batch
    assert t.lr_scheduler_configs[0].scheduler.last_epoch == 2 * 16


@pytest.mark.parametrize(
    "kwargs, chain, match",
    [
        ({"accumulate_grad_batches": 4}, window_chain,
         r"Trainer\(accumulate_grad_batches=4\) and the ChainedOptimizer's accumulate_every\(4\)"),
        ({"gradient_clip_val": 1.0}, lambda: gc.clip_by_norm(1.0),
         r"Trainer\(gradient_clip_val=1.0\) and the ChainedOptimizer's clip_by_norm"),
        ({"gradient_clip_val": 1.0}, lambda: gc.accumulate_every(2),
         r"Trainer\(gradient_clip_val=1.0\) with the ChainedOptimizer's accumulate_every\(2\)"),
    ],
    ids=["accumulate-twice", "clip-twice", "clip-per-micro-batch"],
)
def test_doing_the_work_twice_is_refused_naming_both(kwargs: dict, chain: Any, match: str) -> None:
    model = Regressor(chain())
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=match):
        trainer(callbacks=[ChainedOptimization()], **kwargs).fit(model, data(8))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_a_plain_optimizer_is_refused() -> None:
    with pytest.raises(TypeError, match="must return a gradchain.ChainedOptimizer, got AdamW"):
        trainer(callbacks=[ChainedOptimization()]).fit(Regressor(None), data(8))


def test_a_chain_with_loss_scale_works_in_automatic_optimization() -> None:
    """The callback scales the back-propagated loss by the chain's loss scale (a power of
    two: exact), so chain(loss_scale, accumulate, clip) equals Lightning's native
    accumulation and clipping without scaling; the logged loss is unscaled."""
    chain = gc.chain(gc.loss_scale(init_scale=2.0**10, growth_interval=3),
                     gc.accumulate_every(ACCUMULATE), gc.clip_by_norm(CLIP))
    ours = Regressor(chain)
    losses: list[float] = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any,
                               batch_idx: int) -> None:
            losses.append(float(outputs["loss"]))

    t = trainer(callbacks=[ChainedOptimization(), Record()])
    t.fit(ours, data(16))
    ref = Regressor(None)
    trainer(accumulate_grad_batches=ACCUMULATE, gradient_clip_val=CLIP).fit(ref, data(16))
    for p, r in zip(ours.net.parameters(), ref.net.parameters()):
        torch.testing.assert_close(p, r, rtol=0, atol=1e-10)
    scale = float(gc.tree_get(t.optimizers[0].tx_state, "scale"))
    assert scale > 2.0**10  # it grew: every step was finite, so the scaled loss was used
    assert max(losses) < 100  # logged unscaled


# --------------------------------------------------------------------------- resume
class ResumableLoader(DataLoader):
    """A DataLoader Lightning can resume mid-epoch (its ``_Stateful`` protocol:
    ``state_dict`` / ``load_state_dict``, saved in the checkpoint's loop state): it counts
    the batches yielded in the current pass and, once loaded, skips that many. A plain
    DataLoader restarts the epoch from its first batch on resume (Lightning warns)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.yielded = 0
        self.skip = 0

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        skip, self.skip = self.skip, 0
        self.yielded = skip
        for i, batch in enumerate(super().__iter__()):
            if i >= skip:
                self.yielded += 1
                yield batch

    def state_dict(self) -> dict[str, int]:
        return {"yielded": self.yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.skip = state["yielded"]


class _Stop(Exception):
    pass


class SaveAndStop(pl.Callback):
    """Save a checkpoint at the end of global batch ``at`` (mid-window), then stop the run
    as a crash would."""

    def __init__(self, at: int, path: str) -> None:
        self.at, self.path, self.window = at, path, -1

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.current_epoch * trainer.num_training_batches + batch_idx == self.at:
            opt = trainer.optimizers[0]
            held = getattr(opt, "tx_state", None)  # native: Lightning's own window
            self.window = (int(gc.tree_get(held, "mini_step")) if held is not None
                           else (batch_idx + 1) % ACCUMULATE)
            trainer.save_checkpoint(self.path)
            raise _Stop


def loader(batches: int, resumable: bool) -> DataLoader:
    plain = data(batches)
    if not resumable:
        return plain
    return ResumableLoader(plain.dataset, batch_size=BATCH, shuffle=False)


def run(chain: bool, batches: int, resumable: bool, stop_at: int | None = None,
        ckpt: str | None = None, resume: bool = False) -> Any:
    """One fit (2 epochs) with the chain (``ChainedOptimization``) or Lightning's native
    accumulation + clipping; stopped after saving at global batch ``stop_at``, or resumed
    from ``ckpt``."""
    model = Regressor(window_chain() if chain else None)
    callbacks: list[Any] = [ChainedOptimization()] if chain else []
    saver = None
    if stop_at is not None:
        assert ckpt is not None
        saver = SaveAndStop(stop_at, ckpt)
        callbacks.append(saver)
    native = {} if chain else {"accumulate_grad_batches": ACCUMULATE, "gradient_clip_val": CLIP}
    t = trainer(callbacks=callbacks, **native)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*resuming from a checkpoint that ended before")
        if stop_at is not None:
            with pytest.raises(_Stop):
                t.fit(model, loader(batches, resumable))
            assert saver is not None and 0 < saver.window < ACCUMULATE  # mid-window
        else:
            t.fit(model, loader(batches, resumable), ckpt_path=ckpt if resume else None)
    return model, t


@pytest.mark.parametrize("stop_at", [6, 16 + 9], ids=["epoch0-batch6", "epoch1-batch9"])
def test_resume_mid_window_continues_as_if_uninterrupted(stop_at: int, tmp_path: Any) -> None:
    """Run A uninterrupted; run B saves a checkpoint mid-window (3 or 2 micro-batches held
    in the chain's accumulator) and crashes; run C resumes from it with ``ckpt_path=``:
    C's weights equal A's bit for bit, and the uninterrupted run of Lightning's native
    accumulation + clipping (1e-10). Lightning's native accumulation resumed the same way
    does not: its held window was in ``.grad``, which the checkpoint does not hold."""
    batches = 16
    ckpt = str(tmp_path / "mid.ckpt")
    a, a_trainer = run(True, batches, resumable=True)
    run(True, batches, resumable=True, stop_at=stop_at, ckpt=ckpt)
    saved = torch.load(ckpt, weights_only=False)["optimizer_states"][0]
    assert int(saved["transform"][0]["mini_step"]) == (stop_at + 1) % ACCUMULATE  # held
    c, c_trainer = run(True, batches, resumable=True, ckpt=ckpt, resume=True)
    native, native_trainer = run(False, batches, resumable=True)
    for p, q, r in zip(c.net.parameters(), a.net.parameters(), native.net.parameters()):
        assert torch.equal(p, q)
        torch.testing.assert_close(p, r, rtol=0, atol=1e-10)
    assert c_trainer.global_step == a_trainer.global_step == native_trainer.global_step
    sched = c_trainer.lr_scheduler_configs[0].scheduler
    assert sched.last_epoch == a_trainer.lr_scheduler_configs[0].scheduler.last_epoch
    # Control: Lightning's native accumulation holds the window in .grad, which no
    # checkpoint holds: resumed from its own mid-window checkpoint, it has lost the
    # micro-batches of the interrupted window (the chain keeps them in its state).
    native_ckpt = str(tmp_path / "native.ckpt")
    run(False, batches, resumable=True, stop_at=stop_at, ckpt=native_ckpt)
    resumed, _ = run(False, batches, resumable=True, ckpt=native_ckpt, resume=True)
    lost = max(float((p - r).abs().max())
               for p, r in zip(resumed.net.parameters(), native.net.parameters()))
    assert lost > 1e-3


class ScriptedLoader(DataLoader):
    """Yields the dataset's batches in a given order per epoch (``orders[epoch]``)."""

    def __init__(self, orders: list[list[int]], *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.orders, self.epoch = orders, 0

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        batches = list(super().__iter__())
        order, self.epoch = self.orders[self.epoch], self.epoch + 1
        return iter([batches[i] for i in order])


def test_resume_with_a_plain_dataloader_replays_the_epoch_and_keeps_the_window(
    tmp_path: Any,
) -> None:
    """With a DataLoader that is not resumable, Lightning restarts the interrupted epoch's
    data from its first batch (it warns) while its batch counter goes on: saved after batch
    6, the resumed epoch feeds batches 0..8 as batches 7..15. The chain's held window
    (micro-batches 4, 5, 6) survives in the checkpoint: the resumed run equals, bit for bit,
    an uninterrupted run fed batches 0..6, 0..8 in its first epoch."""
    batches, stop_at = 16, 6
    ckpt = str(tmp_path / "ours.ckpt")
    run(True, batches, resumable=False, stop_at=stop_at, ckpt=ckpt)
    resumed, _ = run(True, batches, resumable=False, ckpt=ckpt, resume=True)
    replay = [*range(stop_at + 1), *range(batches - stop_at - 1)]
    model = Regressor(window_chain())
    plain = data(batches)
    scripted = ScriptedLoader([replay, list(range(batches))], plain.dataset, batch_size=BATCH,
                              shuffle=False)
    trainer(callbacks=[ChainedOptimization()]).fit(model, scripted)
    for p, q in zip(resumed.net.parameters(), model.net.parameters()):
        assert torch.equal(p, q)
