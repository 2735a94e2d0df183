"""``ChainedOptimizer``: run a gradchain transformation in front of any ``torch.optim`` optimizer."""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import optree
import torch

from gradchain.base import GradientTransformation, applied, is_gate
from gradchain.clipping import ClipByNormState
from gradchain.gates import AccumulateState, scale_loss
from gradchain.tree import _named_nodes, from_state_dict, to_state_dict

__all__ = ["ChainedOptimizer"]

_FORMAT = 1


def _merge_states(old: Any, new: Any) -> Any:
    """``new`` with every leaf that ``old`` has at the same path (and shape) taken from ``old``."""
    old_paths, old_leaves, _ = optree.tree_flatten_with_path(old, none_is_leaf=True)
    by_path = dict(zip(old_paths, old_leaves))
    new_paths, new_leaves, spec = optree.tree_flatten_with_path(new, none_is_leaf=True)
    out = []
    for path, leaf in zip(new_paths, new_leaves):
        prev = by_path.get(path, leaf)
        same = (
            isinstance(prev, torch.Tensor)
            and isinstance(leaf, torch.Tensor)
            and prev.shape == leaf.shape
            and prev.dtype == leaf.dtype
        ) or (prev is None and leaf is None)
        out.append(prev if same else leaf)
    return optree.tree_unflatten(spec, out)


class ChainedOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` that runs ``transform`` on the gradients before ``optimizer``.

    ``step()`` reads the ``.grad`` of every parameter (a parameter without gradient is a
    ``None`` leaf, as torch skips it), runs ``transform`` purely, and only when every gate
    of the chain is open (:func:`gradchain.applied`) writes the processed gradients into
    ``.grad`` and calls ``optimizer.step()``. So clipping, accumulation, loss scaling and
    non-finite skipping move out of the training loop, and the rest of the loop stays as
    it was. The transformation sees the parameters as a list of groups, each a list of
    tensors (``[[p0, p1], [p2]]``), in ``param_groups`` order.

    * ``param_groups`` and ``state`` *are* the wrapped optimizer's, so LR schedulers,
      Lightning and checkpoint code see and edit the real ones; ``defaults`` too.
    * ``should_commit`` (e.g. torchft's ``Manager.should_commit``) is asked once per
      applied step, before the wrapped step; a refusal discards the call: parameters, the
      wrapped optimizer's state and the transformation state stay as before it.
    * On an applied step the one host-device sync is reading ``applied(state)``.
    * ``clip_by_norm(error_if_nonfinite=True)`` raises ``RuntimeError`` here, before anything
      is changed, when the norm was nan or inf.
    * Optimizers that re-evaluate the closure (``torch.optim.LBFGS``) get the transformation
      applied at every evaluation; a transformation with gates is refused for them.

    Args:
        optimizer: the ``torch.optim.Optimizer`` to wrap.
        transform: a gradchain transformation whose output is written into ``.grad``
            (gradient processing: clip, accumulate, scale, skip; not an update rule).
        should_commit: optional callable returning a bool, asked before each wrapped step.

    Example:
        >>> import torch, gradchain as gc
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = gc.ChainedOptimizer(
        ...     torch.optim.SGD(model.parameters(), lr=0.1),
        ...     gc.chain(gc.clip_by_norm(1.0), gc.accumulate_every(2)),
        ... )
        >>> for i in range(4):
        ...     model(torch.randn(8, 3)).pow(2).mean().backward()
        ...     _ = opt.step()
        ...     opt.zero_grad()
        ...     print(i, opt.last_step_applied)
        0 False
        1 True
        2 False
        3 True
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        transform: GradientTransformation,
        *,
        should_commit: Callable[[], bool] | None = None,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"ChainedOptimizer: optimizer must be a torch.optim.Optimizer, "
                f"got {type(optimizer).__name__}"
            )
        if isinstance(optimizer, ChainedOptimizer):
            raise TypeError("ChainedOptimizer: wrap the inner optimizer once, with one chain")
        if not (isinstance(transform, tuple) and len(transform) == 2 and callable(transform[1])):
            raise TypeError(
                "ChainedOptimizer: transform must be a GradientTransformation (init, update), "
                f"got {type(transform).__name__}"
            )
        if should_commit is not None and not callable(should_commit):
            raise TypeError("ChainedOptimizer: should_commit must be a callable returning bool")
        self._reevaluates = isinstance(optimizer, torch.optim.LBFGS)
        if self._reevaluates and is_gate(transform):
            raise ValueError(
                f"ChainedOptimizer: {type(optimizer).__name__} re-evaluates the closure several "
                "times per step, so gates (accumulate_every, skip_if_nonfinite, loss_scale) "
                "cannot decide per step; use a transformation without gates (e.g. clip_by_norm)"
            )
        torch._C._log_api_usage_once("gradchain.ChainedOptimizer")
        self.optimizer = optimizer
        self.transform = transform
        self.should_commit = should_commit
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()
        self._warned_capturable_if_run_uncaptured = True
        self.tx_state = transform.init(self._param_tree())
        self._last_applied = False

    # ------------------------------------------------------------------ torch.optim surface
    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property  # type: ignore[override]
    def state(self) -> Any:
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property  # type: ignore[override]
    def defaults(self) -> dict[str, Any]:
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    def __repr__(self) -> str:
        return f"ChainedOptimizer({self.optimizer!r})"

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the wrapped optimizer; its parameters get fresh transformation state
        and the state of existing parameters is kept."""
        self.optimizer.add_param_group(param_group)
        self.tx_state = _merge_states(self.tx_state, self.transform.init(self._param_tree()))

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    # ------------------------------------------------------------------ gradchain surface
    @property
    def last_step_applied(self) -> bool:
        """Whether the last ``step()`` called the wrapped optimizer (every gate open and,
        if given, ``should_commit`` agreed)."""
        return self._last_applied

    def backward(self, loss: torch.Tensor, **kwargs: Any) -> None:
        """``loss.backward(**kwargs)`` on the loss multiplied by the chain's current loss scale
        (plain ``loss.backward`` when the chain has no ``loss_scale``)."""
        scale_loss(loss, self.tx_state).backward(**kwargs)

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss multiplied by the chain's current loss scale (see ``gc.scale_loss``)."""
        return scale_loss(loss, self.tx_state)

    def step_scheduler(self, scheduler: Any, *args: Any, **kwargs: Any) -> bool:
        """Step ``scheduler`` only if the last ``step()`` was applied; returns whether it did.

        Schedules then count applied updates, not calls: skipped AMP steps and accumulation
        micro-steps do not advance the learning rate.
        """
        if self._last_applied:
            scheduler.step(*args, **kwargs)
        return self._last_applied

    def will_apply(self, *, flush: bool = False) -> bool:
        """Whether the next ``step()`` can apply, as far as accumulation windows tell (known on
        the host, no sync). Finiteness is not known before the step, so this is ``True`` for
        a chain without ``accumulate_every``."""
        if flush:
            return True
        for _, node in _named_nodes(self.tx_state):
            if isinstance(node, AccumulateState):
                if int(node.mini_step) + 1 < int(node.every):  # host tensors: no sync
                    return False
        return True

    @contextlib.contextmanager
    def no_sync(self, model: torch.nn.Module, *, flush: bool = False) -> Iterator[None]:
        """Enter ``model.no_sync()`` (DDP) when the coming step will not apply.

        Wrap the forward and backward of each micro-batch: gradients are then all-reduced
        only on the micro-step that closes the accumulation window. A model without
        ``no_sync`` (not DDP) is left alone.
        """
        if not self.will_apply(flush=flush) and hasattr(model, "no_sync"):
            with model.no_sync():
                yield
        else:
            yield

    # ------------------------------------------------------------------ step
    def _params(self) -> list[list[torch.Tensor]]:
        return [list(g["params"]) for g in self.optimizer.param_groups]

    def _param_tree(self) -> list[list[torch.Tensor]]:
        return [[p.detach() for p in group] for group in self._params()]

    def _run_transform(self, state: Any, **extra: Any) -> tuple[list[list[Any]], Any]:
        params = self._params()
        grads = [[p.grad for p in group] for group in params]
        for group in grads:
            for g in group:
                if g is not None and g.is_sparse:
                    raise TypeError(
                        "ChainedOptimizer: sparse gradients are not supported by gradchain "
                        "transformations"
                    )
        with torch.no_grad():
            updates, new_state = self.transform.update(
                grads, state, self._param_tree(), **extra
            )
        return updates, new_state

    @staticmethod
    def _decide(state: Any) -> bool:
        """Whether the step applies, with the one host read of the step. Raises when a
        ``clip_by_norm(error_if_nonfinite=True)`` flagged a nan/inf norm."""
        errors = [
            node.nonfinite_error
            for _, node in _named_nodes(state)
            if isinstance(node, ClipByNormState)
        ]
        ok = applied(state)
        flags = torch.stack([ok.cpu()] + [e.cpu() for e in errors]).tolist()
        if any(flags[1:]):
            raise RuntimeError(
                "ChainedOptimizer: the total norm of the gradients is nan or inf, so "
                "clip_by_norm(error_if_nonfinite=True) refuses the step; nothing was changed"
            )
        return bool(flags[0])

    def _write_grads(self, updates: list[list[Any]]) -> None:
        with torch.no_grad():
            for group, ugroup in zip(self._params(), updates):
                for p, u in zip(group, ugroup):
                    if u is not None:
                        p.grad = u.to(p.dtype) if u.dtype != p.dtype else u

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, **extra: Any) -> Any:  # type: ignore[override]
        """Evaluate ``closure`` (with grad enabled) if given, run the transformation on the
        gradients, and call the wrapped ``step()`` if the step applies. Extra keyword
        arguments (e.g. ``flush=True``) reach the transformation. Returns the loss."""
        if self._reevaluates:
            return self._step_reevaluating(closure, **extra)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        updates, new_state = self._run_transform(self.tx_state, **extra)
        if not self._decide(new_state):
            self.tx_state = new_state
            self._last_applied = False
            return loss
        if self.should_commit is not None and not self.should_commit():
            self._last_applied = False
            return loss
        self._write_grads(updates)
        self.optimizer.step()
        self.tx_state = new_state
        self._last_applied = True
        return loss

    def _step_reevaluating(self, closure: Callable[[], Any] | None, **extra: Any) -> Any:
        if closure is None:
            raise ValueError(
                f"ChainedOptimizer: {type(self.optimizer).__name__}.step needs a closure"
            )
        if self.should_commit is not None and not self.should_commit():
            self._last_applied = False
            return None
        box: dict[str, Any] = {"state": self.tx_state}

        def wrapped() -> Any:
            with torch.enable_grad():
                loss = closure()
            updates, box["state"] = self._run_transform(box["state"], **extra)
            self._decide(box["state"])
            self._write_grads(updates)
            return loss

        loss = self.optimizer.step(wrapped)
        self.tx_state = box["state"]
        self._last_applied = True
        return loss

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The wrapped optimizer's state dict and the transformation state, as plain data
        (loads with ``torch.load(..., weights_only=True)``)."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "transform": to_state_dict(self.tx_state),
            "gradchain": {
                "format": _FORMAT,
                "group_sizes": [len(g) for g in self._params()],
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Restore both states. A state dict from another chain or parameter set is refused
        with a ``ValueError`` naming the mismatch, and nothing is changed."""
        if not isinstance(state_dict, dict) or not {"optimizer", "transform", "gradchain"} <= set(
            state_dict
        ):
            keys = sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__
            raise ValueError(
                "ChainedOptimizer.load_state_dict: expected a dict with keys 'optimizer', "
                f"'transform' and 'gradchain' (from ChainedOptimizer.state_dict()), got {keys}"
            )
        sizes = [len(g) for g in self._params()]
        saved = state_dict["gradchain"].get("group_sizes")
        if saved != sizes:
            raise ValueError(
                "ChainedOptimizer.load_state_dict: the saved parameter groups have sizes "
                f"{saved}, this optimizer's have {sizes}"
            )
        new_tx_state = from_state_dict(self.tx_state, state_dict["transform"])
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self.tx_state = new_tx_state
