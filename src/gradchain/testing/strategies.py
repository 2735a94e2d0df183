"""Hypothesis strategies for gradchain: pytrees of tensors, gradients, transformations.

Everything here is small on purpose (a few leaves of at most a few dozen entries) so that
property tests run on a CPU in seconds. Each strategy shrinks towards the simplest case:
float32, ordinary values, no ``None`` leaves, few leaves.

Example:
    >>> import torch
    >>> from hypothesis import given, settings
    >>> from gradchain.testing import strategies as gst
    >>> @settings(max_examples=5, database=None)
    ... @given(gst.params())
    ... def test_leaves_are_float_tensors(p):
    ...     from gradchain.tree import flatten
    ...     assert all(t.is_floating_point() for t in flatten(p)[0])
    >>> test_leaves_are_float_tensors()
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Collection, Sequence
from typing import Any, NamedTuple

import optree
import torch
from hypothesis import strategies as st

import gradchain
from gradchain.base import GradientTransformation
from gradchain.tree import flatten, unflatten

__all__ = [
    "FLOAT_DTYPES",
    "Layer",
    "dtypes",
    "shapes",
    "tensors",
    "pytrees",
    "params",
    "gradients",
    "transformations",
    "chains",
    "every_other_leaf",
]

#: The floating dtypes the strategies draw from, simplest first (hypothesis shrinks
#: towards the first).
FLOAT_DTYPES: tuple[torch.dtype, ...] = (
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
)

_KEYS = ("w", "b", "weight", "bias", "layer.0.weight", "embed", "norm")


class Layer(NamedTuple):
    """A NamedTuple container that :func:`pytrees` uses, as a model might group a layer.

    Example:
        >>> import torch
        >>> from gradchain.testing.strategies import Layer
        >>> Layer(weight=torch.zeros(2, 2), bias=torch.zeros(2)).bias
        tensor([0., 0.])
    """

    weight: Any
    bias: Any


# --------------------------------------------------------------------------- tensors
def dtypes(allowed: Sequence[torch.dtype] = FLOAT_DTYPES) -> st.SearchStrategy[torch.dtype]:
    """A floating dtype from ``allowed`` (float32 first, so failures shrink to it).

    Example:
        >>> import torch
        >>> from hypothesis import find
        >>> from gradchain.testing import strategies as gst
        >>> find(gst.dtypes([torch.float16, torch.float64]), lambda d: d.itemsize == 8)
        torch.float64
    """
    allowed = tuple(allowed)
    if not allowed:
        raise ValueError("dtypes: allowed must name at least one dtype")
    for d in allowed:
        if not (isinstance(d, torch.dtype) and d.is_floating_point):
            raise TypeError(f"dtypes: expected floating torch.dtypes, got {d!r}")
    return st.sampled_from(allowed)


@st.composite
def _shapes(draw: st.DrawFn, max_dims: int, max_side: int, allow_empty: bool) -> tuple[int, ...]:
    dims = draw(st.lists(st.integers(1, max_side), max_size=max_dims))
    if allow_empty and dims and draw(st.booleans()):
        dims[draw(st.integers(0, len(dims) - 1))] = 0
    return tuple(dims)


def shapes(
    *, max_dims: int = 3, max_side: int = 3, allow_empty: bool = True
) -> st.SearchStrategy[tuple[int, ...]]:
    """Tensor shapes: 0-dim ``()``, empty (a zero side) and ordinary small shapes.

    Args:
        max_dims: most dimensions.
        max_side: longest side.
        allow_empty: also draw shapes with a zero side, e.g. ``(2, 0)``.

    Example:
        >>> from hypothesis import find
        >>> from gradchain.testing import strategies as gst
        >>> find(gst.shapes(), lambda s: True)  # the simplest shape
        ()
        >>> s = find(gst.shapes(max_side=2), lambda s: 0 in s)
        >>> 0 in s and all(d <= 2 for d in s)
        True
    """
    if max_dims < 0 or max_side < 1:
        raise ValueError("shapes: need max_dims >= 0 and max_side >= 1")
    return _shapes(max_dims, max_side, allow_empty)


def _special_values(dtype: torch.dtype, extremes: bool, nonfinite: bool) -> list[float]:
    fi = torch.finfo(dtype)
    values = [0.0, -0.0]
    if extremes:
        huge, tiny = float(fi.max), float(fi.smallest_normal)
        # tiny / 4 is subnormal in every float dtype.
        values += [huge, -huge, huge / 2, tiny, tiny / 4, -tiny / 4]
    if nonfinite:
        values += [math.nan, math.inf, -math.inf]
    return values


def _elements(dtype: torch.dtype, extremes: bool, nonfinite: bool) -> st.SearchStrategy[float]:
    # Ordinary values are 0 or of magnitude in [2**-10, 10]: normal in every float dtype,
    # also after a few multiplications by factors like 0.1 (tiny values are "extremes").
    ordinary = st.floats(-10.0, 10.0, allow_nan=False, allow_infinity=False).map(
        lambda x: x if abs(x) >= 2.0**-10 else 0.0 * x
    )
    if not (extremes or nonfinite):
        return ordinary
    # Mostly ordinary values, so that a tensor holds a special value or two among them.
    special = st.sampled_from(_special_values(dtype, extremes, nonfinite))
    return st.one_of(ordinary, ordinary, ordinary, special)


def _make_tensor(
    values: Sequence[float], shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str
) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.float64).reshape(shape).to(device, dtype)


@st.composite
def _tensors(
    draw: st.DrawFn,
    dtype: torch.dtype | st.SearchStrategy[torch.dtype],
    shape: tuple[int, ...] | st.SearchStrategy[tuple[int, ...]],
    extremes: bool,
    nonfinite: bool,
    device: torch.device | str,
) -> torch.Tensor:
    d = draw(dtype) if isinstance(dtype, st.SearchStrategy) else dtype
    s = draw(shape) if isinstance(shape, st.SearchStrategy) else tuple(shape)
    n = math.prod(s)
    values = draw(st.lists(_elements(d, extremes, nonfinite), min_size=n, max_size=n))
    return _make_tensor(values, s, d, device)


def tensors(
    *,
    dtype: torch.dtype | st.SearchStrategy[torch.dtype] | None = None,
    shape: tuple[int, ...] | st.SearchStrategy[tuple[int, ...]] | None = None,
    extremes: bool = False,
    nonfinite: bool = False,
    device: torch.device | str = "cpu",
) -> st.SearchStrategy[torch.Tensor]:
    """A floating tensor with ordinary values (0, or magnitudes in ``[2**-10, 10]``),
    optionally with special values.

    Args:
        dtype: a dtype or a strategy of dtypes (default :func:`dtypes`).
        shape: a shape or a strategy of shapes (default :func:`shapes`).
        extremes: also draw zeros of both signs, the largest finite values of the dtype
            ("huge"), and the smallest normal and subnormal ones ("tiny").
        nonfinite: also draw ``nan``, ``inf`` and ``-inf``.
        device: where the tensor lives.

    Example:
        >>> import torch
        >>> from hypothesis import find
        >>> from gradchain.testing import strategies as gst
        >>> t = find(gst.tensors(dtype=torch.float16, shape=(3,), nonfinite=True),
        ...          lambda t: bool(t.isnan().any()))
        >>> t.dtype, t.shape, bool(t.isnan().any())
        (torch.float16, torch.Size([3]), True)
    """
    return _tensors(
        dtypes() if dtype is None else dtype,
        shapes() if shape is None else shape,
        extremes,
        nonfinite,
        device,
    )


# --------------------------------------------------------------------------- trees
_CONTAINERS = ("dict", "list", "tuple", "namedtuple")


def pytrees(
    leaves: st.SearchStrategy[Any],
    *,
    max_leaves: int = 6,
    containers: Sequence[str] = _CONTAINERS,
) -> st.SearchStrategy[Any]:
    """Nested pytrees of ``leaves``: dicts, lists, tuples and :class:`Layer` NamedTuples.

    The root may be a bare leaf or an empty container, as a user's params may be.

    Args:
        leaves: the strategy for the leaves.
        max_leaves: a rough upper bound on the number of leaves.
        containers: any of ``"dict"``, ``"list"``, ``"tuple"``, ``"namedtuple"``.

    Example:
        >>> from hypothesis import find, strategies as st
        >>> from gradchain.testing import strategies as gst
        >>> tree = find(gst.pytrees(st.integers(0, 9)), lambda t: isinstance(t, gst.Layer))
        >>> type(tree).__name__, tree._fields
        ('Layer', ('weight', 'bias'))
    """
    unknown = set(containers) - set(_CONTAINERS)
    if unknown or not containers:
        raise ValueError(
            f"pytrees: containers must be some of {list(_CONTAINERS)}, got {containers}"
        )

    def extend(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        options: list[st.SearchStrategy[Any]] = []
        if "dict" in containers:
            options.append(st.dictionaries(st.sampled_from(_KEYS), children, max_size=3))
        if "list" in containers:
            options.append(st.lists(children, max_size=3))
        if "tuple" in containers:
            options.append(st.lists(children, max_size=3).map(tuple))
        if "namedtuple" in containers:
            options.append(st.builds(Layer, children, children))
        return st.one_of(options)

    return st.recursive(leaves, extend, max_leaves=max_leaves)


def params(
    *,
    dtypes: Sequence[torch.dtype] = FLOAT_DTYPES,
    max_leaves: int = 5,
    none: bool = False,
    shapes: st.SearchStrategy[tuple[int, ...]] | None = None,
    containers: Sequence[str] = _CONTAINERS,
    device: torch.device | str = "cpu",
) -> st.SearchStrategy[Any]:
    """Parameter pytrees: nested containers of small floating tensors with ordinary values.

    Args:
        dtypes: the dtypes a leaf may have (each leaf draws its own).
        max_leaves: a rough upper bound on the number of leaves.
        none: also draw ``None`` leaves (params a ``masked`` or ``partition`` member sees).
        shapes: a strategy of shapes (default: 0-dim, empty and small shapes).
        containers: the container kinds, see :func:`pytrees`.
        device: where the tensors live.

    Example:
        >>> import torch
        >>> from hypothesis import find
        >>> from gradchain.testing import strategies as gst
        >>> p = find(gst.params(dtypes=[torch.float64]), lambda p: isinstance(p, dict) and p)
        >>> {k: v.dtype for k, v in p.items() if isinstance(v, torch.Tensor)}
        {'w': torch.float64}
    """
    shape_st = _shapes(3, 3, True) if shapes is None else shapes
    leaf: st.SearchStrategy[Any] = _tensors(_dtypes(dtypes), shape_st, False, False, device)
    if none:
        leaf = st.one_of(leaf, st.none())
    return pytrees(leaf, max_leaves=max_leaves, containers=containers)


_dtypes = dtypes  # ``params`` has an argument of that name


@st.composite
def _gradients(
    draw: st.DrawFn,
    params: Any,
    none: bool,
    extremes: bool,
    nonfinite: bool,
    dtype: torch.dtype | None,
) -> Any:
    leaves, spec = flatten(params)
    # Per tree: ordinary values only, or special values among them (shrinks to ordinary).
    special = (extremes or nonfinite) and draw(st.booleans())
    use_extremes = special and extremes and draw(st.booleans())
    use_nonfinite = special and nonfinite and (not use_extremes or draw(st.booleans()))
    use_extremes = use_extremes or (special and not use_nonfinite)
    out: list[Any] = []
    for p in leaves:
        if p is None or (none and draw(st.booleans())):
            out.append(None)
            continue
        if not isinstance(p, torch.Tensor):
            raise TypeError(
                f"gradients: params leaves must be tensors or None, got {type(p).__name__}"
            )
        d = dtype or p.dtype
        n = p.numel()
        values = draw(st.lists(_elements(d, use_extremes, use_nonfinite), min_size=n, max_size=n))
        out.append(_make_tensor(values, tuple(p.shape), d, p.device))
    return unflatten(spec, out)


def gradients(
    params: Any,
    *,
    none: bool = True,
    extremes: bool = True,
    nonfinite: bool = False,
    dtype: torch.dtype | None = None,
) -> st.SearchStrategy[Any]:
    """Gradient trees shaped like ``params`` (same structure, shapes, dtypes and devices).

    About half of the drawn trees hold ordinary values only; the others mix in special
    values: with ``extremes`` zeros of both signs, the dtype's largest finite values and
    subnormal ones, with ``nonfinite`` also ``nan`` and ``±inf``.

    Args:
        params: the parameter tree (tensor or ``None`` leaves).
        none: a leaf may be ``None`` (a parameter that got no gradient). Leaves whose
            param is ``None`` are always ``None``.
        extremes: draw huge, tiny (subnormal) and zero values.
        nonfinite: draw ``nan`` and ``inf``.
        dtype: the gradients' dtype; default each param's dtype.

    Example:
        >>> import torch
        >>> from hypothesis import find
        >>> from gradchain.testing import strategies as gst
        >>> params = {"w": torch.zeros(2), "b": torch.zeros(3, dtype=torch.float16)}
        >>> g = find(gst.gradients(params), lambda g: g["w"] is None and g["b"] is not None)
        >>> g["w"], g["b"].shape, g["b"].dtype
        (None, torch.Size([3]), torch.float16)
    """
    return _gradients(params, none, extremes, nonfinite, dtype)


# --------------------------------------------------------------------------- transformations
class _Recipe(GradientTransformation):
    """A GradientTransformation that prints as the code that built it (for failure reports)."""

    recipe: str

    def __new__(cls, tx: Any = None, update: Any = None, recipe: str = "") -> _Recipe:
        if isinstance(tx, tuple):  # _Recipe(tx, recipe=...)
            tx, update = tx
        self = super().__new__(cls, tx, update)
        self.recipe = recipe
        return self

    def __repr__(self) -> str:
        return getattr(self, "recipe", "") or super().__repr__()


def _built(factory: Callable[..., GradientTransformation], name: str, **kwargs: Any) -> _Recipe:
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    return _Recipe(factory(**kwargs), recipe=f"{name}({args})")


def every_other_leaf(tree: Any) -> Any:
    """A tree of bools shaped like ``tree``: ``True`` at its 1st, 3rd, 5th... leaf.

    Decided from the structure only, so it serves as a ``masked`` mask (or, mapped to
    labels, as ``partition`` labels) both for params and for updates with ``None`` leaves.

    Example:
        >>> import torch
        >>> from gradchain.testing.strategies import every_other_leaf
        >>> every_other_leaf({"a": torch.zeros(1), "b": None, "c": torch.zeros(2)})
        {'a': True, 'b': False, 'c': True}
    """
    # Plain recursion in optree's leaf order (dict keys sorted): under torch.compile,
    # dynamo's optree polyfill visits dicts in insertion order (torch 2.13), and a
    # position-based mask must come out the same in eager and compiled code.
    position = itertools.count()

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            out = dict.fromkeys(node)
            for k in sorted(node):
                out[k] = walk(node[k])
            return type(node)(out) if type(node) is not dict else out
        if isinstance(node, tuple) and hasattr(node, "_fields"):
            return type(node)(*[walk(x) for x in node])
        if isinstance(node, (list, tuple)):
            return type(node)(walk(x) for x in node)
        return next(position) % 2 == 0

    return walk(tree)


def _ab_labels(tree: Any) -> Any:
    return optree.tree_map(lambda m: "a" if m else "b", every_other_leaf(tree), none_is_leaf=True)


def _plain_builtins() -> dict[str, st.SearchStrategy[_Recipe]]:
    gc = gradchain
    out: dict[str, st.SearchStrategy[_Recipe]] = {
        "identity": st.just(_Recipe(gc.identity(), recipe="identity()")),
        "clip_by_norm": st.builds(
            lambda m, p, e: _built(
                gc.clip_by_norm, "clip_by_norm", max_norm=m, norm_type=p, error_if_nonfinite=e
            ),
            st.sampled_from([1.0, 0.5, 100.0]),
            st.sampled_from([2.0, 1.0, math.inf, 3.5]),
            st.booleans(),
        ),
        "clip_by_value": st.builds(
            lambda hi, lo: _built(gc.clip_by_value, "clip_by_value", max_value=hi, min_value=lo),
            st.sampled_from([1.0, 0.5, 100.0]),
            st.sampled_from([None, 0.0, -2.0]),
        ),
    }
    # The update rules (optimizers.py); looked up by name so the strategies follow the API.
    rules: list[tuple[str, dict[str, st.SearchStrategy[Any]]]] = [
        ("scale", {"step_size": st.sampled_from([-0.5, 2.0])}),
        ("scale_by_learning_rate", {"learning_rate": st.sampled_from([0.1, 1e-3])}),
        ("scale_by_adam", {"amsgrad": st.booleans()}),
        ("trace", {"momentum": st.sampled_from([0.9, 0.5]), "nesterov": st.booleans()}),
        ("add_decayed_weights", {"weight_decay": st.sampled_from([0.01, 0.1])}),
        (
            "sgd",
            {
                "lr": st.sampled_from([0.1]),
                "momentum": st.sampled_from([0.0, 0.9]),
                "weight_decay": st.sampled_from([0.0, 0.01]),
            },
        ),
        (
            "adam",
            {
                "lr": st.sampled_from([1e-3]),
                "amsgrad": st.booleans(),
                "weight_decay": st.sampled_from([0.0, 0.01]),
            },
        ),
        ("adamw", {"lr": st.sampled_from([1e-3]), "amsgrad": st.booleans()}),
    ]
    for name, kwargs in rules:
        factory = getattr(gc, name, None)
        if factory is not None:
            out[name] = st.fixed_dictionaries(kwargs).map(
                functools.partial(_built_kw, factory, name)
            )
    return out


def _built_kw(
    factory: Callable[..., GradientTransformation], name: str, kwargs: dict[str, Any]
) -> _Recipe:
    return _built(factory, name, **kwargs)


def _gate_builtins() -> dict[str, st.SearchStrategy[_Recipe]]:
    gc = gradchain
    return {
        "accumulate_every": st.builds(
            lambda n, m: _built(gc.accumulate_every, "accumulate_every", n=n, mean=m),
            st.integers(1, 3),
            st.booleans(),
        ),
        "skip_if_nonfinite": st.just(_Recipe(gc.skip_if_nonfinite(), recipe="skip_if_nonfinite()")),
        "loss_scale": st.builds(
            lambda s, i, d: _built(
                gc.loss_scale, "loss_scale", init_scale=s, growth_interval=i, dynamic=d
            ),
            st.sampled_from([8.0, 1.0, 2.0**16]),
            st.sampled_from([2, 1, 2000]),
            st.booleans(),
        ),
    }


def legal_members(
    members: Sequence[GradientTransformation], head: Sequence[GradientTransformation] = ()
) -> list[GradientTransformation]:
    """``members`` without those that would make ``chain(*head, *members)`` an order
    ``chain`` refuses (a second update rule, a gate after the rule, ``loss_scale`` after a
    clip: see :func:`gradchain.chain`), the others in their order.

    Example:
        >>> import gradchain as gc
        >>> from gradchain.testing.strategies import legal_members
        >>> adam, sgd, skip = gc.adam(1e-3), gc.sgd(0.1), gc.skip_if_nonfinite()
        >>> legal_members([adam, sgd, skip]) == [adam]
        True
    """
    kept: list[GradientTransformation] = []
    for m in members:
        try:
            gradchain.chain(*head, *kept, m)
        except ValueError:
            continue
        kept.append(m)
    return kept


def _chain_of(members: Sequence[GradientTransformation]) -> _Recipe:
    members = legal_members(members)
    return _Recipe(gradchain.chain(*members), recipe=f"chain({', '.join(map(repr, members))})")


def _masked_of(inner: GradientTransformation) -> _Recipe:
    tx = gradchain.masked(inner, every_other_leaf)
    return _Recipe(tx, recipe=f"masked({inner!r}, every_other_leaf)")


def _partition_of(a: GradientTransformation, b: GradientTransformation) -> _Recipe:
    tx = gradchain.partition({"a": a, "b": b}, _ab_labels)
    return _Recipe(tx, recipe=f"partition({{'a': {a!r}, 'b': {b!r}}}, every_other_leaf -> 'a'/'b')")


def transformations(
    *,
    gates: bool = True,
    combinators: bool = True,
    max_depth: int = 2,
    exclude: Collection[str] = (),
) -> st.SearchStrategy[GradientTransformation]:
    """A built-in transformation with drawn hyperparameters, or a combination of them.

    Draws from ``identity``, ``clip_by_norm``, ``clip_by_value``, the update rules
    (``scale``, ``scale_by_learning_rate``, ``scale_by_adam``, ``trace``,
    ``add_decayed_weights``, ``sgd``, ``adam``, ``adamw``), with ``gates`` also
    ``accumulate_every``, ``skip_if_nonfinite`` and ``loss_scale``, and with ``combinators``
    ``chain``, ``masked`` and ``partition`` of such transformations nested up to
    ``max_depth``. Chains are drawn in orders :func:`~gradchain.chain` accepts (members
    that would make a second update rule, a gate after the rule or a ``loss_scale``
    after a clip are left out: see :func:`legal_members`). A drawn transformation prints as the code that built it, so a failing
    example reads as a recipe.

    Args:
        gates: include the gates.
        combinators: include ``chain``, ``masked`` and ``partition``.
        max_depth: how deep combinators nest.
        exclude: names of built-ins (e.g. ``["accumulate_every"]``) or combinators
            (``"chain"``, ``"masked"``, ``"partition"``) never to draw.

    Example:
        >>> import torch
        >>> from hypothesis import find
        >>> from gradchain.testing import strategies as gst
        >>> tx = find(gst.transformations(combinators=False), lambda tx: "adam" in repr(tx))
        >>> repr(tx).startswith(("adam(", "adamw(", "scale_by_adam("))  # prints as code
        True
        >>> params = {"w": torch.ones(2)}
        >>> updates, state = tx.update({"w": torch.ones(2)}, tx.init(params), params)
        >>> updates["w"].shape
        torch.Size([2])
    """
    builtins = {**_plain_builtins(), **(_gate_builtins() if gates else {})}
    known = set(_plain_builtins()) | set(_gate_builtins()) | {"chain", "masked", "partition"}
    unknown = set(exclude) - known
    if unknown:
        raise ValueError(
            f"transformations: exclude names unknown transformations {sorted(unknown)}; "
            f"known: {sorted(known)}"
        )
    members = [strategy for name, strategy in builtins.items() if name not in exclude]
    if not members:
        raise ValueError("transformations: everything is excluded")
    base = st.one_of(members)
    if not combinators or max_depth <= 0:
        return base
    inner = transformations(gates=gates, combinators=True, max_depth=max_depth - 1, exclude=exclude)
    options: list[st.SearchStrategy[GradientTransformation]] = [base]
    if "chain" not in exclude:
        options.append(st.lists(inner, max_size=3).map(_chain_of))
    if "masked" not in exclude:
        options.append(inner.map(_masked_of))
    if "partition" not in exclude:
        # At most one member of a partition may hold a gate.
        plain = transformations(
            gates=False, combinators=True, max_depth=max_depth - 1, exclude=exclude
        )
        options.append(st.tuples(inner, plain).map(lambda ab: _partition_of(*ab)))
    return st.one_of(options)


def chains(
    *, min_size: int = 0, max_size: int = 4, gates: bool = True, combinators: bool = False
) -> st.SearchStrategy[GradientTransformation]:
    """``chain(...)`` of ``min_size`` to ``max_size`` drawn built-ins (see :func:`transformations`).

    Example:
        >>> from hypothesis import find
        >>> from gradchain.testing import strategies as gst
        >>> find(gst.chains(min_size=2, max_size=2), lambda tx: True)
        chain(identity(), identity())
    """
    if not 0 <= min_size <= max_size:
        raise ValueError(f"chains: need 0 <= min_size <= max_size, got {min_size}, {max_size}")
    member = transformations(gates=gates, combinators=combinators, max_depth=1)
    return st.lists(member, min_size=min_size, max_size=max_size).map(_chain_of)
