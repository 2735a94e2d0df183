"""Pytrees: flattening, paths, structural diffs, leaf grouping, and the ``Leaves`` view.

Every tree in gradchain is an optree pytree flattened with ``none_is_leaf=True``, so a
``None`` gradient keeps its place and lines up with the parameter and state it belongs to.
Users writing their own transformations reach these through :mod:`gradchain.tree`.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import optree
import torch
from torch._C._dynamo.guards import TensorGuards


def flatten(tree: Any) -> tuple[list[Any], optree.PyTreeSpec]:
    """Flatten ``tree`` into its leaves (``None`` counts as a leaf) and a spec.

    Example:
        >>> import torch
        >>> from gradchain.tree import flatten
        >>> leaves, spec = flatten({"b": None, "a": torch.zeros(1)})
        >>> len(leaves), leaves[1] is None
        (2, True)
    """
    kind = type(tree)
    if kind is not dict and kind is not list and kind is not tuple:
        return optree.tree_flatten(tree, none_is_leaf=True)
    if torch.compiler.is_compiling():
        return optree.tree_flatten(tree, none_is_leaf=True)
    # The same container structure comes back on every step: reuse its spec. optree's
    # flatten checks every leaf's type against its node registry (~150 ns a leaf, 4-6 us
    # for 28 tensors); ``flatten_up_to`` on a known spec checks only the containers
    # (~1 us). Reused only where the stored shape proves the containers the same (see
    # ``_shape``), so that ``flatten_up_to`` cannot fail (its error message would format
    # the tensors, which takes milliseconds) and the result is exactly a fresh flatten's.
    key = (kind, len(tree))
    known = _SPECS.get(key)
    if known is not None:
        spec, shape, flat = known
        if (
            (kind is not dict or tuple(tree) == shape)  # a flat list/tuple: its length
            if flat
            else _shape(tree, kind) == shape
        ):
            leaves = spec.flatten_up_to(tree)
            if _LEAF_TYPES.issuperset(map(type, leaves)):
                return leaves, spec
    leaves, spec = optree.tree_flatten(tree, none_is_leaf=True)
    stored = _shape(tree, kind)
    if stored is not None:
        _SPECS[key] = (spec, stored, spec.num_nodes == spec.num_leaves + 1)
    return leaves, spec


_SPECS: dict[tuple[type, int], tuple[optree.PyTreeSpec, tuple[Any, ...], bool]] = {}
_LEAF_TYPES = frozenset({torch.Tensor, torch.nn.Parameter, type(None)})


def _shape(tree: Any, kind: type) -> tuple[Any, ...] | None:
    """What must match for :func:`flatten` to reuse a spec, ``None`` where none is
    reused: a dict of tensors (or None): its keys, in order; a list / tuple of tensors
    (or None) and flat lists / tuples of them: its children's types and the lengths of
    the lists / tuples among them. Anything else (deeper nesting, another container
    type, a non-tensor leaf) is flattened afresh every time."""
    if kind is dict:
        return tuple(tree) if _LEAF_TYPES.issuperset(map(type, tree.values())) else None
    types = tuple(map(type, tree))
    lengths = []
    for child, t in zip(tree, types):
        if t in _LEAF_TYPES:
            continue
        if (t is not list and t is not tuple) or not _LEAF_TYPES.issuperset(map(type, child)):
            return None
        lengths.append(len(child))
    return types + tuple(lengths)


def add_leaf_ids(tree: Any, into: set[int]) -> None:
    """Add the ``id`` of every leaf of ``tree`` to ``into`` (what :func:`flatten` would
    return, ``None`` included). Dicts, lists and tuples (NamedTuple states among them)
    are walked here, a dict's values at C speed; any other node goes through optree. A
    state tree flattens in optree at about 0.5 us a leaf (it sorts every dict's keys);
    identities need no order."""
    kind = type(tree)
    if kind is dict:
        values = tree.values()
        if _LEAF_TYPES.issuperset(map(type, values)):
            into.update(map(id, values))
            return
        for child in values:
            add_leaf_ids(child, into)
    elif kind is list or kind is tuple or (isinstance(tree, tuple) and hasattr(tree, "_fields")):
        for child in tree:
            if type(child) in _LEAF_TYPES:
                into.add(id(child))
            else:
                add_leaf_ids(child, into)
    elif kind in _LEAF_TYPES:
        into.add(id(tree))
    else:
        into.update(map(id, optree.tree_leaves(tree, none_is_leaf=True)))


def any_none(leaves: Iterable[Any]) -> bool:
    """Whether any of ``leaves`` is ``None``, compared by identity at C speed (``None in
    leaves`` would compare tensors with ``==``)."""
    return any(map(operator.is_, leaves, _NONES))


_NONES = itertools.repeat(None)


def unflatten(spec: optree.PyTreeSpec, leaves: Iterable[Any]) -> Any:
    """Inverse of :func:`flatten`.

    Example:
        >>> from gradchain.tree import flatten, unflatten
        >>> leaves, spec = flatten({"a": 1, "b": [2, 3]})
        >>> unflatten(spec, [x * 10 for x in leaves])
        {'a': 10, 'b': [20, 30]}
    """
    return optree.tree_unflatten(spec, list(leaves))


def path_str(path: Sequence[Any]) -> str:
    """``['layer.weight'][0]`` for the key path ``('layer.weight', 0)``."""
    out = ""
    for key in path:
        out += f"[{key!r}]" if not isinstance(key, int) else f"[{key}]"
    return out


def leaf_paths(tree: Any) -> list[str]:
    """Readable paths (``['layer.weight']``, ``[0][1]``) of the leaves of ``tree``.

    Example:
        >>> from gradchain.tree import leaf_paths
        >>> leaf_paths({"w": 1, "b": (2, 3)})
        ["['b'][0]", "['b'][1]", "['w']"]
    """
    paths, _, _ = optree.tree_flatten_with_path(tree, none_is_leaf=True)
    return [path_str(p) for p in paths]


def flatten_like(spec: optree.PyTreeSpec, tree: Any, name: str, like: str) -> list[Any]:
    """Leaves of ``tree`` in the order of ``spec``; a clear error when the structure differs.

    Example:
        >>> import torch
        >>> from gradchain.tree import flatten, flatten_like
        >>> _, spec = flatten({"w": torch.zeros(1)})
        >>> flatten_like(spec, {"v": torch.zeros(1)}, "updates", "params")
        Traceback (most recent call last):
        ...
        ValueError: updates does not have the structure of params: ...
    """
    try:
        leaves = spec.flatten_up_to(tree)
    except (ValueError, TypeError) as err:
        ref = optree.tree_unflatten(spec, [0] * spec.num_leaves)
        diff = first_difference(ref, tree)
        why = str(err) if diff is None else _structure_message(diff, name, like)
        raise ValueError(f"{name} does not have the structure of {like}: {why}") from None
    return leaves


class Difference(NamedTuple):
    """Where a tree first departs from a reference structure (see :func:`first_difference`).

    ``kind`` is ``"type"`` (another node type, or a leaf where a node was expected),
    ``"missing"`` / ``"extra"`` (a key the reference has / does not have) or ``"order"``;
    ``where`` is the path of the node, ``key`` the path of the missing or extra entry;
    ``expected`` and ``got`` are the two nodes that differ.
    """

    kind: str
    where: str
    key: str = ""
    expected: Any = None
    got: Any = None


def _plain_key(node: Any, key: Any) -> str:
    return path_str((key,))


def first_difference(
    ref: Any,
    got: Any,
    *,
    strict: bool = False,
    key_text: Callable[[Any, Any], str] = _plain_key,
    where: str = "",
) -> Difference | None:
    """Where ``got`` first departs from the structure of ``ref``; ``None`` when it fits.

    A leaf of ``ref`` matches anything in ``got`` (a leaf or a subtree), unless ``strict``
    (then a subtree where ``ref`` has a leaf differs too). ``key_text(node, key)`` writes
    one step of a path (default ``['key']`` / ``[0]``). Callers word the message."""
    ref_leaf = optree.tree_is_leaf(ref, none_is_leaf=True)
    got_leaf = optree.tree_is_leaf(got, none_is_leaf=True)
    if ref_leaf and (got_leaf or not strict):
        return None
    if ref_leaf or got_leaf or type(got) is not type(ref):
        return Difference("type", where, expected=ref, got=got)
    r = optree.tree_flatten_one_level(ref, none_is_leaf=True)
    g = optree.tree_flatten_one_level(got, none_is_leaf=True)
    r_keys, g_keys = list(r.entries), list(g.entries)
    if r_keys != g_keys:
        missing = [k for k in r_keys if k not in g_keys]
        extra = [k for k in g_keys if k not in r_keys]
        if missing:
            return Difference("missing", where, where + key_text(ref, missing[0]), ref, got)
        if extra:
            return Difference("extra", where, where + key_text(got, extra[0]), ref, got)
        return Difference("order", where, expected=ref, got=got)
    for key, rc, gc in zip(r_keys, r.children, g.children):
        found = first_difference(
            rc, gc, strict=strict, key_text=key_text, where=where + key_text(ref, key)
        )
        if found is not None:
            return found
    return None


def _structure_message(diff: Difference, name: str, like: str) -> str:
    if diff.kind == "type":
        return (
            f"{like} have a {type(diff.expected).__name__} at {diff.where or 'the root'}, "
            f"{name} has a {type(diff.got).__name__}"
        )
    if diff.kind == "missing":
        return f"{name} has no {diff.key}, which {like} have"
    if diff.kind == "extra":
        return f"{name}{diff.key} is not in {like}"
    return f"the entries of {name}{diff.where} are in another order than in {like}"


def group_by_device_dtype(
    rows: Sequence[tuple[Any, ...]],
) -> list[tuple[list[Any], ...]]:
    """Group rows of tensors by the (device, dtype) of their first tensor.

    Returns, per group, one list per column, so each group feeds ``torch._foreach_*``.

    Example:
        >>> import torch
        >>> from gradchain.tree import group_by_device_dtype
        >>> rows = [(torch.zeros(1), 1), (torch.zeros(1, dtype=torch.float64), 2), (torch.ones(1), 3)]
        >>> [cols[1] for cols in group_by_device_dtype(rows)]
        [[1, 3], [2]]
    """
    if not rows:
        return []
    firsts = [row[0] for row in rows]
    if len({t.dtype for t in firsts}) == 1 and len({t.device for t in firsts}) == 1:
        return [tuple(list(col) for col in zip(*rows))]  # the common case: one group
    groups: dict[tuple[torch.device, torch.dtype], list[tuple[Any, ...]]] = {}
    for row in rows:
        t = row[0]
        groups.setdefault((t.device, t.dtype), []).append(row)
    return [tuple(list(col) for col in zip(*g)) for g in groups.values()]



def zeros_like_tree(params: Any, dtype: torch.dtype | None = None) -> Any:
    """A tree of zeros shaped like ``params`` (``None`` leaves stay ``None``), e.g. a moment.

    ``dtype`` overrides the leaves' dtype (e.g. float32 accumulators for float16 params).

    Example:
        >>> import torch
        >>> from gradchain.tree import zeros_like_tree
        >>> zeros_like_tree({"w": torch.ones(2, dtype=torch.float16), "b": None}, torch.float32)
        {'w': tensor([0., 0.]), 'b': None}
    """
    return map_tensors(
        params, lambda p: torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
    )


def map_tensors(params: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """``fn`` of each tensor leaf of ``params`` (``None`` leaves stay ``None``); a
    ``TypeError`` naming the first leaf that is neither.

    Example:
        >>> import torch
        >>> from gradchain._tree import map_tensors
        >>> map_tensors({"w": torch.ones(2), "b": None}, lambda p: p * 2)
        {'w': tensor([2., 2.]), 'b': None}
    """
    leaves, spec = flatten(params)
    out: list[Any] = []
    for i, p in enumerate(leaves):
        if p is None:
            out.append(None)
        elif isinstance(p, torch.Tensor):
            out.append(fn(p))
        else:
            raise TypeError(
                f"params{leaf_paths(params)[i]}: expected a torch.Tensor or None, "
                f"got {type(p).__name__}"
            )
    return unflatten(spec, out)


def named_nodes(state: Any, path: str = "state") -> Iterable[tuple[str, Any]]:
    """Yield ``(path, node)`` for every NamedTuple node in ``state``, depth first."""
    if isinstance(state, tuple) and hasattr(state, "_fields"):
        yield path, state
        for f in state._fields:
            yield from named_nodes(getattr(state, f), f"{path}.{f}")
    elif isinstance(state, (tuple, list)):
        for i, child in enumerate(state):
            yield from named_nodes(child, f"{path}[{i}]")
    elif isinstance(state, dict):
        for k, child in state.items():
            yield from named_nodes(child, f"{path}[{k!r}]")


# --------------------------------------------------------------------------- leaf views
class Leaves:
    """The present (non-``None``) leaves of an updates tree, and the way back.

    Transformations read the gradients as a flat list with :attr:`values`, read
    per-parameter state trees aligned to them with :meth:`take`, and rebuild trees with
    :meth:`put` (the updates; ``None`` leaves stay ``None``) and :meth:`put_into` (a state
    tree; leaves whose gradient was ``None`` keep their old value, so their state does not
    advance).

    Example:
        >>> import torch
        >>> from gradchain.tree import Leaves
        >>> view = Leaves({"a": torch.ones(1), "b": None})
        >>> view.put([g * 3 for g in view.values])
        {'a': tensor([3.]), 'b': None}
        >>> view.put_into({"a": torch.zeros(1), "b": torch.zeros(1)}, [torch.ones(1)])
        {'a': tensor([1.]), 'b': tensor([0.])}
    """

    __slots__ = ("spec", "leaves", "index", "values", "_taken", "_full")

    def __init__(self, updates: Any) -> None:
        self.leaves, self.spec = flatten(updates)
        leaves = self.leaves
        # (tree, its leaves) for the state trees taken: put_into on the same tree object
        # rebuilds from them instead of flattening it a second time.
        self._taken: list[tuple[Any, list[Any]]] = []
        # Every leaf present (the usual case): whole lists, at C speed.
        self._full = not torch.compiler.is_compiling() and not any_none(leaves)
        if self._full:
            self.index = list(range(len(leaves)))
            self.values: list[torch.Tensor] = list(leaves)
        else:
            self.index = [i for i, g in enumerate(leaves) if g is not None]
            self.values = [leaves[i] for i in self.index]
        # Metadata only (no device read, traceable). Whole-list checks first (cheap); the
        # leaf-by-leaf loop only runs to name the first bad leaf.
        values = self.values
        compiling = torch.compiler.is_compiling()
        if not values or (not compiling and _VALID.get(len(values), values) is True):
            return  # these metadata passed before (see MetaMemo)
        if (
            {type(g) for g in values} <= PLAIN
            and all(map(torch.is_floating_point, values))
            and {g.layout for g in values} <= _STRIDED_ONLY
        ):
            if not compiling:
                _VALID.put(len(values), values, True)
        else:
            for i, g in zip(self.index, values):
                if not (
                    isinstance(g, torch.Tensor) and g.is_floating_point() and g.layout is _STRIDED
                ):
                    raise bad_update(self.spec, i, g)

    def take(
        self, tree: Any, name: str = "state", *, check: bool = True, dtype: bool = True
    ) -> list[Any]:
        """Leaves of ``tree`` (same structure as the updates) at the present positions.

        With ``check`` (default) every taken leaf must be a tensor of its gradient's shape
        and device and, with ``dtype`` (default), of its gradient's dtype or a wider one
        (float32 moments for bfloat16 gradients are fine, float32 state for float64
        gradients is not: it would round them silently); a ``ValueError`` names the first
        leaf that is not. These are metadata checks: no device read, and they trace under
        ``torch.compile`` and ``vmap``. Pass ``check=False`` for state shaped or typed
        differently on purpose (factored moments, offloaded or quantized state), and
        ``dtype=False`` for trees that are not state (e.g. the params).
        """
        leaves = self._flat(tree, name)
        taken = list(leaves) if self._full else [leaves[i] for i in self.index]
        if check and not self._fits(taken, dtype):
            for k, (g, s) in enumerate(zip(self.values, taken)):
                if not (
                    isinstance(s, torch.Tensor)
                    and s.shape == g.shape
                    and (s.dtype is g.dtype or not dtype or _holds(s.dtype, g.dtype))
                    and s.device == g.device
                ):
                    raise misfit(self.spec, self.index[k], g, s, name)
        return taken

    def _flat(self, tree: Any, name: str) -> list[Any]:
        """``tree``'s leaves in the updates' order, flattened once per tree object for
        this view (the leaves list is never modified: callers copy it)."""
        for known, leaves in self._taken:
            if known is tree:
                return leaves
        leaves = flatten_like(self.spec, tree, name, "the updates")
        if len(self._taken) >= 4:  # a view kept across calls holds no more than 4 trees
            del self._taken[0]
        self._taken.append((tree, leaves))
        return leaves

    def take_params(self, params: Any, who: str, why: str) -> list[Any]:
        """The params' leaves at the present positions (``[]`` when no gradient is present),
        for transformations that need them; a ``ValueError`` starting with ``who`` and
        saying ``why`` (e.g. ``"weight decay needs the parameters"``) when ``params`` is
        ``None``."""
        if not self.values:
            return []
        if params is None:
            raise ValueError(
                f"{who}: params is None; {why}, call tx.update(grads, state, params)"
            )
        return self.take(params, "params", dtype=False)

    def _fits(self, taken: list[Any], dtype: bool) -> bool:
        """The common case of :meth:`take`'s check, by whole-list comparisons: plain
        tensors of the gradients' shapes, devices and (with ``dtype``) exact dtypes.
        Memoized on the metadata of both lists (see :class:`MetaMemo`)."""
        values = self.values
        compiling = torch.compiler.is_compiling()
        key = (len(values), dtype)
        both = [*values, *taken]
        if not compiling and _FITS.get(key, both) is True:
            return True
        fits = (
            {type(s) for s in taken} <= PLAIN
            and [s.shape for s in taken] == [g.shape for g in values]
            and (not dtype or [s.dtype for s in taken] == [g.dtype for g in values])
            and [s.device for s in taken] == [g.device for g in values]
        )
        if fits and not compiling:
            _FITS.put(key, both, True)
        return fits

    def take_all(self, tree: Any, name: str = "params") -> list[Any]:
        """All leaves of ``tree`` (same structure as the updates), ``None`` included."""
        return flatten_like(self.spec, tree, name, "the updates")

    def put(self, values: Sequence[Any]) -> Any:
        if self._full:
            return unflatten(self.spec, values)
        out = list(self.leaves)
        for i, v in zip(self.index, values):
            out[i] = v
        return unflatten(self.spec, out)

    def put_into(self, tree: Any, values: Sequence[Any]) -> Any:
        leaves = self._flat(tree, "state")  # (also checks the tree's structure)
        if self._full:
            return unflatten(self.spec, values)
        out = list(leaves)
        for i, v in zip(self.index, values):
            out[i] = v
        return unflatten(self.spec, out)


class MetaMemo:
    """Results that depend only on tensors' metadata, computed once and reused.

    The per-call work of a step that reads only the structure of the trees and the
    metadata of their leaves (whether torch's fused kernel fits, the validation that names
    a bad leaf, the (device, dtype) grouping) gives the same answer on every step of a
    training loop. A memo keeps that answer under a key the caller builds from the
    structure (a treespec, the positions of ``None`` leaves, ...) together with a proof of
    the tensors' metadata: torch's C++ tensor guard (the one ``torch.compile`` checks
    before it reuses a graph), which compares each tensor's Python type, dtype, device,
    shape, strides, ``requires_grad`` and dispatch keys (sparse, functorch-wrapped, ...)
    with the recorded ones, about 60 ns per tensor. Any difference is a miss, and the
    caller recomputes with its full checks (naming the bad leaf as before); a hit
    cannot differ from recomputing, since it depends on nothing else. Identity is not part
    of the proof: results are positions and flags, never the tensors themselves.

    Bounded: at most ``size`` keys (the oldest is dropped). Not used while compiling
    (dynamo guards the graph itself).
    """

    __slots__ = ("_entries", "_size")

    def __init__(self, size: int = 8) -> None:
        self._entries: dict[Any, tuple[Any, Any]] = {}
        self._size = size

    def get(self, key: Any, tensors: Sequence[Any]) -> Any:
        """The value stored under ``key`` if ``tensors`` match the recorded metadata, else
        :data:`MISS`."""
        hit = self._entries.get(key)
        if hit is None:
            return MISS
        guard, value = hit
        try:
            return value if guard.check(*tensors) else MISS
        except TypeError:  # another number of tensors
            return MISS

    def put(self, key: Any, tensors: Sequence[Any], value: Any) -> Any:
        """Store ``value`` under ``key`` with ``tensors``' metadata; returns ``value``.
        A leaf that is not a dense tensor leaves the memo unchanged."""
        try:
            # One list of static sizes (strides) per tensor; the stub's type is narrower.
            guard = TensorGuards(
                *tensors,
                dynamic_dims_sizes=[list(t.size()) for t in tensors],  # type: ignore[misc]
                dynamic_dims_strides=[list(t.stride()) for t in tensors],  # type: ignore[misc]
            )
        except (TypeError, RuntimeError, AttributeError):  # a leaf that is not a tensor
            return value
        entries = self._entries
        if key not in entries and len(entries) >= self._size:
            del entries[next(iter(entries))]
        entries[key] = (guard, value)
        return value


MISS: Any = object()  # :meth:`MetaMemo.get` found nothing usable
_VALID = MetaMemo(16)  # update lists that passed Leaves' validation
_FITS = MetaMemo(16)  # (updates, state) list pairs that passed Leaves.take's check


_STRIDED = torch.strided
_STRIDED_ONLY = frozenset({torch.strided})
PLAIN = frozenset({torch.Tensor, torch.nn.Parameter})
_HOLDS: dict[tuple[torch.dtype, torch.dtype], bool] = {}


def _holds(state: torch.dtype, grad: torch.dtype) -> bool:
    """Whether a ``state`` dtype holds ``grad`` values without rounding (cached)."""
    key = (state, grad)
    ok = _HOLDS.get(key)
    if ok is None:
        ok = _HOLDS[key] = state.is_floating_point and torch.promote_types(state, grad) == state
    return ok


def leaf_path(spec: optree.PyTreeSpec, i: int) -> str:
    return path_str(spec.paths()[i])


def bad_update(spec: optree.PyTreeSpec, i: int, g: Any) -> TypeError:
    """The error for an update leaf that is not a dense floating tensor."""
    where = f"updates{leaf_path(spec, i)}"
    if not isinstance(g, torch.Tensor):
        return TypeError(f"{where}: expected a torch.Tensor or None, got {type(g).__name__}")
    if g.layout is not _STRIDED:
        return TypeError(
            f"{where} is a sparse tensor ({g.layout}); gradchain transformations need dense "
            "gradients: convert with .to_dense(), or make the layer produce dense ones "
            "(e.g. nn.Embedding(..., sparse=False))"
        )
    kind = "complex" if g.is_complex() else "integer" if g.dtype != torch.bool else "boolean"
    return TypeError(
        f"{where} has dtype {g.dtype}; gradients must be floating point "
        f"(float16, bfloat16, float32 or float64), not {kind}"
        + (": view complex parameters as real ones (torch.view_as_real)" if kind == "complex" else "")
    )


def misfit(spec: optree.PyTreeSpec, i: int, g: torch.Tensor, s: Any, name: str) -> ValueError:
    """The error for a state (or params) leaf that does not fit its gradient."""
    path = leaf_path(spec, i)
    if name.split(".")[0].startswith("params"):
        hint = "the gradients must have the structure and shapes of the params"
    else:
        hint = (
            "the state was made for other params (call init on the params these gradients "
            "belong to, or move/cast the state with them)"
        )
    if not isinstance(s, torch.Tensor):
        what = "is None" if s is None else f"is a {type(s).__name__}"
        return ValueError(f"updates{path} is a tensor but {name}{path} {what}; {hint}")
    if s.shape != g.shape:
        diff = f"has shape {tuple(g.shape)} but {name}{path} has shape {tuple(s.shape)}"
    elif s.device != g.device:
        diff = f"is on {g.device} but {name}{path} is on {s.device}"
    else:
        diff = (
            f"has dtype {g.dtype} but {name}{path} has dtype {s.dtype}, which would round it"
        )
    return ValueError(f"updates{path} {diff}; {hint}")
