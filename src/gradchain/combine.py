"""Composing transformations: ``chain``, ``chain_members``, ``masked`` and ``partition``.

Orchestration only: the gate policy (which member runs, which state survives a closed
step) is :class:`gradchain.gating.GateWalk`'s, driven from here.

``masked`` and ``partition`` work on the leaf *positions* of the updates tree. A member
transformation sees the whole tree with the leaves that are not its own replaced by
``None``, the library's "no gradient here" value: ``None`` passes through, its state does
not advance, and ``init`` of a ``None`` leaf gives ``None`` state. So a member keeps state
only for its own leaves, and running it inside ``partition`` is the same as running it by
hand on the subset.

Masks and labels are decided from the *structure* of the tree (names, shapes, dtypes),
never from tensor values: they are Python values, so choosing a member costs no
host-device sync and traces under ``torch.compile`` and ``torch.func``.

Because member states hold ``None`` at the leaves that are not theirs, batching states
with ``torch.func.vmap`` needs ``in_dims``/``out_dims`` trees with ``None`` at those
positions (``vmap`` refuses ``in_dims=0`` for a ``None`` input or output), e.g. built with
``gradchain.tree.flatten``: ``0`` for each tensor leaf, ``None`` for each ``None``.
"""

from __future__ import annotations

import contextvars
import keyword
import weakref
from collections.abc import Callable, Hashable, Mapping
from typing import Any, NamedTuple

import optree
import torch

from gradchain import _checks, _tree
from gradchain.base import (
    DONATE_MODE,
    HOLDS,
    PARTIAL_RULE,
    PASSIVE,
    READS,
    RULE,
    UNSCALES,
    GradientTransformation,
    Ownership,
    Params,
    State,
    Updates,
    donation,
    is_transformation,
    roles_of,
    set_roles,
)
from gradchain.gating import (
    CHAIN_STATE_ATTR,
    GateWalk,
    is_gate,
    mark_gate,
    run_branches,
    window_closes,
)
from gradchain.state import named_entries

__all__ = [
    "chain",
    "chain_members",
    "named_chain",
    "MaskedState",
    "masked",
    "PartitionState",
    "partition",
]


# Set while a chain's init runs: the chains inside it do not check the params again.
_IN_INIT: contextvars.ContextVar[bool] = contextvars.ContextVar("gradchain_in_init",
                                                                 default=False)


