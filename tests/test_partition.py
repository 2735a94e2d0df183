"""Tests for gradchain.partition: masked and partition."""

from __future__ import annotations

import io
from typing import Any, NamedTuple

import optree
import pytest
import torch
from _core_helpers import assert_compiled_matches_eager, assert_tree_equal, assert_vmap_matches_loop
from hypothesis import given
from hypothesis import strategies as st

import gradchain as gc
from gradchain.partition import MaskedState, PartitionState, masked, partition


# --------------------------------------------------------------------------- helpers
def _tensors(seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a": torch.randn(3, generator=g, dtype=dtype),
        "b": torch.randn(2, 2, generator=g, dtype=dtype),
        "c": torch.randn(4, generator=g, dtype=dtype),
    }


def _subset(tree: dict[str, Any], keys: set[str]) -> dict[str, Any]:
    return {k: v for k, v in tree.items() if k in keys}


def _assert_trees_equal(x: Any, y: Any, **tol: float) -> None:
    xl, xs = gc.tree.flatten(x)
    yl, ys = gc.tree.flatten(y)
    assert xs == ys, f"{xs} != {ys}"
    for a, b in zip(xl, yl):
        if isinstance(a, torch.Tensor):
            assert isinstance(b, torch.Tensor)
            if tol:
                torch.testing.assert_close(a, b, **tol)
            else:
                assert a.dtype == b.dtype and torch.equal(a, b), (a, b)
        else:
            assert a == b


def _spy(calls: list[str], name: str) -> gc.GradientTransformation:
    """Identity that records when it runs (tests only; library code keeps no such state)."""

    def init(params: Any) -> gc.EmptyState:
        calls.append(f"{name}.init")
        return gc.EmptyState()

    def update(updates: Any, state: Any, params: Any = None, **extra: Any) -> Any:
        calls.append(f"{name}.update")
        return updates, state

    return gc.GradientTransformation(init, update)


def _labels_fn(params: dict[str, Any]) -> dict[str, str]:
    return {
        k: "no_decay" if k.endswith("bias") or k.startswith("norm.") else "decay" for k in params
    }


# --------------------------------------------------------------------------- masked
def test_masked_equals_inner_on_subset_by_hand() -> None:
    params = _tensors(0)
    mask = {"a": True, "b": False, "c": True}
    tx = masked(gc.clip_by_norm(1.0), mask)
    ref = gc.clip_by_norm(1.0)
    state = tx.init(params)
    ref_state = ref.init(_subset(params, {"a", "c"}))
    for step in range(3):
        grads = {k: 3 * v for k, v in _tensors(step + 1).items()}
        out, state = tx.update(grads, state, params)
        ref_out, ref_state = ref.update(_subset(grads, {"a", "c"}), ref_state)
        # The norm covers the masked-in leaves only; masked-out leaves pass through as is.
        assert torch.equal(out["a"], ref_out["a"]) and torch.equal(out["c"], ref_out["c"])
        assert out["b"] is grads["b"]
        _assert_trees_equal(state.inner_state, ref_state)


def test_masked_state_has_none_for_masked_out_leaves() -> None:
    params = _tensors(0)
    tx = masked(gc.accumulate_every(2), {"a": True, "b": False, "c": True})
    state = tx.init(params)
    assert isinstance(state, MaskedState)
    assert state.inner_state.sums["b"] is None
    assert state.inner_state.sums["a"].shape == (3,)


def test_masked_with_mask_function_called_with_params_or_updates() -> None:
    seen: list[str] = []

    def mask_fn(tree: dict[str, Any]) -> dict[str, bool]:
        seen.append("params" if tree is params else "updates" if tree is grads else "?")
        return {k: k != "b" for k in tree}

    params = _tensors(0)
    grads = _tensors(1)
    tx = masked(gc.clip_by_value(0.1), mask_fn)
    state = tx.init(params)
    out1, _ = tx.update(grads, state, params)
    out2, _ = tx.update(grads, state)
    assert seen == ["params", "params", "updates"]
    _assert_trees_equal(out1, out2)
    assert out1["a"].abs().max() <= 0.1 and out1["b"] is grads["b"]


def test_masked_none_leaves_pass_through_and_state_does_not_advance() -> None:
    params = _tensors(0)
    tx = masked(gc.accumulate_every(3), {"a": True, "b": True, "c": False})
    state = tx.init(params)
    grads = {"a": torch.ones(3), "b": None, "c": None}
    out, state = tx.update(grads, state, params)
    assert out["b"] is None and out["c"] is None
    assert torch.equal(state.inner_state.sums["a"], torch.ones(3))
    assert torch.equal(state.inner_state.sums["b"], torch.zeros(2, 2))
    assert state.inner_state.sums["c"] is None


