"""The laws every gradient transformation must obey, checked with hypothesis in one call.

See :func:`check_transformation`. Each law is a property of ``init`` and ``update`` that
gradchain's protocol promises (design: pure, deterministic, state is data, ``None``
gradients pass through, unknown keyword arguments are ignored, traceable, batchable).
"""

from __future__ import annotations

import dataclasses
import io
import math
import textwrap
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import hypothesis
import optree
import torch
import torch._dynamo
from hypothesis import HealthCheck, Phase, given
from hypothesis import strategies as st
from hypothesis.errors import Flaky

import gradchain
from gradchain._tree import first_difference
from gradchain.base import GradientTransformation
from gradchain.testing import strategies as gst
from gradchain.tree import flatten, from_state_dict, leaf_paths, to_state_dict, unflatten

__all__ = ["LAWS", "DEFAULT_LAWS", "LawViolation", "Example", "check_transformation"]

#: Every law :func:`check_transformation` knows, in the order it checks them.
LAWS: tuple[str, ...] = (
    "purity",
    "determinism",
    "extra_kwargs",
    "state_structure",
    "none_passthrough",
    "update_structure",
    "round_trip",
    "vmap",
    "chain_laws",
    "compile",
)
#: The laws that are on unless switched off (the others are opt-in: they cost more).
DEFAULT_LAWS: tuple[str, ...] = LAWS[:7]

_UNKNOWN_KWARG = "gradchain_testing_unknown_argument"


class LawViolation(AssertionError):
    """A transformation broke a law. The message names the law, the leaf path (when one
    leaf is to blame) and the example that broke it; under :func:`check_transformation`
    that is the smallest example hypothesis found.

    Attributes:
        law: the law's name, one of :data:`LAWS` (or ``"runs"`` when ``init`` or
            ``update`` raised on valid input).
        path: the offending leaf, e.g. ``"updates['w']"`` or ``"state.mu['w']"``, or ``None``.
        example: the :class:`Example` (params and gradients per step), or ``None``.

    Example:
        >>> from gradchain.testing import LawViolation
        >>> err = LawViolation("purity", "update mutated its input", path="updates['w']")
        >>> print(err)
        law 'purity' violated: update mutated its input
          at updates['w']
        >>> isinstance(err, AssertionError), err.law
        (True, 'purity')
    """

    def __init__(
        self, law: str, message: str, *, path: str | None = None, example: Example | None = None
    ) -> None:
        self.law = law
        self.path = path
        self.example = example
        self.detail = message
        text = f"law {law!r} violated: {message}"
        if path:
            text += f"\n  at {path}"
        if example is not None:
            text += "\n  example (the smallest hypothesis found):\n" + textwrap.indent(
                repr(example), "    "
            )
        super().__init__(text)


# --------------------------------------------------------------------------- formatting
def _fmt_values(x: Any) -> str:
    if isinstance(x, list):
        return "[" + ", ".join(_fmt_values(v) for v in x) + "]"
    if isinstance(x, float) and not math.isfinite(x):
        return "float('nan')" if math.isnan(x) else ("float('inf')" if x > 0 else "-float('inf')")
    return repr(x)


def _fmt_tensor(t: torch.Tensor) -> str:
    """Valid Python that rebuilds ``t`` exactly (float32 and wider, and the float16 and
    bfloat16 values, are all exact as Python floats)."""
    dev = "" if t.device.type == "cpu" else f", device='{t.device}'"
    if t.numel() == 0:
        return f"torch.empty({tuple(t.shape)}, dtype={t.dtype}{dev})"
    values = _fmt_values(t.detach().cpu().tolist())
    return f"torch.tensor({values}, dtype={t.dtype}{dev})"


def _fmt(tree: Any) -> str:
    """A one-line, exact rendering of a pytree of tensors (values as Python floats)."""
    if isinstance(tree, torch.Tensor):
        return _fmt_tensor(tree)
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        inner = ", ".join(f"{f}={_fmt(getattr(tree, f))}" for f in tree._fields)
        return f"{type(tree).__name__}({inner})"
    if isinstance(tree, dict):
        return "{" + ", ".join(f"{k!r}: {_fmt(v)}" for k, v in tree.items()) + "}"
    if isinstance(tree, list):
        return "[" + ", ".join(_fmt(v) for v in tree) + "]"
    if isinstance(tree, tuple):
        return "(" + ", ".join(_fmt(v) for v in tree) + ("," if len(tree) == 1 else "") + ")"
    return repr(tree)


@dataclasses.dataclass
class Example:
    """One example a law was checked on: params, one gradient tree per step, and the
    transformations involved when they were drawn too.

    Its ``repr`` prints every tensor as Python code that rebuilds it exactly, so a failing
    example can be pasted into a regression test.

    Example:
        >>> import torch
        >>> from gradchain.testing import Example
        >>> print(Example(params={"w": torch.zeros(2)}, grads=({"w": torch.tensor([1.0, 0.5])},)))
        params = {'w': torch.tensor([0.0, 0.0], dtype=torch.float32)}
        grads[step 1] = {'w': torch.tensor([1.0, 0.5], dtype=torch.float32)}
    """

    params: Any
    grads: tuple[Any, ...]
    tx: GradientTransformation | None = None
    partners: tuple[GradientTransformation, GradientTransformation] | None = None
    position: int = 0

    def __repr__(self) -> str:
        lines = []
        if self.tx is not None:
            lines.append(f"tx = {self.tx!r}")
        lines.append(f"params = {_fmt(self.params)}")
        lines += [f"grads[step {i}] = {_fmt(g)}" for i, g in enumerate(self.grads, 1)]
        if self.partners is not None:
            names = ["b", "c"]
            names.insert(self.position, "tx")
            lines.append(
                f"chain members = ({', '.join(names)}) with b = {self.partners[0]!r}, "
                f"c = {self.partners[1]!r}"
            )
        return "\n".join(lines)


