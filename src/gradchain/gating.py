"""The gate protocol, and the one walker over a chain's members that reads it.

A *gate* (``accumulate_every``, ``skip_if_nonfinite``, ``loss_scale``, or a combinator
holding one) holds some steps back: in ``chain(a, gate, b, c)``, on a step the gate
closes, ``b`` and ``c`` keep their state and the chain emits zeros. A gate declares
itself in two places:

* its ``update`` function is marked with :func:`mark_gate`, so combinators know, before
  calling it, that it handles the ``gate_open``/``host_open`` keywords itself;
* its state class is declared with :func:`gate_state`: which 0-dim bool fields are its
  flags, which of them are decided on the host from counts alone (an accumulation
  window), and whether it replaces the flags of the gates before it.

Transformations that can *refuse* a step outright (``clip_by_norm(error_if_nonfinite=
True)``) declare their error flags with :func:`error_flags`; drivers that can raise
(``ChainedOptimizer``) read them with :func:`new_errors`.

:class:`GateWalk` is the single piece of code that folds these flags while members run:
:func:`~gradchain.chain`, :func:`~gradchain.masked` / :func:`~gradchain.partition`,
:func:`~gradchain.update_and_apply_` and :class:`~gradchain.ChainedOptimizer` all drive it.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import torch

from gradchain import _ops
from gradchain._ops import known_bool, known_int
from gradchain._tree import (
    Leaves,
    flatten,
    flatten_like,
    group_by_device_dtype,
    unflatten,
)
from gradchain.base import GradientTransformation, State, Updates, is_transformation

Flag = torch.Tensor | bool  # a gate decision: a Python bool when known on the host

__all__ = [
    "Flag",
    "GateWalk",
    "Window",
    "Decision",
    "applied",
    "decision",
    "error_flags",
    "gate_state",
    "is_gate",
    "known_bool",
    "known_int",
    "mark_gate",
    "new_errors",
    "run_branches",
    "step_flag",
    "window_closes",
]

_GATE_ATTR = "_gradchain_gate"


def is_gate(transform: GradientTransformation) -> bool:
    """Whether ``transform`` is a gate (or a chain that contains one).

    Example:
        >>> import gradchain as gc
        >>> gc.is_gate(gc.accumulate_every(2)), gc.is_gate(gc.clip_by_norm(1.0))
        (True, False)
        >>> gc.is_gate(gc.chain(gc.clip_by_norm(1.0), gc.skip_if_nonfinite()))
        True
    """
    return bool(getattr(transform.update, _GATE_ATTR, False))


def mark_gate(update: Callable[..., Any]) -> Callable[..., Any]:
    """Mark an ``update`` function as a gate's (see :func:`gate_state`); returns it.

    Example:
        >>> import gradchain as gc
        >>> def init(params):
        ...     return gc.EmptyState()
        >>> def update(updates, state, params=None, gate_open=None, **extra):
        ...     return updates, state
        >>> gc.is_gate(gc.GradientTransformation(init, gc.mark_gate(update)))
        True
    """
    setattr(update, _GATE_ATTR, True)
    return update


class Window(NamedTuple):
    """Where a windowed gate (``accumulate_every``) keeps its host-known window: the field
    names of its position, its length and its running sums."""

    position: str
    length: str
    sums: str


class _GateSpec(NamedTuple):
    flags: tuple[str, ...]
    host_flags: tuple[str, ...]
    absorbs_upstream: bool
    window: Window | None


_GATE_STATES: dict[type, _GateSpec] = {}
_ERROR_FIELDS: dict[type, tuple[str, ...]] = {}

_S = TypeVar("_S", bound=type)


def gate_state(
    flags: tuple[str, ...] = ("is_open",),
    host_flags: tuple[str, ...] = (),
    absorbs_upstream: bool = False,
    window: Window | None = None,
) -> Callable[[_S], _S]:
    """Class decorator that declares a NamedTuple as the state of a gate.

    Args:
        flags: names of its 0-dim bool fields; the step is open when all are true.
        host_flags: those of ``flags`` decided on the host from counts alone (never from
            device data); a chain reads them in eager mode and, when one is false, skips
            the rest of the chain without computing it.
        absorbs_upstream: the gate's flags replace, rather than join, the flags of the
            gates before it (``accumulate_every`` drops micro-steps an earlier gate
            closed and opens on its own schedule).
        window: for a gate that closes on a host-known count, where its window is kept
            (see :class:`Window`); drivers use it to know ahead whether the next call can
            apply, without a sync.

    A gate's ``update`` must be marked with :func:`mark_gate`, accept the extra keyword
    ``gate_open`` (the combined flag of earlier gates, or ``None`` when they are known
    open), keep its own state on steps ``gate_open`` is false, and emit zeros when closed.

    Example:
        >>> from typing import NamedTuple
        >>> import torch, gradchain as gc
        >>> @gc.gate_state()
        ... class EveryOtherState(NamedTuple):
        ...     is_open: torch.Tensor
        >>> bool(gc.applied((EveryOtherState(torch.tensor(False)),)))
        False
    """

    def register(cls: _S) -> _S:
        fields = getattr(cls, "_fields", ())
        named = list(flags) + (list(window) if window is not None else [])
        missing = [f for f in named if f not in fields]
        if missing:
            raise TypeError(f"gate_state: {cls.__name__} has no field(s) {missing}")
        _GATE_STATES[cls] = _GateSpec(tuple(flags), tuple(host_flags), bool(absorbs_upstream),
                                      window)
        return cls

    return register


def error_flags(*names: str) -> Callable[[_S], _S]:
    """Class decorator: these 0-dim bool fields of a state say that the last ``update``
    refused the step (e.g. ``clip_by_norm(error_if_nonfinite=True)`` met a nan norm).

    A pure chain only records the flag; a driver that can raise reads the flags that
    changed in a step with :func:`new_errors` (``ChainedOptimizer`` raises and changes
    nothing).

    Example:
        >>> from typing import NamedTuple
        >>> import torch
        >>> from gradchain.gating import error_flags, new_errors
        >>> @error_flags("failed")
        ... class CheckState(NamedTuple):
        ...     failed: torch.Tensor
        >>> old = (CheckState(torch.tensor(False)),)
        >>> new_errors((CheckState(torch.tensor(True)),), old)
        [tensor(True)]
    """

    def register(cls: _S) -> _S:
        missing = [f for f in names if f not in getattr(cls, "_fields", ())]
        if missing:
            raise TypeError(f"error_flags: {cls.__name__} has no field(s) {missing}")
        _ERROR_FIELDS[cls] = tuple(names)
        return cls

    return register


# --------------------------------------------------------------------------- flags
def _state_nodes(state: State) -> list[Any]:
    """The gate states inside ``state``, in order (depth first)."""
    return _flag_nodes(state, errors=False)[0]


def _flag_nodes(state: State, errors: bool = True) -> tuple[list[Any], list[Any]]:
    """The gate states of ``state`` (the outermost ones, depth first) and, with ``errors``,
    every error-flag state (see :func:`error_flags`, nested in a gate's state or not), in
    one walk."""
    gates: list[Any] = []
    found: list[Any] = []

    def visit(node: Any, in_gate: bool) -> None:
        kind = type(node)
        if errors and kind in _ERROR_FIELDS:
            found.append(node)
        if not in_gate and kind in _GATE_STATES:
            gates.append(node)
            if not errors:
                return  # nothing more to find inside a gate's state
            in_gate = True
        if isinstance(node, (tuple, list)):
            for child in node:
                if not isinstance(child, torch.Tensor):
                    visit(child, in_gate)
        elif isinstance(node, dict):
            for child in node.values():
                if not isinstance(child, torch.Tensor):
                    visit(child, in_gate)

    visit(state, False)
    return gates, found


def and_flags(a: Flag, b: Flag) -> Flag:
    """Both flags: a Python bool where either settles it, else a tensor (no sync)."""
    if a is False or b is False:
        return False
    if a is True:
        return b
    if b is True:
        return a
    assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
    # Move the host flag to the accelerator, never the other way (that would sync).
    if a.device.type == "cpu" and b.device.type != "cpu":
        a, b = b, a
    return torch.logical_and(a, b.to(a.device))


def as_tensor(flag: Flag) -> torch.Tensor:
    return flag if isinstance(flag, torch.Tensor) else torch.tensor(flag)


def _read(flag: Flag) -> Flag:
    """``flag`` as a Python bool where that is free (see :func:`known_bool`)."""
    if isinstance(flag, torch.Tensor):
        known = known_bool(flag)
        if known is not None:
            return known
    return flag


def fold_flags(host: Flag, data: Flag, state: State, read_host: bool = True) -> tuple[Flag, Flag]:
    """Whether a step is applied after the gates in ``state``, as ``(host, data)`` parts,
    given the parts before them.

    The *host* part holds flags decided from counts alone (a closed accumulation window):
    a member behind a closed host flag behaves as if it was not called at all. The *data*
    part holds flags decided from values (finiteness): members behind it are called and
    keep their state, and an absorbing gate (``accumulate_every``) replaces it with its
    own. Python bools where known without touching the device, tensors otherwise.
    """
    return _fold_nodes(host, data, _state_nodes(state), read_host)


def _fold_nodes(host: Flag, data: Flag, nodes: list[Any], read_host: bool) -> tuple[Flag, Flag]:
    for node in nodes:
        spec = _GATE_STATES[type(node)]
        for k, name in enumerate(spec.flags):
            flag = getattr(node, name)
            if spec.absorbs_upstream and k == 0:
                data = True
            if name in spec.host_flags:
                host = and_flags(host, _read(flag) if read_host else flag)
            else:
                data = and_flags(data, flag)
    return host, data


def expect_chain_state(state: Any, who: str, fix: str) -> None:
    """Raise ``TypeError`` when ``state`` is an optimizer or a transformation where the
    state of a chain is expected (a silent ``False`` or an unscaled loss otherwise);
    ``fix`` says what to pass instead."""
    if isinstance(state, torch.optim.Optimizer):
        raise TypeError(
            f"{who}: got the optimizer {type(state).__name__}, not a chain state; {fix}"
        )
    if is_transformation(state):
        raise TypeError(
            f"{who}: got a GradientTransformation, not its state; pass the state that "
            "tx.init() / tx.update() returned"
        )


def applied(state: State) -> torch.Tensor:
    """Whether the last ``update`` that produced ``state`` was applied: every gate open.

    Returns a 0-dim bool tensor (``True`` for a chain without gates). Reading its value
    (``bool(...)``) is the one host-device sync a training loop needs per step.

    Example:
        >>> import torch, gradchain as gc
        >>> tx = gc.chain(gc.accumulate_every(2), gc.sgd(lr=0.1))
        >>> params = {"w": torch.zeros(2)}
        >>> state = tx.init(params)
        >>> _, state = tx.update({"w": torch.ones(2)}, state, params)
        >>> bool(gc.applied(state))
        False
        >>> _, state = tx.update({"w": torch.ones(2)}, state, params)
        >>> bool(gc.applied(state))
        True
    """
    expect_chain_state(state, "applied", "use opt.last_step_applied (or gc.applied(opt.tx_state))")
    return as_tensor(and_flags(*fold_flags(True, True, state, read_host=False)))


def step_flag(state: State) -> Flag:
    """Whether the last ``update`` was applied, as a Python bool where that is known on
    the host (a closed window, an eager CPU flag) and as a 0-dim bool tensor otherwise:
    what a driver reads (at most once per step) to decide whether to step.

    Example:
        >>> import torch, gradchain as gc
        >>> from gradchain.gating import step_flag
        >>> tx = gc.accumulate_every(2)
        >>> _, state = tx.update({"w": torch.ones(1)}, tx.init({"w": torch.zeros(1)}))
        >>> step_flag(state)
        False
    """
    return _applies(_state_nodes(state))


def _applies(gates: list[Any]) -> Flag:
    """Whether a step passes these gate states (:func:`step_flag` of their state)."""
    host, data = _fold_nodes(True, True, gates, read_host=True)
    return host if host is False else and_flags(host, data)


def new_errors(state: State, old_state: State) -> list[torch.Tensor]:
    """The error flags (see :func:`error_flags`) in ``state`` that the last step set: those
    not carried over unchanged from ``old_state`` (a stored error flag is always false,
    since a true one refuses the step before it is stored). Not read: no sync."""
    return decision(state, _error_values(_flag_nodes(old_state)[1])).new_errors


class Decision(NamedTuple):
    """What a driver reads after an ``update`` to decide whether to step (see
    :func:`decision`)."""

    flag: Flag  # as step_flag
    new_errors: list[torch.Tensor]  # as new_errors
    errors: list[torch.Tensor]  # every error flag of the state: the next call's old ones


def _error_values(nodes: list[Any]) -> list[torch.Tensor]:
    return [getattr(node, name) for node in nodes for name in _ERROR_FIELDS[type(node)]]


def decision(state: State, old_errors: list[torch.Tensor]) -> Decision:
    """:func:`step_flag` and :func:`new_errors` in one walk over ``state``, for a driver
    that decides on every step: ``old_errors`` is the ``errors`` of the previous decision
    (the error flags of the state this step started from). Not read: no sync.

    Example:
        >>> import torch, gradchain as gc
        >>> from gradchain.gating import decision
        >>> tx = gc.clip_by_norm(1.0, error_if_nonfinite=True)
        >>> state = tx.init({"w": torch.zeros(2)})
        >>> before = decision(state, []).errors
        >>> _, state = tx.update({"w": torch.tensor([float("nan"), 0.0])}, state)
        >>> found = decision(state, before)
        >>> found.flag, found.new_errors
        (True, [tensor(True)])
    """
    gates, error_nodes = _flag_nodes(state)
    flag = _applies(gates)
    errors = _error_values(error_nodes)
    if not errors or (
        len(errors) == len(old_errors) and all(map(operator.is_, errors, old_errors))
    ):  # none, or all carried over unchanged (the usual step): checked at C speed
        return Decision(flag, [], errors)
    return Decision(flag, [f for f in errors if not any(f is o for o in old_errors)], errors)


# --------------------------------------------------------------------------- windows
def _window_nodes(state: State) -> list[tuple[Any, Window]]:
    out = []
    for node in _state_nodes(state):
        window = _GATE_STATES[type(node)].window
        if window is not None:
            out.append((node, window))
    return out


def has_window(state: State) -> bool:
    """Whether ``state`` holds a windowed gate (``accumulate_every``)."""
    return bool(_window_nodes(state))


def next_call_closes(state: State) -> bool:
    """Whether the next call can apply as far as windows tell: every window reaches its
    length on it (host counters, read without a sync). ``True`` without windows."""
    for node, window in _window_nodes(state):
        position = known_int(getattr(node, window.position))
        length = known_int(getattr(node, window.length))
        if position is not None and length is not None and position + 1 < length:
            return False
    return True


# Set on the state types of chains whose state is a NamedTuple (named_chain): their first
# member is the chain's first member, as for a plain tuple.
CHAIN_STATE_ATTR = "_gradchain_chain_state"


def _is_chain_state(state: State) -> bool:
    return (type(state) is tuple or getattr(type(state), CHAIN_STATE_ATTR, False)) and bool(state)


def _leading(state: State) -> State:
    while _is_chain_state(state):
        state = state[0]
    return state


def leading_window(state: State) -> tuple[Any, Window] | None:
    """The windowed gate state that comes first in a (nested) chain, and its window, or
    ``None`` when the chain does not start with one."""
    node = _leading(state)
    spec = _GATE_STATES.get(type(node))
    if spec is None or spec.window is None:
        return None
    return node, spec.window


def replace_leading(state: State, node: Any) -> State:
    """``state`` with its leading gate state (see :func:`leading_window`) replaced."""
    if not _is_chain_state(state):
        return node
    items = (replace_leading(state[0], node), *state[1:])
    return items if type(state) is tuple else type(state)(*items)


# --------------------------------------------------------------------------- selects
def select_tree(flag: torch.Tensor, new: Any, old: Any) -> Any:
    """``new`` where ``flag`` else ``old``, leafwise over two trees of the same shape."""
    known = known_bool(flag)
    if known is not None:
        # A host flag in eager mode: pick without computing a select (same result).
        return new if known else old
    new_leaves, spec = flatten(new)
    old_leaves = spec.flatten_up_to(old) if new_leaves else []
    out = []
    for n, o in zip(new_leaves, old_leaves):
        if isinstance(n, torch.Tensor) and isinstance(o, torch.Tensor):
            out.append(torch.where(flag.to(n.device), n, o))
        else:
            out.append(n)
    return unflatten(spec, out)


def keep_where_closed(gate_open: torch.Tensor | None, new: Any, old: Any) -> Any:
    """A gate's own state: the new one where the earlier gates were open, else the old one."""
    return new if gate_open is None else select_tree(gate_open, new, old)


def zeros_where_closed(flag: Flag, updates: Updates) -> Updates:
    """``updates`` where ``flag``, else zeros; no gradient-sized zeros are made: a closed
    host flag gives broadcast views of a 0-dim zero, a tensor flag selects against one."""
    if flag is True:
        return updates
    view = Leaves(updates)
    if flag is False:
        return view.put(_ops.zeros_view(view.values))
    return view.put(_ops.where_zeros(flag, view.values))


# --------------------------------------------------------------------------- the walker
class GateWalk:
    """The gate flags along a sequence of members, folded as the members run.

    ``host`` is the part decided from counts alone (a member behind a closed host flag
    behaves as if not called), ``data`` the part decided from values (members behind it
    run and keep their state where it is closed). Both are Python bools where known on the
    host and 0-dim bool tensors otherwise (compiled, vmapped, on an accelerator), so a
    walk never syncs. Usage, for members ``txs`` with gate marks ``gates``::

        walk = GateWalk.from_extra(extra)       # the flags of enclosing gates
        for tx, is_gate, s in zip(txs, gates, states):
            if walk.skips(is_gate):             # closed, known on the host: keep s
                continue
            updates, s = walk.call(tx, is_gate, updates, s, params, extra)
            if is_gate:
                walk.fold(s)
        updates = walk.finish(updates)          # zeros where closed
    """

    __slots__ = ("host", "data")

    def __init__(self, gate_open: Flag | None = None, host_open: Flag | None = None) -> None:
        self.host: Flag = True if host_open is None else host_open
        self.data: Flag = True if gate_open is None else gate_open

    @classmethod
    def from_extra(cls, extra: dict[str, Any]) -> GateWalk:
        """The walk below an enclosing one: takes ``gate_open``/``host_open`` out of the
        extra keywords a combinator received."""
        return cls(extra.pop("gate_open", None), extra.pop("host_open", None))

    def open(self) -> Flag:
        """Whether the step is open so far: ``True``/``False`` where known, else a tensor."""
        self.data = _read(self.data)
        return and_flags(self.host, self.data)

    @property
    def closed_on_host(self) -> bool:
        """A window is closed, known without reading the device: the rest is not run."""
        return self.host is False

    def skips(self, is_gate: bool) -> bool:
        """Whether a member is skipped (keeps its state, not called): a plain member behind
        a flag known closed. Gates are still called: they keep their own state."""
        return not is_gate and self.open() is False

    def keywords(self) -> dict[str, torch.Tensor | None]:
        """The ``gate_open``/``host_open`` keywords for a member (``None`` where open)."""
        both = self.open()
        return {
            "gate_open": None if both is True else as_tensor(both),
            "host_open": None if self.host is True else as_tensor(self.host),
        }

    def call(
        self, tx: GradientTransformation, is_gate: bool, updates: Updates, state: State,
        params: Any, extra: dict[str, Any],
    ) -> tuple[Updates, State]:
        """Run one member under the walk; a plain member behind an undecided flag keeps its
        old state where the flag is closed (selected, no sync)."""
        if is_gate:
            return tx.update(updates, state, params, **self.keywords(), **extra)
        # A plain member runs as if open (a nested chain of plain members would otherwise
        # select its members' states, and this walk the same states again): its new state
        # is selected once, here.
        new_u, new_s = tx.update(updates, state, params, gate_open=None, host_open=None, **extra)
        flag = self.open()
        if flag is not True:
            new_s = select_tree(as_tensor(flag), new_s, state)
        return new_u, new_s

    def state_survives(self, is_gate: bool) -> bool:
        """Whether a member's old state may be given up (donated) to it: not when the walk
        may select it back (a plain member behind an undecided flag)."""
        return is_gate or self.open() is True

    def fold(self, gate_states: State) -> None:
        """Take in the flags of the gate states a member just produced."""
        self.host, self.data = fold_flags(self.host, self.data, gate_states)

    def finish(self, updates: Updates) -> Updates:
        """The output: ``updates`` where the step is open, zeros where closed."""
        return zeros_where_closed(self.open(), updates)

    def opened_window(self, data_before: Flag) -> None:
        """Inside the branch where a windowed gate closes its window (see
        :func:`window_closes`): its host flag is open, and so is its data flag when no
        earlier gate had one (every micro-step of the window was accumulated)."""
        self.host = True
        if data_before is True:
            self.data = True

    def branch(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """While tracing (``torch.compile``), the part of the flag that can be read on the
        host for free (a 0-dim bool on the CPU: an accumulation window's position, or any
        flag of a CPU run), and the flag that remains when it is true (for the
        ``GateWalk(gate_open=...)`` of the rest, made inside the branch); ``None`` when no
        part can be branched on (eager mode reads such flags directly; on an accelerator
        a data flag stays a select, no sync).

        The rest of a chain behind it then runs under :func:`run_branches`
        (``torch.cond``): its maths is done only on steps the flag opens, and its state is
        not selected leaf by leaf.
        """
        if not torch.compiler.is_compiling():
            return None
        parts = [f for f in (self.host, self.data) if isinstance(f, torch.Tensor)]
        on_host = [f for f in parts if f.device.type == "cpu" and f.numel() == 1]
        if not on_host:
            return None
        pred = on_host[0] if len(on_host) == 1 else torch.logical_and(*on_host)
        keep = [f for f in parts if not any(f is h for h in on_host)]
        # The host part is settled inside the branch; a data flag on an accelerator stays.
        return pred, keep[0] if keep else None


def window_closes(state: State, extra: dict[str, Any]) -> torch.Tensor | None:
    """While tracing (``torch.compile``), for the state of a windowed gate
    (``accumulate_every``) whose window position lives on the host: whether this call
    closes its window (``position + 1 >= length``, or ``flush``), a 0-dim CPU bool that a
    chain branches on with ``torch.cond``, so that each branch runs the gate with the
    answer known (keyword ``window_closes``) and computes no select; ``None`` otherwise."""
    if not torch.compiler.is_compiling():
        return None
    spec = _GATE_STATES.get(type(state))
    if spec is None or spec.window is None:
        return None
    position = getattr(state, spec.window.position)
    length = getattr(state, spec.window.length)
    flush = extra.get("flush", False)
    parts = [position, length] + ([flush] if isinstance(flush, torch.Tensor) else [])
    if any(p.device.type != "cpu" or p.numel() != 1 for p in parts):
        return None
    closes = (position + 1 >= length).reshape(())
    if flush is True:
        closes = torch.ones_like(closes)
    elif isinstance(flush, torch.Tensor):
        closes = torch.logical_or(closes, flush.to(torch.bool).reshape(()))
    return closes


def run_branches(
    pred: torch.Tensor,
    when_open: Callable[[Updates, tuple[State, ...]], tuple[Updates, tuple[State, ...]]],
    updates: Updates,
    states: tuple[State, ...],
    when_closed: Callable[[Updates, tuple[State, ...]], tuple[Updates, tuple[State, ...]]]
    | None = None,
) -> tuple[Updates, tuple[State, ...]]:
    """``when_open(updates, states)`` where the 0-dim bool ``pred`` is true, else
    ``when_closed(updates, states)`` (by default: zeros shaped like ``updates`` and
    ``states`` unchanged), as one ``torch.cond`` (traced code).

    Both branches return fresh tensors (``torch.cond`` allows no aliasing of its inputs;
    inductor writes a fresh result straight into its copy), and both must keep the
    structure, shapes and dtypes of the updates and the states, as every built-in does.
    """
    leaves, spec = flatten((updates, states))
    n_updates = len(flatten(updates)[0])
    at = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]

    def rebuild(tensors: tuple[torch.Tensor, ...]) -> Any:
        filled = list(leaves)
        for i, t in zip(at, tensors):
            filled[i] = t
        return unflatten(spec, filled)

    def on_open(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        u, ss = rebuild(tensors)
        got: list[Any] = flatten_like(spec, when_open(u, ss), "(updates, states) after a gate",
                                      "(updates, states) before it")
        if any(not isinstance(got[i], torch.Tensor) for i in at):
            raise TypeError(
                "chain under torch.compile: the members after a gate must return a tensor "
                "wherever they were given one (updates and states)"
            )
        return tuple(got[i].clone() for i in at)

    def on_closed(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if when_closed is not None:
            u, ss = rebuild(tensors)
            got: list[Any] = flatten_like(spec, when_closed(u, ss), "(updates, states)",
                                          "(updates, states) before it")
            return tuple(got[i].clone() for i in at)
        out = [torch.zeros_like(t) if i < n_updates else t for i, t in zip(at, tensors)]
        # The kept states, copied (no aliasing in a branch): floating leaves by one
        # ``x * 1`` per (device, dtype) group (exact, nan and -0. included), so inductor
        # emits a loop per shape, not per leaf.
        rows = [(t, k) for k, (i, t) in enumerate(zip(at, tensors))
                if i >= n_updates and t.is_floating_point()]
        fresh = {k for k, i in enumerate(at) if i < n_updates}
        for ts, ks in group_by_device_dtype(rows):
            for k, copy in zip(ks, torch._foreach_mul(ts, 1.0)):
                out[k] = copy
                fresh.add(k)
        return tuple(t if k in fresh else t.clone() for k, t in enumerate(out))

    out = torch.cond(pred, on_open, on_closed, tuple(leaves[i] for i in at))
    result: tuple[Updates, tuple[State, ...]] = rebuild(tuple(out))
    return result