def test_masked_all_false_is_identity_and_all_true_is_inner() -> None:
    params = _tensors(0)
    grads = _tensors(1)
    off = masked(gc.clip_by_value(0.1), {k: False for k in params})
    out, _ = off.update(grads, off.init(params), params)
    assert all(out[k] is grads[k] for k in grads)
    on = masked(gc.clip_by_value(0.1), {k: True for k in params})
    ref = gc.clip_by_value(0.1)
    _assert_trees_equal(
        on.update(grads, on.init(params), params)[0], ref.update(grads, ref.init(params))[0]
    )


def test_nested_masked() -> None:
    params = _tensors(0)
    grads = _tensors(1)
    inner = masked(gc.clip_by_value(0.1), {"a": True, "b": False, "c": True})
    tx = masked(inner, {"a": True, "b": True, "c": False})
    out, _ = tx.update(grads, tx.init(params), params)
    assert out["a"].abs().max() <= 0.1
    assert out["b"] is grads["b"] and out["c"] is grads["c"]


# --------------------------------------------------------------------------- partition
def _pad_none(ref_state: Any, full_state: Any) -> Any:
    """``ref_state`` (built on a sub-dict) with the ``None`` entries of ``full_state`` added."""
    if isinstance(ref_state, tuple) and hasattr(ref_state, "_fields"):
        return type(ref_state)(
            *(_pad_none(getattr(ref_state, f), getattr(full_state, f)) for f in ref_state._fields)
        )
    if isinstance(ref_state, (tuple, list)):
        return type(ref_state)(_pad_none(r, f) for r, f in zip(ref_state, full_state))
    if isinstance(ref_state, dict):
        return {
            k: _pad_none(ref_state[k], v) if k in ref_state else None for k, v in full_state.items()
        }
    return ref_state


def _check_against_subsets_by_hand(
    make: dict[str, Any], labels: dict[str, str], steps: int, seed: int = 0
) -> None:
    """``partition`` equals running each member by hand on the sub-dict of its leaves."""
    params = _tensors(seed)
    tx = partition({k: f() for k, f in make.items()}, labels)
    refs = {k: f() for k, f in make.items()}
    keys = {k: {leaf for leaf, lab in labels.items() if lab == k} for k in make}
    state = tx.init(params)
    assert isinstance(state, PartitionState) and list(state.inner_states) == list(make)
    ref_params = {k: _subset(params, keys[k]) for k in make}
    ref_states = {k: refs[k].init(ref_params[k]) for k in refs}
    for step in range(steps):
        grads = {k: 2 * v for k, v in _tensors(seed + step + 1).items()}
        out, state = tx.update(grads, state, params)
        for k in refs:
            ref_out, ref_states[k] = refs[k].update(
                _subset(grads, keys[k]), ref_states[k], ref_params[k]
            )
            ref_params[k] = gc.apply_updates(ref_params[k], ref_out)
            for leaf in keys[k]:
                assert torch.equal(out[leaf], ref_out[leaf])
            _assert_trees_equal(
                state.inner_states[k], _pad_none(ref_states[k], state.inner_states[k])
            )
        params = gc.apply_updates(params, out)


def test_partition_equals_members_on_subsets_by_hand() -> None:
    _check_against_subsets_by_hand(
        {"x": lambda: gc.clip_by_norm(1.0), "y": lambda: gc.accumulate_every(1)},
        {"a": "x", "b": "y", "c": "x"},
        steps=3,
    )


def test_partition_with_stateful_optimizers_equals_subsets_by_hand() -> None:
    _check_against_subsets_by_hand(
        {
            "x": lambda: gc.sgd(lr=0.1, momentum=0.9, nesterov=True),
            "y": lambda: gc.chain(gc.clip_by_norm(1.0), gc.adamw(1e-2, weight_decay=0.1)),
        },
        {"a": "y", "b": "x", "c": "y"},
        steps=4,
    )


@given(
    labels=st.fixed_dictionaries({k: st.sampled_from(["x", "y", "z"]) for k in "abc"}),
    seed=st.integers(0, 2**16),
)
def test_partition_equals_subsets_by_hand_for_any_labelling(
    labels: dict[str, str], seed: int
) -> None:
    _check_against_subsets_by_hand(
        {
            "x": lambda: gc.adam(lr=1e-2),
            "y": lambda: gc.chain(gc.clip_by_norm(0.5), gc.sgd(lr=0.1, momentum=0.5)),
            "z": lambda: gc.identity(),
        },
        labels,
        steps=2,
        seed=seed,
    )


def test_partition_label_with_no_leaves_is_allowed() -> None:
    params = _tensors(0)
    grads = _tensors(1)
    tx = partition(
        {"x": gc.clip_by_value(0.1), "unused": gc.clip_by_norm(1.0)}, {k: "x" for k in params}
    )
    state = tx.init(params)
    out, state = tx.update(grads, state, params)
    assert all(out[k].abs().max() <= 0.1 for k in out)
    assert torch.equal(state.inner_states["unused"].norm, torch.tensor(0.0))


