"""``ChainedOptimizer``: run a gradchain transformation in front of any ``torch.optim`` optimizer."""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import operator
import os
import sys
import types
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import optree
import torch
from torch.optim import optimizer as _torch_optimizer

from gradchain import gating
from gradchain._snapshot import Snapshot
from gradchain._tree import named_nodes
from gradchain.base import GradientTransformation, is_transformation, is_update_rule
from gradchain.combine import chain_members, describe, not_a_transformation
from gradchain.gates import LossScaleState, scale_loss
from gradchain.optim._fused import fused_plan_of
from gradchain.state import from_state_dict, to_state_dict

try:  # pickling a transformation (closures) by value; deepcopy does not need it
    import cloudpickle as _cloudpickle
except ImportError:  # pragma: no cover - cloudpickle ships with the dev extra
    _cloudpickle = None

__all__ = ["ChainedOptimizer"]

_FORMAT = 1
_GROUP_KEY = "gradchain"  # the chain state's key in param_groups[0] of the torch-shaped view

# torch.optim.Optimizer's per-instance hook tables: like torch's own pickling, copies start
# without hooks (hooks are often lambdas or bound to objects that are not copied).
_HOOK_TABLES = (
    "_optimizer_step_pre_hooks",
    "_optimizer_step_post_hooks",
    "_optimizer_state_dict_pre_hooks",
    "_optimizer_state_dict_post_hooks",
    "_optimizer_load_state_dict_pre_hooks",
    "_optimizer_load_state_dict_post_hooks",
)
# Per-process or per-instance attributes a copy rebuilds instead of copying: the weak
# self-reference, the snapshot's scratch buffers, the profiler name, and an instance
# ``step`` patched by an LR scheduler (it refers to the original object).
_NOT_COPIED = (*_HOOK_TABLES, "_self_ref", "_snapshot_buffers", "_zero_grad_profile_name",
               "step", "_grad_backup", "_grad_buffers", "_applied_grads", "_held_lrs",
               "_read_grads", "_decided")


def _describe(transform: GradientTransformation) -> str:
    """A short name for ``transform``: its factory's name, ``chain(...)`` of its members."""
    members = chain_members(transform)
    if members is not None:
        return "chain(" + ", ".join(_describe(m) for m in members) + ")"
    name = getattr(transform.update, "__qualname__", type(transform.update).__name__)
    return name.split(".<locals>")[0]


_VERSION = operator.attrgetter("_version")
_GRAD = operator.attrgetter("grad")
_NOT_NONE = functools.partial(operator.is_not, None)  # filter(_NOT_NONE, xs): at C speed
# An optimizer class's hooked ``step`` -> the function under torch's hook wrapper.
_RAW_STEPS: dict[Any, Callable[..., Any] | None] = {}


def _ptr(t: torch.Tensor) -> int | None:
    """The address of ``t``'s storage (of its local shard for a DTensor)."""
    local = getattr(t, "_local_tensor", None)  # DTensor: a wrapper without storage
    try:
        return (t if local is None else local).untyped_storage().data_ptr()
    except RuntimeError:  # another storage-less tensor subclass
        return None


def _storages(tree: Any) -> set[int | None]:
    """The storage addresses of the tensors in ``tree``."""
    return {
        _ptr(x) for x in optree.tree_leaves(tree, none_is_leaf=True) if isinstance(x, torch.Tensor)
    }


_Marks = tuple[Any, Any, list[int | None]]


def _grad_marks(grads: list[torch.Tensor | None]) -> _Marks:
    """What identifies the ``.grad`` tensors after a step: weak references to the first and
    the last present one (a freed gradient must not be kept alive, nor taken for a new one
    at the same address), and the version counter of each (one pass at C speed)."""
    first = next(filter(_NOT_NONE, grads), None)
    if first is None:
        return None, None, []
    last = next(filter(_NOT_NONE, reversed(grads)))
    return weakref.ref(first), weakref.ref(last), _versions(grads)


def _versions(grads: list[torch.Tensor | None]) -> list[int | None]:
    try:
        return list(map(_VERSION, grads))
    except AttributeError:  # a parameter without a gradient
        return [None if g is None else g._version for g in grads]


def _untouched(marks: _Marks, grads: list[torch.Tensor | None]) -> bool:
    """Whether ``grads`` are the tensors of ``marks``, not written since: the same first
    and last tensors (a backward after ``zero_grad()`` makes new ones) and every version
    counter as it was (a backward into kept gradients, or ``zero_grad(set_to_none=False)``,
    bumps them)."""
    first, last, versions = marks
    if first is None or len(versions) != len(grads):
        return False
    if first() is not next(filter(_NOT_NONE, grads), None) or last() is not next(
        filter(_NOT_NONE, reversed(grads)), None
    ):
        return False  # new gradient tensors: a backward ran
    return _versions(grads) == versions


def _sparse_grad_error(grads: list[list[Any]]) -> TypeError | None:
    """The error naming the first sparse ``.grad`` in ``grads`` (per group), if any."""
    for i, group in enumerate(grads):
        for j, g in enumerate(group):
            if g is not None and g.layout is not torch.strided:
                return TypeError(
                    f"ChainedOptimizer: param_groups[{i}]['params'][{j}].grad is sparse "
                    f"({g.layout}); gradchain transformations need dense gradients (e.g. "
                    "nn.Embedding(..., sparse=False))"
                )
    return None


def _lrs(groups: list[dict[str, Any]]) -> list[Any]:
    """Each group's lr as a comparable value (a CPU tensor's value; others as they are)."""
    out = []
    for g in groups:
        lr = g.get("lr")
        if isinstance(lr, torch.Tensor):
            lr = lr.item() if lr.device.type == "cpu" and lr.numel() == 1 else id(lr)
        out.append(lr)
    return out


