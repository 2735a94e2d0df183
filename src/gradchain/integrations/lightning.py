"""Lightning automatic optimization with a :class:`~gradchain.ChainedOptimizer`.

Import it only when you use it (it imports ``pytorch_lightning``)::

    from gradchain.integrations.lightning import ChainedOptimization

    trainer = pl.Trainer(callbacks=[ChainedOptimization()], ...)

Without it, Lightning's automatic optimization calls the adapter once per batch and counts
every call as an optimizer step: with a chain that accumulates over ``n`` micro-batches,
``interval="step"`` schedulers step ``n`` times too often and ``global_step`` /
``max_steps`` / ``estimated_stepping_batches`` count micro-batches.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.loops.optimization.automatic import ClosureResult

from gradchain import gating
from gradchain._tree import named_nodes
from gradchain.adapter import ChainedOptimizer
from gradchain.clipping import ClipByNormState

__all__ = ["ChainedOptimization"]


class _WindowMemberResult(ClosureResult):
    """Lightning's closure result without its division of the loss by
    ``accumulate_grad_batches``: the chain's ``accumulate_every`` takes the mean itself."""

    @classmethod
    def from_training_step_output(cls, training_step_output: Any, normalize: int = 1) -> Any:
        return super().from_training_step_output(training_step_output, 1)


def _windows(state: Any) -> list[int]:
    """The lengths of the accumulation windows in a chain state (host counters)."""
    out = []
    for _, node in named_nodes(state):
        found = gating.leading_window(node)
        if found is not None and found[0] is node:
            out.append(int(getattr(node, found[1].length)))
    return out


def _clips(state: Any) -> bool:
    return any(isinstance(node, ClipByNormState) for _, node in named_nodes(state))