def test_partition_tuple_labels_and_label_function() -> None:
    params = {"layer": {"weight": torch.ones(2, 2), "bias": torch.ones(2)}}
    grads = {"layer": {"weight": torch.full((2, 2), 3.0), "bias": torch.full((2,), 3.0)}}

    def labels_fn(tree: Any) -> Any:
        return {"layer": {"weight": ("w", 1), "bias": ("b", 2)}}

    transforms = {("w", 1): gc.clip_by_value(1.0), ("b", 2): gc.clip_by_value(2.0)}
    for labels in (labels_fn, labels_fn(None)):
        tx = partition(transforms, labels)
        out, _ = tx.update(grads, tx.init(params), params)
        assert torch.equal(out["layer"]["weight"], torch.ones(2, 2))
        assert torch.equal(out["layer"]["bias"], torch.full((2,), 2.0))


def test_partition_none_leaves() -> None:
    params = {"a": torch.zeros(2), "b": torch.zeros(2), "frozen": None}
    labels = {"a": "acc", "b": "clip", "frozen": "clip"}
    tx = partition({"acc": gc.accumulate_every(2), "clip": gc.clip_by_value(0.5)}, labels)
    state = tx.init(params)
    assert state.inner_states["acc"].sums["frozen"] is None
    grads = {"a": None, "b": torch.ones(2), "frozen": None}
    out, state = tx.update(grads, state, params)
    assert out["a"] is None and out["frozen"] is None
    assert torch.equal(out["b"], torch.zeros(2))  # closed window: zeros everywhere
    assert torch.equal(state.inner_states["acc"].sums["a"], torch.zeros(2))


def test_partition_passes_extra_kwargs_to_members() -> None:
    params = {"a": torch.zeros(1), "b": torch.zeros(1)}
    tx = partition(
        {"acc": gc.accumulate_every(4), "plain": gc.identity()}, {"a": "acc", "b": "plain"}
    )
    state = tx.init(params)
    _, state = tx.update({"a": torch.tensor([1.0]), "b": torch.tensor([5.0])}, state, params)
    out, state = tx.update(
        {"a": torch.tensor([3.0]), "b": torch.tensor([5.0])}, state, params, flush=True
    )
    assert bool(gc.applied(state))
    assert torch.equal(out["a"], torch.tensor([2.0])) and torch.equal(out["b"], torch.tensor([5.0]))


def test_gan_generator_and_discriminator_in_one_step_equal_two_chains() -> None:
    torch.manual_seed(0)
    gen, disc = torch.nn.Linear(2, 3), torch.nn.Linear(3, 1)
    params = {
        "gen": {k: p.detach() for k, p in gen.named_parameters()},
        "disc": {k: p.detach() for k, p in disc.named_parameters()},
    }

    def labels_fn(tree: Any) -> Any:
        return {net: {k: net for k in sub} for net, sub in tree.items()}

    def make_gen() -> gc.GradientTransformation:
        return gc.adam(lr=2e-4, betas=(0.5, 0.999))

    def make_disc() -> gc.GradientTransformation:
        return gc.chain(gc.clip_by_norm(1.0), gc.sgd(lr=1e-2, momentum=0.9))

    tx = partition({"gen": make_gen(), "disc": make_disc()}, labels_fn)
    g_tx, d_tx = make_gen(), make_disc()
    state = tx.init(params)
    g_state, d_state = g_tx.init(params["gen"]), d_tx.init(params["disc"])
    g_params, d_params = params["gen"], params["disc"]
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        grads = {
            net: {k: torch.randn(p.shape, generator=g) for k, p in sub.items()}
            for net, sub in params.items()
        }
        updates, state = tx.update(grads, state, params)
        params = gc.apply_updates(params, updates)
        g_upd, g_state = g_tx.update(grads["gen"], g_state, g_params)
        d_upd, d_state = d_tx.update(grads["disc"], d_state, d_params)
        g_params = gc.apply_updates(g_params, g_upd)
        d_params = gc.apply_updates(d_params, d_upd)
    _assert_trees_equal(params, {"gen": g_params, "disc": d_params})
    adam_state = state.inner_states["gen"][0]
    assert adam_state.mu["disc"] == {"weight": None, "bias": None}
    _assert_trees_equal(adam_state.mu["gen"], g_state[0].mu)
    _assert_trees_equal(adam_state.count, g_state[0].count)


# --------------------------------------------------------------------------- errors
def test_mask_structure_mismatch_names_the_path() -> None:
    params = {"enc": {"w": torch.zeros(1), "b": torch.zeros(1)}, "head": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"\['enc'\]\['b'\] is missing"):
        masked(gc.identity(), {"enc": {"w": True}, "head": True}).init(params)
    with pytest.raises(ValueError, match=r"\['enc'\]\['x'\] is not in"):
        masked(gc.identity(), {"enc": {"w": True, "b": True, "x": True}, "head": True}).init(params)
    with pytest.raises(ValueError, match=r"at \['enc'\] expected a dict, got a bool"):
        masked(gc.identity(), {"enc": True, "head": True}).init(params)
    with pytest.raises(ValueError, match=r"mask\['head'\] is a dict where the params have a leaf"):
        masked(gc.identity(), {"enc": {"w": True, "b": True}, "head": {"x": True}}).init(params)