# --------------------------------------------------------------------------- paths
def _key(node: Any, key: Any, fields: bool) -> str:
    if fields and isinstance(node, tuple) and hasattr(node, "_fields") and isinstance(key, int):
        return f".{node._fields[key]}"
    return f"[{key}]" if isinstance(key, int) else f"[{key!r}]"


def _state_paths(tree: Any) -> list[str]:
    """Like :func:`gradchain.tree.leaf_paths`, with NamedTuple fields by name (``.mu``)."""
    paths, _, _ = optree.tree_flatten_with_path(tree, none_is_leaf=True)
    out = []
    for path in paths:
        node, text = tree, ""
        for k in path:
            text += _key(node, k, True)
            try:
                node = node[k]
            except (TypeError, KeyError, IndexError):
                node = None
        out.append(text)
    return out


def _is_leaf(x: Any) -> bool:
    return optree.tree_is_leaf(x, none_is_leaf=True)


def _kind(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    if x is None:
        return "None"
    if _is_leaf(x):
        return f"a {type(x).__name__} ({x!r})"
    return f"a {type(x).__name__}"


def _structure_difference(a: Any, b: Any, path: str, fields: bool) -> tuple[str, str] | None:
    """The first place where the tree structures of ``a`` and ``b`` differ."""
    diff = first_difference(
        a, b, strict=True, key_text=lambda node, k: _key(node, k, fields), where=path
    )
    if diff is None:
        return None
    if diff.kind == "type":
        return diff.where, f"expected {_kind(diff.expected)}, got {_kind(diff.got)}"
    expected = list(optree.tree_flatten_one_level(diff.expected, none_is_leaf=True).entries)
    got = list(optree.tree_flatten_one_level(diff.got, none_is_leaf=True).entries)
    return diff.where, (
        f"expected a {type(diff.expected).__name__} with entries {expected}, got entries {got}"
    )


# --------------------------------------------------------------------------- comparisons
_INT_VIEW = {
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
}

# (rtol, atol) for the vmap and compile laws: torch.testing.assert_close's defaults for
# float32 and float64; for float16 and bfloat16 about 4 units in the last place, because
# eager, batched and compiled kernels round their intermediates differently (e.g. torch's
# own float16 ``add(x, y, alpha=0.1)`` is 3 ulps from the correctly rounded result).
_TOLERANCE = {
    torch.float16: (4e-3, 1e-3),
    torch.bfloat16: (3.2e-2, 1e-2),
    torch.float32: (1.3e-6, 1e-5),
    torch.float64: (1e-7, 1e-7),
}


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (so ``0.0 != -0.0``), except that any two nans are equal."""
    if a.numel() == 0:
        return True
    view = _INT_VIEW.get(a.dtype)
    if view is None:
        if a.is_floating_point() or a.is_complex():
            return bool(torch.equal(a, b) or ((a == b) | (a.isnan() & b.isnan())).all())
        return bool(torch.equal(a, b))
    same = a.contiguous().view(view) == b.contiguous().view(view)
    return bool((same | (a.isnan() & b.isnan())).all())


def _close(
    a: torch.Tensor, b: torch.Tensor, rtol: float | None, atol: float | None
) -> tuple[bool, str]:
    if a.numel() == 0 or not a.is_floating_point():
        return _bits_equal(a, b), ""
    r, t = _TOLERANCE.get(a.dtype, (1e-5, 1e-8))
    r = max(r, rtol) if rtol is not None else r
    t = max(t, atol) if atol is not None else t
    ok = torch.isclose(b, a, rtol=r, atol=t, equal_nan=True)
    if bool(ok.all()):
        return True, ""
    diff = (b.double() - a.double()).abs()
    diff = torch.where(ok, torch.zeros_like(diff), diff.nan_to_num(nan=math.inf))
    return False, f" (largest difference {float(diff.max()):.3g}, rtol={r:g}, atol={t:g})"


def _leaf_difference(
    expected: Any, got: Any, tol: tuple[float | None, float | None] | None
) -> str | None:
    if isinstance(expected, torch.Tensor) or isinstance(got, torch.Tensor):
        if not (isinstance(expected, torch.Tensor) and isinstance(got, torch.Tensor)):
            return f"expected {_kind(expected)}, got {_kind(got)}"
        for what in ("shape", "dtype", "device"):
            if getattr(expected, what) != getattr(got, what):
                return (
                    f"expected {what} {getattr(expected, what)}, got {getattr(got, what)} "
                    f"(expected {_fmt(expected)}, got {_fmt(got)})"
                )
        if tol is None:
            ok, note = _bits_equal(expected, got), ""
        else:
            ok, note = _close(expected, got, *tol)
        if not ok:
            return f"expected {_fmt(expected)}, got {_fmt(got)}{note}"
        return None
    if type(expected) is not type(got):
        return f"expected {_kind(expected)}, got {_kind(got)}"
    if isinstance(expected, float) and math.isnan(expected) and math.isnan(got):
        return None
    if expected != got:
        return f"expected {expected!r}, got {got!r}"
    return None


def _tree_difference(
    expected: Any,
    got: Any,
    root: str,
    *,
    state: bool,
    tol: tuple[float | None, float | None] | None = None,
) -> tuple[str, str] | None:
    """``(path, description)`` of the first difference between two trees, or ``None``."""
    found = _structure_difference(expected, got, root, fields=state)
    if found is not None:
        return found
    e_leaves, _ = flatten(expected)
    g_leaves, _ = flatten(got)
    paths = _state_paths(expected) if state else leaf_paths(expected)
    for p, e, g in zip(paths, e_leaves, g_leaves):
        why = _leaf_difference(e, g, tol)
        if why is not None:
            return root + p, why
    return None


def _meta_difference(expected: Any, got: Any, root: str) -> tuple[str, str] | None:
    """Structure, and per tensor leaf shape/dtype/device (values may differ)."""
    found = _structure_difference(expected, got, root, fields=True)
    if found is not None:
        return found
    e_leaves, _ = flatten(expected)
    g_leaves, _ = flatten(got)
    for p, e, g in zip(_state_paths(expected), e_leaves, g_leaves):
        if isinstance(e, torch.Tensor) and isinstance(g, torch.Tensor):
            for what in ("shape", "dtype", "device"):
                if getattr(e, what) != getattr(g, what):
                    return root + p, f"{what} {getattr(e, what)} became {getattr(g, what)}"
        elif type(e) is not type(g):
            return root + p, f"{_kind(e)} became {_kind(g)}"
    return None


def _tolerance(ex: Example, o: _Options) -> tuple[float | None, float | None]:
    """Tolerances for the vmap and compile laws: the user's, else those of the least
    precise dtype in the example (a float32 state computed from bfloat16 gradients
    inherits their rounding: eager, batched and compiled code may round in different
    places)."""
    if o.tol != (None, None):
        return o.tol
    dtypes = {x.dtype for x in flatten((ex.params, ex.grads))[0] if isinstance(x, torch.Tensor)}
    tols = [_TOLERANCE[d] for d in dtypes if d in _TOLERANCE]
    if not tols:
        return (None, None)
    return max(r for r, _ in tols), max(a for _, a in tols)


# --------------------------------------------------------------------------- tree utilities
def _clone(tree: Any) -> Any:
    def one(x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        y = x.detach().clone()
        return y.requires_grad_(True) if x.requires_grad and y.is_leaf else y

    return optree.tree_map(one, tree, none_is_leaf=True)


def _versions(tree: Any) -> list[int | None]:
    out: list[int | None] = []
    for x in flatten(tree)[0]:
        if isinstance(x, torch.Tensor):
            try:
                out.append(x._version)
            except RuntimeError:  # inference tensors have no version counter
                out.append(None)
        else:
            out.append(None)
    return out


def _scaled(tree: Any, factor: float) -> Any:
    return optree.tree_map(
        lambda x: x * factor if isinstance(x, torch.Tensor) else x, tree, none_is_leaf=True
    )


# --------------------------------------------------------------------------- options
@dataclasses.dataclass(frozen=True)
class _Options:
    laws: frozenset[str]
    steps: int
    kwargs: Mapping[str, Any]
    tol: tuple[float | None, float | None]

    def on(self, law: str) -> bool:
        return law in self.laws


# --------------------------------------------------------------------------- the checks
def _call(
    law: str,
    tx: GradientTransformation,
    grads: Any,
    state: Any,
    params: Any,
    kwargs: Mapping[str, Any],
    ex: Example,
    step: int,
    what: str = "update",
) -> tuple[Any, Any]:
    try:
        result = tx.update(grads, state, params, **kwargs)
    except LawViolation:
        raise
    except Exception as err:
        raise LawViolation(
            law, f"{what} raised {type(err).__name__} on step {step}: {err}", example=ex
        ) from err
    if not (isinstance(result, tuple) and len(result) == 2):
        raise LawViolation(
            "update_structure",
            f"update must return a pair (updates, new_state), got {_kind(result)}",
            example=ex,
        )
    return result


def _fail(law: str, ex: Example, where: tuple[str, str] | None, prefix: str) -> None:
    if where is not None:
        path, why = where
        raise LawViolation(law, f"{prefix}: {why}", path=path, example=ex)


def _param_like_nodes(
    old: Any, new: Any, spec: optree.PyTreeSpec, shapes: list[Any], path: str
) -> Iterator[tuple[str, Any, Any]]:
    """Pairs of (old, new) state subtrees that have the params' structure and shapes:
    per-parameter state such as moments or accumulators."""
    if _is_leaf(old) or _is_leaf(new) or type(old) is not type(new):
        return
    if optree.tree_structure(old, none_is_leaf=True) == spec:
        leaves = spec.flatten_up_to(old)
        if any(isinstance(x, torch.Tensor) for x in leaves) and all(
            x is None or (isinstance(x, torch.Tensor) and tuple(x.shape) == s)
            for x, s in zip(leaves, shapes)
        ):
            yield path, old, new
            return
    lo = optree.tree_flatten_one_level(old, none_is_leaf=True)
    ln = optree.tree_flatten_one_level(new, none_is_leaf=True)
    if list(lo.entries) != list(ln.entries):
        return
    for k, co, cn in zip(lo.entries, lo.children, ln.children):
        yield from _param_like_nodes(co, cn, spec, shapes, path + _key(old, k, True))


def _check_none_passthrough(
    ex: Example, grads: Any, out: Any, state: Any, new_state: Any, step: int
) -> None:
    g_leaves, g_spec = flatten(grads)
    nones = [i for i, g in enumerate(g_leaves) if g is None]
    if not nones:
        return
    paths = leaf_paths(grads)
    out_leaves, out_spec = flatten(out)
    if out_spec == g_spec:
        for i in nones:
            if out_leaves[i] is not None:
                raise LawViolation(
                    "none_passthrough",
                    f"a None gradient came out as {_kind(out_leaves[i])} on step {step}; "
                    "None must pass through as None",
                    path="updates" + paths[i],
                    example=ex,
                )
    if g_spec.is_leaf():
        return
    p_leaves = flatten(ex.params)[0]
    if len(p_leaves) != len(g_leaves):
        return
    shapes = [tuple(p.shape) if isinstance(p, torch.Tensor) else None for p in p_leaves]
    for path, old, new in _param_like_nodes(state, new_state, g_spec, shapes, "state"):
        old_l, new_l = g_spec.flatten_up_to(old), g_spec.flatten_up_to(new)
        for i in nones:
            o, n = old_l[i], new_l[i]
            same = (o is None and n is None) or (
                isinstance(o, torch.Tensor)
                and isinstance(n, torch.Tensor)
                and o.shape == n.shape
                and o.dtype == n.dtype
                and _bits_equal(o, n)
            )
            if not same:
                raise LawViolation(
                    "none_passthrough",
                    f"the state of a parameter whose gradient is None changed on step {step} "
                    f"(from {_fmt(o)} to {_fmt(n)}); it must not advance",
                    path=f"{path}{paths[i]} (gradient updates{paths[i]} is None)",
                    example=ex,
                )


def _check_update_structure(ex: Example, grads: Any, out: Any, step: int) -> None:
    found = _structure_difference(grads, out, "updates", fields=False)
    if found is not None:
        hint = ""
        if any(g is None for g in flatten(grads)[0]):
            hint = " (None gradients must stay in the tree as None)"
        raise LawViolation(
            "update_structure",
            f"the updates do not have the structure of the gradients on step {step}: "
            f"{found[1]}{hint}",
            path=found[0],
            example=ex,
        )
    paths = leaf_paths(grads)
    for p, g, u in zip(paths, flatten(grads)[0], flatten(out)[0]):
        if g is None:
            continue
        if not isinstance(u, torch.Tensor):
            raise LawViolation(
                "update_structure",
                f"a gradient tensor came out as {_kind(u)} on step {step}",
                path="updates" + p,
                example=ex,
            )
        for what in ("shape", "dtype", "device"):
            if getattr(g, what) != getattr(u, what):
                raise LawViolation(
                    "update_structure",
                    f"the update's {what} is {getattr(u, what)}, the gradient's is "
                    f"{getattr(g, what)} (step {step})",
                    path="updates" + p,
                    example=ex,
                )


def _round_trip(state: Any, template: Any) -> Any:
    buffer = io.BytesIO()
    torch.save(to_state_dict(state), buffer)
    buffer.seek(0)
    return from_state_dict(template, torch.load(buffer, weights_only=True))


def _check_eager(tx: GradientTransformation, ex: Example, o: _Options) -> None:
    params = ex.params
    p_in = _clone(params)
    try:
        state = tx.init(p_in)
    except Exception as err:
        raise LawViolation("runs", f"init raised {type(err).__name__}: {err}", example=ex) from err
    if o.on("purity"):
        _fail(
            "purity",
            ex,
            _tree_difference(params, p_in, "params", state=False),
            "init mutated its input",
        )
    if o.on("determinism"):
        again = tx.init(_clone(params))
        _fail(
            "determinism",
            ex,
            _tree_difference(state, again, "state", state=True),
            "init gave two different states for the same params",
        )
    init_state = state

    for step, grads in enumerate(ex.grads, 1):
        g_in, p_in = _clone(grads), _clone(params)
        s_snap = _clone(state)
        before = _versions((g_in, state, p_in))
        out, new_state = _call("runs", tx, g_in, state, p_in, o.kwargs, ex, step)

        if o.on("purity"):
            where = f"update mutated its input on step {step}"
            _fail("purity", ex, _tree_difference(grads, g_in, "updates", state=False), where)
            _fail("purity", ex, _tree_difference(s_snap, state, "state", state=True), where)
            _fail("purity", ex, _tree_difference(params, p_in, "params", state=False), where)
            after = _versions((g_in, state, p_in))
            if before != after:
                names = (
                    ["updates" + p for p in leaf_paths(g_in)]
                    + ["state" + p for p in _state_paths(state)]
                    + ["params" + p for p in leaf_paths(p_in)]
                )
                i = next(i for i, (a, b) in enumerate(zip(before, after)) if a != b)
                raise LawViolation(
                    "purity",
                    f"update modified an input in place on step {step} (its version counter "
                    "moved, even if the values look the same)",
                    path=names[i] if len(names) == len(before) else None,
                    example=ex,
                )

        if o.on("determinism"):
            out2, state2 = _call(
                "determinism", tx, _clone(grads), _clone(s_snap), _clone(params), o.kwargs, ex, step
            )
            prefix = (
                f"a second call with the same inputs gave a different result on step "
                f"{step} (hidden state outside `state`?)"
            )
            _fail("determinism", ex, _tree_difference(out, out2, "updates", state=False), prefix)
            _fail(
                "determinism", ex, _tree_difference(new_state, state2, "state", state=True), prefix
            )

        if o.on("extra_kwargs"):
            kwargs = {**o.kwargs, _UNKNOWN_KWARG: object()}
            try:
                out3, state3 = tx.update(_clone(grads), _clone(s_snap), _clone(params), **kwargs)
            except Exception as err:
                raise LawViolation(
                    "extra_kwargs",
                    f"update(..., {_UNKNOWN_KWARG}=...) raised {type(err).__name__}: {err}; "
                    "update must accept and ignore keyword arguments it does not know "
                    "(give it **extra)",
                    example=ex,
                ) from err
            prefix = f"an unknown keyword argument changed the result on step {step}"
            _fail("extra_kwargs", ex, _tree_difference(out, out3, "updates", state=False), prefix)
            _fail(
                "extra_kwargs", ex, _tree_difference(new_state, state3, "state", state=True), prefix
            )

        if o.on("state_structure"):
            _fail(
                "state_structure",
                ex,
                _meta_difference(init_state, new_state, "state"),
                f"the state after step {step} does not have the structure of init's state",
            )

        if o.on("none_passthrough"):
            _check_none_passthrough(ex, grads, out, s_snap, new_state, step)

        if o.on("update_structure"):
            _check_update_structure(ex, grads, out, step)

        if o.on("round_trip"):
            try:
                restored = _round_trip(new_state, init_state)
            except Exception as err:
                raise LawViolation(
                    "round_trip",
                    f"the state after step {step} does not survive to_state_dict -> torch.save "
                    f"-> torch.load(weights_only=True) -> from_state_dict: "
                    f"{type(err).__name__}: {err}",
                    example=ex,
                ) from err
            _fail(
                "round_trip",
                ex,
                _tree_difference(new_state, restored, "state", state=True),
                f"the state after step {step} came back different from a round trip",
            )

        state = new_state


# --------------------------------------------------------------------------- vmap
def _in_dims(tree: Any) -> Any:
    return optree.tree_map(
        lambda x: 0 if isinstance(x, torch.Tensor) else None, tree, none_is_leaf=True
    )


def _stack(trees: Sequence[Any]) -> Any:
    leaves0, spec = flatten(trees[0])
    columns = [spec.flatten_up_to(t) for t in trees]
    out: list[Any] = []
    for i, x in enumerate(leaves0):
        column: list[Any] = [c[i] for c in columns]
        out.append(torch.stack(column) if isinstance(x, torch.Tensor) else x)
    return unflatten(spec, out)


def _member(tree: Any, k: int) -> Any:
    return optree.tree_map(
        lambda x: x[k] if isinstance(x, torch.Tensor) else x, tree, none_is_leaf=True
    )


def _check_vmap(tx: GradientTransformation, ex: Example, o: _Options) -> None:
    """``torch.func.vmap(update)`` over a batch of two members equals a loop over them."""
    tol = _tolerance(ex, o)
    member_params = [_clone(ex.params), _scaled(ex.params, 2.0)]
    member_grads = [list(ex.grads), [_scaled(g, -0.5) for g in ex.grads]]
    states = [tx.init(p) for p in member_params]
    b_params = _stack(member_params)
    b_state = _stack(states)
    for step in range(len(ex.grads)):
        grads = [member_grads[k][step] for k in range(2)]
        loop = [
            _call("runs", tx, _clone(grads[k]), states[k], member_params[k], o.kwargs, ex, step + 1)
            for k in range(2)
        ]
        b_grads = _stack(grads)
        if not any(isinstance(x, torch.Tensor) for x in flatten((b_grads, b_state, b_params))[0]):
            return  # nothing to batch (e.g. an empty params tree)
        try:
            fn = torch.func.vmap(
                lambda g, s, p: tx.update(g, s, p, **o.kwargs),
                in_dims=(_in_dims(b_grads), _in_dims(b_state), _in_dims(b_params)),
                out_dims=(_in_dims(loop[0][0]), _in_dims(loop[0][1])),
            )
            b_out, b_state = fn(b_grads, b_state, b_params)
        except Exception as err:
            raise LawViolation(
                "vmap",
                f"torch.func.vmap(update) raised {type(err).__name__} on step {step + 1}: {err}",
                example=ex,
            ) from err
        for k in range(2):
            prefix = (
                f"vmap(update) differs from a loop on step {step + 1}, batch member {k} "
                "(member 1 has params * 2 and gradients * -0.5)"
            )
            _fail(
                "vmap",
                ex,
                _tree_difference(loop[k][0], _member(b_out, k), "updates", state=False, tol=tol),
                prefix,
            )
            _fail(
                "vmap",
                ex,
                _tree_difference(loop[k][1], _member(b_state, k), "state", state=True, tol=tol),
                prefix,
            )
        states = [loop[k][1] for k in range(2)]


# --------------------------------------------------------------------------- chain laws
def _trajectory(
    tx: GradientTransformation, ex: Example, o: _Options, name: str
) -> list[tuple[Any, list[Any]]]:
    try:
        state = tx.init(_clone(ex.params))
        out = []
        for g in ex.grads:
            u, state = tx.update(_clone(g), state, _clone(ex.params), **o.kwargs)
            out.append((u, flatten(state)[0]))
    except Exception as err:
        raise LawViolation(
            "chain_laws", f"{name} raised {type(err).__name__}: {err}", example=ex
        ) from err
    return out


def _same_trajectory(
    expected: list[tuple[Any, list[Any]]],
    got: list[tuple[Any, list[Any]]],
    ex: Example,
    what: str,
) -> None:
    for step, ((u1, s1), (u2, s2)) in enumerate(zip(expected, got), 1):
        _fail(
            "chain_laws",
            ex,
            _tree_difference(u1, u2, "updates", state=False),
            f"{what}: different updates on step {step}",
        )
        if len(s1) != len(s2):
            raise LawViolation(
                "chain_laws",
                f"{what}: the states hold {len(s1)} and {len(s2)} leaves on step {step}",
                example=ex,
            )
        for i, (a, b) in enumerate(zip(s1, s2)):
            why = _leaf_difference(a, b, None)
            if why is not None:
                raise LawViolation(
                    "chain_laws",
                    f"{what}: state leaf {i} (in flattening order) differs on step {step}: {why}",
                    example=ex,
                )


def _check_chain_laws(tx: GradientTransformation, ex: Example, o: _Options) -> None:
    chain = gradchain.chain
    empty = chain()
    for step, g in enumerate(ex.grads, 1):
        u, s = _call(
            "chain_laws",
            empty,
            _clone(g),
            empty.init(_clone(ex.params)),
            _clone(ex.params),
            o.kwargs,
            ex,
            step,
            "chain().update",
        )
        _fail(
            "chain_laws",
            ex,
            _tree_difference(g, u, "updates", state=False),
            "chain() is not the identity",
        )
        if s != ():
            raise LawViolation("chain_laws", f"chain()'s state is {s!r}, expected ()", example=ex)
    ref = _trajectory(tx, ex, o, "tx")
    for name, variant in (
        ("chain(tx)", chain(tx)),
        ("chain(chain(), tx, chain())", chain(chain(), tx, chain())),
    ):
        _same_trajectory(ref, _trajectory(variant, ex, o, name), ex, f"{name} is not tx")
    if ex.partners is None:
        return
    members: list[GradientTransformation] = list(ex.partners)
    members.insert(ex.position, tx)
    for i in range(3):
        # A partner that makes an order chain refuses (a second update rule, a gate after
        # the rule, loss_scale after a clip) is replaced by identity(): the law is about
        # nesting, not about that order.
        try:
            chain(*members)
            break
        except ValueError:
            if i != ex.position:
                members[i] = gradchain.identity()
    a, b, c = members
    flat = _trajectory(chain(a, b, c), ex, o, "chain(a, b, c)")
    _same_trajectory(
        flat,
        _trajectory(chain(chain(a, b), c), ex, o, "chain(chain(a, b), c)"),
        ex,
        "chain(chain(a, b), c) differs from chain(a, b, c)",
    )
    _same_trajectory(
        flat,
        _trajectory(chain(a, chain(b, c)), ex, o, "chain(a, chain(b, c))"),
        ex,
        "chain(a, chain(b, c)) differs from chain(a, b, c)",
    )


# --------------------------------------------------------------------------- compile
def _check_compile(
    tx: GradientTransformation, compiled: Callable[..., Any], ex: Example, o: _Options
) -> None:
    tol = _tolerance(ex, o)
    e_state = tx.init(_clone(ex.params))
    c_state = tx.init(_clone(ex.params))
    for step, g in enumerate(ex.grads, 1):
        e_out, e_state = _call(
            "runs", tx, _clone(g), e_state, _clone(ex.params), o.kwargs, ex, step
        )
        try:
            c_out, c_state = compiled(_clone(g), c_state, _clone(ex.params), **o.kwargs)
        except Exception as err:
            first = str(err).strip().splitlines()
            raise LawViolation(
                "compile",
                f"torch.compile(update, fullgraph=True) failed on step {step}: "
                f"{type(err).__name__}: {' '.join(first[:3])}",
                example=ex,
            ) from err
        prefix = f"torch.compile(update, fullgraph=True) differs from eager on step {step}"
        _fail(
            "compile", ex, _tree_difference(e_out, c_out, "updates", state=False, tol=tol), prefix
        )
        _fail(
            "compile", ex, _tree_difference(e_state, c_state, "state", state=True, tol=tol), prefix
        )


def _compile_template(dtypes: Sequence[torch.dtype]) -> Any:
    """One tree for the compile law: a Layer, mixed dtypes, and a leaf without gradient."""

    def z(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros(shape, dtype=dtype if dtype in dtypes else dtypes[0])

    return {
        "layer": gst.Layer(weight=z((2, 3), torch.float32), bias=z((3,), torch.float32)),
        "mixed": [z((2,), torch.float16), z((), torch.bfloat16), z((2,), torch.float64)],
        "frozen": z((2,), torch.float32),
    }


@st.composite
def _compile_examples(
    draw: st.DrawFn,
    params: Any,
    tx: Any,
    steps: int,
    nonfinite: bool,
    dtypes: Sequence[torch.dtype],
) -> Example:
    if params is None:
        template = _compile_template(dtypes)
        p = draw(gst.gradients(template, none=False, extremes=False))
        grads = []
        for _ in range(steps):
            g = draw(gst.gradients(p, none=False, extremes=False, nonfinite=nonfinite))
            g["frozen"] = None
            grads.append(g)
    else:
        p = draw(params) if isinstance(params, st.SearchStrategy) else _clone(params)
        grads = [
            draw(gst.gradients(p, none=False, extremes=False, nonfinite=nonfinite))
            for _ in range(steps)
        ]
    drawn_tx = draw(tx) if isinstance(tx, st.SearchStrategy) else None
    return Example(params=p, grads=tuple(grads), tx=drawn_tx)


# --------------------------------------------------------------------------- examples
def _edge_params(dtypes: Sequence[torch.dtype]) -> dict[str, torch.Tensor]:
    """An empty tensor, a 0-dim tensor (of another dtype when ``dtypes`` allows: mixed
    dtypes) and a leaf whose gradient is ``None``: the edge leaves every default example
    carries."""
    first, last = dtypes[0], dtypes[-1]
    return {
        "empty": torch.zeros((2, 0), dtype=first),
        "scalar": torch.tensor(0.5, dtype=last),
        "no_grad": torch.full((2,), 0.5, dtype=first),
    }


@st.composite
def _examples(
    draw: st.DrawFn,
    params: Any,
    tx: Any,
    steps: int,
    none: bool,
    extremes: bool,
    nonfinite: bool,
    dtypes: Sequence[torch.dtype],
    partners: st.SearchStrategy[GradientTransformation] | None,
) -> Example:
    drawn_tx = draw(tx) if isinstance(tx, st.SearchStrategy) else None
    if params is None:
        # The drawn tree, and beside it the leaves that break transformations most often,
        # in every example (random draws alone miss them on some seeds).
        p = (draw(gst.params(dtypes=dtypes)), _edge_params(dtypes))
    elif isinstance(params, st.SearchStrategy):
        p = draw(params)
    else:
        p = _clone(params)
    grads = tuple(
        draw(gst.gradients(p, none=none, extremes=extremes, nonfinite=nonfinite))
        for _ in range(steps)
    )
    if params is None and none:
        for g in grads:
            g[1]["no_grad"] = None
    pair = None
    position = 0
    if partners is not None:
        pair = (draw(partners), draw(partners))
        position = draw(st.integers(0, 2))
    return Example(params=p, grads=grads, tx=drawn_tx, partners=pair, position=position)


def _settings(parent: hypothesis.settings | None, max_examples: int | None) -> hypothesis.settings:
    base = parent if parent is not None else hypothesis.settings.default
    assert base is not None  # a profile is always loaded
    kwargs: dict[str, Any] = dict(
        # The explain phase reruns a failure many times to list the lines it ran; the
        # LawViolation message already says what went wrong, and where.
        phases=tuple(p for p in base.phases if p != Phase.explain),
        database=None,
        deadline=None,
        report_multiple_bugs=False,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
            HealthCheck.large_base_example,
        ],
    )
    if max_examples is not None:
        kwargs["max_examples"] = max_examples
    return hypothesis.settings(base, **kwargs)


def _run(test: Callable[[], None], law_if_flaky: str) -> None:
    try:
        test()
    except Flaky as err:
        subs = getattr(err, "exceptions", ())
        first = next((e for e in subs if isinstance(e, LawViolation)), None)
        if first is None:
            detail, path, example = repr(err), None, None
        else:
            detail = f"law {first.law!r}: {first.detail}"
            path, example = first.path, first.example
        raise LawViolation(
            law_if_flaky,
            "an example failed, then passed when hypothesis ran it again: the transformation "
            "does not behave the same on the same inputs (hidden state outside `state`, or "
            f"randomness?). The failure was {detail}",
            path=path,
            example=example,
        ) from err


def check_transformation(
    tx: GradientTransformation | st.SearchStrategy[GradientTransformation],
    *,
    params: Any = None,
    steps: int = 3,
    purity: bool = True,
    determinism: bool = True,
    extra_kwargs: bool = True,
    none_passthrough: bool = True,
    update_structure: bool = True,
    state_structure: bool = True,
    round_trip: bool = True,
    vmap: bool = False,
    chain_laws: bool = False,
    compile: bool = False,
    chain_partners: st.SearchStrategy[GradientTransformation] | None = None,
    nonfinite: bool = True,
    extremes: bool = True,
    dtypes: Sequence[torch.dtype] = gst.FLOAT_DTYPES,
    update_kwargs: Mapping[str, Any] | None = None,
    max_examples: int | None = None,
    compile_examples: int = 3,
    compile_backend: str = "inductor",
    rtol: float | None = None,
    atol: float | None = None,
    settings: hypothesis.settings | None = None,
) -> None:
    """Check that ``tx`` obeys gradchain's laws on examples hypothesis draws; raise
    :class:`LawViolation` (an ``AssertionError``) naming the law, the leaf and the smallest
    failing example otherwise.

    Each example is a params tree (nested dicts, lists, tuples and NamedTuples of 0-dim,
    empty and small tensors in float32, float64, float16 and bfloat16; by default paired,
    in a tuple, with fixed edge leaves: an empty tensor, a 0-dim tensor of another dtype
    and a leaf whose gradient is always ``None``, so every run checks them) and ``steps``
    gradient trees shaped like it (with ``None`` leaves, and huge, subnormal, zero,
    ``nan`` and ``inf`` values). ``tx`` is run through ``init`` and ``steps`` updates
    (always with ``params``), and the laws switched on are checked at every step:

    * ``purity``: ``init`` and ``update`` never modify their inputs (params, updates,
      state), by value or in place;
    * ``determinism``: the same inputs give bitwise the same updates and state (this is
      what catches hidden Python-side state such as a counter in a closure);
    * ``extra_kwargs``: ``update`` accepts an unknown keyword argument and ignores it;
    * ``state_structure``: every state has the tree structure, shapes, dtypes and devices
      of ``init``'s state;
    * ``none_passthrough``: a ``None`` gradient comes out as ``None``, and per-parameter
      state belonging to it (any state subtree shaped like the params) does not change;
    * ``update_structure``: the updates have the gradients' tree structure and each
      update the shape, dtype and device of its gradient;
    * ``round_trip``: every state survives ``to_state_dict`` → ``torch.save`` →
      ``torch.load(weights_only=True)`` → ``from_state_dict`` bit-exactly;
    * ``vmap`` (opt-in): ``torch.func.vmap(update)`` over a batch of two (params, state,
      gradients) members equals a loop over them;
    * ``chain_laws`` (opt-in): ``chain()`` is the identity, ``chain(tx)`` and
      ``chain(chain(), tx, chain())`` behave as ``tx``, and
      ``chain(a, chain(b, c)) == chain(chain(a, b), c) == chain(a, b, c)`` with ``tx`` at
      each position among two drawn built-ins;
    * ``compile`` (opt-in): ``torch.compile(update, fullgraph=True)`` traces (no graph
      breaks: no ``.item()``, no Python branching on tensor values) and equals eager.
      Compiling is slow, so this law runs on its own ``compile_examples`` examples of a
      single tree structure (or of ``params``), compiled once and reused. It resets
      dynamo's caches (``torch._dynamo.reset()``) before and after.

    Besides, ``init`` or ``update`` raising on a valid example is reported as law
    ``"runs"``. The laws are checked in the order above, and the first broken one is
    reported. Comparisons are bitwise (any two nans equal) except ``vmap`` and
    ``compile``, which allow the tolerances of the least precise dtype in the example:
    ``torch.testing.assert_close``'s for float32 and float64, about 4 ulps for float16
    and bfloat16.

    Call it from a plain pytest test (not from inside another ``@given`` test). The number
    of examples follows the active hypothesis profile unless ``max_examples`` is given.

    Args:
        tx: the transformation, or a hypothesis strategy of transformations (one is drawn
            per example, e.g. ``strategies.chains()``).
        params: ``None`` to draw params trees, a params tree to use for every example
            (for a ``tx`` that needs a particular structure), or a strategy of them.
        steps: updates per example.
        purity, determinism, extra_kwargs, state_structure, none_passthrough,
            update_structure, round_trip, vmap, chain_laws, compile: switch each law on or off.
        chain_partners: the transformations ``tx`` is chained with for the associativity
            law (default: ``strategies.transformations(combinators=False)``, the built-ins).
        nonfinite: draw ``nan``/``inf`` gradient values.
        extremes: draw huge, subnormal and zero gradient values.
        dtypes: the dtypes params (and their gradients) may have.
        update_kwargs: keyword arguments passed to every ``update`` call.
        max_examples: examples to draw (default: the hypothesis profile's).
        compile_examples: examples for the ``compile`` law.
        compile_backend: the ``torch.compile`` backend (``"inductor"``; ``"aot_eager"`` is
            much faster to compile and still checks that the graph is whole).
        rtol, atol: at least these tolerances for the ``vmap`` and ``compile`` laws
            (default: those of the least precise dtype in the example).
        settings: a ``hypothesis.settings`` to start from instead of the active profile.

    Raises:
        LawViolation: a law does not hold; the message names the law, the leaf path and
            the smallest example found.

    Example:
        A transformation that halves the updates, checked with the default laws:

        >>> import torch, gradchain as gc
        >>> from gradchain.testing import check_transformation
        >>> def halve():
        ...     def init(params):
        ...         return gc.EmptyState()
        ...     def update(updates, state, params=None, **extra):
        ...         return [None if g is None else g / 2 for g in updates], state
        ...     return gc.GradientTransformation(init, update)
        >>> params = [torch.zeros(2), torch.zeros(())]
        >>> check_transformation(halve(), params=params, max_examples=5)

        One that forgets that ``None`` gradients pass through:

        >>> def halve_or_zero():
        ...     def update(updates, state, params=None, **extra):
        ...         return [torch.zeros_like(p) if g is None else g / 2
        ...                 for g, p in zip(updates, params)], state
        ...     return gc.GradientTransformation(lambda p: gc.EmptyState(), update)
        >>> check_transformation(halve_or_zero(), params=params, max_examples=20)
        Traceback (most recent call last):
        ...
        gradchain.testing.laws.LawViolation: law 'none_passthrough' violated: a None gradient came out as a tensor ...
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"check_transformation: steps must be an int >= 1, got {steps!r}")
    if not isinstance(tx, st.SearchStrategy) and not (
        isinstance(tx, tuple) and len(tx) == 2 and callable(tx[0]) and callable(tx[1])
    ):
        raise TypeError(
            "check_transformation: tx must be a GradientTransformation (init, update) or a "
            f"hypothesis strategy of them, got {type(tx).__name__}"
        )
    dtypes = tuple(dtypes)
    switches = {
        "purity": purity,
        "determinism": determinism,
        "extra_kwargs": extra_kwargs,
        "none_passthrough": none_passthrough,
        "update_structure": update_structure,
        "state_structure": state_structure,
        "round_trip": round_trip,
        "vmap": vmap,
        "chain_laws": chain_laws,
        "compile": compile,
    }
    options = _Options(
        laws=frozenset(k for k, v in switches.items() if v),
        steps=steps,
        kwargs=dict(update_kwargs or {}),
        tol=(rtol, atol),
    )
    eager_laws = options.laws - {"compile"}

    if eager_laws:
        partners = None
        if chain_laws:
            partners = (
                chain_partners
                if chain_partners is not None
                else gst.transformations(combinators=False)
            )
        examples = _examples(
            params, tx, steps, none_passthrough, extremes, nonfinite, dtypes, partners
        )

        @_settings(settings, max_examples)
        @given(example=examples)
        def check_laws(example: Example) -> None:
            t = example.tx if example.tx is not None else tx
            assert not isinstance(t, st.SearchStrategy)
            _check_eager(t, example, options)
            if options.on("vmap"):
                _check_vmap(t, example, options)
            if options.on("chain_laws"):
                _check_chain_laws(t, example, options)

        _run(check_laws, "determinism")

    if options.on("compile"):
        _run_compile_law(
            tx, params, options, nonfinite, dtypes, compile_examples, compile_backend, settings
        )


def _run_compile_law(
    tx: Any,
    params: Any,
    options: _Options,
    nonfinite: bool,
    dtypes: tuple[torch.dtype, ...],
    compile_examples: int,
    backend: str,
    parent: hypothesis.settings | None,
) -> None:
    compiled_cache: dict[int, tuple[Any, Callable[..., Any]]] = {}

    def compiled_for(t: GradientTransformation) -> Callable[..., Any]:
        # One compiled function per transformation: dynamo reuses its graph for every
        # example of the same structure.
        hit = compiled_cache.get(id(t))
        if hit is None or hit[0] is not t:
            hit = (t, torch.compile(t.update, fullgraph=True, dynamic=False, backend=backend))
            compiled_cache[id(t)] = hit
        return hit[1]

    @_settings(parent, compile_examples)
    @given(example=_compile_examples(params, tx, options.steps, nonfinite, dtypes))
    def check_compile(example: Example) -> None:
        t = example.tx if example.tx is not None else tx
        assert not isinstance(t, st.SearchStrategy)
        _check_compile(t, compiled_for(t), example, options)

    config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    torch._dynamo.reset()
    try:
        with config.patch({limit: 64}):
            _run(check_compile, "compile")
    finally:
        compiled_cache.clear()
        torch._dynamo.reset()
