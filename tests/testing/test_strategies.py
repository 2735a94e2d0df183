"""Self-tests of gradchain.testing.strategies: what they draw, and that they reach the
corner cases they promise (containers, 0-dim and empty tensors, every dtype, None leaves,
nan/inf, huge and subnormal values, gates and combinators)."""

from __future__ import annotations

from typing import Any

import optree
import pytest
import torch
from hypothesis import Phase, find, given, settings
from hypothesis import strategies as st

import gradchain as gc
from gradchain.testing import strategies as gst
from gradchain.tree import flatten

# No shrinking: these only show that a case is reached.
_FIND = settings(max_examples=2000, database=None, deadline=None, phases=[Phase.generate])


def _found(strategy: st.SearchStrategy[Any], condition: Any) -> Any:
    return find(strategy, condition, settings=_FIND)


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [x for x in flatten(tree)[0] if isinstance(x, torch.Tensor)]


def _nodes(tree: Any) -> list[Any]:
    out = [tree]
    if not optree.tree_is_leaf(tree, none_is_leaf=True):
        for child in optree.tree_flatten_one_level(tree, none_is_leaf=True).children:
            out += _nodes(child)
    return out


# --------------------------------------------------------------------------- tensors
@given(gst.shapes())
def test_shapes_are_small(shape: tuple[int, ...]) -> None:
    assert len(shape) <= 3 and all(0 <= d <= 3 for d in shape)


def test_shapes_reach_zero_dim_and_empty() -> None:
    assert _found(gst.shapes(), lambda s: s == ()) == ()
    assert 0 in _found(gst.shapes(), lambda s: 0 in s)
    with pytest.raises(ValueError):
        gst.shapes(max_side=0)


@given(gst.tensors(dtype=torch.bfloat16, shape=(2, 3)))
def test_tensors_follow_dtype_and_shape(t: torch.Tensor) -> None:
    assert t.dtype == torch.bfloat16 and t.shape == (2, 3)
    assert bool(t.isfinite().all()) and bool((t.abs() <= 10).all())


@pytest.mark.parametrize("dtype", gst.FLOAT_DTYPES)
def test_tensors_reach_special_values(dtype: torch.dtype) -> None:
    fi = torch.finfo(dtype)
    special = gst.tensors(dtype=dtype, shape=(4,), extremes=True, nonfinite=True)
    assert _found(special, lambda t: bool(t.isnan().any())) is not None
    assert _found(special, lambda t: bool(t.isinf().any())) is not None
    huge = _found(special, lambda t: bool((t.abs() == fi.max).any()))
    assert huge is not None
    tiny = _found(special, lambda t: bool(((t != 0) & (t.abs() < fi.smallest_normal)).any()))
    assert tiny is not None  # subnormal
    negzero = _found(special, lambda t: bool(((t == 0) & t.signbit()).any()))
    assert negzero is not None


def test_dtypes_validates() -> None:
    with pytest.raises(TypeError):
        gst.dtypes([torch.int32])
    with pytest.raises(ValueError):
        gst.dtypes([])


# --------------------------------------------------------------------------- trees
@given(gst.params())
def test_params_are_trees_of_small_float_tensors(p: Any) -> None:
    leaves = flatten(p)[0]
    assert all(isinstance(x, torch.Tensor) and x.dtype in gst.FLOAT_DTYPES for x in leaves)
    assert all(bool(x.isfinite().all()) for x in leaves)
    assert len(leaves) <= 12


@pytest.mark.parametrize(
    "what,condition",
    [
        ("dict", lambda p: any(type(n) is dict and n for n in _nodes(p))),
        ("list", lambda p: any(type(n) is list and n for n in _nodes(p))),
        ("tuple", lambda p: any(type(n) is tuple and n for n in _nodes(p))),
        ("namedtuple", lambda p: any(isinstance(n, gst.Layer) for n in _nodes(p))),
        (
            "nested",
            lambda p: any(
                not optree.tree_is_leaf(c, none_is_leaf=True) for n in _nodes(p)[1:] for c in [n]
            ),
        ),
        ("bare tensor", lambda p: isinstance(p, torch.Tensor)),
        ("empty container", lambda p: p in ({}, [], ())),
        ("0-dim leaf", lambda p: any(t.dim() == 0 for t in _tensors(p))),
        ("empty leaf", lambda p: any(t.numel() == 0 and t.dim() > 0 for t in _tensors(p))),
        *[
            (str(d), lambda p, d=d: any(t.dtype == d for t in _tensors(p)))
            for d in gst.FLOAT_DTYPES
        ],
    ],
)
def test_params_reach(what: str, condition: Any) -> None:
    assert _found(gst.params(), condition) is not None, what


def test_params_none_leaves_only_when_asked() -> None:
    # find raises when nothing matches; the tree found may be a bare None (a None leaf too).
    found = _found(gst.params(none=True), lambda p: None in flatten(p)[0])
    assert None in flatten(found)[0]


