"""The protocol: ``GradientTransformation``, ``chain`` and ``apply_updates``.

A gradient transformation is a pair of pure functions ``(init, update)``:

* ``init(params) -> state``
* ``update(updates, state, params=None, **extra) -> (updates, new_state)``

``chain`` composes transformations. Some transformations are *gates*
(``accumulate_every``, ``skip_if_nonfinite``, ``loss_scale``): on the steps a gate
closes, everything after it in the chain keeps its state and the chain emits zero
updates. How a chain finds out whether a gate is open without a host-device sync is
described in :func:`chain`.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol, TypeVar

import torch

from gradchain import tree as _tree
from gradchain.tree import _known_bool

Params = Any
Updates = Any
State = Any
Flag = torch.Tensor | bool  # a gate decision: a Python bool when known on the host

__all__ = [
    "donation",
    "GradientTransformation",
    "EmptyState",
    "identity",
    "chain",
    "apply_updates",
    "apply_updates_",
    "applied",
    "is_gate",
    "gate_state",
    "mark_gate",
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


# --------------------------------------------------------------------------- gates
# A gate marks its ``update`` function with this attribute and keeps a 0-dim bool
# ``is_open`` field in its state (see ``GateState`` below). ``chain`` uses the mark to
# know that a member manages its own state on closed upstream steps.
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


class _GateSpec(NamedTuple):
    flags: tuple[str, ...]
    host_flags: tuple[str, ...]
    absorbs_upstream: bool


_GATE_STATES: dict[type, _GateSpec] = {}

_S = TypeVar("_S", bound=type)


def gate_state(
    flags: tuple[str, ...] = ("is_open",),
    host_flags: tuple[str, ...] = (),
    absorbs_upstream: bool = False,
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
        missing = [f for f in flags if f not in getattr(cls, "_fields", ())]
        if missing:
            raise TypeError(f"gate_state: {cls.__name__} has no field(s) {missing}")
        _GATE_STATES[cls] = _GateSpec(tuple(flags), tuple(host_flags), bool(absorbs_upstream))
        return cls

    return register


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


_mark_gate = mark_gate


def _gate_flags(state: State) -> list[tuple[torch.Tensor, bool, bool]]:
    """The flags of every gate state inside ``state``, in order, as
    ``(flag, on_host, absorbs)`` (see :func:`gate_state`)."""
    flags: list[tuple[torch.Tensor, bool, bool]] = []

    def visit(node: Any) -> None:
        spec = _GATE_STATES.get(type(node))
        if spec is not None:
            for k, name in enumerate(spec.flags):
                flags.append(
                    (getattr(node, name), name in spec.host_flags, spec.absorbs_upstream and k == 0)
                )
            return
        if isinstance(node, (tuple, list)):
            for child in node:
                visit(child)
        elif isinstance(node, dict):
            for child in node.values():
                visit(child)

    visit(state)
    return flags


def _and(a: Flag, b: Flag) -> Flag:
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


def _fold_flags(
    host: Flag, data: Flag, state: State, read_host: bool = True
) -> tuple[Flag, Flag]:
    """Whether a step is applied after the gates in ``state``, as ``(host, data)`` parts,
    given the parts before them.

    The *host* part holds flags decided from counts alone (a closed accumulation window):
    a member behind a closed host flag behaves as if it was not called at all. The *data*
    part holds flags decided from values (finiteness): members behind it are called and
    keep their state, and an absorbing gate (``accumulate_every``) replaces it with its
    own. Python bools where known without touching the device, tensors otherwise.
    """
    for flag, on_host, absorbs in _gate_flags(state):
        if absorbs:
            data = True
        if on_host:
            value: Flag = flag
            if read_host:
                known = _known_bool(flag)
                if known is not None:
                    value = known
            host = _and(host, value)
        else:
            data = _and(data, flag)
    return host, data


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


_DONATE = {(False, False): False, (True, False): "updates", (False, True): "state",
           (True, True): True}


def _as_tensor(flag: Flag) -> torch.Tensor:
    return flag if isinstance(flag, torch.Tensor) else torch.tensor(flag)


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
    host, data = _fold_flags(True, True, state, read_host=False)
    result = _and(host, data)
    return torch.tensor(result) if isinstance(result, bool) else result


def _expect_state(state: Any, cls: type, who: str) -> None:
    """Raise ``TypeError`` unless ``state`` is a ``cls`` (the state ``who``'s init makes).

    One ``isinstance`` per call: it turns a state passed to the wrong transformation
    (e.g. a chain's tuple, or another member's state) into a message instead of an
    ``AttributeError`` deep inside the maths.
    """
    if not isinstance(state, cls):
        hint = (
            " (a chain's state is a tuple of its members' states: give each member its own)"
            if type(state) is tuple
            else ""
        )
        raise TypeError(
            f"{who}.update: state must be the {cls.__name__} made by {who}(...).init(params), "
            f"got {type(state).__name__}{hint}"
        )


# --------------------------------------------------------------------------- basics
def identity() -> GradientTransformation:
    """The transformation that passes updates through unchanged.

    Example:
        >>> import torch, gradchain as gc
        >>> tx = gc.identity()
        >>> tx.update({"w": torch.ones(1)}, tx.init({}))[0]
        {'w': tensor([1.])}
    """

    def init(params: Params) -> EmptyState:
        del params
        return EmptyState()

    def update(
        updates: Updates, state: EmptyState, params: Params | None = None, **extra: Any
    ) -> tuple[Updates, EmptyState]:
        del params, extra
        return updates, state

    return GradientTransformation(init, update)


def _zeros_like_tree(updates: Updates) -> Updates:
    leaves, spec = _tree.flatten(updates)
    for i, g in enumerate(leaves):
        if g is not None and not isinstance(g, torch.Tensor):
            raise _tree._bad_update(spec, i, g)
    return _tree.unflatten(spec, [None if g is None else torch.zeros_like(g) for g in leaves])


def _select_tree(flag: torch.Tensor, new: Any, old: Any) -> Any:
    """``new`` where ``flag`` else ``old``, leafwise over two trees of the same shape."""
    known = _known_bool(flag)
    if known is not None:
        # A host flag in eager mode: pick without computing a select (same result).
        return new if known else old
    new_leaves, spec = _tree.flatten(new)
    old_leaves = spec.flatten_up_to(old) if new_leaves else []
    out = []
    for n, o in zip(new_leaves, old_leaves):
        if isinstance(n, torch.Tensor) and isinstance(o, torch.Tensor):
            out.append(torch.where(flag.to(n.device), n, o))
        else:
            out.append(n)
    return _tree.unflatten(spec, out)


class _Ownership:
    """Whether a chain member's output is memory the chain alone holds, so that the next
    member may write into it (``donate="updates"``) without anyone seeing a change.

    Output leaves are compared by storage with the chain's incoming updates, the params,
    the old states and the new states made so far; one shared storage and the output is
    not owned. Only plain eager tensors qualify (``torch.func`` wrappers and compiled code
    keep the pure path).
    """

    def __init__(self, updates: Updates, state: Any, params: Params) -> None:
        self.active = not torch.compiler.is_compiling()
        self.held: set[int] | None = None
        self.roots = (updates, state, params)

    @staticmethod
    def _ptrs(tree: Any, into: set[int]) -> bool:
        for x in _tree.flatten(tree)[0]:
            if isinstance(x, torch.Tensor):
                if not _tree._use_foreach([x]) or x.is_meta:
                    return False
                into.add(x.untyped_storage().data_ptr())
        return True

    def owns(self, output: Updates, new_states: list[State]) -> bool:
        if not self.active:
            return False
        if self.held is None:
            self.held = set()
            if not all(self._ptrs(root, self.held) for root in self.roots if root is not None):
                self.active = False
                return False
        held = set(self.held)
        if not self._ptrs(new_states, held):
            return False
        seen: set[int] = set()
        for x in _tree.flatten(output)[0]:
            if x is None:
                continue
            if not isinstance(x, torch.Tensor) or not _tree._use_foreach([x]):
                return False
            if x.numel() == 0:
                continue
            ptr = x.untyped_storage().data_ptr()
            if ptr in held or ptr in seen:
                return False
            seen.add(ptr)
        return True


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Apply ``transforms`` in order; the state is the tuple of their states.

    Extra keyword arguments given to ``update`` reach every member. ``donate=True``
    (see :func:`donation`) lets members reuse the incoming updates' and their old state's
    memory; a member whose old state must survive a gate's select gets only the updates.

    **Gates.** A gate governs everything after it. When a gate closes a step, later
    members keep their state and the chain emits zeros. The chain finds out whether a
    gate is open from the gate's ``is_open`` flag:

    * a flag that is known without reading the device (``accumulate_every`` keeps its
      window position on the host) is read in eager mode, and on closed micro-steps the
      rest of the chain is not run at all: an adam behind ``accumulate_every(8)`` does its
      maths once per window;
    * a flag that is data on the device (finiteness in ``skip_if_nonfinite`` and
      ``loss_scale``) is never read: the rest of the chain runs and its new state is
      selected with ``torch.where``, so there is no host-device sync, and the cost of a
      skipped step is that of an applied one.

    Under ``torch.compile`` and ``torch.func`` transforms every flag is treated as data,
    so the same chain traces with ``fullgraph=True`` and batches under ``vmap``.

    Later gates receive the combined flag of the gates before them as the extra keyword
    ``gate_open`` and keep their own state on steps an earlier gate closed.

    Example:
        >>> import torch, gradchain as gc
        >>> tx = gc.chain(gc.clip_by_norm(1.0), gc.sgd(lr=0.5))
        >>> params = {"w": torch.zeros(2)}
        >>> updates, state = tx.update({"w": torch.tensor([3.0, 4.0])}, tx.init(params), params)
        >>> updates["w"]
        tensor([-0.3000, -0.4000])
    """
    transforms = tuple(transforms)
    for i, t in enumerate(transforms):
        if not (isinstance(t, tuple) and len(t) == 2 and callable(t[0]) and callable(t[1])):
            raise TypeError(
                f"chain: argument {i} must be a GradientTransformation (init, update), "
                f"got {type(t).__name__}"
            )
    gates = tuple(is_gate(t) for t in transforms)

    def init(params: Params) -> tuple[State, ...]:
        return tuple(t.init(params) for t in transforms)

    def update(
        updates: Updates, state: tuple[State, ...], params: Params | None = None, **extra: Any
    ) -> tuple[Updates, tuple[State, ...]]:
        if not isinstance(state, tuple) or len(state) != len(transforms):
            got = f"a tuple of {len(state)}" if type(state) is tuple else type(state).__name__
            raise ValueError(
                f"chain.update: state must be a tuple of {len(transforms)} member states "
                f"(from this chain's init), got {got}"
            )
        # Gates before this chain (when nested): all of them, and the host-decided part.
        gate_open: torch.Tensor | None = extra.pop("gate_open", None)
        host_open: torch.Tensor | None = extra.pop("host_open", None)
        host: Flag = True if host_open is None else host_open
        data: Flag = True if gate_open is None else gate_open
        new_states: list[State] = []
        # A pure call still lets a member write into what the member before it made (fresh
        # tensors nobody else holds): checked, not assumed (see _Ownership).
        # Donation as the caller gave it; members after the first get the updates donated
        # only if the output they receive is owned (a user's transformation may return
        # memory it keeps in its state).
        give_updates, give_state = donation(extra, "chain")
        owner = _Ownership(
            None if give_updates else updates, None if give_state else state, params
        )
        owned = give_updates
        for i, (t, s) in enumerate(zip(transforms, state)):
            if isinstance(data, torch.Tensor):
                known = _known_bool(data)
                if known is not None:
                    data = known
            both = _and(host, data)
            if both is False and not gates[i]:
                # Closed by a flag that is data but happens to be on the host (eager, CPU):
                # the select below would keep the old state, so skip the work. Later gates
                # still run (they see gate_open and keep their own state).
                new_states.append(s)
                continue
            open_t = None if both is True else _as_tensor(both)
            host_t = None if host is True else _as_tensor(host)
            # A plain member behind an undecided gate keeps its old state where the gate
            # is closed (the select below): that state must survive, so it is not donated.
            state_given = give_state and (open_t is None or gates[i])
            member_extra = {**extra, "donate": _DONATE[(owned, state_given)]}
            new_u, new_s = t.update(
                updates, s, params, gate_open=open_t, host_open=host_t, **member_extra
            )
            if open_t is not None and not gates[i]:
                # A plain member behind an undecided gate: keep its old state where closed.
                new_s = _select_tree(open_t, new_s, s)
            updates = new_u
            new_states.append(new_s)
            owned = i + 1 < len(transforms) and owner.owns(new_u, new_states)
            if gates[i]:
                host, data = _fold_flags(host, data, new_s)
                if host is False:
                    # A window is closed, known without reading the device: skip the rest
                    # of the chain. A closed gate emits zeros, which are this chain's output.
                    new_states.extend(state[i + 1 :])
                    return new_u, tuple(new_states)
        both = _and(host, data)
        if both is False:
            updates = _zeros_like_tree(updates)
        elif both is not True:
            updates = _select_tree(both, updates, _zeros_like_tree(updates))
        return updates, tuple(new_states)

    if any(gates):
        _mark_gate(update)
    _CHAIN_MEMBERS[update] = transforms
    return GradientTransformation(init, update)


_CHAIN_MEMBERS: weakref.WeakKeyDictionary[Callable[..., Any], tuple[GradientTransformation, ...]] = (
    weakref.WeakKeyDictionary()
)


def chain_members(tx: GradientTransformation) -> tuple[GradientTransformation, ...] | None:
    """The members of ``tx`` if it was made by :func:`chain`, else ``None``.

    Example:
        >>> import gradchain as gc
        >>> clip, sgd = gc.clip_by_norm(1.0), gc.sgd(0.1)
        >>> gc.chain_members(gc.chain(clip, sgd)) == (clip, sgd)
        True
        >>> gc.chain_members(clip) is None
        True
    """
    return _CHAIN_MEMBERS.get(tx.update)


# --------------------------------------------------------------------------- apply
def apply_updates(params: Params, updates: Updates) -> Params:
    """Return ``params + updates`` leafwise, each result cast to its param's dtype.

    A ``None`` update leaves its parameter unchanged. Nothing is modified in place.

    Example:
        >>> import torch, gradchain as gc
        >>> gc.apply_updates({"w": torch.ones(2)}, {"w": torch.tensor([0.5, -1.0])})
        {'w': tensor([1.5000, 0.0000])}
    """
    p_leaves, spec = _tree.flatten(params)
    u_leaves = _tree.flatten_like(spec, updates, "updates", "params")
    _check_updates_fit(spec, p_leaves, u_leaves, "apply_updates")
    out = list(p_leaves)
    rows = []
    for i, (p, u) in enumerate(zip(p_leaves, u_leaves)):
        if u is None or p is None:
            continue
        if p.dtype == u.dtype and _tree._use_foreach([p, u]):
            rows.append((p, u, i))
        else:
            out[i] = (p + u).to(p.dtype)
    # Same dtypes: one foreach add per (device, dtype) group, the same sums as leaf by leaf.
    for ps, us, idx in _tree.group_by_device_dtype(rows):
        for i, x in zip(idx, torch._foreach_add(ps, us)):
            out[i] = x
    return _tree.unflatten(spec, out)


def _check_updates_fit(spec: Any, p_leaves: list[Any], u_leaves: list[Any], who: str) -> None:
    """Each update is ``None`` or a tensor of its param's shape: metadata checks, done before
    anything is changed (a broadcast would silently change the param's shape, and an
    in-place update could fail half-way)."""
    for i, (p, u) in enumerate(zip(p_leaves, u_leaves)):
        if u is None or p is None:
            continue
        if not (isinstance(u, torch.Tensor) and isinstance(p, torch.Tensor)):
            bad, what = ("updates", u) if not isinstance(u, torch.Tensor) else ("params", p)
            raise TypeError(
                f"{who}: {bad}{_tree._leaf_path(spec, i)} must be a torch.Tensor or None, "
                f"got {type(what).__name__}"
            )
        if u.shape != p.shape:
            path = _tree._leaf_path(spec, i)
            raise ValueError(
                f"{who}: updates{path} has shape {tuple(u.shape)} but params{path} has shape "
                f"{tuple(p.shape)}"
            )


def apply_updates_(params: Params, updates: Updates) -> Params:
    """In-place ``params += updates`` for live tensors (e.g. ``nn.Parameter``); returns ``params``.

    Runs under ``torch.no_grad()`` with ``torch._foreach_add_`` per (device, dtype) group.

    Example:
        >>> import torch, gradchain as gc
        >>> model = torch.nn.Linear(2, 1)
        >>> params = dict(model.named_parameters())
        >>> before = model.bias.detach().clone()
        >>> _ = gc.apply_updates_(params, {"weight": None, "bias": torch.ones(1)})
        >>> bool(torch.equal(model.bias.detach(), before + 1))
        True
    """
    p_leaves, spec = _tree.flatten(params)
    u_leaves = _tree.flatten_like(spec, updates, "updates", "params")
    _check_updates_fit(spec, p_leaves, u_leaves, "apply_updates_")
    pairs = [(p, u) for p, u in zip(p_leaves, u_leaves) if p is not None and u is not None]
    with torch.no_grad():
        for ps, us in _tree.group_by_device_dtype(pairs):
            # No cast of the updates first: the add runs in the promoted dtype and rounds
            # once into the param's, exactly as ``apply_updates`` does.
            torch._foreach_add_(ps, us)
    return params