_TORCH_OPTIM_DIR = os.path.dirname(_torch_optimizer.__file__) + os.sep


def _warn_at_caller(message: str) -> None:
    """A ``UserWarning`` pointing at the code that called ``step()``: past this module's
    frames and torch.optim's (its hook wrapper, an LR scheduler's step wrapper)."""
    level = 2
    frame: types.FrameType | None = sys._getframe(1)
    while frame is not None and (
        frame.f_code.co_filename == __file__
        or frame.f_code.co_filename.startswith(_TORCH_OPTIM_DIR)
    ):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, UserWarning, stacklevel=level)


def _call_hooked(
    opt: torch.optim.Optimizer,
    func: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    global_hooks: bool,
) -> Any:
    """``func(*args, **kwargs)`` as torch's step wrapper runs an optimizer's ``step``
    (``Optimizer.profile_hook_step``): pre hooks (the global ones first, with
    ``global_hooks``) that may replace the arguments, the step, ``_optimizer_step_code``,
    post hooks (the global ones last), all inside the profiler's
    ``Optimizer.step#<class>.step`` range when the profiler is on. With no hook and no
    profiler (the usual case), just the step and ``_optimizer_step_code``."""
    if not (
        opt._optimizer_step_pre_hooks
        or opt._optimizer_step_post_hooks
        or (global_hooks and (_torch_optimizer._global_optimizer_pre_hooks
                              or _torch_optimizer._global_optimizer_post_hooks))
        or torch.autograd._profiler_enabled()
    ):
        out = func(*args, **kwargs)
        opt._optimizer_step_code()
        return out
    pre: Iterable[Any] = opt._optimizer_step_pre_hooks.values()
    post: Iterable[Any] = opt._optimizer_step_post_hooks.values()
    if global_hooks:
        pre = itertools.chain(_torch_optimizer._global_optimizer_pre_hooks.values(), pre)
        post = itertools.chain(post, _torch_optimizer._global_optimizer_post_hooks.values())
    scope = (
        torch.autograd.profiler.record_function(f"Optimizer.step#{type(opt).__name__}.step")
        if torch.autograd._profiler_enabled()
        else contextlib.nullcontext()
    )
    with scope:
        for pre_hook in tuple(pre):
            result = pre_hook(opt, args, kwargs)
            if result is not None:
                if not (isinstance(result, tuple) and len(result) == 2):
                    raise RuntimeError(
                        f"{func} must return None or a tuple of (new_args, new_kwargs), "
                        f"but got {result}."
                    )
                args, kwargs = result
        out = func(*args, **kwargs)
        opt._optimizer_step_code()
        for post_hook in tuple(post):
            post_hook(opt, args, kwargs)
    return out


class _ByValue:
    """A transformation pickled by value (its functions are closures, which plain pickle
    stores by name and cannot find again): ``cloudpickle`` bytes, loaded back on unpickle."""

    def __init__(self, transform: GradientTransformation) -> None:
        self.transform = transform

    def __reduce__(self) -> tuple[Any, ...]:
        if _cloudpickle is None:
            raise TypeError(
                "ChainedOptimizer: pickling the adapter stores its transformation (closures) "
                "by value, which needs the cloudpickle package (pip install cloudpickle); "
                "copy.deepcopy works without it, and a checkpoint should use state_dict()"
            )
        return (_cloudpickle.loads, (_cloudpickle.dumps(self.transform),))


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


def _check_arguments(optimizer: Any, transform: Any) -> None:
    """Refuse, naming what is wrong and the fix, what ``ChainedOptimizer(optimizer,
    transform)`` cannot run: before anything is built (see the Reliability page's
    misuse catalogue)."""
    if is_transformation(optimizer) and isinstance(transform, torch.optim.Optimizer):
        raise TypeError(
            "ChainedOptimizer: the arguments are swapped: pass the torch optimizer first, "
            "ChainedOptimizer(optimizer, transform)"
        )
    if not isinstance(optimizer, torch.optim.Optimizer):
        if callable(optimizer) and not isinstance(optimizer, (type, torch.nn.Module)):
            name = getattr(optimizer, "__name__", type(optimizer).__name__)
            raise TypeError(
                f"ChainedOptimizer: optimizer is a callable ({name}), not an optimizer: call "
                "it to make one, e.g. torch.optim.AdamW(model.parameters(), lr=...)"
            )
        raise TypeError(
            f"ChainedOptimizer: optimizer must be a torch.optim.Optimizer, "
            f"got {type(optimizer).__name__}"
        )
    if isinstance(optimizer, ChainedOptimizer):
        raise TypeError("ChainedOptimizer: wrap the inner optimizer once, with one chain")
    if not is_transformation(transform):
        raise TypeError(f"ChainedOptimizer: transform {not_a_transformation(transform)}")
    if is_update_rule(transform):
        where = _rule_path(transform)
        raise ValueError(
            f"ChainedOptimizer: the transform holds an update rule ({where}), and the "
            f"wrapped {type(optimizer).__name__} applies its own: every step would apply "
            "two rules (the learning rate twice, the sign flipped twice); keep gradient "
            "processing in the transform (clip, accumulate_every, loss_scale, "
            f"skip_if_nonfinite) and the rule in {type(optimizer).__name__}, or run the "
            "whole chain with gc.update_and_apply_"
        )


def _rule_path(transform: GradientTransformation, path: str = "transform") -> str:
    """Where the update rule sits in ``transform``: ``transform[1] = chain(...)``."""
    members = chain_members(transform)
    if members is not None and fused_plan_of(transform) is None:  # not a built-in alias
        for i, member in enumerate(members):
            if is_update_rule(member):
                return _rule_path(member, f"{path}[{i}]")
    return f"{path} = {describe(transform)}"