def _init_members(transforms: tuple[GradientTransformation, ...], params: Params) -> Any:
    """``chain``'s init: the params are checked once, by the outermost chain. (A module
    function: a chain pickled by value refers to it, not to the context variable.)"""
    if _IN_INIT.get() or torch.compiler.is_compiling():
        return tuple(t.init(params) for t in transforms)
    _checks.params_tree(params, "chain.init")
    token = _IN_INIT.set(True)
    try:
        return tuple(t.init(params) for t in transforms)
    finally:
        _IN_INIT.reset(token)


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

    Under ``torch.func`` transforms every flag is treated as data, so the same chain
    batches under ``vmap``. Under ``torch.compile`` (``fullgraph=True`` works) a flag that
    lives on the host (an accumulation window's position; any flag when the run is on the
    CPU) becomes a ``torch.cond``: a window gate and the rest of the chain are two
    branches (the window closes or not), and behind the last gate the rest of the chain is
    computed only in the branch where the step is open, so a closed step costs a copy of
    the later members' states instead of their maths, and no per-leaf select is traced.
    Flags on an accelerator stay selects (no sync). The members after a gate must then
    return updates and states of the structure, shapes and dtypes they were given (every
    built-in does) and must not modify their inputs (the protocol's purity).

    Later gates receive the combined flag of the gates before them as the extra keyword
    ``gate_open`` and keep their own state on steps an earlier gate closed.

    **Orders that cannot be meant are refused** when the chain is built (from the roles
    the factories declare, see :func:`~gradchain.mark_update_rule`; nothing is read from
    a tensor): two update rules; a gate that holds gradients back (``accumulate_every``,
    ``skip_if_nonfinite``, ``loss_scale``) after the rule; ``loss_scale`` after anything
    but ``accumulate_every`` (a clip, a decay or a skip would see scaled gradients).
    ``init`` refuses a module, an iterator (``model.parameters()``), non-tensor leaves
    and integer tensors, and warns for a ``state_dict()``.

    Raises:
        TypeError: an argument is not a transformation (the message says when it is an
            uncalled factory or a list).
        ValueError: one of the orders above, naming the members by index and name.

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
        if not is_transformation(t):
            raise TypeError(f"chain: argument {i} {not_a_transformation(t)}")
    gates = tuple(is_gate(t) for t in transforms)
    last_gate = ([i for i, g in enumerate(gates) if g] or [-1])[-1]  # traceable (no max default)
    compiling = torch.compiler.is_compiling()
    if not compiling:
        check_order(transforms, "chain")

    def init(params: Params) -> tuple[State, ...]:
        return _init_members(transforms, params)

    def update(
        updates: Updates, state: tuple[State, ...], params: Params | None = None, **extra: Any
    ) -> tuple[Updates, tuple[State, ...]]:
        if not isinstance(state, tuple) or len(state) != len(transforms):
            raise ValueError(state_mismatch(transforms, state))
        walk = GateWalk.from_extra(extra)  # the gates of enclosing chains, when nested
        # Donation as the caller gave it; members after the first get the updates donated
        # only if what they receive is checked to be memory the chain alone holds (a
        # user's transformation may return memory it keeps in its state): see Ownership.
        give_updates, give_state = donation(extra, "chain")
        owner = Ownership(None if give_updates else updates, None if give_state else state, params)
        return run(0, updates, state, walk, give_updates, give_state, owner, params, extra)

    def run(
        start: int, updates: Updates, states: tuple[State, ...], walk: GateWalk, owned: bool,
        give_state: bool, owner: Ownership | None, params: Params | None, extra: dict[str, Any],
        closes: bool | None = None,
    ) -> tuple[Updates, tuple[State, ...]]:
        """Members ``start..`` on ``updates`` and their ``states``, under ``walk``;
        ``closes``: inside a window branch, whether member ``start``'s window closes."""
        new_states: list[State] = []
        for i in range(start, len(transforms)):
            t, s = transforms[i], states[i - start]
            if walk.skips(gates[i]):
                new_states.append(s)
                continue
            pred = window_closes(s, extra) if gates[i] and closes is None else None
            if pred is not None:
                # Traced, a window position on the host: the gate and the rest of the
                # chain are two branches of torch.cond, the window closing or not.
                u, ss = window_branch(i, pred, updates, states[i - start :], walk, params, extra)
                return u, (*new_states, *ss)
            mode = DONATE_MODE[(owned, give_state and walk.state_survives(gates[i]))]
            head = {"window_closes": closes} if i == start and closes is not None else {}
            data_before = walk.data
            updates, new_s = walk.call(
                t, gates[i], updates, s, params, {**extra, **head, "donate": mode}
            )
            new_states.append(new_s)
            owned = owner is not None and i + 1 < len(transforms) and owner.owns(
                updates, new_states
            )
            if gates[i]:
                walk.fold(new_s)
                if head.get("window_closes") is True:
                    walk.opened_window(data_before)
                if walk.closed_on_host:
                    # A window is closed, known without reading the device: the rest of
                    # the chain is not run. A closed gate emits zeros: this chain's output.
                    new_states.extend(states[i + 1 - start :])
                    return updates, tuple(new_states)
                branch = walk.branch() if last_gate == i and i + 1 < len(transforms) else None
                if branch is not None:
                    # Traced, with a flag readable on the host: the rest of the chain is a
                    # branch of torch.cond, computed only on steps the flag opens. Once, at
                    # the last gate (nested branches would copy the states at every level).
                    pred, keep = branch
                    rest = states[i + 1 - start :]

                    def when_open(
                        u: Updates, ss: tuple[State, ...], at: int = i + 1,
                        flag: torch.Tensor | None = keep,
                    ) -> tuple[Updates, tuple[State, ...]]:
                        inner = GateWalk(gate_open=flag)
                        return run(at, u, ss, inner, False, False, None, params, extra)

                    updates, rest = run_branches(pred, when_open, updates, rest)
                    return updates, (*new_states, *rest)
        return walk.finish(updates), tuple(new_states)

    def window_branch(
        i: int, pred: torch.Tensor, updates: Updates, states: tuple[State, ...],
        walk: GateWalk, params: Params | None, extra: dict[str, Any],
    ) -> tuple[Updates, tuple[State, ...]]:
        """Members ``i..`` (``i`` a windowed gate) as ``torch.cond(pred, ...)``: where the
        window closes, all of them with the gate knowing it; else the gate alone (it adds
        the micro-step and emits zeros) and the rest keep their states."""
        host = None if walk.host is True else walk.host
        data = None if walk.data is True else walk.data

        def when_open(u: Updates, ss: tuple[State, ...]) -> tuple[Updates, tuple[State, ...]]:
            inner = GateWalk(gate_open=data, host_open=host)
            return run(i, u, ss, inner, False, False, None, params, extra, closes=True)

        def when_closed(u: Updates, ss: tuple[State, ...]) -> tuple[Updates, tuple[State, ...]]:
            inner = GateWalk(gate_open=data, host_open=host)
            u, s = inner.call(transforms[i], True, u, ss[0], params,
                              {**extra, "window_closes": False, "donate": False})
            return u, (s, *ss[1:])

        return run_branches(pred, when_open, updates, states, when_closed)

    if any(gates):
        mark_gate(update)
    if not compiling:
        # A chain built inside compiled code (inject_hyperparams rebuilds its rule on every
        # step) is not recorded: compiled code never asks, and the record would be a side
        # effect the graph cannot hold.
        _record_members(update, transforms)
        set_roles(update, chain_roles(transforms))
    return GradientTransformation(init, update)


# --------------------------------------------------------------------------- misuse
def describe(transform: GradientTransformation) -> str:
    """A short name for ``transform``: its factory's name, ``chain(...)`` of its members."""
    members = chain_members(transform)
    if members is not None:
        return "chain(" + ", ".join(describe(m) for m in members) + ")"
    update = transform[1]
    name = getattr(update, "__qualname__", type(update).__name__)
    return str(name).split(".<locals>")[0]


def not_a_transformation(value: Any) -> str:
    """The end of a message for ``value`` given where a transformation is expected: what
    it is instead, and what to do (an uncalled factory, a list of transformations)."""
    if callable(value) and not isinstance(value, type):
        name = getattr(value, "__name__", type(value).__name__)
        return (
            f"is the function {name}, not a transformation: call it, e.g. {name}(...) "
            "(a factory returns the GradientTransformation)"
        )
    if isinstance(value, list) and value and all(is_transformation(v) for v in value):
        return (
            f"is a list of {len(value)} transformations: pass gc.chain(*transformations) "
            "(or the transformations as separate arguments of chain)"
        )
    return f"must be a GradientTransformation (init, update), got {type(value).__name__}"


def state_mismatch(members: tuple[GradientTransformation, ...], state: Any) -> str:
    """The message for a state that is not one of ``chain(*members)``'s: the members this
    chain has, against what the state holds (the error path only)."""
    names = "; ".join(f"[{i}] {describe(t)}" for i, t in enumerate(members))
    if type(state) is tuple:
        held = "; ".join(f"[{i}] {_state_name(s)}" for i, s in enumerate(state))
        return (f"chain.update: state must hold one state per member, {len(members)} "
                f"({names}), got a tuple of {len(state)} ({held}): it comes from a chain of "
                "another shape (a member more or less); make it with this chain's init")
    hint = (" (arguments in the wrong order? it is update(updates, state, params))"
            if isinstance(state, (dict, list, torch.Tensor)) else "")
    return (f"chain.update: state must be the tuple of member states made by this chain's "
            f"init, {len(members)} ({names}), got {type(state).__name__}{hint}")


def _state_name(state: Any) -> str:
    if isinstance(state, tuple) and not hasattr(state, "_fields"):
        return "(" + ", ".join(_state_name(s) for s in state) + ")"
    return type(state).__name__


def _partial(roles: frozenset[str]) -> frozenset[str]:
    """The roles of ``masked`` / ``partition`` over members with ``roles``: a rule there
    updates some leaves only (two such rules may follow each other)."""
    return roles - {RULE} | ({PARTIAL_RULE} if RULE in roles else set())


def chain_roles(members: tuple[GradientTransformation, ...]) -> frozenset[str]:
    """The roles of a chain of ``members``: each member's; passive only if every member
    is passive or declares nothing (as the flat chain would be checked)."""
    roles = [roles_of(t) for t in members]
    union = frozenset().union(*roles)
    if all(PASSIVE in r or not r for r in roles):
        return union | {PASSIVE}
    return union - {PASSIVE}


def check_order(members: tuple[GradientTransformation, ...], who: str) -> None:
    """Refuse, when ``chain(*members)`` is built, an order that cannot be meant: two update
    rules (or a rule and a ``partition``/``masked`` one that covers some of its params); a
    gate that holds gradients back (``accumulate_every``, ``skip_if_nonfinite``,
    ``loss_scale``) after the rule; ``loss_scale`` after a member that reads the values it
    has not unscaled yet. Reads the roles the factories declared (no tensor, no sync)."""
    roles = [roles_of(t) for t in members]

    def name(i: int) -> str:
        return f"member {i} ({describe(members[i])})"

    rules = [i for i, r in enumerate(roles) if RULE in r]
    if len(rules) > 1:
        i, j = rules[:2]
        raise ValueError(
            f"{who}: two update rules, {name(i)} and {name(j)}: each turns its input into "
            "a step (and applies its learning rate), so the second would take the first's "
            "step for a gradient; keep one rule per chain (different rules for different "
            "parameters: gc.partition)"
        )
    partial = next((i for i, r in enumerate(roles) if PARTIAL_RULE in r and RULE not in r), None)
    if rules and partial is not None:
        raise ValueError(
            f"{who}: {name(rules[0])} is an update rule for every parameter and "
            f"{name(partial)} applies an update rule to some of them: those parameters would "
            "get two rules (the second taking the first's step for a gradient); give each "
            "parameter one rule: put every rule inside the partition (a label per rule), or "
            "use the one rule alone"
        )
    rule = next((i for i, r in enumerate(roles) if r & {RULE, PARTIAL_RULE}), None)
    if rule is not None:
        late = next((j for j in range(rule + 1, len(members)) if HOLDS in roles[j]), None)
        if late is not None:
            raise ValueError(
                f"{who}: {name(late)} holds gradients back but comes after the update rule, "
                f"{name(rule)}: the rule would run on every call (its state taking in "
                "every micro-batch, and non-finite gradients, before the gate decides) and "
                "the gate would then hold back steps, not gradients; put the gate before the "
                "rule (to sum updates after the rule as optax.apply_every does, use "
                "gc.apply_every)"
            )
    for j, r in enumerate(roles):
        if UNSCALES not in r:
            continue
        early = next((i for i in range(j) if _needs_unscaled(roles[i])), None)
        if early is not None:
            raise ValueError(
                f"{who}: loss_scale, in {name(j)}, comes after {name(early)}, which then "
                "sees the gradients still multiplied by the loss scale (2**16 by default): "
                "a clip would always clip, a decay, a skip or a rule would act on the wrong "
                "values; put loss_scale first (only accumulate_every may come before it)"
            )


def _needs_unscaled(roles: frozenset[str]) -> bool:
    """Whether a member with ``roles`` must not run before ``loss_scale``: it reads the
    values (clips, decay), is a rule, or is a gate that is not a plain window (a skip
    would hide overflows from the scale, which would then never back off)."""
    return bool(roles & {READS, RULE, PARTIAL_RULE, UNSCALES}) or (
        HOLDS in roles and PASSIVE not in roles
    )


_CHAIN_MEMBERS: weakref.WeakKeyDictionary[Callable[..., Any], tuple[GradientTransformation, ...]] = (
    weakref.WeakKeyDictionary()
)


_MEMBERS_ATTR = "_gradchain_members"


def _record_members(update: Callable[..., Any], members: tuple[GradientTransformation, ...]) -> None:
    """Record ``update``'s members, in the registry and on the function itself: a copy of
    the function made by pickling by value (``cloudpickle``; ``ChainedOptimizer`` pickles
    its chain so) carries its attributes, not registry entries."""
    _CHAIN_MEMBERS[update] = members
    setattr(update, _MEMBERS_ATTR, members)


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
    found = _CHAIN_MEMBERS.get(tx.update)
    return found if found is not None else getattr(tx.update, _MEMBERS_ATTR, None)


# --------------------------------------------------------------------------- named_chain
def named_chain(*named: tuple[str, GradientTransformation]) -> GradientTransformation:
    """:func:`chain` with a name for each member; the state is keyed by the names.

    ``named_chain(("clip", clip_by_norm(1.0)), ("adam", adam(1e-3)))`` runs exactly as
    ``chain(clip_by_norm(1.0), adam(1e-3))`` (the same walk over the members, so gates
    keep their meaning, and ``update_and_apply_`` runs a final ``sgd``/``adam``/``adamw``
    as torch's fused kernel), but its state is a NamedTuple whose fields are the names:
    ``state.adam`` is the adam's state, ``gc.tree_get(state, "adam")`` finds it anywhere
    in an enclosing state, and :func:`~gradchain.to_state_dict` keys it by name. Where a
    lookup by type is ambiguous (two adams under a :func:`partition`), a name is not.

    Names are Python identifiers not starting with ``_`` (they are the fields of the
    state's NamedTuple, a type ``torch.func`` and ``torch.compile`` flatten without
    registration); optax's ``named_chain`` takes any string.

    Args:
        *named: ``(name, transformation)`` pairs, names unique.

    Returns:
        A :class:`GradientTransformation` whose state is a NamedTuple named
        ``NamedChainState`` with one field per name, in order.

    Raises:
        TypeError: an argument is not a ``(str, GradientTransformation)`` pair.
        ValueError: a name is not an identifier, starts with ``_``, or repeats.

    Example:
        >>> import torch, gradchain as gc
        >>> tx = gc.named_chain(("clip", gc.clip_by_norm(1.0)), ("opt", gc.sgd(lr=0.5)))
        >>> params = {"w": torch.zeros(2)}
        >>> updates, state = tx.update({"w": torch.tensor([3.0, 4.0])}, tx.init(params), params)
        >>> updates["w"], state._fields
        (tensor([-0.3000, -0.4000]), ('clip', 'opt'))
        >>> gc.tree_get(state, "clip").norm
        tensor(5.)
    """
    who = "named_chain"
    names: list[str] = []
    members: list[GradientTransformation] = []
    for i, pair in enumerate(named):
        if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str)):
            raise TypeError(
                f"{who}: argument {i} must be a pair (name, transformation), got "
                f"{type(pair).__name__}"
            )
        name, tx = pair
        if not name.isidentifier() or keyword.iskeyword(name) or name.startswith("_"):
            raise ValueError(
                f"{who}: name {name!r} must be a Python identifier not starting with '_' "
                "(it is a field of the state)"
            )
        if name in names:
            raise ValueError(f"{who}: the name {name!r} more than once; names must be unique")
        if not is_transformation(tx):
            raise TypeError(
                f"{who}: {name!r} must be a GradientTransformation (init, update), got "
                f"{type(tx).__name__}"
            )
        names.append(name)
        members.append(tx)
    inner = chain(*members)
    state_type: Any = NamedTuple("NamedChainState", [(n, Any) for n in names])  # type: ignore[misc]
    setattr(state_type, CHAIN_STATE_ATTR, True)  # a chain's state (see gating.leading_window)

    def init(params: Params) -> Any:
        return state_type(*inner.init(params))

    def update(
        updates: Updates, state: Any, params: Params | None = None, **extra: Any
    ) -> tuple[Updates, Any]:
        if not isinstance(state, state_type):
            fields = getattr(state, "_fields", None)
            got = f"a state with fields {fields}" if fields else type(state).__name__
            raise ValueError(
                f"{who}.update: state must be the NamedChainState with fields {tuple(names)} "
                f"made by this named_chain's init, got {got}"
            )
        new_updates, new_states = inner.update(updates, tuple(state), params, **extra)
        return new_updates, state_type(*new_states)

    if is_gate(inner):
        mark_gate(update)
    set_roles(update, roles_of(inner))
    # Recorded as a chain: update_and_apply_ walks into it (and rebuilds its state type).
    _record_members(update, tuple(members))
    return GradientTransformation(init, update)


