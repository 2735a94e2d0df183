"""State as data: read a field anywhere in a chain state, and convert states to and from
plain nested dicts/lists of tensors (what ``torch.load(..., weights_only=True)`` accepts).

Files are :mod:`gradchain.checkpoint`'s business; this module only converts.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from gradchain._tree import named_nodes

_T = TypeVar("_T", bound=type)

__all__ = ["tree_get", "to_state_dict", "from_state_dict", "config_fields", "named_entries"]

_NAMED_ENTRIES: dict[type, str] = {}


def named_entries(field: str) -> Callable[[_T], _T]:
    """Class decorator: the keys of this dict-valued field of a state are names that
    :func:`tree_get` finds, as it finds field names (a partition's labels, injected
    hyperparameters). Only these dicts are searched: the dicts of a params-shaped tree (a
    moment ``mu = {"w": ...}``) are not, so a parameter name never shadows a field.

    Example:
        >>> from typing import NamedTuple
        >>> import torch
        >>> from gradchain.state import named_entries, tree_get
        >>> @named_entries("by_name")
        ... class RegistryState(NamedTuple):
        ...     by_name: dict
        >>> tree_get((RegistryState({"lr": torch.tensor(0.1)}),), "lr")
        tensor(0.1000)
    """

    def register(cls: _T) -> _T:
        _NAMED_ENTRIES[cls] = field
        return cls

    return register


def tree_get(state: Any, key: str | type) -> Any:
    """Read a field (by name) or a sub-state (by type) from anywhere in a chain state.

    A name matches a field of a state NamedTuple (``"norm"``, ``"count"``), the name of a
    member of a :func:`~gradchain.named_chain` (its state), a label of a
    :func:`~gradchain.partition` (that member's state) and an injected hyperparameter
    (``"lr"``, see :func:`~gradchain.inject_hyperparams`). Raises ``KeyError`` when nothing
    matches and when more than one thing matches (the message lists the paths, so you can
    narrow the search: ``tree_get(tree_get(state, "decay"), gc.ScaleByAdamState)``).

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
    for path, node in named_nodes(state):
        if isinstance(key, type):
            if isinstance(node, key):
                found.append((path, node))
        else:
            if key in node._fields:
                found.append((f"{path}.{key}", getattr(node, key)))
            entries = _NAMED_ENTRIES.get(type(node))
            if entries is not None:
                table = getattr(node, entries)
                if isinstance(table, dict) and key in table:
                    found.append((f"{path}.{entries}[{key!r}]", table[key]))
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
        >>> from gradchain.state import config_fields, from_state_dict
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


def _is_state(x: Any) -> bool:
    """A member state of a chain: a NamedTuple, or a nested chain's tuple of them (not a
    params-shaped tuple of tensors)."""
    if isinstance(x, tuple) and hasattr(x, "_fields"):
        return True
    return isinstance(x, tuple) and len(x) > 0 and all(_is_state(s) for s in x)


def _fits(template: Any, data: Any) -> bool:
    try:
        _rebuild(template, data, "")
    except (ValueError, TypeError):
        return False
    return True


def _state_name(x: Any) -> str:
    if isinstance(x, tuple) and hasattr(x, "_fields"):
        return type(x).__name__
    if isinstance(x, tuple):
        return "(" + ", ".join(_state_name(s) for s in x) + ")"
    return type(x).__name__


def _data_name(x: Any) -> str:
    if isinstance(x, dict):
        return "{" + ", ".join(map(str, x)) + "}"
    if isinstance(x, (list, tuple)):
        return "[" + ", ".join(_data_name(d) for d in x) + "]"
    return type(x).__name__


def _members_differ(template: Any, data: Any, path: str) -> str:
    """The message for a chain state saved with a member more or less (the error path):
    which member is missing or extra, found by aligning the saved members with this
    chain's."""
    n, m = len(template), len(data)
    where = ""
    if m == n - 1:  # one member less: the one whose removal makes the rest fit
        for i in range(n):
            rest = list(template[:i]) + list(template[i + 1 :])
            if all(_fits(t, d) for t, d in zip(rest, data)):
                where = (f"; member {path}[{i}] ({_state_name(template[i])}) is missing from "
                         "the saved state")
                break
    elif m == n + 1:  # one member more
        for i in range(m):
            rest = list(data[:i]) + list(data[i + 1 :])
            if all(_fits(t, d) for t, d in zip(template, rest)):
                where = (f"; the saved state has an extra member at {path}[{i}] (with keys "
                         f"{_data_name(data[i])}), which this chain lacks")
                break
    if not where:
        first = next((i for i, (t, d) in enumerate(zip(template, data)) if not _fits(t, d)),
                     min(n, m))
        where = f"; the first that differs is member {path}[{first}]"
    return (
        f"from_state_dict: {path} does not fit this transformation's state: it holds {n} "
        "member states ("
        + ", ".join(_state_name(t) for t in template)
        + f"), the saved state {m}{where}: it was saved from a chain with a member "
        + ("less" if m < n else "more")
        + " (load it into a chain of the same members, in the same order)"
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
        if isinstance(data, (list, tuple)) and len(data) != len(template) and _is_state(
            tuple(template)
        ):
            raise ValueError(_members_differ(template, data, path))
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