@given(gst.params(dtypes=[torch.float16], containers=["list"]))
def test_params_options(p: Any) -> None:
    assert all(t.dtype == torch.float16 for t in _tensors(p))
    assert all(type(n) is list for n in _nodes(p) if not isinstance(n, torch.Tensor))


def test_pytrees_validates_containers() -> None:
    with pytest.raises(ValueError, match="containers"):
        gst.pytrees(st.none(), containers=["set"])


# --------------------------------------------------------------------------- gradients
@given(st.data())
def test_gradients_are_shaped_like_params(data: st.DataObject) -> None:
    params = data.draw(gst.params(none=True))
    grads = data.draw(gst.gradients(params, nonfinite=True))
    p_leaves, p_spec = flatten(params)
    g_leaves, g_spec = flatten(grads)
    assert p_spec == g_spec
    for p, g in zip(p_leaves, g_leaves):
        if p is None:
            assert g is None
        elif g is not None:
            assert (g.shape, g.dtype, g.device) == (p.shape, p.dtype, p.device)


@given(st.data())
def test_gradients_without_none_or_specials(data: st.DataObject) -> None:
    params = data.draw(gst.params())
    grads = data.draw(gst.gradients(params, none=False, extremes=False, nonfinite=False))
    for g in flatten(grads)[0]:
        assert isinstance(g, torch.Tensor) and bool((g.abs() <= 10).all())


def test_gradients_reach_none_nan_huge_and_tiny() -> None:
    params = {"w": torch.zeros(3), "b": torch.zeros(2, dtype=torch.float16)}
    grads = gst.gradients(params, nonfinite=True)
    assert _found(grads, lambda g: g["w"] is None)["w"] is None
    assert _found(grads, lambda g: any(bool(t.isnan().any()) for t in _tensors(g)))
    assert _found(
        grads, lambda g: any(bool((t.abs() == torch.finfo(t.dtype).max).any()) for t in _tensors(g))
    )
    assert _found(
        grads,
        lambda g: any(
            bool(((t != 0) & (t.abs() < torch.finfo(t.dtype).smallest_normal)).any())
            for t in _tensors(g)
        ),
    )
    # And trees with ordinary values only.
    assert _found(
        grads,
        lambda g: len(_tensors(g)) == 2 and all(bool((t.abs() <= 10).all()) for t in _tensors(g)),
    )


def test_gradients_dtype_override() -> None:
    params = {"w": torch.zeros(3, dtype=torch.float16)}
    g = find(gst.gradients(params, none=False, dtype=torch.float32), lambda g: True)
    assert g["w"].dtype == torch.float32


# --------------------------------------------------------------------------- transformations
@given(gst.transformations(), gst.params(), st.data())
def test_drawn_transformations_run_and_print_as_code(
    tx: gc.GradientTransformation, params: Any, data: st.DataObject
) -> None:
    assert "<function" not in repr(tx) and "GradientTransformation(" not in repr(tx)
    state = tx.init(params)
    for _ in range(2):
        grads = data.draw(gst.gradients(params, extremes=False))
        updates, state = tx.update(grads, state, params)
        assert flatten(updates)[1] == flatten(grads)[1]


@pytest.mark.parametrize(
    "name",
    [
        "identity",
        "clip_by_norm",
        "clip_by_value",
        "accumulate_every",
        "skip_if_nonfinite",
        "loss_scale",
        "scale(",
        "scale_by_learning_rate",
        "scale_by_adam",
        "trace",
        "add_decayed_weights",
        "sgd",
        "adam(",
        "adamw",
        "chain(",
        "masked(",
        "partition(",
    ],
)
def test_transformations_reach(name: str) -> None:
    assert _found(gst.transformations(), lambda tx: name in repr(tx)) is not None


@given(gst.transformations(gates=False, combinators=False))
def test_transformations_without_gates_or_combinators(tx: gc.GradientTransformation) -> None:
    assert not gc.is_gate(tx)
    assert not repr(tx).startswith(("chain(", "masked(", "partition("))


@given(gst.transformations(gates=False, combinators=True))
def test_no_gates_when_switched_off(tx: gc.GradientTransformation) -> None:
    assert not gc.is_gate(tx)


@given(gst.chains(min_size=1, max_size=3))
def test_chains(tx: gc.GradientTransformation) -> None:
    assert repr(tx).startswith("chain(")
    p = {"w": torch.ones(2)}
    updates, _ = tx.update({"w": torch.ones(2)}, tx.init(p), p)
    assert updates["w"].shape == (2,)


def test_chains_validates() -> None:
    with pytest.raises(ValueError):
        gst.chains(min_size=3, max_size=1)


def test_every_other_leaf_is_structural() -> None:
    tree = {"a": torch.zeros(1), "b": None, "c": [torch.zeros(2), torch.zeros(())]}
    assert gst.every_other_leaf(tree) == {"a": True, "b": False, "c": [True, False]}