def test_mask_leaves_must_be_bools() -> None:
    with pytest.raises(TypeError, match=r"mask\['b'\] must be a Python bool, got int"):
        masked(gc.identity(), {"a": True, "b": 1})
    params = {"a": torch.zeros(2), "b": torch.zeros(2)}
    tx = masked(gc.identity(), lambda p: {k: v.sum() > 0 for k, v in p.items()})
    with pytest.raises(TypeError, match=r"mask\['a'\] must be a Python bool, got Tensor"):
        tx.init(params)


def test_unknown_label_names_the_leaf_and_the_known_labels() -> None:
    transforms = {"x": gc.identity(), "y": gc.identity()}
    with pytest.raises(ValueError, match=r"labels\['b'\] is 'z'.*known labels: \['x', 'y'\]"):
        partition(transforms, {"a": "x", "b": "z"})
    tx = partition(transforms, lambda p: {k: "z" if k == "b" else "x" for k in p})
    with pytest.raises(ValueError, match=r"labels\['b'\] is 'z'.*known labels: \['x', 'y'\]"):
        tx.init({"a": torch.zeros(1), "b": torch.zeros(1)})


def test_labels_structure_mismatch_names_the_path() -> None:
    tx = partition({"x": gc.identity()}, {"a": "x", "b": "x"})
    with pytest.raises(ValueError, match=r"labels must have the structure.*\['c'\] is missing"):
        tx.init({"a": torch.zeros(1), "b": torch.zeros(1), "c": torch.zeros(1)})
    tx = partition({"x": gc.identity()}, [{"a": "x"}])
    with pytest.raises(ValueError, match=r"\[0\]\['b'\] is missing"):
        tx.init([{"a": torch.zeros(1), "b": torch.zeros(1)}])


def test_constructor_argument_errors() -> None:
    with pytest.raises(TypeError, match="transform must be a GradientTransformation"):
        masked(lambda g: g, {"a": True})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="transforms must be a dict"):
        partition([gc.identity()], {"a": 0})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one"):
        partition({}, {})
    with pytest.raises(TypeError, match=r"transforms\['x'\] must be a GradientTransformation"):
        partition({"x": "sgd"}, {"a": "x"})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="at most one member may be or contain a gate"):
        partition(
            {"x": gc.accumulate_every(2), "y": gc.chain(gc.identity(), gc.skip_if_nonfinite())},
            {"a": "x", "b": "y"},
        )


def test_errors_raise_before_any_member_runs() -> None:
    calls: list[str] = []
    tx = partition(
        {"x": _spy(calls, "x"), "y": _spy(calls, "y")},
        lambda p: {k: "y" if k == "b" else "x" for k in p},
    )
    params = {"a": torch.zeros(1), "b": torch.zeros(1)}
    state = tx.init(params)
    calls.clear()
    with pytest.raises(ValueError, match="updates does not have the structure of params"):
        tx.update({"a": torch.zeros(1)}, state, params)
    bad = partition(
        {"x": _spy(calls, "x"), "y": _spy(calls, "y")},
        lambda p: {k: "y" if k == "b" else "oops" for k in p},
    )
    with pytest.raises(ValueError, match="not a label"):
        bad.update({"a": torch.zeros(1), "b": torch.zeros(1)}, state, params)
    with pytest.raises(ValueError, match="state must be a PartitionState"):
        tx.update({"a": torch.zeros(1), "b": torch.zeros(1)}, (state,), params)
    with pytest.raises(ValueError, match=r"one state per member \['x', 'y'\]"):
        tx.update(
            {"a": torch.zeros(1), "b": torch.zeros(1)},
            PartitionState({"x": gc.EmptyState()}),
            params,
        )
    assert calls == []


