"""Self-tests of gradchain.testing's law checks: each law passes on a lawful transformation
and fails, with a message naming the law, the leaf and the example, on one that breaks it."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, NamedTuple

import pytest
import torch

import gradchain as gc
from gradchain.testing import LAWS, Example, LawViolation, check_transformation
from gradchain.testing import strategies as gst
from gradchain.tree import Leaves, zeros_like_tree

# A fixed, small tree keeps these tests fast; the default (drawn params) is exercised by
# tests/test_builtin_laws.py.
PARAMS = {"w": torch.zeros(2), "b": torch.zeros(())}
FEW = 15


def _tx(update: Callable[..., Any], init: Callable[[Any], Any] | None = None) -> Any:
    return gc.GradientTransformation(init or (lambda params: gc.EmptyState()), update)


def _violation(tx: Any, **kwargs: Any) -> LawViolation:
    kwargs.setdefault("params", PARAMS)
    kwargs.setdefault("max_examples", FEW)
    with pytest.raises(LawViolation) as info:
        check_transformation(tx, **kwargs)
    return info.value


def _halve() -> Any:
    def update(updates: Any, state: Any, params: Any = None, **extra: Any) -> Any:
        view = Leaves(updates)
        return view.put([g / 2 for g in view.values]), state

    return _tx(update)


class MomentumState(NamedTuple):
    trace: Any


def _momentum(none_as_zero: bool = False) -> Any:
    """A lawful stateful transformation (or, with ``none_as_zero``, one whose state for a
    parameter without gradient decays anyway)."""

    def init(params: Any) -> MomentumState:
        return MomentumState(zeros_like_tree(params))

    def update(updates: Any, state: MomentumState, params: Any = None, **extra: Any) -> Any:
        if none_as_zero:
            updates = {
                k: torch.zeros_like(params[k]) if g is None else g for k, g in updates.items()
            }
            new = {k: 0.9 * state.trace[k] + g for k, g in updates.items()}
            return new, MomentumState(new)
        view = Leaves(updates)
        new = [0.9 * t + g for t, g in zip(view.take(state.trace), view.values)]
        return view.put(new), MomentumState(view.put_into(state.trace, new))

    return _tx(update, init)


# --------------------------------------------------------------------------- lawful
def test_a_lawful_transformation_passes_every_law() -> None:
    check_transformation(
        _momentum(),
        params=PARAMS,
        max_examples=FEW,
        vmap=True,
        chain_laws=True,
        compile=True,
        compile_examples=2,
        compile_backend="aot_eager",
    )


def test_lawful_stateless_transformation_passes_on_drawn_params() -> None:
    check_transformation(_halve(), max_examples=FEW)


def test_a_strategy_of_transformations_is_checked_per_example() -> None:
    check_transformation(gst.chains(max_size=2), max_examples=10)


def test_params_may_be_a_strategy() -> None:
    check_transformation(
        gc.clip_by_value(1.0),
        params=gst.params(dtypes=[torch.float64], containers=["list"]),
        max_examples=10,
    )


def test_update_kwargs_reach_every_call() -> None:
    check_transformation(
        gc.accumulate_every(3), update_kwargs={"flush": True}, params=PARAMS, max_examples=FEW
    )


def test_laws_are_named() -> None:
    assert set(LAWS) == {
        "purity",
        "determinism",
        "extra_kwargs",
        "none_passthrough",
        "update_structure",
        "state_structure",
        "round_trip",
        "vmap",
        "chain_laws",
        "compile",
    }


def test_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="steps"):
        check_transformation(gc.identity(), steps=0)
    with pytest.raises(TypeError, match="GradientTransformation"):
        check_transformation(lambda g: g)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- each law fails
def test_purity_catches_a_transformation_that_mutates_its_input() -> None:
    def update(updates: Any, state: Any, params: Any = None, **extra: Any) -> Any:
        if updates["b"] is not None:
            updates["b"].add_(1.0)
        return updates, state

    err = _violation(_tx(update))
    assert err.law == "purity"
    assert err.path == "updates['b']"
    assert "mutated its input" in str(err)


def test_purity_catches_an_in_place_write_that_keeps_the_values() -> None:
    def update(updates: Any, state: Any, params: Any = None, **extra: Any) -> Any:
        params["w"].mul_(1.0)  # same values, still a write into the caller's tensor
        return updates, state

    err = _violation(_tx(update))
    assert err.law == "purity" and err.path == "params['w']"
    assert "in place" in str(err)


def test_purity_catches_a_mutated_state() -> None:
    def update(updates: Any, state: MomentumState, params: Any = None, **extra: Any) -> Any:
        state.trace["w"].add_(1.0)
        return updates, state

    err = _violation(_tx(update, lambda p: MomentumState(zeros_like_tree(p))))
    assert err.law == "purity" and err.path == "state.trace['w']"


def test_determinism_catches_hidden_python_state() -> None:
    calls = [0]

    def update(updates: Any, state: Any, params: Any = None, **extra: Any) -> Any:
        calls[0] += 1  # a step counter that is not in the state
        view = Leaves(updates)
        return view.put([g * calls[0] for g in view.values]), state

    err = _violation(_tx(update))
    assert err.law == "determinism"
    assert "hidden state" in str(err)
    assert err.path is not None and err.path.startswith("updates[")


def test_determinism_catches_randomness() -> None:
    def update(updates: Any, state: Any, params: Any = None, **extra: Any) -> Any:
        view = Leaves(updates)
        return view.put([g + torch.rand_like(g) for g in view.values]), state

    assert _violation(_tx(update)).law == "determinism"


def test_state_structure_catches_a_state_that_changes_structure() -> None:
    def update(updates: Any, state: tuple, params: Any = None, **extra: Any) -> Any:
        return updates, (*state, torch.zeros(()))  # one more entry per step

    err = _violation(_tx(update, lambda p: ()))
    assert err.law == "state_structure"
    assert "structure of init's state" in str(err)


def test_state_structure_catches_a_state_that_changes_dtype() -> None:
    def update(updates: Any, state: MomentumState, params: Any = None, **extra: Any) -> Any:
        return updates, MomentumState({k: v.double() for k, v in state.trace.items()})

    err = _violation(_tx(update, lambda p: MomentumState(zeros_like_tree(p))))
    assert err.law == "state_structure"
    assert err.path is not None and err.path.startswith("state.trace[")
    assert "dtype" in str(err)


def test_none_passthrough_catches_a_transformation_that_drops_none() -> None:
    def update(updates: Any, state: Any, params: Any = None, **extra: Any) -> Any:
        return {
            k: torch.zeros_like(params[k]) if g is None else g for k, g in updates.items()
        }, state

    err = _violation(_tx(update))
    assert err.law == "none_passthrough"
    assert re.search(r"updates\['[wb]'\]", str(err))
    assert "None" in str(err)


def test_none_passthrough_catches_state_advancing_without_gradient() -> None:
    err = _violation(_momentum(none_as_zero=True))
    # The update of the None leaf is a tensor (caught first) or its state decays.
    assert err.law == "none_passthrough"


def test_update_structure_catches_removed_none_leaves() -> None:
    def update(updates: Any, state: Any, params: Any = None, **extra: Any) -> Any:
        return {k: g for k, g in updates.items() if g is not None}, state

    err = _violation(_tx(update))
    assert err.law == "update_structure"
    assert "None gradients must stay in the tree" in str(err)


def test_update_structure_catches_a_changed_dtype() -> None:
    def update(updates: Any, state: Any, params: Any = None, **extra: Any) -> Any:
        view = Leaves(updates)
        return view.put([g.double() for g in view.values]), state

    err = _violation(_tx(update))
    assert err.law == "update_structure"
    assert "dtype" in str(err) and err.path is not None and err.path.startswith("updates[")


def test_extra_kwargs_catches_a_transformation_that_rejects_unknown_kwargs() -> None:
    def update(updates: Any, state: Any, params: Any = None) -> Any:
        return updates, state

    err = _violation(_tx(update))
    assert err.law == "extra_kwargs"
    assert "**extra" in str(err)


def test_round_trip_catches_a_state_that_is_not_data() -> None:
    class FnState(NamedTuple):
        fn: Any

    def update(updates: Any, state: Any, params: Any = None, **extra: Any) -> Any:
        return updates, state

    err = _violation(_tx(update, lambda p: FnState(fn=torch.sin)))
    assert err.law == "round_trip"
    assert "to_state_dict" in str(err)


class LazyState(NamedTuple):
    trace: Any


def _lazy_momentum() -> Any:
    """State created on the first update (a common pattern): init's state holds None."""

    def update(updates: Any, state: LazyState, params: Any = None, **extra: Any) -> Any:
        view = Leaves(updates)
        trace = state.trace if state.trace is not None else zeros_like_tree(params)
        new = [0.9 * t + g for t, g in zip(view.take(trace), view.values)]
        return view.put(new), LazyState(view.put_into(trace, new))

    return _tx(update, lambda params: LazyState(None))


