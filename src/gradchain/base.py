"""The protocol: ``GradientTransformation``, ``EmptyState``, ``identity``, and donation.

A gradient transformation is a pair of pure functions ``(init, update)``:

* ``init(params) -> state``
* ``update(updates, state, params=None, **extra) -> (updates, new_state)``

Composition lives in :mod:`gradchain.combine`, the gate protocol in :mod:`gradchain.gating`,
applying updates in :mod:`gradchain.update`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import torch

from gradchain import _ops
from gradchain._tree import PLAIN, add_leaf_ids, flatten

Params = Any
Updates = Any
State = Any

__all__ = [
    "GradientTransformation",
    "EmptyState",
    "identity",
    "stateless",
    "donation",
    "expect_state",
    "is_transformation",
    "is_update_rule",
    "mark_update_rule",
]


class InitFn(Protocol):
    def __call__(self, params: Params) -> State: ...


class UpdateFn(Protocol):
    def __call__(
        self, updates: Updates, state: State, params: Params | None = None, **extra: Any
    ) -> tuple[Updates, State]: ...


class GradientTransformation(NamedTuple):
    """A pure gradient transformation: ``init(params) -> state`` and
    ``update(updates, state, params=None, **extra) -> (updates, new_state)``.

    ``update`` never mutates its inputs and accepts (and ignores) keyword arguments it
    does not know, so a chain can pass e.g. ``flush=True`` to every member.

    Example:
        >>> import torch, gradchain as gc
        >>> def double():
        ...     def init(params):
        ...         return gc.EmptyState()
        ...     def update(updates, state, params=None, **extra):
        ...         return {k: 2 * g for k, g in updates.items()}, state
        ...     return gc.GradientTransformation(init, update)
        >>> tx = double()
        >>> out, _ = tx.update({"w": torch.ones(2)}, tx.init({"w": torch.zeros(2)}))
        >>> out["w"]
        tensor([2., 2.])
    """

    init: InitFn | Callable[..., State]
    update: UpdateFn | Callable[..., tuple[Updates, State]]


class EmptyState(NamedTuple):
    """The state of a stateless transformation.

    Example:
        >>> import gradchain as gc
        >>> gc.identity().init({})
        EmptyState()
    """


def is_transformation(value: Any) -> bool:
    """Whether ``value`` is an ``(init, update)`` pair of callables (a
    :class:`GradientTransformation` or a plain tuple shaped like one).

    Example:
        >>> import gradchain as gc
        >>> gc.is_transformation(gc.identity()), gc.is_transformation(gc.identity)
        (True, False)
    """
    return (
        isinstance(value, tuple) and len(value) == 2 and callable(value[0]) and callable(value[1])
    )


# --------------------------------------------------------------------------- roles
# What a transformation *is* in a chain, declared by the factory that builds it (never
# guessed from names): an attribute on its ``update`` function, a frozenset of the roles
# below. Combinators give their own ``update`` the roles of their members (see
# ``combine.chain``), so a check sees through nesting. Read at construction only.
_ROLES_ATTR = "_gradchain_roles"
RULE = "update rule"  # turns gradients into the step (applies the learning rate)
PARTIAL_RULE = "update rule on some leaves"  # a rule inside masked / partition
HOLDS = "holds gradients back"  # accumulate_every, skip_if_nonfinite, loss_scale
UNSCALES = "unscales"  # loss_scale: divides the gradients by the loss scale
READS = "reads gradient values"  # clips, decay: wrong on gradients still loss-scaled
PASSIVE = "passive"  # reads no gradient value and commutes with scaling (identity, accumulate)


def roles_of(transform: Any) -> frozenset[str]:
    """The roles ``transform``'s factory declared (empty for an undeclared one)."""
    update = transform[1] if isinstance(transform, tuple) and len(transform) == 2 else None
    return frozenset(getattr(update, _ROLES_ATTR, ()))