# --------------------------------------------------------------------------- state as data
def test_state_round_trip_through_state_dict_and_torch_load() -> None:
    params = _tensors(0)
    tx = gc.chain(
        masked(gc.clip_by_norm(1.0), {"a": True, "b": False, "c": True}),
        partition(
            {"acc": gc.accumulate_every(3), "clip": gc.clip_by_norm(2.0)},
            {"a": "acc", "b": "clip", "c": "acc"},
        ),
    )
    state = tx.init(params)
    for step in range(2):
        _, state = tx.update(_tensors(step + 1), state, params)
    buf = io.BytesIO()
    torch.save(gc.to_state_dict(state), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    again = gc.from_state_dict(tx.init(params), loaded)
    _assert_trees_equal(again, state)
    # Resuming from the loaded state continues exactly (mid-window).
    grads = _tensors(9)
    _assert_trees_equal(tx.update(grads, again, params), tx.update(grads, state, params))
    # A state of another partition does not fit and names the path.
    other = partition({"acc": gc.accumulate_every(3)}, {k: "acc" for k in params})
    with pytest.raises(ValueError, match=r"state\[1\]\.inner_states\['clip'\]"):
        gc.from_state_dict(tx.init(params), [loaded[0], gc.to_state_dict(other.init(params))])


# --------------------------------------------------------------------------- gates inside
def test_gate_inside_partition_gates_the_whole_step() -> None:
    params = {"a": torch.zeros(2), "b": torch.zeros(2)}
    tx = partition(
        {
            "acc": gc.chain(gc.accumulate_every(2), gc.clip_by_norm(1.0)),
            "plain": gc.clip_by_norm(10.0),
        },
        {"a": "acc", "b": "plain"},
    )
    assert gc.is_gate(tx)
    state = tx.init(params)
    g1 = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([1.0, 1.0])}
    g2 = {"a": torch.tensor([3.0, 8.0]), "b": torch.tensor([2.0, 0.0])}

    out, state = tx.update(g1, state, params)
    assert not bool(gc.applied(state))
    _assert_trees_equal(out, {"a": torch.zeros(2), "b": torch.zeros(2)})
    # The plain member kept its state on the closed step.
    assert torch.equal(state.inner_states["plain"].norm, torch.tensor(0.0))

    out, state = tx.update(g2, state, params)
    assert bool(gc.applied(state))
    torch.testing.assert_close(out["a"], torch.tensor([0.6, 0.8]))  # mean [3, 4], clipped
    assert torch.equal(out["b"], g2["b"])  # the plain member sees this step's gradient
    assert torch.equal(state.inner_states["plain"].norm, torch.tensor(2.0))


def test_gate_inside_partition_holds_back_the_outer_chain_tail() -> None:
    params = {"a": torch.zeros(2), "b": torch.zeros(2)}
    inner = partition(
        {"acc": gc.accumulate_every(2), "plain": gc.identity()}, {"a": "acc", "b": "plain"}
    )
    tx = gc.chain(inner, gc.clip_by_norm(1.0))
    assert gc.is_gate(tx)
    state = tx.init(params)
    out, state = tx.update({"a": torch.ones(2), "b": torch.ones(2)}, state, params)
    assert not bool(gc.applied(state))
    assert torch.equal(state[1].norm, torch.tensor(0.0))
    _assert_trees_equal(out, {"a": torch.zeros(2), "b": torch.zeros(2)})
    out, state = tx.update({"a": torch.ones(2), "b": torch.zeros(2)}, state, params)
    assert bool(gc.applied(state))
    torch.testing.assert_close(state[1].norm, torch.tensor(2.0).sqrt())


def test_nonfinite_gate_inside_masked_zeroes_every_leaf() -> None:
    params = {"a": torch.zeros(2), "b": torch.zeros(2)}
    tx = gc.chain(masked(gc.skip_if_nonfinite(), {"a": True, "b": False}), gc.clip_by_norm(100.0))
    state = tx.init(params)
    out, state = tx.update({"a": torch.tensor([1.0, float("nan")]), "b": torch.ones(2)}, state)
    assert not bool(gc.applied(state))
    _assert_trees_equal(out, {"a": torch.zeros(2), "b": torch.zeros(2)})
    assert torch.equal(state[1].norm, torch.tensor(0.0))
    # Non-finite values in a masked-out leaf are not the gate's business.
    alone = masked(gc.skip_if_nonfinite(), {"a": True, "b": False})
    g = {"a": torch.ones(2), "b": torch.tensor([float("inf"), 0.0])}
    out, s = alone.update(g, alone.init(params))
    assert bool(gc.applied(s))
    assert out["a"] is g["a"] or torch.equal(out["a"], g["a"])
    assert torch.equal(out["b"], g["b"])


def test_gate_inside_partition_behind_an_outer_gate() -> None:
    params = {"a": torch.zeros(1), "b": torch.zeros(1)}
    tx = gc.chain(
        gc.skip_if_nonfinite(),
        partition(
            {"acc": gc.accumulate_every(2), "plain": gc.clip_by_norm(10.0)},
            {"a": "acc", "b": "plain"},
        ),
    )
    state = tx.init(params)
    nan = torch.tensor([float("nan")])
    # A dropped micro-step is not accumulated; the window still closes on call 2.
    _, state = tx.update({"a": nan, "b": torch.ones(1)}, state)
    out, state = tx.update({"a": torch.tensor([4.0]), "b": torch.tensor([3.0])}, state)
    assert bool(gc.applied(state))
    assert torch.equal(out["a"], torch.tensor([4.0])) and torch.equal(out["b"], torch.tensor([3.0]))
    assert torch.equal(state[1].inner_states["plain"].norm, torch.tensor(3.0))