def test_state_structure_catches_lazily_created_state() -> None:
    err = _violation(_lazy_momentum())
    assert err.law == "state_structure" and err.path == "state.trace"
    assert "expected None, got a dict" in str(err)


def test_round_trip_catches_a_state_that_does_not_fit_inits_template() -> None:
    err = _violation(_lazy_momentum(), state_structure=False)
    assert err.law == "round_trip"
    assert "from_state_dict" in str(err)


def test_compile_law_catches_item() -> None:
    def update(updates: Any, state: Any, params: Any = None, **extra: Any) -> Any:
        view = Leaves(updates)
        # A host-device sync: reads a tensor's value into Python.
        big = sum(g.abs().sum().item() for g in view.values) > 1.0
        return view.put([g / 2 if big else g for g in view.values]), state

    tx = _tx(update)
    check_transformation(tx, params=PARAMS, max_examples=FEW)  # eager laws are fine
    err = _violation(
        tx,
        compile=True,
        compile_examples=2,
        compile_backend="eager",
        purity=False,
        determinism=False,
        extra_kwargs=False,
        none_passthrough=False,
        update_structure=False,
        state_structure=False,
        round_trip=False,
    )
    assert err.law == "compile"
    assert "fullgraph=True" in str(err)


def test_compile_law_catches_a_compiled_result_that_differs() -> None:
    def update(updates: Any, state: Any, params: Any = None, **extra: Any) -> Any:
        view = Leaves(updates)
        factor = 3.0 if torch.compiler.is_compiling() else 1.0
        return view.put([g * factor for g in view.values]), state

    err = _violation(_tx(update), compile=True, compile_examples=3, compile_backend="eager")
    assert err.law == "compile" and "differs from eager" in str(err)


