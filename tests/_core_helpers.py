"""Small helpers shared by the core tests (test_base, test_tree, test_clipping, test_gates).

Deliberately independent of ``gradchain.testing`` (the public kit), so the core tests
check the library with nothing of the library's own test machinery in between.
"""

from __future__ import annotations

from typing import Any

import optree
import torch
from hypothesis import strategies as st

import gradchain as gc

NONFINITE = (float("nan"), float("inf"), float("-inf"))


def leaves(tree: Any) -> list[Any]:
    return optree.tree_leaves(tree, none_is_leaf=True)


def structure(tree: Any) -> Any:
    return optree.tree_structure(tree, none_is_leaf=True)


def clone_tree(tree: Any) -> Any:
    return optree.tree_map(
        lambda x: x.clone() if isinstance(x, torch.Tensor) else x, tree, none_is_leaf=True
    )


def assert_tree_equal(a: Any, b: Any) -> None:
    """Same structure; tensor leaves bit-identical (nan == nan), same dtype and shape."""
    assert structure(a) == structure(b), (structure(a), structure(b))
    for x, y in zip(leaves(a), leaves(b)):
        if isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor)
            assert x.dtype == y.dtype and x.shape == y.shape, (x, y)
            assert x.device == y.device
            if x.is_floating_point():
                assert torch.equal(
                    torch.nan_to_num(x, 1.0, 2.0, 3.0), torch.nan_to_num(y, 1.0, 2.0, 3.0)
                )
                assert torch.equal(x.isnan(), y.isnan())
            else:
                assert torch.equal(x, y), (x, y)
        else:
            assert x == y, (x, y)


def assert_tree_close(a: Any, b: Any, rtol: float = 1e-6, atol: float = 1e-7) -> None:
    assert structure(a) == structure(b), (structure(a), structure(b))
    for x, y in zip(leaves(a), leaves(b)):
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and x.shape == y.shape, (x, y)
            if x.is_floating_point():
                torch.testing.assert_close(x, y, rtol=rtol, atol=atol, equal_nan=True)
            else:
                assert torch.equal(x, y), (x, y)
        else:
            assert x == y, (x, y)


def random_tree(
    dtype: torch.dtype = torch.float32, seed: int = 0, scale: float = 1.0, with_none: bool = True
) -> dict[str, torch.Tensor | None]:
    """A dict of leaves of several shapes: matrix, 0-dim, empty, vector, and a None."""
    gen = torch.Generator().manual_seed(seed)
    tree: dict[str, torch.Tensor | None] = {
        "w": torch.randn(3, 4, generator=gen, dtype=dtype) * scale,
        "s": torch.randn((), generator=gen, dtype=dtype) * scale,
        "e": torch.randn(0, generator=gen, dtype=dtype),
        "b": torch.randn(5, generator=gen, dtype=dtype) * scale,
    }
    if with_none:
        tree["n"] = None
    return tree


def stack_trees(trees: list[Any]) -> Any:
    return optree.tree_map(
        lambda *xs: torch.stack(xs) if isinstance(xs[0], torch.Tensor) else xs[0],
        *trees,
        none_is_leaf=True,
    )


def unstack_tree(tree: Any, i: int) -> Any:
    return optree.tree_map(
        lambda x: x[i] if isinstance(x, torch.Tensor) else x, tree, none_is_leaf=True
    )


# --------------------------------------------------------------------------- hypothesis
_SHAPES = [(), (1,), (3,), (2, 3), (0,), (2, 1, 2)]
_finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32)


@st.composite
def tensors(draw: Any, dtype: torch.dtype, nonfinite: bool = False) -> torch.Tensor:
    shape = draw(st.sampled_from(_SHAPES))
    n = 1
    for d in shape:
        n *= d
    elems = st.one_of(_finite, st.sampled_from(NONFINITE)) if nonfinite else _finite
    values = draw(st.lists(elems, min_size=n, max_size=n))
    return torch.tensor(values, dtype=dtype).reshape(shape)


@st.composite
def grad_trees(draw: Any, nonfinite: bool = False, allow_none: bool = True) -> dict[str, Any]:
    """Dicts of 1-4 float32/float64 tensors of small shapes, optionally with None leaves.

    With ``nonfinite=True`` entries may be nan or inf (rarely).
    """
    n = draw(st.integers(1, 4))
    out: dict[str, Any] = {}
    for i in range(n):
        if allow_none and draw(st.integers(0, 4)) == 0:
            out[f"p{i}"] = None
        else:
            dtype = draw(st.sampled_from([torch.float32, torch.float64]))
            bad = nonfinite and draw(st.integers(0, 3)) == 0
            out[f"p{i}"] = draw(tensors(dtype, nonfinite=bad))
    return out