def test_plain_masked_behind_an_outer_gate_keeps_its_state_on_skipped_steps() -> None:
    params = {"a": torch.zeros(2), "b": torch.zeros(2)}
    plain = masked(gc.sgd(lr=0.1, momentum=0.9), {"a": True, "b": False})
    assert not gc.is_gate(plain)
    tx = gc.chain(gc.skip_if_nonfinite(), plain)
    state = tx.init(params)
    _, state = tx.update({"a": torch.ones(2), "b": torch.ones(2)}, state, params)
    before = gc.to_state_dict(state[1])
    out, state = tx.update(
        {"a": torch.ones(2), "b": torch.tensor([float("nan"), 0.0])}, state, params
    )
    assert not bool(gc.applied(state))
    _assert_trees_equal(out, {"a": torch.zeros(2), "b": torch.zeros(2)})
    _assert_trees_equal(gc.to_state_dict(state[1]), before)


# --------------------------------------------------------------------------- tracing
def _tiny_partition() -> gc.GradientTransformation:
    return partition(
        {
            "x": gc.chain(gc.clip_by_norm(1.0), gc.clip_by_value(0.3)),
            "y": masked(gc.clip_by_norm(0.5), lambda p: {k: k == "b" for k in p}),
        },
        {"a": "x", "b": "y", "c": "y"},
    )


def _gated_partition() -> gc.GradientTransformation:
    return partition(
        {"acc": gc.chain(gc.accumulate_every(2), gc.clip_by_norm(1.0)), "y": gc.clip_by_norm(0.5)},
        {"a": "acc", "b": "y", "c": "y"},
    )


@pytest.mark.parametrize("make", [_tiny_partition, _gated_partition])
def test_compile_fullgraph_equals_eager(make: Any) -> None:
    torch._dynamo.reset()
    params = _tensors(0)
    tx = make()
    compiled = torch.compile(tx.update, fullgraph=True)
    s_eager = s_comp = tx.init(params)
    for step in range(3):
        grads = _tensors(step + 1)
        out_e, s_eager = tx.update(grads, s_eager, params)
        out_c, s_comp = compiled(grads, s_comp, params)
        _assert_trees_equal(out_c, out_e, rtol=1e-6, atol=1e-6)
        _assert_trees_equal(s_comp, s_eager, rtol=1e-6, atol=1e-6)
        assert bool(gc.applied(s_comp)) == bool(gc.applied(s_eager))


def _batch_dims(tree: Any) -> Any:
    """``in_dims``/``out_dims`` for ``torch.func.vmap``: 0 for tensors, None for ``None``.

    Masked-out leaves hold ``None`` in member states, and vmap refuses ``in_dims=0`` for
    a ``None`` input or output, so the dims are given leaf by leaf.
    """
    leaves, spec = gc.tree.flatten(tree)
    return gc.tree.unflatten(spec, [0 if isinstance(x, torch.Tensor) else None for x in leaves])


def _stack(trees: list[Any]) -> Any:
    leaves, spec = gc.tree.flatten(trees[0])
    columns = zip(*(gc.tree.flatten(t)[0] for t in trees))
    return gc.tree.unflatten(
        spec, [torch.stack(c) if isinstance(c[0], torch.Tensor) else c[0] for c in columns]
    )


@pytest.mark.parametrize("make", [_tiny_partition, _gated_partition])
def test_vmap_over_states_equals_a_loop(make: Any) -> None:
    tx = make()
    params = _tensors(0)
    grads = [_tensors(10 + i) for i in range(4)]
    states = [tx.init(params) for _ in range(4)]
    for i in range(4):  # give the members different states
        for j in range(i % 2 + 1):
            _, states[i] = tx.update(_tensors(20 + i + j), states[i], params)
    looped = [tx.update(g, s, params) for g, s in zip(grads, states)]
    dims = (_batch_dims(grads[0]), _batch_dims(states[0]))
    out_v, state_v = torch.func.vmap(
        tx.update, in_dims=(*dims, None), out_dims=(_batch_dims(looped[0][0]), dims[1])
    )(_stack(grads), _stack(states), params)
    _assert_trees_equal(out_v, _stack([o for o, _ in looped]), rtol=1e-6, atol=1e-6)
    _assert_trees_equal(state_v, _stack([s for _, s in looped]), rtol=1e-6, atol=1e-6)


def test_update_is_differentiable() -> None:
    params = {"a": torch.zeros(2), "b": torch.zeros(2)}
    tx = partition({"x": gc.clip_by_norm(1.0), "y": gc.clip_by_value(0.5)}, {"a": "x", "b": "y"})
    state = tx.init(params)

    def loss(a: torch.Tensor) -> torch.Tensor:
        out, _ = tx.update({"a": a, "b": torch.tensor([0.1, 2.0])}, state, params)
        return out["a"].sum() + out["b"].sum()

    grad = torch.func.grad(loss)(torch.tensor([3.0, 4.0]))
    # d/da sum(a / |a|) for |a| = 5
    a = torch.tensor([3.0, 4.0])
    expected = torch.autograd.functional.jacobian(lambda x: (x / (x.norm() + 1e-6)).sum(), a)
    torch.testing.assert_close(grad, expected)