def test_vmap_law_catches_python_branching_on_tensor_values() -> None:
    def update(updates: Any, state: Any, params: Any = None, **extra: Any) -> Any:
        view = Leaves(updates)
        return view.put([g * 2 if bool((g > 0).any()) else g for g in view.values]), state

    err = _violation(_tx(update), vmap=True)
    assert err.law == "vmap" and "vmap" in str(err)


def test_chain_laws_catch_a_transformation_that_behaves_differently_in_a_chain() -> None:
    def update(updates: Any, state: Any, params: Any = None, **extra: Any) -> Any:
        view = Leaves(updates)
        factor = 2.0 if "gate_open" in extra else 1.0  # chain always passes gate_open
        return view.put([g * factor for g in view.values]), state

    err = _violation(_tx(update), chain_laws=True)
    assert err.law == "chain_laws"
    assert "chain(tx)" in str(err)


def test_a_crash_is_reported_with_its_example() -> None:
    def update(updates: Any, state: Any, params: Any = None, **extra: Any) -> Any:
        for g in Leaves(updates).values:
            if g.dim() == 0:
                raise RuntimeError("0-dim tensors are not supported")
        return updates, state

    err = _violation(_tx(update))
    assert err.law == "runs"
    assert isinstance(err.__cause__, RuntimeError)


# --------------------------------------------------------------------------- reporting
def test_message_names_law_leaf_and_smallest_example() -> None:
    def update(updates: Any, state: Any, params: Any = None, **extra: Any) -> Any:
        view = Leaves(updates)
        # Breaks only on negative entries: widens such a leaf to float32.
        return view.put([g.float() if bool((g < 0).any()) else g for g in view.values]), state

    err = _violation(
        _tx(update),
        params=None,
        max_examples=100,
        nonfinite=False,
        extremes=False,
        dtypes=[torch.float16],
    )
    text = str(err)
    assert text.startswith("law 'update_structure' violated: the update's dtype is torch.float32")
    assert "\n  at updates" in text
    assert "example (the smallest hypothesis found):" in text
    assert isinstance(err.example, Example)
    assert "params = " in text and "dtype=torch.float16" in text
    # Shrunk: the gradients hold a single negative entry in all.
    grads = text[text.index("grads[step 1]") :]
    assert len(re.findall(r"-(?!0\.0\b)\d", grads)) == 1, text  # one negative entry (not -0.0)


def test_example_repr_is_exact_python() -> None:
    params = {
        "w": torch.tensor([0.1, float("nan"), float("-inf")], dtype=torch.float32),
        "h": [torch.tensor(1e-40, dtype=torch.bfloat16), torch.zeros(2, 0, dtype=torch.float16)],
    }
    ex = Example(params=params, grads=({"w": None, "h": [None, None]},), tx=gc.identity())
    text = repr(ex)
    assert "0.10000000149011612" in text  # float32(0.1), exactly
    assert "grads[step 1] = {'w': None, 'h': [None, None]}" in text
    line = text.splitlines()[1]
    assert line.startswith("params = ")
    rebuilt = eval(line[len("params = ") :], {"torch": torch})  # noqa: S307 - our own output
    for a, b in zip(gc.tree.flatten(params)[0], gc.tree.flatten(rebuilt)[0]):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a[~a.isnan()], b[~b.isnan()])


@pytest.mark.parametrize("law", ["purity", "determinism", "round_trip"])
def test_each_default_law_can_be_switched_off(law: str) -> None:
    calls = [0]

    def update(updates: Any, state: Any, params: Any = None, **extra: Any) -> Any:
        calls[0] += 1
        return updates, state

    # A lawful transformation passes whatever is switched off.
    check_transformation(_tx(update), params=PARAMS, max_examples=5, **{law: False})


def test_switching_off_the_broken_law_lets_the_check_pass() -> None:
    def update(updates: Any, state: Any, params: Any = None) -> Any:
        return updates, state

    check_transformation(
        _tx(update), params=PARAMS, max_examples=5, extra_kwargs=False, chain_laws=False
    )


def test_flaky_failures_are_reported_as_determinism() -> None:
    calls = [0]

    def update(updates: Any, state: Any, params: Any = None, **extra: Any) -> Any:
        calls[0] += 1
        if calls[0] == 7:  # fails once, never again
            raise RuntimeError("boom")
        return updates, state

    err = _violation(_tx(update), determinism=False, extra_kwargs=False)
    assert err.law == "determinism"
    assert "passed when hypothesis ran it again" in str(err)