# --------------------------------------------------------------------------- helpers
def _is_node(x: Any) -> bool:
    return not optree.tree_is_leaf(x, none_is_leaf=True)


def is_params_function(x: Any) -> bool:
    """Whether a mask or labels value is a function of the params: callable and not a
    pytree node. A callable that is also a registered pytree (a NamedTuple with a
    ``__call__``, an equinox-style module registered with optree) is a tree, as the params
    it mirrors are (optax issue 913)."""
    return callable(x) and not _is_node(x)


def _difference_message(diff: _tree.Difference, ref_name: str) -> str:
    if diff.kind == "type":
        expected, got = type(diff.expected).__name__, type(diff.got).__name__
        return f"at {diff.where or 'the root'} expected a {expected}, got a {got}"
    if diff.kind == "missing":
        return f"{diff.key} is missing"
    if diff.kind == "extra":
        return f"{diff.key} is not in the {ref_name}"
    return f"at {diff.where or 'the root'} the entries are in a different order"


def _leaves_at(
    spec: optree.PyTreeSpec, ref: Any, ref_name: str, tree: Any, name: str, who: str
) -> list[Any]:
    """The entries of ``tree`` at the leaf positions of ``spec`` (the structure of ``ref``)."""
    try:
        return spec.flatten_up_to(tree)
    except (ValueError, TypeError) as err:
        diff = _tree.first_difference(ref, tree)
        why = str(err) if diff is None else _difference_message(diff, ref_name)
        raise ValueError(
            f"{who}: {name} must have the structure of the {ref_name} (one entry per leaf): {why}"
        ) from None