# --------------------------------------------------------------------------- torch parity
def test_partition_with_adamw_matches_torch_adamw_param_groups() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("lin", torch.nn.Linear(4, 3))
    model.add_module("norm", torch.nn.LayerNorm(3))
    model.add_module("out", torch.nn.Linear(3, 2))
    model = model.double()
    named = dict(model.named_parameters())
    labels = _labels_fn(named)
    assert labels == {
        "lin.weight": "decay",
        "lin.bias": "no_decay",
        "norm.weight": "no_decay",
        "norm.bias": "no_decay",
        "out.weight": "decay",
        "out.bias": "no_decay",
    }
    decay = [p for k, p in named.items() if labels[k] == "decay"]
    no_decay = [p for k, p in named.items() if labels[k] == "no_decay"]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-2,
    )
    tx = partition(
        {"decay": gc.adamw(1e-2, weight_decay=0.1), "no_decay": gc.adamw(1e-2, weight_decay=0.0)},
        _labels_fn,
    )
    params = {k: p.detach().clone() for k, p in named.items()}
    state = tx.init(params)
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        grads = {
            k: torch.randn(p.shape, generator=g, dtype=torch.float64) for k, p in named.items()
        }
        for k, p in named.items():
            p.grad = grads[k].clone()
        opt.step()
        updates, state = tx.update(grads, state, params)
        params = gc.apply_updates(params, updates)
    for k, p in named.items():
        torch.testing.assert_close(params[k], p.detach(), rtol=1e-12, atol=1e-12)


# =========================================================================== named_chain
def test_named_chain_equals_chain_and_tree_get_finds_members_by_name():
    params = {"w": torch.randn(3, 2, dtype=torch.float64), "b": torch.randn(2, dtype=torch.float64)}
    grads = [{k: torch.randn_like(v) for k, v in params.items()} for _ in range(4)]
    named = gc.named_chain(("clip", gc.clip_by_norm(1.0)), ("opt", gc.adam(1e-2)))
    plain = gc.chain(gc.clip_by_norm(1.0), gc.adam(1e-2))
    s_n, s_p = named.init(params), plain.init(params)
    assert s_n._fields == ("clip", "opt")
    for g in grads:
        u_n, s_n = named.update(g, s_n, params)
        u_p, s_p = plain.update(g, s_p, params)
        assert_tree_equal(u_n, u_p)
        assert_tree_equal(tuple(s_n), s_p)
    assert gc.tree_get(s_n, "opt") is s_n.opt
    assert gc.tree_get(s_n, "clip") is s_n.clip
    assert int(gc.tree_get(gc.tree_get(s_n, "opt"), gc.ScaleByAdamState).count) == 4
    sd = gc.to_state_dict(s_n)
    assert sorted(sd) == ["clip", "opt"]
    assert_tree_equal(gc.from_state_dict(named.init(params), sd), s_n)


def test_named_chain_resolves_what_is_ambiguous_by_type_under_partition():
    params = {"w": torch.zeros(2, 2), "b": torch.zeros(2)}
    tx = gc.partition(
        {"decay": gc.named_chain(("adam", gc.adamw(1e-3, weight_decay=0.1))),
         "no_decay": gc.named_chain(("adam_nd", gc.adamw(1e-3, weight_decay=0.0)))},
        {"w": "decay", "b": "no_decay"},
    )
    state = tx.init(params)
    with pytest.raises(KeyError, match="ambiguous"):
        gc.tree_get(state, gc.ScaleByAdamState)
    assert gc.tree_get(gc.tree_get(state, "adam"), gc.ScaleByAdamState).mu["b"] is None
    # partition labels are names too
    assert gc.tree_get(state, "no_decay") is state.inner_states["no_decay"]


def test_named_chain_gates_keep_the_chain_semantics():
    params = {"w": torch.zeros(3)}
    steps = [{"w": torch.tensor([1.0, float("nan") if i == 2 else 2.0, 3.0])} for i in range(6)]
    named = gc.named_chain(("skip", gc.skip_if_nonfinite()), ("acc", gc.accumulate_every(2)),
                           ("opt", gc.sgd(0.1, momentum=0.9)))
    plain = gc.chain(gc.skip_if_nonfinite(), gc.accumulate_every(2), gc.sgd(0.1, momentum=0.9))
    assert gc.is_gate(named)
    s_n, s_p = named.init(params), plain.init(params)
    for g in steps:
        u_n, s_n = named.update(g, s_n, params)
        u_p, s_p = plain.update(g, s_p, params)
        assert_tree_equal(u_n, u_p)
        assert_tree_equal(tuple(s_n), s_p)
        assert bool(gc.applied(s_n)) == bool(gc.applied(s_p))
    # nested in a chain, behind a gate
    outer = gc.chain(gc.accumulate_every(2), gc.named_chain(("opt", gc.sgd(0.1))))
    st = outer.init(params)
    _, st = outer.update({"w": torch.ones(3)}, st, params)
    assert st[1].opt == outer.init(params)[1].opt