def params_for(grads: Any) -> Any:
    """Params shaped like ``grads`` (a ``None`` gradient's param is a small tensor)."""
    return optree.tree_map(
        lambda g: torch.zeros(2) if g is None else torch.ones_like(g), grads, none_is_leaf=True
    )


@st.composite
def grad_sequences(
    draw: Any, steps: int = 3, nonfinite: bool = False, allow_none: bool = True
) -> list[dict[str, Any]]:
    """``steps`` gradient trees of one structure (1-4 leaves of float32/float64, small
    shapes, optional None leaves); with ``nonfinite=True`` some steps hold nan/inf."""
    n = draw(st.integers(1, 4))
    spec: dict[str, Any] = {}
    for i in range(n):
        if allow_none and draw(st.integers(0, 4)) == 0:
            spec[f"p{i}"] = None
        else:
            spec[f"p{i}"] = (
                draw(st.sampled_from(_SHAPES)),
                draw(st.sampled_from([torch.float32, torch.float64])),
            )
    out = []
    for _ in range(steps):
        tree: dict[str, Any] = {}
        for k, s in spec.items():
            if s is None:
                tree[k] = None
                continue
            shape, dtype = s
            size = 1
            for d in shape:
                size *= d
            bad = nonfinite and draw(st.integers(0, 3)) == 0
            elems = st.one_of(_finite, st.sampled_from(NONFINITE)) if bad else _finite
            values = draw(st.lists(elems, min_size=size, max_size=size))
            tree[k] = torch.tensor(values, dtype=dtype).reshape(shape)
        out.append(tree)
    return out


def check_protocol(tx: Any, grad_steps: list[Any]) -> list[tuple[Any, Any]]:
    """Run ``tx`` over ``grad_steps`` checking the protocol laws at every step.

    Inputs are never mutated, ``update`` is deterministic, the output has the structure,
    shapes and dtypes of the input, ``None`` gradients pass through as ``None``, and the
    state keeps its structure. Returns the (updates, state) of every step.
    """
    params = params_for(grad_steps[0])
    state = tx.init(params)
    results = []
    for grads in grad_steps:
        g_before, s_before, p_before = clone_tree(grads), clone_tree(state), clone_tree(params)
        out1, s1 = tx.update(grads, state, params)
        out2, s2 = tx.update(grads, state, params)
        assert_tree_equal(grads, g_before)
        assert_tree_equal(state, s_before)
        assert_tree_equal(params, p_before)
        assert_tree_equal(out1, out2)
        assert_tree_equal(s1, s2)
        assert structure(out1) == structure(grads)
        assert structure(s1) == structure(state)
        for a, b in zip(leaves(s1), leaves(state)):
            if isinstance(a, torch.Tensor):
                assert a.dtype == b.dtype and a.shape == b.shape and a.device == b.device
        for g, o in zip(leaves(grads), leaves(out1)):
            if g is None:
                assert o is None
            else:
                assert o.shape == g.shape and o.dtype == g.dtype
        results.append((out1, s1))
        state = s1
    return results


# --------------------------------------------------------------------------- compile / vmap
def assert_compiled_matches_eager(compiled: Any, tx: Any, params: Any, steps: list[Any]) -> None:
    """``compiled`` (``torch.compile(tx.update, fullgraph=True)``) gives the eager results
    (updates, states, ``applied``) over ``steps``."""
    s_eager = tx.init(params)
    s_comp = tx.init(params)
    for grads in steps:
        u_eager, s_eager = tx.update(grads, s_eager, params)
        u_comp, s_comp = compiled(grads, s_comp, params)
        assert_tree_close(u_comp, u_eager, rtol=1e-5, atol=1e-6)
        assert_tree_close(s_comp, s_eager, rtol=1e-5, atol=1e-6)
        assert bool(gc.applied(s_comp)) == bool(gc.applied(s_eager))


def assert_vmap_matches_loop(tx: Any, params_list: list[Any], steps: list[list[Any]]) -> None:
    """``torch.func.vmap(tx.update)`` over a batch of states equals a Python loop.

    ``steps[t][i]`` is the gradient tree of member ``i`` at step ``t``.
    """
    states = [tx.init(p) for p in params_list]
    batched_state = stack_trees(states)
    batched_params = stack_trees(params_list)
    vupdate = torch.func.vmap(lambda g, s, p: tx.update(g, s, p))
    for grads in steps:
        looped = [tx.update(g, s, p) for g, s, p in zip(grads, states, params_list)]
        states = [s for _, s in looped]
        u_b, batched_state = vupdate(stack_trees(grads), batched_state, batched_params)
        for i, (u, s) in enumerate(looped):
            assert_tree_close(unstack_tree(u_b, i), u, rtol=1e-6, atol=1e-7)
            assert_tree_close(unstack_tree(batched_state, i), s, rtol=1e-6, atol=1e-7)
            assert bool(gc.applied(unstack_tree(batched_state, i))) == bool(gc.applied(s))
