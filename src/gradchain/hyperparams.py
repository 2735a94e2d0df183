"""Hyperparameters held in the state: :func:`inject_hyperparams` and :func:`set_hyperparams`.

``inject_hyperparams(gc.adamw)(lr=1e-3, weight_decay=0.1)`` is ``gc.adamw(lr=1e-3,
weight_decay=0.1)`` with ``lr`` and ``weight_decay`` moved out of the closure into the
state, as 0-dim tensors. Then a hyperparameter

* is read from the state (``state.hyperparams["lr"]``, or
  ``gc.tree_get(state, "hyperparams")["lr"]`` inside a chain): for one given as a
  schedule, it is the value the last step used, so logging needs no recomputation;
* is changed with the pure :func:`set_hyperparams`, which returns a new state;
* is saved by :func:`~gradchain.to_state_dict` with the rest of the state;
* is an input of ``torch.compile``'d code, not a constant baked into it: changing it does
  not recompile;
* is batched by ``torch.func.vmap`` like any state tensor (a different learning rate per
  ensemble member);
* is honoured by the fused path of :func:`~gradchain.update_and_apply_`.

This is optax's ``inject_hyperparams`` in a torch-native shape.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from gradchain._ops import safe_increment
from gradchain.base import (
    GradientTransformation,
    Params,
    State,
    Updates,
    expect_state,
    roles_of,
    set_roles,
)
from gradchain.gating import applied, is_gate, mark_gate
from gradchain.optim._fused import FusedStep, advance, bind_fused, fused_plan_of
from gradchain.state import named_entries

__all__ = ["InjectHyperparamsState", "inject_hyperparams", "set_hyperparams"]

# Hyperparameters are kept on the host in float64: exactly the Python floats torch.optim
# keeps in its param groups, readable for free (logging, the Python-float arguments of the
# fused kernels) and changed without touching the accelerator.
_HYPER_DTYPE = torch.float64
_HYPER_DEVICE = torch.device("cpu")


@named_entries("hyperparams")
class InjectHyperparamsState(NamedTuple):
    """State of a transformation made by :func:`inject_hyperparams`.

    Attributes:
        count: int64 0-dim tensor (host), the number of updates done; the argument of the
            hyperparameters given as schedules.
        hyperparams: a dict ``name -> float64 0-dim tensor`` (host; one entry per batch
            member under ``vmap``): the value the last update used for a scheduled
            hyperparameter (its value at count 0 before the first update), the current
            value for the others.
        inner_state: the state of the wrapped transformation.

    Example:
        >>> import torch, gradchain as gc
        >>> tx = gc.inject_hyperparams(gc.sgd)(lr=0.1)
        >>> tx.init({"w": torch.zeros(1)}).hyperparams
        {'lr': tensor(0.1000, dtype=torch.float64)}
    """

    count: torch.Tensor  # type: ignore[assignment]  # shadows tuple.count, as in optax
    hyperparams: dict[str, torch.Tensor]
    inner_state: State


def _is_numeric(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.is_floating_point() and value.numel() == 1
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_schedule(value: Any) -> bool:
    return callable(value) and not isinstance(value, (torch.Tensor, type))


def _as_hyper(value: Any, name: str, who: str) -> torch.Tensor:
    """A number, or a 1-element float tensor, as the stored float64 host tensor."""
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            raise TypeError(f"{who}: {name} must be a floating point value, got {value.dtype}")
        return value.detach().to(_HYPER_DEVICE, _HYPER_DTYPE).reshape(value.shape)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"{who}: {name} must be a float or a 0-dim float tensor, got {type(value).__name__}"
        )
    if not math.isfinite(value):
        raise ValueError(f"{who}: {name} must be finite, got {value}")
    return torch.tensor(float(value), dtype=_HYPER_DTYPE, device=_HYPER_DEVICE)


def _scheduled(value: Any, name: str) -> torch.Tensor:
    """A schedule's value (float or tensor; batched under vmap) as a float64 host tensor."""
    if isinstance(value, torch.Tensor):
        return value.to(_HYPER_DEVICE, _HYPER_DTYPE)
    return _as_hyper(value, name, "inject_hyperparams")