def set_roles(update: Callable[..., Any], roles: Any) -> Callable[..., Any]:
    """Give ``update`` exactly these roles (replacing any it had); returns it. Not inside
    compiled code (a transformation built there is never checked, and the attribute would
    be a side effect the graph cannot hold)."""
    if not torch.compiler.is_compiling():
        setattr(update, _ROLES_ATTR, frozenset(roles))
    return update


def add_roles(update: Callable[..., Any], *roles: str) -> Callable[..., Any]:
    """Add ``roles`` to ``update``'s; returns it (nothing inside compiled code)."""
    if torch.compiler.is_compiling():
        return update
    return set_roles(update, frozenset(getattr(update, _ROLES_ATTR, ())) | set(roles))


def mark_update_rule(update: Callable[..., Any]) -> Callable[..., Any]:
    """Declare ``update`` as an update rule's (it turns gradients into the step, e.g. it
    applies the learning rate); returns it.

    Every built-in rule is declared so (``sgd``, ``adam``, ``adamw``, every rule of
    :mod:`gradchain.optim`, ``scale_by_learning_rate``), and so is a chain that holds one.
    Declare your own rule too: then ``chain`` refuses two rules in one chain or a gate
    (``accumulate_every``, ``skip_if_nonfinite``, ``loss_scale``) placed after it, and
    :class:`~gradchain.ChainedOptimizer` refuses it in front of a torch optimizer (which
    applies its own rule).

    Example:
        >>> import torch, gradchain as gc
        >>> def my_sign_sgd(lr):
        ...     def init(params):
        ...         return gc.EmptyState()
        ...     def update(updates, state, params=None, **extra):
        ...         return {k: -lr * g.sign() for k, g in updates.items()}, state
        ...     return gc.GradientTransformation(init, gc.mark_update_rule(update))
        >>> gc.is_update_rule(my_sign_sgd(0.1)), gc.is_update_rule(gc.clip_by_norm(1.0))
        (True, False)
        >>> gc.chain(my_sign_sgd(0.1), gc.sgd(0.1))
        Traceback (most recent call last):
        ...
        ValueError: chain: two update rules, member 0 (my_sign_sgd) and member 1 (...
    """
    return add_roles(update, RULE)


def is_update_rule(transform: Any) -> bool:
    """Whether ``transform`` is an update rule or holds one (a chain, ``masked`` or
    ``partition`` with one inside); see :func:`mark_update_rule`.

    Example:
        >>> import gradchain as gc
        >>> gc.is_update_rule(gc.adamw(1e-3)), gc.is_update_rule(gc.scale_by_learning_rate(0.1))
        (True, True)
        >>> gc.is_update_rule(gc.chain(gc.clip_by_norm(1.0), gc.accumulate_every(2)))
        False
    """
    return bool(roles_of(transform) & {RULE, PARTIAL_RULE})


def expect_state(state: Any, cls: type, who: str) -> None:
    """Raise ``TypeError`` unless ``state`` is a ``cls`` (the state ``who``'s init makes).

    One ``isinstance`` per call: it turns a state passed to the wrong transformation
    (e.g. a chain's tuple, or another member's state) into a message instead of an
    ``AttributeError`` deep inside the maths.
    """
    if not isinstance(state, cls):
        if type(state) is tuple:
            hint = " (a chain's state is a tuple of its members' states: give each member its own)"
        elif isinstance(state, (dict, list, torch.Tensor)):
            hint = (" (arguments in the wrong order? it is update(updates, state, params): "
                    "a tree of tensors was given as the state)")
        else:
            hint = (" (a state from another transformation, or from this one built with other "
                    "arguments, e.g. a schedule instead of a constant: make it with this "
                    "transformation's init)")
        raise TypeError(
            f"{who}.update: state must be the {cls.__name__} made by {who}(...).init(params), "
            f"got {type(state).__name__}{hint}"
        )


def expect_empty(state: Any, who: str) -> None:
    """:func:`expect_state` for a stateless transformation: ``EmptyState()`` (or ``None``,
    which code written for stateless transformations passes). A state of another
    transformation (a stale schedule state given to a constant rate) raises."""
    if state is not None and not isinstance(state, EmptyState):
        expect_state(state, EmptyState, who)