def _hashable_in(x: Any, keys: Mapping[Any, Any]) -> bool:
    try:
        return x in keys
    except TypeError:  # unhashable
        return False


def _not_a_leaf(who: str, name: str, path: str, leaf: Any) -> ValueError:
    return ValueError(
        f"{who}: {name} must have the structure of the params (one entry per leaf): "
        f"{name}{path} is a {type(leaf).__name__} where the params have a leaf"
    )


def _check_mask_leaves(leaves: list[Any], paths: Callable[[], list[str]], who: str) -> None:
    for i, leaf in enumerate(leaves):
        if not isinstance(leaf, bool):
            if _is_node(leaf):
                raise _not_a_leaf(who, "mask", paths()[i], leaf)
            raise TypeError(
                f"{who}: mask{paths()[i]} must be a Python bool, got {type(leaf).__name__}; "
                "masks are decided from the tree's structure (names, shapes), not from "
                "tensor values"
            )


def _check_label_leaves(
    leaves: list[Any], paths: Callable[[], list[str]], known: Mapping[Any, Any], who: str
) -> None:
    for i, leaf in enumerate(leaves):
        if not _hashable_in(leaf, known):
            if _is_node(leaf) and not isinstance(leaf, tuple):
                raise _not_a_leaf(who, "labels", paths()[i], leaf)
            raise ValueError(
                f"{who}: labels{paths()[i]} is {leaf!r}, which is not a label of transforms; "
                f"known labels: {list(known)}"
            )