class _NonfiniteNormError(RuntimeError):
    """``clip_by_norm(error_if_nonfinite=True)`` refused the step (a refusal, not a fault)."""


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
    * At most one host-device sync per step: the device-side gate flags and clip error
      flags are read in one transfer; accumulation micro-steps (known on the host) read
      nothing from the device.
    * ``clip_by_norm(error_if_nonfinite=True)`` raises ``RuntimeError`` here, before anything
      is changed, when the norm was nan or inf.
    * A held-back step (a gate closed it) consumes the gradients: ``.grad`` is set to
      ``None`` afterwards, since the accumulator now holds them (or they were dropped as
      non-finite), so they cannot be counted twice.
    * Optimizers that re-evaluate the closure (``torch.optim.LBFGS``) get the transformation
      applied at every evaluation; a transformation with gates is refused for them.
    * **Failures and refusals change nothing** (design.md §3). Everything that can refuse
      or fail is decided before the wrapped step starts: the closure, the transformation
      (run purely; its new state is kept aside), the gate and clip-error flags, and
      ``should_commit``. If one raises (even ``KeyboardInterrupt``) or refuses, the
      parameters, the wrapped optimizer's state and ``param_groups`` and the
      transformation state stay exactly as before the call, and the step can be retried;
      nothing is copied for this. The gradients are donated to the transformation
      (``donate="updates"``, see :func:`~gradchain.donation`), which clips or unscales
      them in place as ``clip_grad_norm_`` and ``GradScaler.unscale_`` do, so after a
      refusal ``.grad`` may hold processed values (call ``zero_grad()``).
      ``clip_by_norm(error_if_nonfinite=True)``'s ``RuntimeError`` is such a refusal:
      inside :meth:`no_sync` it also moves the window back into the accumulator, so that
      ``zero_grad()`` and the next micro-batch carry on.
    * **transactional=True** (opt-in) also undoes a wrapped step that fails halfway (a
      failure inside ``torch.optim`` leaves it half done otherwise, as without the
      adapter): applied steps first copy the parameters, the optimizer's state tensors
      and the gradients, and restore all of them, ``.grad`` included, if anything raises.
      That is one copy of the optimizer's memory per applied step (held-back steps copy
      nothing; on accelerators the copies are transient, on CPU they go into buffers kept
      between steps, since a fresh large CPU allocation page-faults). With a closure,
      gradients that already exist are copied too. See the Reliability page for figures.
    * **A drop-in torch.optim.Optimizer.** The processed gradients are written into the
      existing ``.grad`` tensors in place (the objects survive a step, as with the bare
      optimizer); ``copy.deepcopy``, ``pickle`` and ``torch.save`` round-trip it, chain
      included (pickling stores the transformation's closures by value and needs
      ``cloudpickle``; copies start without hooks, as torch's do); the four state-dict
      hook kinds run in torch's order; torch's global step hooks and this adapter's
      step hooks run once per ``step()`` (the wrapped optimizer's own step hooks run
      when it steps; the global ones are not run a second time for it).
    * **torch.distributed.checkpoint.** :meth:`state_dict` also has torch's keys
      (``"state"``, ``"param_groups"``, with the chain state in the first group), so
      ``get_optimizer_state_dict(model, opt)`` / ``set_optimizer_state_dict`` work with
      the adapter itself. Their initialisation step (wrapped state empty, every lr 0,
      every gradient zero) makes the wrapped optimizer's state without touching the
      chain, and that placeholder state is dropped at the first real step, so a
      checkpoint taken at any point, the first accumulation window included, leaves the
      run bit-identical.

    Args:
        optimizer: the ``torch.optim.Optimizer`` to wrap.
        transform: a gradchain transformation whose output is written into ``.grad``
            (gradient processing: clip, accumulate, scale, skip; not an update rule).
        should_commit: optional callable returning a bool, asked before each wrapped step.
        transactional: also undo a wrapped step that raises halfway (see above), at the
            cost of a copy of the parameters, optimizer state and gradients per applied
            step. Default ``False``: failures and refusals before the wrapped step still
            change nothing.

    Raises:
        TypeError: ``optimizer`` is not an optimizer instance (the class, an uncalled
            factory, a model, another ``ChainedOptimizer``), ``transform`` is not a
            transformation (an uncalled factory, a list), or the two are swapped.
        ValueError: ``transform`` holds an update rule (``sgd``, ``adamw``, any rule of
            :mod:`gradchain.optim`, ``scale_by_learning_rate``; the message names where):
            the wrapped optimizer applies its own; or gates in front of ``LBFGS``.
            See the misuse catalogue on the Reliability page.

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
        transactional: bool = False,
    ) -> None:
        if isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"ChainedOptimizer: optimizer is the class {optimizer.__name__}, not an "
                f"optimizer; pass an instance, e.g. {optimizer.__name__}(model.parameters(), "
                "lr=...)"
            )
        _check_arguments(optimizer, transform)
        if should_commit is not None and not callable(should_commit):
            raise TypeError("ChainedOptimizer: should_commit must be a callable returning bool")
        if not isinstance(transactional, bool):
            raise TypeError(
                f"ChainedOptimizer: transactional must be a bool, got {type(transactional).__name__}"
            )
        self._reevaluates = isinstance(optimizer, torch.optim.LBFGS)
        if self._reevaluates and gating.is_gate(transform):
            raise ValueError(
                f"ChainedOptimizer: {type(optimizer).__name__} re-evaluates the closure several "
                "times per step, so gates (accumulate_every, skip_if_nonfinite, loss_scale) "
                "cannot decide per step; use a transformation without gates (e.g. clip_by_norm)"
            )
        torch._C._log_api_usage_once("gradchain.ChainedOptimizer")
        self.optimizer = optimizer
        self.transform = transform
        self.should_commit = should_commit
        self.transactional = transactional
        self._warned_capturable_if_run_uncaptured = True
        self._rebuild_local()
        self.tx_state = transform.init(self._param_tree())
        self._last_applied = False
        self._before_seed: Any = None  # the state before no_sync moved the window into .grad
        # The wrapped optimizer's state was made by an initialisation step (DCP's), not by a
        # real one: the first applied step clears it, so it starts as in a run without it.
        self._placeholder = False

    def _rebuild_local(self) -> None:
        """The per-instance attributes a new object and a copy start with (``_NOT_COPIED``)."""
        for name in _HOOK_TABLES:
            setattr(self, name, OrderedDict())
        self._snapshot_buffers: list[torch.Tensor] = []  # see Snapshot
        # (.grad tensor, its value before this step wrote into it), transactional only
        self._grad_backup: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._grad_buffers: list[torch.Tensor] = []  # kept CPU buffers for _grad_backup
        self._self_ref = weakref.ref(self)
        # the .grad tensors after the last applied step (see _grad_marks): a step() that
        # finds them untouched was called twice without a backward in between
        self._applied_grads: _Marks | None = None
        # each group's lr after the last held-back step (a change before the next step
        # means a scheduler stepped on a step that applied nothing)
        self._held_lrs: list[Any] | None = None
        # the .grad lists read by this step's transform (None outside a step): the later
        # checks of the step compare with them instead of reading every .grad again
        self._read_grads: list[list[Any]] | None = None
        # (the state the last decision read, its error flags): the next step starts from
        # that state, so its old error flags need no second walk
        self._decided: tuple[Any, list[torch.Tensor]] = (None, [])
        self._patch_step_function()

    # ------------------------------------------------------------------ copies
    def __getstate__(self) -> dict[str, Any]:  # type: ignore[override]
        """Everything but hooks and per-instance scratch (see ``_NOT_COPIED``); the
        transformation goes by value (its functions are closures; needs ``cloudpickle``)."""
        real = self._real()
        state = {k: v for k, v in real.__dict__.items() if k not in _NOT_COPIED}
        state["transform"] = _ByValue(real.transform)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:  # type: ignore[override]
        transform = state["transform"]
        if isinstance(transform, _ByValue):  # a copy made in this process
            transform = transform.transform
        self.__dict__.update(state, transform=transform)
        self._rebuild_local()

    def __deepcopy__(self, memo: dict[int, Any]) -> ChainedOptimizer:
        """A deep copy as torch makes one of an optimizer (parameters and both states copied,
        hooks not), sharing the transformation (pure functions) and ``should_commit``."""
        real = self._real()
        new = ChainedOptimizer.__new__(ChainedOptimizer)
        memo[id(real)] = new
        memo[id(self)] = new
        if real.should_commit is not None:
            memo.setdefault(id(real.should_commit), real.should_commit)
        state = {
            k: copy.deepcopy(v, memo) if k != "transform" else v
            for k, v in real.__dict__.items()
            if k not in _NOT_COPIED
        }
        new.__setstate__(state)
        return new

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

    @property
    def _step_supports_amp_scaling(self) -> bool:
        """Read by ``torch.amp.GradScaler.step`` (only there): ``False``, so the scaler
        unscales and checks the gradients itself; an error when the chain has its own
        ``loss_scale``, since the gradients would then be unscaled twice."""
        if any(isinstance(node, LossScaleState) for _, node in named_nodes(self.tx_state)):
            raise ValueError(
                "ChainedOptimizer: torch.amp.GradScaler.step() is driving an adapter whose "
                "chain has its own loss_scale(): the gradients would be unscaled twice. Use "
                "one of them: drop the GradScaler (scale the loss with opt.backward(loss) or "
                "opt.scale_loss(loss)), or drop loss_scale() from the chain"
            )
        return False

    def __repr__(self) -> str:
        real = self._real()
        inner = "\n  ".join(repr(real.optimizer).splitlines())
        return (
            f"ChainedOptimizer(\n  transform={_describe(real.transform)},\n"
            f"  transactional={real.transactional},\n  optimizer={inner}\n)"
        )

    def _real(self) -> ChainedOptimizer:
        """``self``, or, when a method is called on a proxy that subclasses this class and
        forwards attribute reads (Lightning's ``LightningOptimizer`` re-classes itself so),
        the ChainedOptimizer behind it: methods that write state or call the wrapped
        optimizer must act on it, not store copies on the proxy or see the proxy's
        ``optimizer`` (which is this object, not the wrapped optimizer)."""
        real = self._self_ref()
        return self if real is None else real

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the wrapped optimizer; its parameters get fresh transformation state
        and the state of existing parameters is kept."""
        if self._real() is not self:
            return self._real().add_param_group(param_group)
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
        return flush or gating.next_call_closes(self.tx_state)  # host counters: no sync

    @contextlib.contextmanager
    def no_sync(self, model: torch.nn.Module, *, flush: bool = False) -> Iterator[None]:
        """Enter ``model.no_sync()`` (DDP) when the coming step will not apply.

        Wrap the forward and backward of each micro-batch: gradients are then all-reduced
        only on the micro-step that closes the accumulation window. On that micro-step the
        window's accumulated (rank-local) gradient sums are first moved into ``.grad``, so
        that the closing backward's all-reduce covers the whole window, as DDP's own
        ``no_sync`` accumulation does; the accumulator carries on from zero with its count
        kept. Call ``zero_grad()`` outside this block. This needs ``accumulate_every`` first
        in the chain (only the window's sum of raw gradients is ever all-reduced), e.g.
        ``chain(accumulate_every(4), loss_scale(), clip_by_norm(1.0))``. A model without
        ``no_sync`` (not DDP) is left alone.
        """
        real = self._real()
        ddp = hasattr(model, "no_sync")
        if ddp and gating.leading_window(real.tx_state) is None and gating.has_window(
            real.tx_state
        ):
            raise ValueError(
                "ChainedOptimizer.no_sync: accumulate_every must be the first transformation "
                "of the chain (e.g. chain(accumulate_every(4), loss_scale(), "
                "clip_by_norm(1.0))): gradients are all-reduced once per window, so only the "
                "window's sum of raw gradients is the same on every rank"
            )
        if not real.will_apply(flush=flush) and ddp:
            with model.no_sync():  # type: ignore[operator]
                yield
        else:
            if ddp:
                real._seed_window()
            yield

    def _seed_window(self) -> None:
        """Move the leading accumulator's sums into ``.grad`` (see :meth:`no_sync`)."""
        found = gating.leading_window(self.tx_state)
        if found is None:
            return
        acc, window = found
        if gating.known_int(getattr(acc, window.position)) == 0:  # host counter: no sync
            return
        window_sums = getattr(acc, window.sums)
        with torch.no_grad():
            for group, sums in zip(self._params(), window_sums):
                for p, s in zip(group, sums):
                    if s is not None:
                        s = s.to(p.dtype, copy=True)
                        p.grad = s if p.grad is None else p.grad + s
        zeros = optree.tree_map(
            lambda s: None if s is None else torch.zeros_like(s), window_sums, none_is_leaf=True
        )
        if self._before_seed is None:  # entered twice before one step: keep the first
            self._before_seed = self.tx_state
        self.tx_state = gating.replace_leading(
            self.tx_state, acc._replace(**{window.sums: zeros})
        )

    # ------------------------------------------------------------------ step
    def _params(self) -> list[list[torch.Tensor]]:
        """Each group's parameter list (the groups' own lists: read, never written)."""
        return [g["params"] for g in self.optimizer.param_groups]

    def _param_tree(self) -> list[list[torch.Tensor]]:
        return [[p.detach() for p in group] for group in self._params()]

    def _run_transform(
        self,
        state: Any,
        groups: list[list[torch.Tensor]],
        grads: list[list[Any]] | None = None,
        **extra: Any,
    ) -> tuple[list[list[Any]], Any]:
        """The transformation on ``grads`` (each group's ``.grad`` list, read now if not
        given)."""
        if grads is None:
            grads = [[p.grad for p in group] for group in groups]
        self._read_grads = grads
        if "donate" in extra:
            raise ValueError(
                "ChainedOptimizer.step: donate is not a step argument; the adapter donates "
                "the gradients itself when transactional=False"
            )
        if not self.transactional:
            # The transformation's state is never donated: a refused step keeps the old one.
            extra["donate"] = "updates"
        # The parameters go in as they are (no per-step detach): update runs without grad
        # and never writes them. (step() runs under no_grad; a closure's re-evaluation runs
        # inside the wrapped step, which may enable grad.)
        try:
            if not torch.is_grad_enabled():
                return self.transform.update(grads, state, groups, **extra)  # type: ignore[no-any-return]
            with torch.no_grad():
                updates, new_state = self.transform.update(grads, state, groups, **extra)
        except Exception as err:
            # A sparse gradient is refused by the transformations that read the gradients
            # (their validation, before they compute); name it as the user knows it. (Not
            # checked up front: an identity() adapter hands it to the wrapped optimizer, as
            # the bare one gets it, e.g. SparseAdam.)
            sparse = _sparse_grad_error(grads)
            if sparse is not None:
                raise sparse from err
            raise
        return updates, new_state

    def _decide(self, state: Any, old_state: Any) -> bool:
        """Whether the step applies, with at most one device-to-host read. Raises when a
        ``clip_by_norm(error_if_nonfinite=True)`` flagged a nan/inf norm.

        Gate flags kept on the host (the accumulation window) are read for free; the flags
        that are device data (finiteness, the clip error flags that changed in this step) are
        stacked on the device and copied to the host in one transfer. A step with nothing
        to read on the device (an accumulation micro-step) does not sync at all.
        """
        last, last_errors = self._decided
        if last is not old_state:
            last_errors = gating.decision(old_state, []).errors
        found = gating.decision(state, last_errors)
        self._decided = (state, found.errors)
        flag = found.flag  # a bool where known on the host
        pending = ([flag] if isinstance(flag, torch.Tensor) else []) + found.new_errors
        if not pending:
            return bool(flag)
        device = next((t.device for t in pending if t.device.type != "cpu"), pending[0].device)
        values = torch.stack([t.reshape(()).to(device) for t in pending]).tolist()
        if any(values[1:] if isinstance(flag, torch.Tensor) else values):
            raise _NonfiniteNormError(
                "ChainedOptimizer: the total norm of the gradients is nan or inf, so "
                "clip_by_norm(error_if_nonfinite=True) refuses the step; nothing was changed"
            )
        return bool(values[0]) if isinstance(flag, torch.Tensor) else bool(flag)

    def _write_grads(
        self, groups: list[list[torch.Tensor]], updates: list[list[Any]], new_state: Any
    ) -> None:
        """Write the processed gradients into the existing ``.grad`` tensors, in place, so
        the tensor objects survive the step as with the bare optimizer (references held
        elsewhere, CUDA graphs). A ``.grad`` is replaced instead only where it cannot take
        the values: there is none, its shape differs, or the new transformation state
        shares its memory (a transformation may keep donated memory in its state).

        Transactional, every ``.grad`` handed to the wrapped step is first copied into
        ``_grad_backup`` (restored if the step raises)."""
        backup = self._grad_backup if self.transactional else None
        # The lists the transform read, unless a should_commit callback ran in between
        # (user code: it could have replaced a .grad).
        read = self._read_grads if self.should_commit is None else None
        if read is None:
            read = [[p.grad for p in group] for group in groups]
        if backup is None and all(
            all(map(operator.is_, rgroup, ugroup))  # the usual case, at C speed
            or all(u is None or u is g for g, u in zip(rgroup, ugroup))
            for rgroup, ugroup in zip(read, updates)
        ):
            return  # every gradient was processed in place (or passed through)
        self._read_grads = None  # .grad objects may be replaced below: read them again
        kept: set[int | None] | None = None  # storages of the new state, on demand
        with torch.no_grad():
            for group, ugroup in zip(groups, updates):
                for p, u in zip(group, ugroup):
                    if u is None:
                        continue
                    g = p.grad
                    if backup is not None and g is not None:
                        backup.append((g, self._backup_buffer(len(backup), g).copy_(g)))
                    if u is g:  # donated and processed in place (or passed through)
                        continue
                    if g is not None and g.shape == u.shape and g.layout is torch.strided:
                        if kept is None:
                            kept = _storages(new_state)
                        ptr = _ptr(g)
                        if ptr is not None and ptr not in kept and ptr != _ptr(u):
                            g.copy_(u)
                            continue
                    p.grad = u.to(p.dtype) if u.dtype != p.dtype else u

    def _backup_buffer(self, i: int, g: torch.Tensor) -> torch.Tensor:
        """The ``i``-th buffer for a copy of ``g``: on CPU kept from step to step (a fresh
        large CPU allocation page-faults, see ``Snapshot``), elsewhere a new one."""
        if g.device.type != "cpu" or type(g) is not torch.Tensor:
            return torch.empty_like(g)
        bufs = self._grad_buffers
        if i < len(bufs):
            buf = bufs[i]
            if buf.shape == g.shape and buf.dtype == g.dtype and buf.stride() == g.stride():
                return buf
            bufs[i] = buf = torch.empty_like(g)
            return buf
        buf = torch.empty_like(g)
        bufs.append(buf)
        return buf

    def _wrapped_step(self, closure: Callable[[], Any] | None = None) -> Any:
        """The wrapped optimizer's ``step``, with its own (local) step hooks and profiler
        range but without torch's global step hooks: those ran once already, for this
        adapter's ``step()``, so profilers and step counters see one step per call.

        An instance-level ``step`` (patched on the wrapped optimizer by someone else, e.g. an
        LR scheduler built on it) is called as it is, global hooks included."""
        opt = self.optimizer
        fn = getattr(type(opt), "step", None)
        raw = _RAW_STEPS.get(fn)
        if raw is None and getattr(fn, "hooked", False):
            raw = _RAW_STEPS[fn] = getattr(fn, "__wrapped__", None)
        if raw is None or "step" in vars(opt):
            return opt.step() if closure is None else opt.step(closure)
        args: tuple[Any, ...] = (opt,) if closure is None else (opt, closure)
        return _call_hooked(opt, raw, args, {}, global_hooks=False)

    def step(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        """``step(closure=None, **extra)``: evaluate ``closure`` (with grad enabled) if
        given, run the transformation on the gradients, and call the wrapped ``step()`` if
        the step applies. Extra keyword arguments (e.g. ``flush=True``) reach the
        transformation. Returns the loss.

        If anything raises before the wrapped step, the parameters and both states are as
        before the call (``.grad`` may hold processed values); with ``transactional=True``
        a failure inside the wrapped step is undone too, ``.grad`` included. The exception
        propagates.

        Step hooks (global and this optimizer's) and the profiler's
        ``Optimizer.step#ChainedOptimizer.step`` range work as for any torch optimizer;
        the adapter runs them itself instead of under torch's wrapper, so that a step with
        no hook and no profiler pays for neither."""
        return _call_hooked(self, ChainedOptimizer._run_step, (self, *args), kwargs,
                            global_hooks=True)

    def _run_step(self, closure: Callable[[], Any] | None = None, **extra: Any) -> Any:
        """:meth:`step` without the hooks."""
        # Without grad, as torch.no_grad() would run it (set directly: cheaper per call).
        grad_was = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        try:
            return self._step_without_grad(closure, extra)
        finally:
            torch._C._set_grad_enabled(grad_was)

    # torch's Optimizer wraps a subclass's ``step`` with its hook wrapper unless it is
    # marked; this one runs the hooks itself. (``__wrapped__``, as torch's wrapper sets it:
    # the step without hooks, whose signature introspection shows.)
    step.hooked = True  # type: ignore[attr-defined]
    step.__wrapped__ = _run_step  # type: ignore[attr-defined]

    def _step_without_grad(self, closure: Callable[[], Any] | None, extra: dict[str, Any]) -> Any:
        groups = self._params()
        grouped = [list(map(_GRAD, group)) for group in groups]
        grads = grouped[0] if len(grouped) == 1 else [g for group in grouped for g in group]
        # A closure may zero or accumulate into existing gradients in place: keep values.
        grad_values = (
            [None if g is None else (g._version, g.clone()) for g in grads]
            if closure is not None and self.transactional
            else None
        )
        if self._is_initialisation_step(closure, extra):
            # DCP's _init_optim_state: make the wrapped optimizer's state (zero gradients, lr
            # 0) without touching the chain; the first real step starts from scratch. Checked
            # first: that lr 0 is no scheduler's doing (no held-back-step warning).
            self._wrapped_step()
            self._placeholder = True
            return None
        held, self._held_lrs = self._held_lrs, None
        if held is not None and held != _lrs(self.optimizer.param_groups):
            _warn_at_caller(
                "ChainedOptimizer.step: the learning rate changed after a held-back step "
                f"(param_groups lr {held} -> {_lrs(self.optimizer.param_groups)}): a "
                "scheduler stepped on every call advances on accumulation micro-steps and "
                "skipped steps; step it with opt.step_scheduler(scheduler), or only when "
                "opt.last_step_applied",
            )
        if closure is None and next(filter(_NOT_NONE, grads), None) is None:
            # torch.optim skips parameters without gradients; a chain would still count the
            # call (an accumulation window would advance on nothing): do nothing, loudly.
            _warn_at_caller(
                "ChainedOptimizer.step: no parameter has a gradient (call loss.backward() "
                "before step()); nothing was done and the chain state did not advance",
            )
            self._last_applied = False
            return None
        if closure is None and self._applied_grads is not None and _untouched(
            self._applied_grads, grads
        ):
            _warn_at_caller(
                "ChainedOptimizer.step: called again with the gradients of the last applied "
                "step, untouched since (no zero_grad() and backward() in between); they are "
                "applied a second time",
            )
        saved = (self.tx_state, self._before_seed, self._last_applied)
        placeholder = self._placeholder
        snapshot: list[Snapshot] = []  # taken just before the wrapped step, if transactional
        self._grad_backup.clear()
        try:
            if self._reevaluates:
                return self._step_reevaluating(closure, groups, snapshot, **extra)
            return self._step(closure, groups, snapshot, grouped, grads, **extra)
        except BaseException as err:
            if snapshot:
                snapshot[0].restore()
            for written, before in reversed(self._grad_backup):
                written.copy_(before)
            self.tx_state, self._before_seed, self._last_applied = saved
            self._placeholder = placeholder
            if isinstance(err, _NonfiniteNormError) and saved[1] is not None:
                # A refusal: move the window back into the accumulator (see no_sync), so
                # that it is not lost with the gradients the caller will discard.
                self.tx_state, self._before_seed = saved[1], None
            params = [p for group in groups for p in group]
            for p, g, kept in zip(params, grads, grad_values or [None] * len(params)):
                p.grad = g
                if g is not None and kept is not None and g._version != kept[0]:
                    g.copy_(kept[1])
            raise
        finally:
            self._grad_backup.clear()
            self._read_grads = None  # never keeps gradients alive between steps
            if self._decided[0] is not self.tx_state:  # a refused state is not kept alive
                self._decided = (None, [])

    def _is_initialisation_step(self, closure: Any, extra: dict[str, Any]) -> bool:
        """Whether this call is an optimizer-state initialisation, as
        ``torch.distributed.checkpoint.state_dict`` makes one before reading or loading a
        state dict (``_init_optim_state``): the wrapped optimizer has no state yet, every
        group's lr is 0 and every trainable parameter has an all-zero gradient. The host
        checks come first; the zero check (one device read) runs only when they hold,
        i.e. at most on the steps before the first applied one with every lr at 0."""
        if closure is not None or extra or self.optimizer.state:
            return False
        groups = self.optimizer.param_groups
        if not groups or not all("lr" in g and float(g["lr"]) == 0.0 for g in groups):
            return False
        grads = [p.grad for g in groups for p in g["params"] if p.requires_grad]
        if not grads or any(g is None for g in grads):
            return False
        # DTensor gradients (FSDP2): each rank reads its own shards. DCP's zeros are zero on
        # every rank; a real step with every lr at 0 and all-zero local gradients on one
        # rank only is the one case where ranks could disagree.
        local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
        device = local[0].device
        nonzero = torch.stack([torch.count_nonzero(g).to(device) for g in local]).sum()
        return int(nonzero) == 0

    def _drop_placeholder(self) -> None:
        """Before the first real wrapped step: forget state an initialisation step made."""
        if self._placeholder:
            self.optimizer.state.clear()
            self._placeholder = False

    def _step(
        self,
        closure: Callable[[], Any] | None,
        groups: list[list[torch.Tensor]],
        snapshot: list[Snapshot],
        grouped: list[list[Any]],
        grads: list[Any],
        **extra: Any,
    ) -> Any:
        """One step; ``grouped`` is each group's ``.grad`` list as read before the call,
        ``grads`` the same flattened."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # A refused call restores the state as it was before no_sync moved the window into
        # .grad, so that the window is not lost with the discarded gradients.
        before_seed, self._before_seed = self._before_seed, None
        updates, new_state = self._run_transform(
            self.tx_state, groups, None if closure is not None else grouped, **extra
        )
        applies = self._decide(new_state, self.tx_state)
        if not applies:
            self.tx_state = new_state
            self._last_applied = False
            # The chain consumed these gradients (into its accumulator, or dropped them as
            # non-finite): clear them, so a loop that skips zero_grad() on held-back steps
            # does not count them twice.
            for group in groups:
                for p in group:
                    p.grad = None
            self._held_lrs = _lrs(self.optimizer.param_groups)
            return loss
        if self.should_commit is not None and not self.should_commit():
            if before_seed is not None:
                self.tx_state = before_seed
            self._last_applied = False
            return loss
        self._write_grads(groups, updates, new_state)
        # The marks of the .grad tensors the wrapped step gets, taken now, while their
        # metadata are still in the CPU's cache (the wrapped step reads .grad, it does not
        # write it; one that does only makes the next step-twice check miss).
        read, self._read_grads = self._read_grads, None
        marks = _grad_marks(
            grads
            if read is grouped and self.should_commit is None  # .grad objects unchanged
            else [p.grad for group in groups for p in group]
        )
        if self.transactional:
            snapshot.append(Snapshot(self.optimizer, self._snapshot_buffers))
        self._drop_placeholder()
        self._wrapped_step()
        self.tx_state = new_state
        self._last_applied = True
        self._applied_grads = marks
        return loss

    def _step_reevaluating(
        self,
        closure: Callable[[], Any] | None,
        groups: list[list[torch.Tensor]],
        snapshot: list[Snapshot],
        **extra: Any,
    ) -> Any:
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
            old = box["state"]
            updates, box["state"] = self._run_transform(old, groups, **extra)
            self._decide(box["state"], old)
            self._write_grads(groups, updates, box["state"])
            return loss

        if self.transactional:
            snapshot.append(Snapshot(self.optimizer, self._snapshot_buffers))
        self._drop_placeholder()
        loss = self._wrapped_step(wrapped)
        self.tx_state = box["state"]
        self._last_applied = True
        return loss

    # ------------------------------------------------------------------ checkpoints
    def _meta(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "group_sizes": [len(g) for g in self._params()],
            "shapes": [[list(p.shape) for p in g] for g in self._params()],
            "placeholder": self._placeholder,
        }

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The wrapped optimizer's state dict and the transformation state, as plain data
        (loads with ``torch.load(..., weights_only=True)``).

        Keys: ``"optimizer"`` (the wrapped optimizer's ``state_dict()``), ``"transform"``
        (:func:`~gradchain.to_state_dict` of the chain state) and ``"gradchain"`` (format,
        group sizes and shapes, checked on load); and, for tools that read a torch optimizer
        state dict (``torch.distributed.checkpoint.state_dict``, FSDP), torch's own keys
        ``"state"`` (the same object as ``["optimizer"]["state"]``) and ``"param_groups"``,
        whose first group also carries the chain state under ``"gradchain"``. Either form,
        the whole dict or just ``{"state", "param_groups"}``, loads back.

        State-dict hooks run as in torch: pre-hooks with the adapter, then post-hooks
        with the adapter and the dict (a hook's return value replaces the dict)."""
        if self._real() is not self:
            return self._real().state_dict()
        for pre_hook in tuple(self._optimizer_state_dict_pre_hooks.values()):
            pre_hook(self)
        inner = self.optimizer.state_dict()
        transform = to_state_dict(self.tx_state)
        meta = self._meta()
        groups = [dict(g) for g in inner["param_groups"]]
        if groups:
            groups[0][_GROUP_KEY] = {**meta, "transform": transform}
        state_dict: dict[str, Any] = {
            "state": inner["state"],
            "param_groups": groups,
            "optimizer": inner,
            "transform": transform,
            "gradchain": meta,
        }
        for post_hook in tuple(self._optimizer_state_dict_post_hooks.values()):
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Restore both states. A state dict from another chain or parameter set is refused
        with a ``ValueError`` naming the mismatch, and nothing is changed. Accepts the dict
        :meth:`state_dict` returns, or its torch-shaped part ``{"state", "param_groups"}``
        (what ``torch.distributed.checkpoint.state_dict.set_optimizer_state_dict`` passes).

        Load-state-dict hooks run as in torch: pre-hooks with the adapter and (a shallow
        copy of) the dict, whose return value replaces it, then post-hooks with the
        adapter."""
        if self._real() is not self:
            return self._real().load_state_dict(state_dict)
        if isinstance(state_dict, dict):
            state_dict = state_dict.copy()  # shallow, as torch: hooks may edit it
        for pre_hook in tuple(self._optimizer_load_state_dict_pre_hooks.values()):
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        inner, transform, meta = self._split_state_dict(state_dict)
        sizes = [len(g) for g in self._params()]
        saved = meta.get("group_sizes")
        if saved != sizes:
            raise ValueError(
                "ChainedOptimizer.load_state_dict: the saved parameter groups have sizes "
                f"{saved}, this optimizer's have {sizes}"
            )
        # torch.optim loads per-parameter state of any shape, so check shapes here.
        saved_shapes = meta.get("shapes")
        if saved_shapes is not None:
            for i, (group, saved_group) in enumerate(zip(self._params(), saved_shapes)):
                for j, (p, shape) in enumerate(zip(group, saved_group)):
                    if list(p.shape) != list(shape):
                        raise ValueError(
                            "ChainedOptimizer.load_state_dict: param_groups"
                            f"[{i}]['params'][{j}] was saved with shape {tuple(shape)}, "
                            f"this optimizer's has shape {tuple(p.shape)}"
                        )
        new_tx_state = from_state_dict(self.tx_state, transform)
        self.optimizer.load_state_dict(inner)
        self.tx_state = new_tx_state
        self._placeholder = bool(meta.get("placeholder", False))
        for post_hook in tuple(self._optimizer_load_state_dict_post_hooks.values()):
            post_hook(self)

    @staticmethod
    def _split_state_dict(state_dict: Any) -> tuple[dict[str, Any], Any, dict[str, Any]]:
        """``(wrapped optimizer's state dict, transformation state, meta)`` from either form
        of :meth:`state_dict`'s output."""
        if isinstance(state_dict, dict) and {"optimizer", "transform", "gradchain"} <= set(
            state_dict
        ):
            return state_dict["optimizer"], state_dict["transform"], state_dict["gradchain"]
        groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
        if (
            isinstance(groups, list)
            and groups
            and isinstance(groups[0], dict)
            and isinstance(groups[0].get(_GROUP_KEY), dict)
            and "state" in state_dict
        ):
            meta = dict(groups[0][_GROUP_KEY])
            transform = meta.pop("transform")
            first = {k: v for k, v in groups[0].items() if k != _GROUP_KEY}
            inner = {"state": state_dict["state"], "param_groups": [first, *groups[1:]]}
            return inner, transform, meta
        keys = sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__
        raise ValueError(
            "ChainedOptimizer.load_state_dict: expected a dict with keys 'optimizer', "
            f"'transform' and 'gradchain' (from ChainedOptimizer.state_dict()), got {keys}"
        )