def inject_hyperparams(
    factory: Callable[..., GradientTransformation], static_args: tuple[str, ...] = ()
) -> Callable[..., GradientTransformation]:
    r"""Wrap a transformation factory so that its numeric arguments live in the state.

    ``inject_hyperparams(factory)(*args, **kwargs)`` returns a transformation that
    computes what ``factory(*args, **kwargs)`` computes, with every *numeric argument the
    call gives* (a Python ``int``/``float``, or a 1-element float tensor) and every
    *argument given as a schedule* (a callable of the count) held in its state as a
    0-dim float64 tensor on the host (:class:`InjectHyperparamsState`). Each ``update``
    reads them from the state, evaluates the schedules at the state's ``count``, and
    runs ``factory(**static, **hyperparameters)`` with the values as 0-dim tensors.
    Arguments left to their defaults, bools, tuples, strings and the names in
    ``static_args`` stay fixed (for example ``betas``, ``amsgrad``, ``nesterov``).

    The factory is called again with tensors on every step (a few microseconds of Python),
    so it must accept a 0-dim tensor wherever a number is injected. The rules in
    :mod:`gradchain.optim` do for their learning rate, every one of them (tested by
    discovery: a rule added there is checked too); which arguments may be tensors:

    ============================  ===============================================
    rule                          hyperparameters that may be injected
    ============================  ===============================================
    ``sgd``, ``adam``, ``adamw``  ``lr``, ``weight_decay``
    ``adagrad``, ``adadelta``,    ``lr``
    ``adamax``, ``nadam``,
    ``radam``, ``rmsprop``,
    ``asgd``, ``adafactor``,
    ``muon``
    ``rprop``                     none that matters: ``lr`` only sets the initial
                                  step sizes (at ``init``), as in torch
    ``scale_by_learning_rate``    ``learning_rate``
    ``scale``                     ``step_size``
    ``add_decayed_weights``       ``weight_decay``
    ============================  ===============================================

    A factory that reads an injected value as a Python number (e.g. to decide its
    structure) raises when called with a tensor; list that argument in ``static_args``.
    Values are validated by the factory itself where they can be read for free (eager
    mode: they are host tensors), so ``set_hyperparams(state, lr=-1.0)`` makes the next
    ``update`` raise ``sgd``'s own error before anything is changed.

    **Compile and vmap.** The hyperparameters are tensors in the state, so a
    ``torch.compile``'d ``update`` takes them as inputs: changing one does not recompile.
    Under ``torch.func.vmap`` a batch of states holds one value per member.

    **Fused.** When ``factory`` makes a rule that :func:`~gradchain.update_and_apply_`
    runs as torch's fused kernel (``sgd``, ``adam``, ``adamw``), so does the injected
    transformation, with the hyperparameters from the state (the learning rate and, read
    from the host for free, the others), so that it equals ``torch.optim.AdamW(fused=True)``
    whose ``param_groups[0]["lr"]`` is changed the same way, bit for bit.

    The state's ``count`` advances on every ``update`` (on every applied one when the
    wrapped transformation is a gate), so a scheduled hyperparameter sees ``0`` at the
    first update, as :func:`~gradchain.scale_by_learning_rate` does.

    Args:
        factory: a function returning a :class:`~gradchain.GradientTransformation`, e.g.
            :func:`~gradchain.adamw` or your own.
        static_args: names of numeric arguments to keep fixed (not injected).

    Returns:
        A function with ``factory``'s signature returning a
        :class:`~gradchain.GradientTransformation` with state
        :class:`InjectHyperparamsState`.

    Raises:
        TypeError: ``factory`` is not callable, or (from the returned function) the
            arguments do not fit ``factory``'s signature.

    Example:
        >>> import torch, gradchain as gc
        >>> tx = gc.inject_hyperparams(gc.sgd)(lr=0.1)
        >>> params = {"w": torch.ones(2)}
        >>> state = tx.init(params)
        >>> updates, state = tx.update({"w": torch.ones(2)}, state, params)
        >>> updates["w"]
        tensor([-0.1000, -0.1000])
        >>> state = gc.set_hyperparams(state, lr=0.5)
        >>> updates, state = tx.update({"w": torch.ones(2)}, state, params)
        >>> updates["w"]
        tensor([-0.5000, -0.5000])

        A schedule is evaluated from the state's count; the state keeps the value used:

        >>> tx = gc.inject_hyperparams(gc.adamw)(lr=gc.linear_schedule(1.0, 0.0, 4))
        >>> state = tx.init(params)
        >>> for _ in range(3):
        ...     _, state = tx.update({"w": torch.ones(2)}, state, params)
        >>> float(gc.tree_get(state, "hyperparams")["lr"])
        0.5
    """
    if not callable(factory):
        raise TypeError(
            f"inject_hyperparams: factory must be a callable returning a "
            f"GradientTransformation, got {type(factory).__name__}"
        )
    name_of = getattr(factory, "__name__", "factory")
    who = f"inject_hyperparams({name_of})"
    signature = inspect.signature(factory)
    static_names = tuple(static_args)
    unknown = [n for n in static_names if n not in signature.parameters]
    if unknown:
        raise TypeError(f"{who}: static_args names {unknown}, not arguments of {name_of}")

    def make(*args: Any, **kwargs: Any) -> GradientTransformation:
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError as err:
            raise TypeError(f"{who}: {err}") from None
        static: dict[str, Any] = {}
        numeric: dict[str, torch.Tensor] = {}
        schedules: dict[str, Callable[..., Any]] = {}
        for name, value in bound.arguments.items():
            kind = signature.parameters[name].kind
            if kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
                raise TypeError(f"{who}: pass the arguments of {name_of} by name, not *{name}")
            if name in static_names:
                static[name] = value
            elif _is_numeric(value):
                numeric[name] = _as_hyper(value, name, who)
            elif _is_schedule(value):
                schedules[name] = value
            else:
                static[name] = value

        def values_at(count: torch.Tensor, constants: dict[str, torch.Tensor]) -> dict[str, Any]:
            values: dict[str, Any] = dict(constants)
            for name, schedule in schedules.items():
                values[name] = _scheduled(schedule(count), name)
            return values

        # The last build and the tensors it was built with. Building is pure (the factory
        # reads the tensors when it runs), so while a step receives the very same tensor
        # objects (constant hyperparameters: the state passes them on) the rule is reused
        # rather than rebuilt: a memo, with no effect on any result. Not under
        # torch.compile (it traces the build) nor torch.func (new wrappers every call).
        memo: list[Any] = [(), None]

        def build(values: dict[str, Any]) -> GradientTransformation:
            key = tuple(values.values())
            if torch.compiler.is_compiling() or any(
                torch._C._functorch.is_functorch_wrapped_tensor(v) for v in key
            ):
                return factory(**static, **values)
            last_key, last = memo
            if last is not None and len(last_key) == len(key) and all(
                a is b for a, b in zip(last_key, key)
            ):
                return last  # type: ignore[no-any-return]
            built = factory(**static, **values)
            memo[0], memo[1] = key, built
            return built

        names = set(numeric) | set(schedules)

        # One build at construction: the factory's own checks see the first values, and
        # whether the wrapped transformation is a gate is known.
        first = build(values_at(torch.zeros((), dtype=torch.int64), numeric))
        gated = is_gate(first)

        def init(params: Params) -> InjectHyperparamsState:
            count = torch.zeros((), dtype=torch.int64, device=_HYPER_DEVICE)
            values = values_at(count, numeric)
            return InjectHyperparamsState(
                count=count,
                hyperparams={k: v.clone() for k, v in values.items()},
                inner_state=build(values).init(params),
            )

        def update(
            updates: Updates,
            state: InjectHyperparamsState,
            params: Params | None = None,
            **extra: Any,
        ) -> tuple[Updates, InjectHyperparamsState]:
            expect_state(state, InjectHyperparamsState, who)
            if state.hyperparams.keys() != names:
                raise ValueError(
                    f"{who}.update: the state holds hyperparameters {sorted(state.hyperparams)},"
                    f" this transformation injects {sorted(names)}"
                )
            values = values_at(state.count, state.hyperparams)
            inner = build(values)
            new_updates, new_inner = inner.update(updates, state.inner_state, params, **extra)
            count = safe_increment(state.count)
            if gated:
                # Count applied updates only, as a schedule in the chain would.
                count = torch.where(applied(new_inner).to(count.device), count, state.count)
            return new_updates, InjectHyperparamsState(count, values, new_inner)

        def plan(
            state: Any, p_leaves: list[Any], g_leaves: list[Any], spec: Any
        ) -> FusedStep | None:
            """The binding for ``update_and_apply_``: the wrapped rule's own binding, called
            with the hyperparameters from the state (see :mod:`gradchain.optim._fused`)."""
            if not isinstance(state, InjectHyperparamsState) or state.hyperparams.keys() != names:
                return None
            values = values_at(state.count, state.hyperparams)
            inner_plan = fused_plan_of(build(values))
            if inner_plan is None:
                return None
            inner_step = inner_plan(state.inner_state, p_leaves, g_leaves, spec)
            if inner_step is None:
                return None

            def step(grads: list[Any], keep: torch.Tensor | None) -> InjectHyperparamsState:
                new_inner = inner_step(grads, keep)
                count = advance(state.count, safe_increment(state.count), keep)
                return InjectHyperparamsState(count, values, new_inner)

            return step

        if gated:
            mark_gate(update)
        injected = bind_fused(GradientTransformation(init, update), plan)
        set_roles(update, roles_of(first))  # what the wrapped transformation is
        return injected

    make.__name__ = f"inject_hyperparams_{name_of}"
    make.__doc__ = f"{name_of} with its numeric arguments held in the state (see inject_hyperparams)."
    return make