class ChainedOptimization(pl.Callback):
    r"""Make Lightning's automatic optimization count the updates a
    :class:`~gradchain.ChainedOptimizer` applies, as it counts its own accumulation.

    With the adapter returned from ``configure_optimizers`` and a chain holding
    ``accumulate_every(n)``, this callback (at ``on_fit_start``):

    * sets ``trainer.accumulate_grad_batches = n``, so ``global_step``, ``max_steps``,
      ``estimated_stepping_batches`` (read after the optimizers are configured) and
      ``interval="step"`` schedulers count one step per window, as with
      ``Trainer(accumulate_grad_batches=n)``;
    * tells Lightning that the strategy accumulates (the adapter is then called on every
      micro-batch, and its chain keeps the window's sum) and removes Lightning's division
      of the loss by ``n`` (the chain takes the mean);
    * at the last batch of an epoch, calls the adapter's step with ``flush=True``: as
      Lightning steps on a partial last window, so does the chain (with the exact mean
      over the micro-batches it holds, where Lightning divides their sum by ``n``).

    A chain without ``accumulate_every`` needs nothing of this and is left alone (every
    call is then a step, as for Lightning). It refuses, naming both, what would do the
    work twice or at the wrong place: ``Trainer(accumulate_grad_batches>1)`` with a chain
    that accumulates, ``Trainer(gradient_clip_val=...)`` with a chain that clips
    (``clip_by_norm``), and ``gradient_clip_val`` with a chain that accumulates (Lightning
    would clip every micro-batch instead of the window: put ``clip_by_norm`` after
    ``accumulate_every`` in the chain).

    Gates that decide from the data (``skip_if_nonfinite``, ``loss_scale`` overflow) are
    counted as steps, as Lightning counts a ``GradScaler`` step it skipped.

    Raises:
        TypeError: the module uses automatic optimization and its optimizer is not a
            ``ChainedOptimizer``, or there is more than one optimizer.
        ValueError: one of the combinations above.

    Example:
        >>> import torch, pytorch_lightning as pl, gradchain as gc
        >>> from gradchain.integrations.lightning import ChainedOptimization
        >>> class Module(pl.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.net = torch.nn.Linear(3, 1)
        ...     def training_step(self, batch, batch_idx):
        ...         return self.net(batch[0]).pow(2).mean()
        ...     def configure_optimizers(self):
        ...         return gc.ChainedOptimizer(torch.optim.SGD(self.parameters(), lr=0.1),
        ...                                    gc.chain(gc.accumulate_every(4),
        ...                                             gc.clip_by_norm(1.0)))
        >>> data = torch.utils.data.DataLoader(
        ...     torch.utils.data.TensorDataset(torch.randn(32, 3)), batch_size=4)
        >>> trainer = pl.Trainer(max_epochs=1, callbacks=[ChainedOptimization()],
        ...                      logger=False, enable_checkpointing=False,
        ...                      enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(Module(), data)
        >>> trainer.global_step, trainer.accumulate_grad_batches
        (2, 4)
    """

    def __init__(self) -> None:
        self._final = False  # the current batch is the last of the epoch
        self._strategy_class: type | None = None
        self._handle: Any = None

    # ------------------------------------------------------------------ setup
    @staticmethod
    def _adapter(trainer: pl.Trainer) -> ChainedOptimizer:
        optimizers = trainer.optimizers
        if len(optimizers) != 1:
            raise TypeError(
                "ChainedOptimization: automatic optimization needs exactly one optimizer, "
                f"got {len(optimizers)}; use manual optimization for several"
            )
        opt = optimizers[0]
        real = getattr(opt, "_optimizer", opt)  # Lightning's LightningOptimizer wrapper
        if not isinstance(real, ChainedOptimizer):
            raise TypeError(
                "ChainedOptimization: configure_optimizers must return a "
                f"gradchain.ChainedOptimizer, got {type(real).__name__}"
            )
        return real._real()

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not pl_module.automatic_optimization:
            return
        opt = self._adapter(trainer)
        windows = _windows(opt.tx_state)
        clips = _clips(opt.tx_state)
        if trainer.gradient_clip_val is not None and clips:
            raise ValueError(
                f"ChainedOptimization: Trainer(gradient_clip_val={trainer.gradient_clip_val}) "
                "and the ChainedOptimizer's clip_by_norm would both clip: remove "
                "gradient_clip_val from the Trainer (or clip_by_norm from the chain)"
            )
        if not windows:
            return
        every = windows[0]
        if len(set(windows)) > 1:
            raise ValueError(
                f"ChainedOptimization: the chain has accumulation windows of lengths {windows}; "
                "Lightning counts steps by one window length"
            )
        if trainer.accumulate_grad_batches != 1:
            raise ValueError(
                "ChainedOptimization: Trainer(accumulate_grad_batches="
                f"{trainer.accumulate_grad_batches}) and the ChainedOptimizer's "
                f"accumulate_every({every}) would both accumulate (each window would be "
                "divided twice): remove accumulate_grad_batches from the Trainer; the chain's "
                "window then sets Lightning's step counting"
            )
        if trainer.gradient_clip_val is not None:
            raise ValueError(
                f"ChainedOptimization: Trainer(gradient_clip_val={trainer.gradient_clip_val}) "
                f"with the ChainedOptimizer's accumulate_every({every}) would clip every "
                "micro-batch, not the window: remove gradient_clip_val from the Trainer and "
                "put gc.clip_by_norm(...) after accumulate_every in the chain"
            )
        trainer.accumulate_grad_batches = every
        trainer.fit_loop.epoch_loop.automatic_optimization.output_result_cls = (
            _WindowMemberResult
        )
        strategy = trainer.strategy
        self._strategy_class = type(strategy)
        callback = self

        def handles(_: Any) -> bool:
            # Every micro-batch reaches the adapter; on an epoch's last batch Lightning
            # steps as usual (and the adapter flushes the partial window).
            return not callback._final

        strategy.__class__ = type(
            f"Chained{self._strategy_class.__name__}",
            (self._strategy_class,),
            {"handles_gradient_accumulation": property(handles)},
        )

        def flush_on_last_batch(_: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if callback._final:
                return args, {**kwargs, "flush": True}
            return None

        self._handle = opt.register_step_pre_hook(flush_on_last_batch)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        total = trainer.num_training_batches
        self._final = isinstance(total, int) and batch_idx + 1 == total

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._strategy_class is not None:
            trainer.strategy.__class__ = self._strategy_class
            self._strategy_class = None
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._final = False