def donation(extra: dict[str, Any], who: str) -> tuple[bool, bool]:
    """Read the ``donate`` extra argument as ``(updates, state)``: which inputs a
    transformation may overwrite to build its outputs.

    ``donate=True`` gives up the incoming updates and the old state; ``donate="updates"``
    the incoming updates only, ``donate="state"`` the old state only; ``False`` (the
    default) nothing: ``update`` is pure.
    Donation never changes results: a transformation that reuses donated memory computes
    the same values, bit for bit, that it would compute into fresh tensors. After a
    donating call, the donated tensors hold unspecified values: use the outputs only.
    Transformations that ignore ``donate`` stay correct (they are just pure). Honour it in
    your own transformation with this function:

    Example:
        >>> import torch, gradchain as gc
        >>> gc.donation({"donate": True}, "mine"), gc.donation({}, "mine")
        ((True, True), (False, False))
        >>> tx = gc.chain(gc.clip_by_norm(1.0), gc.sgd(lr=0.1))
        >>> params = {"w": torch.zeros(2)}
        >>> grads = {"w": torch.tensor([3.0, 4.0])}
        >>> updates, state = tx.update(grads, tx.init(params), params, donate=True)
        >>> updates["w"]  # grads["w"] is given up: its memory may now hold anything
        tensor([-0.0600, -0.0800])
    """
    value = extra.get("donate", False)
    if value is False or value is None or torch.compiler.is_compiling():
        # Compiled code plans its own memory: writes into graph inputs would only add
        # copies back to them.
        return False, False
    if value is True:
        return True, True
    if value == "updates":
        return True, False
    if value == "state":
        return False, True
    raise ValueError(
        f"{who}.update: donate must be True, False, 'updates' or 'state', got {value!r}"
    )


DONATE_MODE = {(False, False): False, (True, False): "updates", (False, True): "state",
               (True, True): True}
"""The ``donate`` extra value for (updates given up, state given up)."""


class Ownership:
    """Whether a chain member's output is memory the chain alone holds, so that the next
    member may write into it (``donate="updates"``) without anyone seeing a change.

    An output leaf is owned when it is the only tensor on its storage (torch's count of
    the tensors, views and storage objects that use it is 1: a view of an input, a
    detached alias of a state tensor or a second output on the same memory would count)
    and is not itself one of the tensor objects held elsewhere: the chain's incoming
    updates, the params, the old states and the new states made so far (the same object
    in two places adds nothing to the count, so those are compared by identity). Memory
    behind two distinct storage objects (``torch.from_numpy`` twice on one array) is not
    seen. Only plain eager tensors qualify (``torch.func`` wrappers and compiled code keep
    the pure path), and nothing is owned on a torch without the storage count.
    """

    def __init__(self, updates: Updates, state: Any, params: Params) -> None:
        self.active = _USE_COUNT is not None and not torch.compiler.is_compiling()
        self.held: set[int] | None = None  # ids of the tensors held elsewhere
        self.roots = (updates, state, params)
        self.states_seen = 0  # the new states already in ``held`` (the chain's list grows)

    def owns(self, output: Updates, new_states: list[State]) -> bool:
        """Whether ``output`` is owned; ``new_states`` is the chain's list of the states
        made so far, which only grows: each joins what others hold once, when first seen."""
        if not self.active:
            return False
        held = self.held
        if held is None:
            held = self.held = set()
            for root in self.roots:
                if root is not None:
                    add_leaf_ids(root, held)
        if len(new_states) > self.states_seen:
            add_leaf_ids(new_states[self.states_seen :], held)
            self.states_seen = len(new_states)
        outs = [x for x in flatten(output)[0] if x is not None]
        if not outs:
            return True
        if not set(map(type, outs)) <= PLAIN:
            return False
        lay = _ops.layout(outs)
        if not lay.foreach or lay.broadcast or lay.meta:
            # Not plain eager tensors, or a view whose elements share memory (one element
            # shared by many: never written into).
            return False
        ids = set(map(id, outs))
        return (
            len(ids) == len(outs) and held.isdisjoint(ids)
            and set(map(_USE_COUNT, map(_STORAGE_ID, outs))) == _ONE  # type: ignore[arg-type]
        )