# --------------------------------------------------------------------------- the core
class _Members:
    """Runs a dict of member transformations on the subsets of leaves given by a label
    per leaf; leaves whose label is not a member pass through unchanged.

    Members run under a :class:`~gradchain.gating.GateWalk`: the gate member first, then
    the plain members, which keep their state where its flag is closed.

    At most one member may hold gates: gates in two parallel members have no order, so
    neither "a gate governs what follows it" nor the order-dependent folding of gate flags
    in ``applied`` would be well defined for them.
    """

    def __init__(
        self,
        who: str,
        members: Mapping[Hashable, GradientTransformation],
        labels_of: Callable[[Any, optree.PyTreeSpec, Any, str], list[Any]],
    ) -> None:
        self.who = who
        self.members = dict(members)
        gates = [k for k, t in self.members.items() if is_gate(t)]
        if len(gates) > 1:
            raise ValueError(
                f"{who}: at most one member may be or contain a gate, got gates in "
                f"{gates}; a gate shared by all subsets goes in a chain before {who}, e.g. "
                f"chain(accumulate_every(4), {who}(...))"
            )
        self.gate_label: Hashable | None = gates[0] if gates else None
        self.gated = self.gate_label is not None
        self.labels_of = labels_of

    def _groups(self, labels: list[Any]) -> dict[Hashable, list[int]]:
        groups: dict[Hashable, list[int]] = {k: [] for k in self.members}
        for i, label in enumerate(labels):
            if _hashable_in(label, groups):
                groups[label].append(i)
        return groups

    @staticmethod
    def _subtree(spec: optree.PyTreeSpec, leaves: list[Any], index: list[int]) -> Any:
        sub: list[Any] = [None] * len(leaves)
        for i in index:
            sub[i] = leaves[i]
        return _tree.unflatten(spec, sub)

    def init(self, params: Params) -> dict[Hashable, State]:
        leaves, spec = _tree.flatten(params)
        groups = self._groups(self.labels_of(params, spec, params, "params"))
        return {k: t.init(self._subtree(spec, leaves, groups[k])) for k, t in self.members.items()}

    def update(
        self,
        updates: Updates,
        states: Mapping[Hashable, State],
        params: Params | None,
        extra: dict[str, Any],
    ) -> tuple[Updates, dict[Hashable, State]]:
        if not isinstance(states, Mapping) or set(states) != set(self.members):
            got = list(states) if isinstance(states, Mapping) else type(states).__name__
            raise ValueError(
                f"{self.who}.update: the state must hold one state per member "
                f"{list(self.members)} (from this transformation's init), got {got}"
            )
        walk = GateWalk.from_extra(extra)
        if not self.gated:
            # The enclosing chain keeps this whole state on steps an earlier gate closes.
            walk = GateWalk()
        p_leaves: list[Any] | None
        if params is None:
            u_leaves, spec = _tree.flatten(updates)
            p_leaves, source, source_name = None, updates, "updates"
        else:
            p_leaves, spec = _tree.flatten(params)
            u_leaves = _tree.flatten_like(spec, updates, "updates", "params")
            source, source_name = params, "params"
        groups = self._groups(self.labels_of(source, spec, source, source_name))

        out = list(u_leaves)
        new_states = dict(states)

        def run(k: Hashable) -> None:
            index = groups[k]
            sub_u = self._subtree(spec, u_leaves, index)
            sub_p = None if p_leaves is None else self._subtree(spec, p_leaves, index)
            new_u, new_states[k] = walk.call(
                self.members[k], k == self.gate_label, sub_u, states[k], sub_p, extra
            )
            new_leaves = _tree.flatten_like(spec, new_u, f"{self.who}[{k!r}] output", "updates")
            for i in index:
                out[i] = new_leaves[i]

        # The gate member first: its flags decide whether the plain members run at all.
        if self.gate_label is not None:
            run(self.gate_label)
            walk.fold(new_states[self.gate_label])
        if walk.open() is False:
            # Closed, known without reading the device: plain members keep their state.
            return walk.finish(updates), new_states
        for k in self.members:
            if k != self.gate_label:
                run(k)
        return walk.finish(_tree.unflatten(spec, out)), new_states


