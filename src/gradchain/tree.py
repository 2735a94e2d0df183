"""Tree helpers: flattening, leaf grouping, global norms, and state as plain data.

Every tree in gradchain is an optree pytree flattened with ``none_is_leaf=True``, so a
``None`` gradient keeps its place and lines up with the parameter and state it belongs to.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import optree
import torch

from gradchain import _dist

_T = TypeVar("_T", bound=type)

__all__ = [
    "flatten",
    "unflatten",
    "flatten_like",
    "leaf_paths",
    "group_by_device_dtype",
    "global_norm",
    "tree_get",
    "to_state_dict",
    "from_state_dict",
    "zeros_like_tree",
    "Leaves",
]


def flatten(tree: Any) -> tuple[list[Any], optree.PyTreeSpec]:
    """Flatten ``tree`` into its leaves (``None`` counts as a leaf) and a spec.

    Example:
        >>> import torch
        >>> from gradchain.tree import flatten
        >>> leaves, spec = flatten({"b": None, "a": torch.zeros(1)})
        >>> len(leaves), leaves[1] is None
        (2, True)
    """
    return optree.tree_flatten(tree, none_is_leaf=True)


def unflatten(spec: optree.PyTreeSpec, leaves: Iterable[Any]) -> Any:
    """Inverse of :func:`flatten`.

    Example:
        >>> from gradchain.tree import flatten, unflatten
        >>> leaves, spec = flatten({"a": 1, "b": [2, 3]})
        >>> unflatten(spec, [x * 10 for x in leaves])
        {'a': 10, 'b': [20, 30]}
    """
    return optree.tree_unflatten(spec, list(leaves))


def _path_str(path: Sequence[Any]) -> str:
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
    return [_path_str(p) for p in paths]


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
        why = _first_difference(ref, tree, name, like) or str(err)
        raise ValueError(f"{name} does not have the structure of {like}: {why}") from None
    return leaves


def _first_difference(ref: Any, got: Any, name: str, like: str, path: tuple[Any, ...] = ()) -> str | None:
    """Where ``got`` first departs from the structure of ``ref`` (whose leaves may be
    anything in ``got``), as a short sentence; ``None`` when it fits."""
    if optree.tree_is_leaf(ref, none_is_leaf=True):
        return None
    where = _path_str(path)
    if optree.tree_is_leaf(got, none_is_leaf=True) or type(got) is not type(ref):
        return (
            f"{like} have a {type(ref).__name__} at {where or 'the root'}, "
            f"{name} has a {type(got).__name__}"
        )
    r = optree.tree_flatten_one_level(ref, none_is_leaf=True)
    g = optree.tree_flatten_one_level(got, none_is_leaf=True)
    r_keys, g_keys = list(r.entries), list(g.entries)
    if r_keys != g_keys:
        missing = [k for k in r_keys if k not in g_keys]
        extra = [k for k in g_keys if k not in r_keys]
        if missing:
            return f"{name} has no {_path_str((*path, missing[0]))}, which {like} have"
        if extra:
            return f"{name}{_path_str((*path, extra[0]))} is not in {like}"
        return f"the entries of {name}{where} are in another order than in {like}"
    for key, rc, gc in zip(r_keys, r.children, g.children):
        found = _first_difference(rc, gc, name, like, (*path, key))
        if found is not None:
            return found
    return None


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
    groups: dict[tuple[torch.device, torch.dtype], list[tuple[Any, ...]]] = {}
    for row in rows:
        t = row[0]
        groups.setdefault((t.device, t.dtype), []).append(row)
    return [tuple(list(col) for col in zip(*g)) for g in groups.values()]


def _norm_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    """float32 at least, float64 if any tensor is float64."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def global_norm(tensors: Sequence[torch.Tensor | None], norm_type: float = 2.0) -> torch.Tensor:
    """The norm of the concatenation of ``tensors`` (``None`` entries are skipped).

    Computed in float32 at least (float64 when any tensor is float64), so float16 or
    bfloat16 gradients whose norm exceeds their range still get a finite norm. Matches
    ``torch.nn.utils.get_total_norm`` for ``norm_type`` 1, 2, any p > 0 and ``inf``.
    Empty input gives ``0.``.

    DTensor leaves (FSDP2 ``fully_shard``, tensor parallel) count with all their shards:
    the result is a plain tensor, the same on every rank, from one all-reduce per group of
    leaves sharded alike (one for FSDP2). So every rank must call it. Plain tensors mixed
    in are taken as replicated (counted once).

    Example:
        >>> import torch
        >>> from gradchain.tree import global_norm
        >>> global_norm([torch.tensor([3.0]), None, torch.tensor([4.0])])
        tensor(5.)
        >>> global_norm([torch.full((4,), 60000.0, dtype=torch.float16)])
        tensor(120000.)
    """
    ts = [t for t in tensors if t is not None]
    if not ts:
        return torch.tensor(0.0)
    dtype = _norm_dtype(ts)
    device = ts[0].device
    # Empty tensors add nothing to a p-norm, and the inf-norm of one raises (no identity).
    ts = [t for t in ts if t.numel() > 0]
    if not ts:
        return torch.zeros((), dtype=dtype, device=device)
    p = float(norm_type)
    if _dist.has_dtensor(ts):
        return _sharded_global_norm(ts, p, dtype, device)
    stacked = torch.stack(_leaf_norms(ts, p, dtype, device))
    return torch.linalg.vector_norm(stacked, p)