_ONE = {1}
_USE_COUNT = getattr(torch._C, "_storage_Use_Count", None)
_STORAGE_ID = getattr(torch._C, "_storage_id", None)
if _STORAGE_ID is None:
    _USE_COUNT = None


# --------------------------------------------------------------------------- basics
def stateless(
    fn: Callable[..., Updates], name: str | None = None, *, roles: tuple[str, ...] = ()
) -> GradientTransformation:
    """A transformation without state from a function of the updates (``optax.stateless``).

    ``fn(updates, params)`` returns the new updates; a ``fn`` that also takes
    ``**extra`` receives the keyword arguments given to ``update`` (e.g. ``donate``, see
    :func:`donation`). ``init`` returns ``EmptyState()``; ``update`` accepts that (or
    ``None``) as the state and refuses another transformation's state, naming ``name``
    (``fn``'s name by default), and returns the state it was given. Every stateless
    built-in (``identity``, ``scale``, ``clip_by_value``, ...) is made with it; ``roles``
    is how they declare themselves to ``chain``'s order checks (internal; declare a rule
    of your own with :func:`mark_update_rule` on the result's ``update``).

    Example:
        >>> import torch, gradchain as gc
        >>> def double(updates, params):
        ...     return {k: None if u is None else 2 * u for k, u in updates.items()}
        >>> tx = gc.stateless(double)
        >>> tx.update({"w": torch.ones(2), "b": None}, tx.init({}))
        ({'w': tensor([2., 2.]), 'b': None}, EmptyState())
        >>> tx.update({"w": torch.ones(2)}, gc.clip_by_norm(1.0).init({}))
        Traceback (most recent call last):
        ...
        TypeError: double.update: state must be the EmptyState made by double(...).init(params), got ClipByNormState (...)
    """
    if not callable(fn):
        raise TypeError(f"stateless: fn must be a function of (updates, params), got {fn!r}")
    who: str = name or getattr(fn, "__name__", None) or "stateless"
    if who == "<lambda>":
        who = "stateless"
    code = getattr(fn, "__code__", None)  # (a function or method: also while compiling)
    if code is not None:
        takes_extra = bool(code.co_flags & inspect.CO_VARKEYWORDS)
    elif torch.compiler.is_compiling():
        takes_extra = False
    else:
        try:  # functools.partial, a callable object
            takes_extra = any(
                p.kind is inspect.Parameter.VAR_KEYWORD
                for p in inspect.signature(fn).parameters.values()
            )
        except (TypeError, ValueError):  # a callable without a signature
            takes_extra = False

    def init(params: Params) -> EmptyState:
        del params
        return EmptyState()

    def update(
        updates: Updates, state: EmptyState, params: Params | None = None, **extra: Any
    ) -> tuple[Updates, EmptyState]:
        expect_empty(state, who)
        return (fn(updates, params, **extra) if takes_extra else fn(updates, params)), state

    if not torch.compiler.is_compiling():  # (a side effect compiled code cannot hold)
        update.__qualname__ = f"{who}.<locals>.update"  # the name a misuse message shows
    return GradientTransformation(init, add_roles(update, *roles))


def identity() -> GradientTransformation:
    """The transformation that passes updates through unchanged.

    Example:
        >>> import torch, gradchain as gc
        >>> tx = gc.identity()
        >>> tx.update({"w": torch.ones(1)}, tx.init({}))[0]
        {'w': tensor([1.])}
    """

    def identity(updates: Updates, params: Params) -> Updates:
        return updates

    return stateless(identity, roles=(PASSIVE,))
