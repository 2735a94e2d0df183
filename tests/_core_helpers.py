"""Small helpers shared by the core tests (test_base, test_tree, test_clipping, test_gates).

Deliberately independent of ``gradchain.testing`` (the public kit), so the core tests
check the library with nothing of the library's own test machinery in between.
"""

from __future__ import annotations

from typing import Any

import optree
import torch
from hypothesis import strategies as st

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
                assert torch.equal(torch.nan_to_num(x, 1.0, 2.0, 3.0), torch.nan_to_num(y, 1.0, 2.0, 3.0))
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


def params_like(tree: Any, seed: int = 100) -> Any:
    """Parameters for a gradient tree: same structure, ``None`` gradients get a tensor."""
    gen = torch.Generator().manual_seed(seed)
    return optree.tree_map(
        lambda g: torch.randn(2, generator=gen) if g is None else torch.randn(g.shape, generator=gen, dtype=g.dtype),
        tree,
        none_is_leaf=True,
    )


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