# --------------------------------------------------------------------------- masked
class MaskedState(NamedTuple):
    """State of :func:`masked`.

    Attributes:
        inner_state: the wrapped transformation's state, built from the params with the
            masked-out leaves replaced by ``None`` (so it holds ``None`` there).

    Example:
        >>> import torch, gradchain as gc
        >>> tx = gc.masked(gc.trace(0.9), {"w": True, "b": False})
        >>> tx.init({"w": torch.zeros(1), "b": torch.zeros(1)}).inner_state.trace
        {'w': tensor([0.]), 'b': None}
    """

    inner_state: State


def masked(
    transform: GradientTransformation, mask: Any | Callable[[Params], Any]
) -> GradientTransformation:
    """Apply ``transform`` only to the leaves where ``mask`` is ``True``; the other leaves
    pass through unchanged.

    ``transform`` sees the updates and params with the masked-out leaves replaced by
    ``None``, so it keeps no state for them and anything it computes over all leaves (the
    global norm of ``clip_by_norm``, say) covers the masked-in leaves only. The result is
    the same as running ``transform`` by hand on the subset.

    ``mask`` is a tree of Python bools with the structure of the params (one entry per
    leaf), or a callable ``params -> mask``. A value that is both callable and a pytree
    node (a NamedTuple or a class registered with optree that defines ``__call__``, as an
    equinox module does) is a tree, not a function. ``init`` calls it with the params; ``update``
    calls it with ``params`` when given, else with the updates (whose leaves may be
    ``None`` where no gradient arrived), so a mask function that looks at names or shapes
    is the safe kind. Extra keyword arguments reach ``transform`` unchanged.

    **Gates inside.** When ``transform`` is (or contains) a gate (``accumulate_every``,
    ``skip_if_nonfinite``, ``loss_scale``), ``masked`` is itself a gate, and a closed gate
    closes the whole step, not just the masked-in leaves: the output is zeros for every leaf
    (the masked-out ones too), and in an enclosing chain the tail after ``masked`` is held
    back, exactly as for a gate placed in the chain itself. ``applied(state)`` sees the
    inner gate's flag (it is inside :class:`MaskedState`). Gates before ``masked`` in an
    enclosing chain govern ``transform`` as they would govern it in the chain.

    Args:
        transform: the transformation to apply to the masked-in leaves.
        mask: a tree of bools shaped like the params, or a callable giving one.

    Returns:
        A :class:`GradientTransformation` with state :class:`MaskedState`.

    Raises:
        TypeError: ``transform`` is not a transformation, or a mask entry is not a bool.
        ValueError: the mask does not have the structure of the params (the message names
            the first differing path).

    Example:
        >>> import torch, gradchain as gc
        >>> params = {"w": torch.ones(2), "b": torch.ones(2)}
        >>> tx = gc.masked(gc.clip_by_value(0.5), {"w": True, "b": False})
        >>> out, state = tx.update({"w": torch.full((2,), 3.0), "b": torch.full((2,), 3.0)},
        ...                        tx.init(params), params)
        >>> out
        {'w': tensor([0.5000, 0.5000]), 'b': tensor([3., 3.])}

        Weight decay on matrices only, with a mask function:

        >>> def matrices(params):
        ...     return {k: v.ndim > 1 for k, v in params.items()}
        >>> decay = gc.masked(gc.add_decayed_weights(0.1), matrices)
        >>> params = {"w": torch.ones(2, 2), "b": torch.ones(2)}
        >>> grads = {"w": torch.zeros(2, 2), "b": torch.zeros(2)}
        >>> out, _ = decay.update(grads, decay.init(params), params)
        >>> out["w"], out["b"]
        (tensor([[0.1000, 0.1000],
                [0.1000, 0.1000]]), tensor([0., 0.]))
    """
    who = "masked"
    if not is_transformation(transform):
        raise TypeError(
            f"{who}: transform must be a GradientTransformation (init, update), "
            f"got {type(transform).__name__}"
        )
    mask_fn = is_params_function(mask)
    if not mask_fn:
        leaves, _ = _tree.flatten(mask)
        _check_mask_leaves(leaves, lambda: _tree.leaf_paths(mask), who)

    def labels_of(source: Any, spec: optree.PyTreeSpec, ref: Any, ref_name: str) -> list[Any]:
        tree = mask(source) if mask_fn else mask
        name = "mask(...)" if mask_fn else "mask"
        leaves = _leaves_at(spec, ref, ref_name, tree, name, who)
        _check_mask_leaves(leaves, lambda: _tree.leaf_paths(ref), who)
        return leaves

    core = _Members(who, {True: transform}, labels_of)

    def init(params: Params) -> MaskedState:
        return MaskedState(core.init(params)[True])

    def update(
        updates: Updates, state: MaskedState, params: Params | None = None, **extra: Any
    ) -> tuple[Updates, MaskedState]:
        if not isinstance(state, MaskedState):
            raise ValueError(
                f"{who}.update: state must be a MaskedState (from this transformation's "
                f"init), got {type(state).__name__}"
            )
        new_updates, states = core.update(updates, {True: state.inner_state}, params, extra)
        return new_updates, MaskedState(states[True])

    if core.gated:
        mark_gate(update)
    set_roles(update, _partial(roles_of(transform)))
    return GradientTransformation(init, update)