def _leaf_norms(
    ts: Sequence[torch.Tensor], p: float, dtype: torch.dtype, device: torch.device
) -> list[torch.Tensor]:
    """The ``p``-norm of each (non-empty) tensor, in ``dtype`` on ``device``."""
    norms: list[torch.Tensor] = []
    for (group,) in group_by_device_dtype([(t,) for t in ts]):
        if _use_foreach(group):
            norms.extend(torch._foreach_norm(group, p, dtype=dtype))
        else:
            norms.extend(torch.linalg.vector_norm(t, p, dtype=dtype) for t in group)
    return [n.to(device) for n in norms]


def _sharded_global_norm(
    ts: Sequence[torch.Tensor], p: float, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """:func:`global_norm` when some leaves are DTensors: a plain tensor, equal on all ranks.

    Each rank takes the norms of its local shards; per group of leaves sharded alike
    (see :mod:`gradchain._dist`) the sum of their ``p``-th powers (the max for ``inf``) is
    all-reduced once. For ``inf`` a nan flag travels in the same all-reduce, since a max
    reduction may drop a nan.
    """
    plain, groups = _dist.local_parts(ts, exact=True)
    inf = math.isinf(p)

    def part(norms: list[torch.Tensor], on: torch.device) -> torch.Tensor:
        # This rank's share: max (inf) or sum of p-th powers of ``norms``; 0 for none.
        if not norms:
            return torch.zeros((), dtype=dtype, device=on)
        stacked = torch.stack(norms)
        return stacked.max() if inf else stacked.pow(p).sum()

    parts: list[torch.Tensor] = []
    if plain:  # replicated by the user's contract: counted once, not reduced
        parts.append(part(_leaf_norms(plain, p, dtype, device), device))
    for mesh, dims, locals_ in groups:
        on = locals_[0].device
        local = part(_leaf_norms([x for x in locals_ if x.numel() > 0], p, dtype, on), on)
        if inf:
            isnan = torch.isnan(local)
            packed = torch.stack([torch.where(isnan, 0.0, local), isnan.to(dtype)])
            packed = _dist.all_reduce(packed, mesh, dims, "max")
            local = torch.where(packed[1] > 0, torch.nan, packed[0])
        else:
            local = _dist.all_reduce(local, mesh, dims, "sum")
        parts.append(local.to(device))
    total = torch.stack(parts)
    return total.max() if inf else total.sum().pow(1.0 / p)


def _known_bool(flag: torch.Tensor) -> bool | None:
    """The value of a 0-dim bool flag if it can be read without a host-device sync and
    without breaking a trace; ``None`` when it must stay a tensor.

    Host (CPU) tensors are readable for free in eager mode: there is no device to wait
    for, so reading one is not a host-device sync. Under ``torch.compile`` or
    ``torch.func`` transforms (vmap, grad) flags are symbolic or batched, and stay tensors;
    on an accelerator they stay tensors too. Code that uses the value must give exactly
    the result the tensor path gives; it only skips work (a select, a discarded tail).
    """
    if flag.device.type != "cpu" or torch.compiler.is_compiling():
        return None
    if torch._C._functorch.is_functorch_wrapped_tensor(flag):
        return None
    if isinstance(flag, torch._subclasses.FakeTensor):
        return None
    return bool(flag)


def _use_foreach(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether ``torch._foreach_*`` kernels can serve these tensors: plain eager tensors.

    Foreach ops have no vmap batching rule and no functorch autograd, so tensors that
    are batched, wrapped by ``torch.func``, or that require grad go leaf by leaf.
    """
    if not tensors:
        return False
    if torch.compiler.is_compiling():
        return True
    t = tensors[0]
    if torch._C._functorch.is_functorch_wrapped_tensor(t):
        return False
    if torch.is_grad_enabled() and any(x.requires_grad for x in tensors):
        return False
    return type(t) is torch.Tensor or isinstance(t, torch.nn.Parameter)


def zeros_like_tree(params: Any, dtype: torch.dtype | None = None) -> Any:
    """A tree of zeros shaped like ``params`` (``None`` leaves stay ``None``), e.g. a moment.

    ``dtype`` overrides the leaves' dtype (e.g. float32 accumulators for float16 params).

    Example:
        >>> import torch
        >>> from gradchain.tree import zeros_like_tree
        >>> zeros_like_tree({"w": torch.ones(2, dtype=torch.float16), "b": None}, torch.float32)
        {'w': tensor([0., 0.]), 'b': None}
    """
    leaves, spec = flatten(params)
    out: list[torch.Tensor | None] = []
    for i, p in enumerate(leaves):
        if p is None:
            out.append(None)
        elif isinstance(p, torch.Tensor):
            out.append(torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format))
        else:
            raise TypeError(
                f"params{leaf_paths(params)[i]}: expected a torch.Tensor or None, "
                f"got {type(p).__name__}"
            )
    return unflatten(spec, out)


# --------------------------------------------------------------------------- state lookup
def _named_nodes(state: Any, path: str = "state") -> Iterable[tuple[str, Any]]:
    """Yield (path, node) for every NamedTuple node in ``state``."""
    if isinstance(state, tuple) and hasattr(state, "_fields"):
        yield path, state
        for f in state._fields:
            yield from _named_nodes(getattr(state, f), f"{path}.{f}")
    elif isinstance(state, (tuple, list)):
        for i, child in enumerate(state):
            yield from _named_nodes(child, f"{path}[{i}]")
    elif isinstance(state, dict):
        for k, child in state.items():
            yield from _named_nodes(child, f"{path}[{k!r}]")


def tree_get(state: Any, key: str | type) -> Any:
    """Read a field (by name) or a sub-state (by type) from anywhere in a chain state.

    Raises ``KeyError`` when nothing matches and when more than one thing matches (the
    message lists the paths, so you can index the state directly instead).

    Example:
        >>> import torch, gradchain as gc
        >>> tx = gc.chain(gc.clip_by_norm(1.0), gc.sgd(lr=0.1))
        >>> params = {"w": torch.zeros(2)}
        >>> _, state = tx.update({"w": torch.tensor([3.0, 4.0])}, tx.init(params), params)
        >>> gc.tree_get(state, "norm")
        tensor(5.)
        >>> type(gc.tree_get(state, gc.ClipByNormState)).__name__
        'ClipByNormState'
    """
    found: list[tuple[str, Any]] = []
    for path, node in _named_nodes(state):
        if isinstance(key, type):
            if isinstance(node, key):
                found.append((path, node))
        elif key in node._fields:
            found.append((f"{path}.{key}", getattr(node, key)))
    what = key.__name__ if isinstance(key, type) else repr(key)
    if not found:
        raise KeyError(f"tree_get: no {what} in this state")
    if len(found) > 1:
        paths = ", ".join(p for p, _ in found)
        raise KeyError(f"tree_get: {what} is ambiguous in this state; it is at {paths}")
    return found[0][1]


# --------------------------------------------------------------------------- state as data
def to_state_dict(state: Any) -> Any:
    """The plain form of a state: nested dicts/lists of tensors, ints, floats and None.

    NamedTuples become dicts keyed by field name, tuples become lists. The result can
    be saved with ``torch.save`` and read back with ``torch.load(..., weights_only=True)``.

    Example:
        >>> import torch, gradchain as gc
        >>> tx = gc.chain(gc.clip_by_norm(1.0), gc.accumulate_every(2))
        >>> sd = gc.to_state_dict(tx.init({"w": torch.zeros(2)}))
        >>> sorted(sd[0])
        ['nonfinite_error', 'norm']
    """
    if isinstance(state, tuple) and hasattr(state, "_fields"):
        return {f: to_state_dict(getattr(state, f)) for f in state._fields}
    if isinstance(state, (tuple, list)):
        return [to_state_dict(x) for x in state]
    if isinstance(state, dict):
        return {k: to_state_dict(v) for k, v in state.items()}
    if isinstance(state, torch.Tensor):
        return state.detach().clone()
    if state is None or isinstance(state, (bool, int, float, str)):
        return state
    raise TypeError(f"to_state_dict: cannot store a {type(state).__name__} in a state dict")


_CONFIG_FIELDS: dict[type, tuple[str, ...]] = {}


def config_fields(*names: str) -> Callable[[_T], _T]:
    """Class decorator: these tensor fields of a state hold configuration (e.g. a window
    length), so :func:`from_state_dict` refuses data whose values differ from the template's.

    Example:
        >>> from typing import NamedTuple
        >>> import torch
        >>> from gradchain.tree import config_fields, from_state_dict
        >>> @config_fields("n")
        ... class WindowState(NamedTuple):
        ...     n: torch.Tensor
        >>> from_state_dict(WindowState(torch.tensor(4)), {"n": torch.tensor(3)})
        Traceback (most recent call last):
        ...
        ValueError: from_state_dict: state.n is part of the transformation's configuration: ...
    """

    def register(cls: _T) -> _T:
        _CONFIG_FIELDS[cls] = tuple(names)
        return cls

    return register


def _mismatch(path: str, expected: str, got: Any) -> ValueError:
    if isinstance(got, torch.Tensor):
        desc = f"a tensor of shape {tuple(got.shape)} and dtype {got.dtype}"
    elif isinstance(got, dict):
        desc = f"a dict with keys {sorted(map(str, got))}"
    elif isinstance(got, (list, tuple)):
        desc = f"a list of length {len(got)}"
    else:
        desc = repr(got)
    return ValueError(
        f"from_state_dict: {path} does not fit this transformation's state: "
        f"expected {expected}, got {desc}"
    )


def _rebuild(template: Any, data: Any, path: str) -> Any:
    if isinstance(template, tuple) and hasattr(template, "_fields"):
        fields = template._fields
        if not isinstance(data, dict):
            raise _mismatch(path, f"a dict with keys {list(fields)}", data)
        missing = [f for f in fields if f not in data]
        extra = [k for k in data if k not in fields]
        if missing:
            raise _mismatch(f"{path}.{missing[0]}", "a value (key missing)", data)
        if extra:
            raise _mismatch(f"{path}.{extra[0]}", f"no such key in {type(template).__name__}", data)
        rebuilt = type(template)(
            *(_rebuild(getattr(template, f), data[f], f"{path}.{f}") for f in fields)
        )
        for f in _CONFIG_FIELDS.get(type(template), ()):
            want, got = getattr(template, f), getattr(rebuilt, f)
            if not torch.equal(want.cpu(), got.cpu()):
                raise ValueError(
                    f"from_state_dict: {path}.{f} is part of the transformation's configuration: "
                    f"this one has {want.tolist()}, the state dict has {got.tolist()} "
                    "(it comes from a differently configured transformation)"
                )
        return rebuilt
    if isinstance(template, (tuple, list)):
        if not isinstance(data, (list, tuple)) or len(data) != len(template):
            raise _mismatch(path, f"a list of length {len(template)}", data)
        items = [_rebuild(t, d, f"{path}[{i}]") for i, (t, d) in enumerate(zip(template, data))]
        return type(template)(items)
    if isinstance(template, dict):
        if not isinstance(data, dict):
            raise _mismatch(path, f"a dict with keys {sorted(map(str, template))}", data)
        missing = [k for k in template if k not in data]
        extra = [k for k in data if k not in template]
        if missing:
            raise _mismatch(f"{path}[{missing[0]!r}]", "a value (key missing)", data)
        if extra:
            raise _mismatch(f"{path}[{extra[0]!r}]", "no such key", data)
        return type(template)((k, _rebuild(v, data[k], f"{path}[{k!r}]")) for k, v in template.items())
    if isinstance(template, torch.Tensor):
        if not isinstance(data, torch.Tensor):
            raise _mismatch(path, f"a tensor of shape {tuple(template.shape)}", data)
        if data.shape != template.shape or data.dtype != template.dtype:
            raise _mismatch(
                path, f"a tensor of shape {tuple(template.shape)} and dtype {template.dtype}", data
            )
        return data.detach().to(template.device, copy=True)
    if template is None:
        if data is not None:
            raise _mismatch(path, "None", data)
        return None
    if isinstance(template, (bool, int, float, str)):
        if type(data) is not type(template) and not (
            isinstance(template, float) and isinstance(data, float) and math.isnan(data)
        ):
            raise _mismatch(path, f"a {type(template).__name__}", data)
        return data
    raise TypeError(f"from_state_dict: {path}: unsupported template leaf {type(template).__name__}")


def from_state_dict(template_state: Any, state_dict: Any) -> Any:
    """Rebuild a state shaped like ``template_state`` (usually ``tx.init(params)``) from
    the plain data made by :func:`to_state_dict`.

    Tensors are copied onto the template's devices. Nothing is changed when the data
    does not fit: a ``ValueError`` names the first path that differs (missing or extra
    key, wrong length, wrong shape or dtype).

    Example:
        >>> import torch, gradchain as gc
        >>> tx = gc.adam(lr=1e-3)
        >>> params = {"w": torch.zeros(3)}
        >>> state = tx.init(params)
        >>> again = gc.from_state_dict(state, gc.to_state_dict(state))
        >>> gc.from_state_dict(gc.sgd(lr=0.1).init(params), gc.to_state_dict(state))
        Traceback (most recent call last):
        ...
        ValueError: from_state_dict: ... does not fit this transformation's state: ...
    """
    return _rebuild(template_state, state_dict, "state")


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

    __slots__ = ("spec", "leaves", "index", "values")

    def __init__(self, updates: Any) -> None:
        self.leaves, self.spec = flatten(updates)
        self.index = [i for i, g in enumerate(self.leaves) if g is not None]
        self.values: list[torch.Tensor] = [self.leaves[i] for i in self.index]
        # Metadata only (no device read, traceable). Whole-list checks first (cheap); the
        # leaf-by-leaf loop only runs to name the first bad leaf.
        values = self.values
        if not (
            {type(g) for g in values} <= _PLAIN
            and all(map(torch.is_floating_point, values))
            and {g.layout for g in values} <= _STRIDED_ONLY
        ):
            for i, g in zip(self.index, values):
                if not (
                    isinstance(g, torch.Tensor) and g.is_floating_point() and g.layout is _STRIDED
                ):
                    raise _bad_update(self.spec, i, g)

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
        leaves = flatten_like(self.spec, tree, name, "the updates")
        taken = [leaves[i] for i in self.index]
        if check and not self._fits(taken, dtype):
            for k, (g, s) in enumerate(zip(self.values, taken)):
                if not (
                    isinstance(s, torch.Tensor)
                    and s.shape == g.shape
                    and (s.dtype is g.dtype or not dtype or _holds(s.dtype, g.dtype))
                    and s.device == g.device
                ):
                    raise _misfit(self.spec, self.index[k], g, s, name)
        return taken

    def _fits(self, taken: list[Any], dtype: bool) -> bool:
        """The common case of :meth:`take`'s check, by whole-list comparisons: plain
        tensors of the gradients' shapes, devices and (with ``dtype``) exact dtypes."""
        values = self.values
        return (
            {type(s) for s in taken} <= _PLAIN
            and [s.shape for s in taken] == [g.shape for g in values]
            and (not dtype or [s.dtype for s in taken] == [g.dtype for g in values])
            and [s.device for s in taken] == [g.device for g in values]
        )

    def take_all(self, tree: Any, name: str = "params") -> list[Any]:
        """All leaves of ``tree`` (same structure as the updates), ``None`` included."""
        return flatten_like(self.spec, tree, name, "the updates")

    def put(self, values: Sequence[Any]) -> Any:
        out = list(self.leaves)
        for i, v in zip(self.index, values):
            out[i] = v
        return unflatten(self.spec, out)

    def put_into(self, tree: Any, values: Sequence[Any]) -> Any:
        out = list(flatten_like(self.spec, tree, "state", "the updates"))
        for i, v in zip(self.index, values):
            out[i] = v
        return unflatten(self.spec, out)


_STRIDED = torch.strided
_STRIDED_ONLY = frozenset({torch.strided})
_PLAIN = frozenset({torch.Tensor, torch.nn.Parameter})
_HOLDS: dict[tuple[torch.dtype, torch.dtype], bool] = {}


def _holds(state: torch.dtype, grad: torch.dtype) -> bool:
    """Whether a ``state`` dtype holds ``grad`` values without rounding (cached)."""
    key = (state, grad)
    ok = _HOLDS.get(key)
    if ok is None:
        ok = _HOLDS[key] = state.is_floating_point and torch.promote_types(state, grad) == state
    return ok


def _leaf_path(spec: optree.PyTreeSpec, i: int) -> str:
    return _path_str(spec.paths()[i])


def _bad_update(spec: optree.PyTreeSpec, i: int, g: Any) -> TypeError:
    """The error for an update leaf that is not a dense floating tensor."""
    where = f"updates{_leaf_path(spec, i)}"
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


def _misfit(spec: optree.PyTreeSpec, i: int, g: torch.Tensor, s: Any, name: str) -> ValueError:
    """The error for a state (or params) leaf that does not fit its gradient."""
    path = _leaf_path(spec, i)
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