def test_named_chain_compiles_and_vmaps():
    torch._dynamo.reset()
    params = {"w": torch.randn(3, 2), "b": torch.randn(2)}
    tx = gc.named_chain(("clip", gc.clip_by_norm(1.0)), ("opt", gc.adam(1e-2)))
    steps = [{k: torch.randn_like(v) for k, v in params.items()} for _ in range(3)]
    assert_compiled_matches_eager(torch.compile(tx.update, fullgraph=True), tx, params, steps)
    params_list = [{k: v + i for k, v in params.items()} for i in range(3)]
    assert_vmap_matches_loop(tx, params_list, [[steps[t]] * 3 for t in range(3)])


def test_named_chain_validates():
    with pytest.raises(TypeError, match="named_chain: argument 0 must be a pair"):
        gc.named_chain(gc.sgd(0.1))
    with pytest.raises(ValueError, match="'a' more than once"):
        gc.named_chain(("a", gc.sgd(0.1)), ("a", gc.sgd(0.1)))
    for bad in ("1st", "_x", "with space", "class", ""):
        with pytest.raises(ValueError, match="identifier"):
            gc.named_chain((bad, gc.sgd(0.1)))
    with pytest.raises(TypeError, match="GradientTransformation"):
        gc.named_chain(("a", 3))
    tx = gc.named_chain(("a", gc.sgd(0.1)))
    with pytest.raises(ValueError, match="named_chain.update: state"):
        tx.update({"w": torch.ones(1)}, (gc.EmptyState(),), {"w": torch.ones(1)})


def test_named_chain_runs_fused_in_update_and_apply_():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    params = dict(model.named_parameters())
    tx = gc.named_chain(("skip", gc.skip_if_nonfinite()), ("opt", gc.adamw(1e-2)))
    ref = {k: p.detach().clone().requires_grad_(True) for k, p in params.items()}
    torch_opt = torch.optim.AdamW(ref.values(), lr=1e-2, fused=True)
    state = tx.init(params)
    for _ in range(3):
        grads = {k: torch.randn_like(p) for k, p in params.items()}
        state = gc.update_and_apply_(tx, {k: g.clone() for k, g in grads.items()}, state, params)
        for k, p in ref.items():
            p.grad = grads[k].clone()
        torch_opt.step()
    assert state._fields == ("skip", "opt")
    for k in params:
        assert torch.equal(params[k].detach(), ref[k].detach())


# =========================================================================== callable pytrees
class _CallableTree(NamedTuple):
    """A tree that is also callable (as an equinox Module is): a registered pytree node."""

    w: Any
    b: Any

    def __call__(self, params):  # pragma: no cover - must not be called
        raise AssertionError("a registered pytree mask must be used as a tree")


def test_masked_and_partition_treat_a_callable_pytree_as_a_tree():
    params = _CallableTree(torch.ones(2), torch.ones(2))
    grads = _CallableTree(torch.full((2,), 3.0), torch.full((2,), 3.0))
    tx = gc.masked(gc.clip_by_value(0.5), _CallableTree(True, False))
    out, _ = tx.update(grads, tx.init(params), params)
    assert torch.equal(out.w, torch.full((2,), 0.5)) and torch.equal(out.b, grads.b)

    tx = gc.partition({"x": gc.scale(2.0), "y": gc.scale(-1.0)}, _CallableTree("x", "y"))
    out, _ = tx.update(grads, tx.init(params), params)
    assert torch.equal(out.w, grads.w * 2) and torch.equal(out.b, -grads.b)


def test_masked_treats_a_class_registered_with_optree_as_a_tree():
    @optree.register_pytree_node_class(namespace=optree.registry.__GLOBAL_NAMESPACE)
    class Module:
        def __init__(self, w, b):
            self.w, self.b = w, b

        def __call__(self, params):  # pragma: no cover
            raise AssertionError("a registered pytree must be used as a tree")

        def tree_flatten(self):
            return (self.w, self.b), None, ("w", "b")

        @classmethod
        def tree_unflatten(cls, meta, children):
            return cls(*children)

    params = Module(torch.ones(2), torch.ones(2))
    grads = Module(torch.full((2,), 3.0), torch.full((2,), 3.0))
    tx = gc.masked(gc.clip_by_value(0.5), Module(True, False))
    out, _ = tx.update(grads, tx.init(params), params)
    assert torch.equal(out.w, torch.full((2,), 0.5)) and torch.equal(out.b, grads.b)
    # A plain function is still a function.
    tx = gc.masked(gc.clip_by_value(0.5), lambda p: Module(False, True))
    out, _ = tx.update(grads, tx.init(params), params)
    assert torch.equal(out.w, grads.w) and torch.equal(out.b, torch.full((2,), 0.5))