# --------------------------------------------------------------------------- partition
@named_entries("inner_states")
class PartitionState(NamedTuple):
    """State of :func:`partition`.

    Attributes:
        inner_states: a dict ``label -> state`` of the members' states, in the order of
            ``transforms``. Each was built from the params with the other labels' leaves
            replaced by ``None``.

    Example:
        >>> import torch, gradchain as gc
        >>> tx = gc.partition({"a": gc.sgd(lr=0.1), "b": gc.adam()}, {"w": "a", "v": "b"})
        >>> list(tx.init({"w": torch.zeros(1), "v": torch.zeros(1)}).inner_states)
        ['a', 'b']
    """

    inner_states: dict[Hashable, State]


def partition(
    transforms: Mapping[Hashable, GradientTransformation],
    labels: Any | Callable[[Params], Any],
) -> GradientTransformation:
    """Process each leaf with exactly the transformation of its label.

    The torch.optim counterpart is a list of param groups: one chain per group, each with
    its own hyperparameters and its own state. Member ``transforms[label]`` sees the
    updates and params with the leaves of other labels replaced by ``None``, so it keeps
    state only for its own leaves and anything it computes over all leaves (a global norm)
    covers its subset only. The result equals running each member by hand on its subset.

    ``labels`` is a tree with the structure of the params holding one label per leaf, or a
    callable ``params -> labels`` (a callable pytree node is a tree, as for
    :func:`masked`). ``init`` calls it with the params; ``update`` calls it
    with ``params`` when given, else with the updates (whose leaves may be ``None`` where
    no gradient arrived), so a label function that looks at names or shapes is the safe
    kind. Every leaf's label must be a key of ``transforms``; a key that labels no leaf is
    allowed (its member runs on an empty subset). Extra keyword arguments reach every
    member unchanged.

    **Gates inside.** One member may be or contain a gate (``accumulate_every``,
    ``skip_if_nonfinite``, ``loss_scale``); ``partition`` is then itself a gate, and that
    gate closes the whole step, not just its subset:

    * on a step it closes, the output is zeros for *every* leaf and the other members keep
      their state; in an enclosing chain the whole tail after ``partition`` is held back,
      exactly as for a gate placed in the chain itself. On a step it opens, the other
      members run on their subsets as usual (so with ``accumulate_every(4)`` in one
      member, the other members step once every 4 calls, on unaccumulated gradients);
    * ``applied(state)`` sees the gate's flags (they are inside this state);
    * where the gate's flag is known on the host (an accumulation window in eager mode)
      the other members are not run on closed steps; otherwise they run and their new
      state is selected with ``torch.where``, with no host-device sync;
    * gates before ``partition`` in an enclosing chain govern every member.

    Gates in two members raise ``ValueError``: parallel gates have no order, so which
    gate governs what would be ambiguous. A gate meant for every subset goes in the chain
    before ``partition``: ``chain(accumulate_every(4), partition(...))``.

    Args:
        transforms: a dict ``label -> GradientTransformation``.
        labels: a tree of labels shaped like the params, or a callable giving one.

    Returns:
        A :class:`GradientTransformation` with state :class:`PartitionState`.

    Raises:
        TypeError: ``transforms`` is not a dict of transformations.
        ValueError: ``transforms`` is empty, a leaf's label is not a key of ``transforms``
            (the message names the leaf and the known labels), or the labels do not have
            the structure of the params (the message names the first differing path).

    Example:
        No weight decay on biases and norms, as two AdamW param groups would do:

        >>> import torch, gradchain as gc
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
        >>> params = {k: p.detach() for k, p in model.named_parameters()}
        >>> def labels_fn(params):
        ...     return {k: "no_decay" if k.endswith("bias") or k.startswith("1.") else "decay"
        ...             for k in params}
        >>> tx = gc.partition(
        ...     {"decay": gc.adamw(1e-3, weight_decay=0.1),
        ...      "no_decay": gc.adamw(1e-3, weight_decay=0.0)},
        ...     labels_fn,
        ... )
        >>> state = tx.init(params)
        >>> grads = {k: torch.ones_like(p) for k, p in params.items()}
        >>> updates, state = tx.update(grads, state, params)
        >>> params = gc.apply_updates(params, updates)
        >>> sorted(state.inner_states)
        ['decay', 'no_decay']

        A GAN's generator and discriminator, each with its own chain, in one functional
        step:

        >>> params = {"gen": {"w": torch.zeros(2)}, "disc": {"w": torch.zeros(2)}}
        >>> tx = gc.partition(
        ...     {"gen": gc.adam(lr=1e-3, betas=(0.5, 0.999)),
        ...      "disc": gc.chain(gc.clip_by_norm(1.0), gc.sgd(lr=0.1))},
        ...     {"gen": {"w": "gen"}, "disc": {"w": "disc"}},
        ... )
        >>> grads = {"gen": {"w": torch.ones(2)}, "disc": {"w": torch.tensor([3.0, 4.0])}}
        >>> updates, state = tx.update(grads, tx.init(params), params)
        >>> updates["disc"]["w"]
        tensor([-0.0600, -0.0800])
    """
    who = "partition"
    if not isinstance(transforms, Mapping):
        raise TypeError(
            f"{who}: transforms must be a dict label -> GradientTransformation, "
            f"got {type(transforms).__name__}"
        )
    if not transforms:
        raise ValueError(f"{who}: transforms must hold at least one labelled transformation")
    for k, t in transforms.items():
        if not is_transformation(t):
            raise TypeError(
                f"{who}: transforms[{k!r}] must be a GradientTransformation (init, update), "
                f"got {type(t).__name__}"
            )
    members = dict(transforms)
    labels_fn = is_params_function(labels)
    if not labels_fn:
        # Labels that are keys of ``transforms`` are leaves even if they are tuples.
        label_tree: Any = labels
        paths, leaves, _ = optree.tree_flatten_with_path(
            label_tree, is_leaf=lambda x: _hashable_in(x, members), none_is_leaf=True
        )
        _check_label_leaves(leaves, lambda: [_tree.path_str(p) for p in paths], members, who)

    def labels_of(source: Any, spec: optree.PyTreeSpec, ref: Any, ref_name: str) -> list[Any]:
        tree = labels(source) if labels_fn else labels
        name = "labels(...)" if labels_fn else "labels"
        leaves = _leaves_at(spec, ref, ref_name, tree, name, who)
        _check_label_leaves(leaves, lambda: _tree.leaf_paths(ref), members, who)
        return leaves

    core = _Members(who, members, labels_of)

    def init(params: Params) -> PartitionState:
        return PartitionState(core.init(params))

    def update(
        updates: Updates, state: PartitionState, params: Params | None = None, **extra: Any
    ) -> tuple[Updates, PartitionState]:
        if not isinstance(state, PartitionState):
            raise ValueError(
                f"{who}.update: state must be a PartitionState (from this transformation's "
                f"init), got {type(state).__name__}"
            )
        new_updates, states = core.update(updates, state.inner_states, params, extra)
        return new_updates, PartitionState(states)

    if core.gated:
        mark_gate(update)
    set_roles(update, _partial(chain_roles(tuple(members.values()))))
    _PARTITIONS[update] = core
    return GradientTransformation(init, update)


_PARTITIONS: weakref.WeakKeyDictionary[Callable[..., Any], _Members] = weakref.WeakKeyDictionary()


def partition_groups(
    tx: GradientTransformation, params: Params
) -> dict[Hashable, tuple[GradientTransformation, list[int]]] | None:
    """For ``tx`` made by :func:`partition` without gates: each label's member and the
    leaf positions (in ``params``' flattening order) it owns; ``None`` otherwise. Drivers
    that run members themselves (``update_and_apply_`` runs each group as torch's fused
    kernel) use it; it reads the labels, never tensor values."""
    core = _PARTITIONS.get(tx.update)
    if core is None or core.gated:
        return None
    spec = _tree.flatten(params)[1]
    groups = core._groups(core.labels_of(params, spec, params, "params"))
    return {k: (t, groups[k]) for k, t in core.members.items()}