def _replace_node(tree: Any, old: Any, new: Any) -> Any:
    """``tree`` with the node ``old`` (by identity) replaced by ``new``."""
    if tree is old:
        return new
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*(_replace_node(x, old, new) for x in tree))
    if isinstance(tree, (tuple, list)):
        return type(tree)(_replace_node(x, old, new) for x in tree)
    if isinstance(tree, dict):
        return type(tree)((k, _replace_node(v, old, new)) for k, v in tree.items())
    return tree


def _find_injected(state: Any, path: str = "state") -> list[tuple[str, InjectHyperparamsState]]:
    if isinstance(state, InjectHyperparamsState):
        found = [(path, state)]
        return found + _find_injected(state.inner_state, f"{path}.inner_state")
    if isinstance(state, tuple) and hasattr(state, "_fields"):
        return [x for f in state._fields for x in _find_injected(getattr(state, f), f"{path}.{f}")]
    if isinstance(state, (tuple, list)):
        return [x for i, c in enumerate(state) for x in _find_injected(c, f"{path}[{i}]")]
    if isinstance(state, dict):
        return [x for k, c in state.items() for x in _find_injected(c, f"{path}[{k!r}]")]
    return []


def set_hyperparams(state: State, **values: float | torch.Tensor) -> State:
    """A copy of ``state`` with new values for injected hyperparameters (pure).

    ``state`` is the :class:`InjectHyperparamsState` of a transformation made by
    :func:`inject_hyperparams`, or any state (a chain's, a partition's, ...) holding
    exactly one. Each value is a float or a float tensor shaped like the stored one
    (0-dim, or one value per member for a state batched with ``vmap``); it is stored as
    float64 on the host. The new value is used from the next ``update`` on; a
    hyperparameter given as a schedule is overwritten by the schedule at that update.
    Nothing is modified in place: the old state stays valid.

    Args:
        state: a state holding one :class:`InjectHyperparamsState`.
        **values: ``name=value`` for hyperparameters the state holds.

    Returns:
        The new state, with the same structure.

    Raises:
        KeyError: a name is not a hyperparameter of the state (the message names it and
            lists the known ones), or the state holds no or several injected states.
        TypeError: a value is not a float or a float tensor.
        ValueError: a value is not finite (where readable for free) or its shape differs
            from the stored one.

    Example:
        >>> import torch, gradchain as gc
        >>> tx = gc.chain(gc.clip_by_norm(1.0), gc.inject_hyperparams(gc.adamw)(lr=1e-3))
        >>> state = tx.init({"w": torch.zeros(2)})
        >>> state = gc.set_hyperparams(state, lr=3e-4)
        >>> float(gc.tree_get(state, "hyperparams")["lr"])
        0.0003
        >>> gc.set_hyperparams(state, learning_rate=0.1)
        Traceback (most recent call last):
        ...
        KeyError: "set_hyperparams: no hyperparameter 'learning_rate' in this state; it holds ['lr']"
    """
    who = "set_hyperparams"
    found = _find_injected(state)
    if not found:
        raise KeyError(f"{who}: this state holds no InjectHyperparamsState (see inject_hyperparams)")
    if len(found) > 1:
        paths = ", ".join(p for p, _ in found)
        raise KeyError(
            f"{who}: this state holds several injected states, at {paths}; pass the one "
            "you mean and put the result back into the state"
        )
    _, target = found[0]
    new_hyper = dict(target.hyperparams)
    for name, value in values.items():
        if name not in new_hyper:
            raise KeyError(
                f"{who}: no hyperparameter {name!r} in this state; it holds {sorted(new_hyper)}"
            )
        old = new_hyper[name]
        if isinstance(value, torch.Tensor):
            if not value.is_floating_point():
                raise TypeError(f"{who}: {name} must be a float tensor, got {value.dtype}")
            if value.shape != old.shape:
                raise ValueError(
                    f"{who}: {name} must have the stored shape {tuple(old.shape)}, got "
                    f"{tuple(value.shape)}"
                )
            new = value.detach().to(old.device, old.dtype)
            if (
                not torch.compiler.is_compiling()
                and not torch._C._functorch.is_functorch_wrapped_tensor(new)
                and not bool(torch.isfinite(new).all())  # a host tensor: no sync
            ):
                raise ValueError(f"{who}: {name} must be finite, got {value}")
        else:
            new = torch.full_like(old, float(_as_hyper(value, name, who)))
        new_hyper[name] = new
    return _replace_node(state, target, target._replace(hyperparams=new_hyper))
