"""Tree helpers: flattening, leaf views, global norms, tree_get, and state as plain data."""

from __future__ import annotations

import io
import math

import pytest
import torch
from _core_helpers import assert_tree_equal, clone_tree

import gradchain as gc
from gradchain.tree import (
    Leaves,
    flatten,
    flatten_like,
    global_norm,
    group_by_device_dtype,
    leaf_paths,
    unflatten,
    zeros_like_tree,
)

NAN, INF = float("nan"), float("inf")
PARAMS = {
    "layer.weight": torch.zeros(3, 2),
    "layer.bias": torch.zeros(2),
    "scale": torch.zeros((), dtype=torch.float64),
    "emb": torch.zeros(2, dtype=torch.float16),
}


def _grads(seed, bad=None):
    gen = torch.Generator().manual_seed(seed)
    g = {k: torch.randn(v.shape, generator=gen).to(v.dtype) for k, v in PARAMS.items()}
    if bad is not None:
        g["layer.bias"][0] = bad
    return g


def _everything():
    """A chain holding every built-in gate and clipping, plus stateful optimizers."""
    return gc.chain(
        gc.loss_scale(init_scale=8.0, growth_interval=2, min_scale=1.0),
        gc.skip_if_nonfinite(),
        gc.clip_by_norm(1.0, error_if_nonfinite=True),
        gc.clip_by_value(0.5),
        gc.accumulate_every(3),
        # momentum (sgd's state, not a rule) before a rule: chain refuses two rules
        gc.chain(gc.chain(gc.trace(0.9), gc.scale(-0.1)), gc.adamw(1e-2)),
        gc.identity(),
    )


def _save_load(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _is_plain(x) -> bool:
    if isinstance(x, dict):
        return type(x) is dict and all(isinstance(k, str) and _is_plain(v) for k, v in x.items())
    if isinstance(x, list):
        return type(x) is list and all(_is_plain(v) for v in x)
    return x is None or isinstance(x, (torch.Tensor, bool, int, float, str))


# --------------------------------------------------------------------------- state as data
@pytest.mark.parametrize("n_steps", [0, 2, 7])
def test_state_dict_round_trip_is_bit_exact(n_steps):
    tx = _everything()
    state = tx.init(PARAMS)
    steps = [_grads(i, bad=NAN if i == 3 else None) for i in range(12)]
    for g in steps[:n_steps]:
        _, state = tx.update(g, state, PARAMS)
    sd = gc.to_state_dict(state)
    assert _is_plain(sd)
    loaded = _save_load(sd)
    restored = gc.from_state_dict(tx.init(PARAMS), loaded)
    assert_tree_equal(restored, state)
    # same NamedTuple classes at the same places
    assert [type(x) for x in _nodes(restored)] == [type(x) for x in _nodes(state)]
    # restored tensors are copies: scribbling over the loaded data does not reach them
    for t in _plain_leaves(loaded):
        if isinstance(t, torch.Tensor):
            t.fill_(7)
    assert_tree_equal(restored, state)
    # and the run continues identically
    for g in steps[n_steps:]:
        u1, state = tx.update(g, state, PARAMS)
        u2, restored = tx.update(g, restored, PARAMS)
        assert_tree_equal(u1, u2)
        assert_tree_equal(restored, state)
        assert bool(gc.applied(restored)) == bool(gc.applied(state))


def _nodes(tree):
    out = []

    def visit(x):
        if isinstance(x, tuple):
            out.append(x)
            for c in x:
                visit(c)
        elif isinstance(x, dict):
            for c in x.values():
                visit(c)

    visit(tree)
    return out


def _plain_leaves(x):
    if isinstance(x, dict):
        return [y for v in x.values() for y in _plain_leaves(v)]
    if isinstance(x, list):
        return [y for v in x for y in _plain_leaves(v)]
    return [x]


def test_state_dict_layout():
    tx = gc.chain(gc.clip_by_norm(1.0), gc.accumulate_every(2))
    sd = gc.to_state_dict(tx.init({"w": torch.zeros(2)}))
    assert isinstance(sd, list) and len(sd) == 2
    assert set(sd[0]) == {"norm", "nonfinite_error"}
    assert set(sd[1]) >= {"mini_step", "accumulated", "sums", "is_open", "nonempty"}
    assert isinstance(sd[1]["sums"], dict) and torch.equal(sd[1]["sums"]["w"], torch.zeros(2))
    # to_state_dict copies: changing the state dict does not change the state
    state = tx.init({"w": torch.zeros(2)})
    sd = gc.to_state_dict(state)
    sd[1]["sums"]["w"].fill_(3.0)
    assert torch.equal(state[1].sums["w"], torch.zeros(2))
    with pytest.raises(TypeError, match="cannot store"):
        gc.to_state_dict((object(),))


def _mutations():
    """(description, function that breaks a state dict, path the error must name)."""

    def missing_key(sd):
        del sd[4]["accumulated"]

    def extra_key(sd):
        sd[1]["surprise"] = torch.zeros(())

    def wrong_shape(sd):
        sd[4]["sums"]["layer.weight"] = torch.zeros(2, 3)

    def wrong_dtype(sd):
        sd[0]["scale"] = sd[0]["scale"].double()

    def wrong_length(sd):
        sd.append({})

    def wrong_inner_length(sd):
        sd[5].pop()

    def missing_param(sd):
        del sd[5][0][0]["trace"]["emb"]

    def not_a_tensor(sd):
        sd[2]["norm"] = 1.0

    return [
        ("missing key", missing_key, "state[4].accumulated"),
        ("extra key", extra_key, "state[1].surprise"),
        ("wrong shape", wrong_shape, "state[4].sums['layer.weight']"),
        ("wrong dtype", wrong_dtype, "state[0].scale"),
        ("wrong length", wrong_length, "state"),
        ("wrong inner length", wrong_inner_length, "state[5]"),
        ("missing param", missing_param, "state[5][0][0].trace['emb']"),
        ("not a tensor", not_a_tensor, "state[2].norm"),
    ]


@pytest.mark.parametrize("what, mutate, path", _mutations(), ids=[m[0] for m in _mutations()])
def test_from_state_dict_mismatch_names_the_first_mismatching_path(what, mutate, path):
    tx = _everything()
    state = tx.init(PARAMS)
    _, state = tx.update(_grads(0), state, PARAMS)
    sd = _save_load(gc.to_state_dict(state))
    mutate(sd)
    template = tx.init(PARAMS)
    template_copy = clone_tree(template)
    with pytest.raises(ValueError) as info:
        gc.from_state_dict(template, sd)
    msg = str(info.value)
    assert f"{path} does not fit" in msg, msg
    assert_tree_equal(template, template_copy)  # the template is not modified


def test_from_state_dict_reports_the_first_of_several_mismatches():
    tx = gc.chain(gc.clip_by_norm(1.0), gc.skip_if_nonfinite())
    sd = gc.to_state_dict(tx.init({"w": torch.zeros(2)}))
    sd[0]["norm"] = torch.zeros(3)
    sd[1]["total_skips"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"state\[0\]\.norm does not fit"):
        gc.from_state_dict(tx.init({"w": torch.zeros(2)}), sd)


def test_from_state_dict_rejects_a_different_transformation():
    params = {"w": torch.zeros(3)}
    with pytest.raises(ValueError, match="does not fit"):
        gc.from_state_dict(gc.sgd(0.1).init(params), gc.to_state_dict(gc.adam().init(params)))


# --------------------------------------------------------------------------- tree_get
def test_tree_get_by_name_and_by_type():
    tx = _everything()
    state = tx.init(PARAMS)
    _, state = tx.update(_grads(0, bad=INF), state, PARAMS)
    assert float(gc.tree_get(state, "scale")) == 4.0
    assert int(gc.tree_get(state, "total_skips")) == 0  # loss_scale dropped the step first
    assert int(gc.tree_get(state, "mini_step")) == 1
    assert gc.tree_get(state, "norm") is state[2].norm
    assert gc.tree_get(state, gc.LossScaleState) is state[0]
    assert gc.tree_get(state, gc.AccumulateState) is state[4]
    assert gc.tree_get(state, gc.ScaleByAdamState) is state[5][1][0]


def test_tree_get_missing_and_ambiguous():
    tx = gc.chain(gc.clip_by_norm(1.0), gc.clip_by_norm(2.0), gc.sgd(0.1, momentum=0.9))
    state = tx.init({"w": torch.zeros(2)})
    with pytest.raises(KeyError, match="no 'scale'"):
        gc.tree_get(state, "scale")
    with pytest.raises(KeyError, match="no LossScaleState"):
        gc.tree_get(state, gc.LossScaleState)
    with pytest.raises(KeyError, match=r"ambiguous.*state\[0\]\.norm.*state\[1\]\.norm"):
        gc.tree_get(state, "norm")
    with pytest.raises(KeyError, match="ClipByNormState is ambiguous"):
        gc.tree_get(state, gc.ClipByNormState)
    # indexing the sub-state resolves the ambiguity
    assert gc.tree_get(state[1], "norm") is state[1].norm


# --------------------------------------------------------------------------- helpers
def test_flatten_keeps_none_leaves_and_unflatten_inverts():
    tree = {"b": None, "a": [torch.ones(1), (None, torch.zeros(2))]}
    ls, spec = flatten(tree)
    assert len(ls) == 4 and ls[0] is not None and ls[1] is None and ls[3] is None
    again = unflatten(spec, ls)
    assert again["b"] is None and again["a"][1][0] is None
    assert again["a"][0] is tree["a"][0]
    assert leaf_paths(tree) == ["['a'][0]", "['a'][1][0]", "['a'][1][1]", "['b']"]


def test_flatten_like_names_both_trees():
    _, spec = flatten({"w": torch.zeros(1), "b": torch.zeros(1)})
    with pytest.raises(ValueError, match="updates does not have the structure of params"):
        flatten_like(spec, {"w": torch.zeros(1)}, "updates", "params")
    assert len(flatten_like(spec, {"w": 1, "b": None}, "x", "y")) == 2


def test_leaves_view():
    g = {"a": torch.ones(2), "b": None, "c": torch.full((1,), 2.0)}
    view = Leaves(g)
    assert len(view.values) == 2
    state = {"a": torch.zeros(2), "b": torch.full((3,), 5.0), "c": torch.zeros(1)}
    taken = view.take(state)
    assert taken[0] is state["a"] and taken[1] is state["c"]
    assert len(view.take_all(state)) == 3
    out = view.put([v * 10 for v in view.values])
    assert out["b"] is None and torch.equal(out["c"], torch.full((1,), 20.0))
    new_state = view.put_into(state, [torch.ones(2), torch.ones(1)])
    assert new_state["b"] is state["b"]  # the None gradient's state does not advance
    assert torch.equal(new_state["a"], torch.ones(2))
    with pytest.raises(TypeError, match=r"updates\['a'\]"):
        Leaves({"a": 3.0})
    with pytest.raises(ValueError, match="structure"):
        view.take({"a": torch.zeros(2)})


def test_zeros_like_tree():
    params = {"h": torch.ones(2, dtype=torch.float16), "n": None, "m": torch.ones(2, 3)}
    z = zeros_like_tree(params)
    assert z["n"] is None and z["h"].dtype == torch.float16 and z["m"].shape == (2, 3)
    assert not bool(z["m"].any())
    z32 = zeros_like_tree(params, torch.float32)
    assert z32["h"].dtype == torch.float32 and z32["m"].dtype == torch.float32
    with pytest.raises(TypeError, match=r"params\['x'\]"):
        zeros_like_tree({"x": 1.0})


def test_group_by_device_dtype_keeps_order_within_groups():
    rows = [
        (torch.zeros(1), "a"),
        (torch.zeros(1, dtype=torch.float64), "b"),
        (torch.zeros(2), "c"),
        (torch.zeros(1, dtype=torch.float16), "d"),
        (torch.zeros(1, dtype=torch.float64), "e"),
    ]
    groups = group_by_device_dtype(rows)
    assert [g[1] for g in groups] == [["a", "c"], ["b", "e"], ["d"]]


@pytest.mark.parametrize("p", [1.0, 2.0, 3.5, INF])
def test_global_norm_matches_torch_get_total_norm(p):
    gen = torch.Generator().manual_seed(0)
    ts = [
        torch.randn(3, 4, generator=gen),
        torch.randn((), generator=gen),
        torch.randn(7, generator=gen),
    ]
    ref = torch.nn.utils.get_total_norm(ts, p)
    got = global_norm([ts[0], None, ts[1], torch.zeros(0), ts[2]], p)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=0)
    ts64 = [t.double() for t in ts]
    got64 = global_norm(ts64 + [torch.zeros(0, dtype=torch.float64)], p)
    assert got64.dtype == torch.float64
    torch.testing.assert_close(got64, torch.nn.utils.get_total_norm(ts64, p), rtol=1e-12, atol=0)


def test_global_norm_edge_cases():
    assert float(global_norm([])) == 0.0
    assert float(global_norm([None])) == 0.0
    for p in (2.0, INF):
        z = global_norm([torch.zeros(0, dtype=torch.float64)], p)
        assert float(z) == 0.0 and z.dtype == torch.float64
    big = global_norm([torch.full((4,), 60000.0, dtype=torch.float16)])
    assert big.dtype == torch.float32 and float(big) == 120000.0
    assert math.isnan(float(global_norm([torch.tensor([1.0, NAN])])))
    assert math.isinf(float(global_norm([torch.tensor([1.0, INF])], INF)))


def test_flatten_reuses_specs_but_never_differs_from_a_fresh_flatten(monkeypatch):
    import collections

    import optree

    from gradchain._tree import flatten, unflatten

    t = torch.ones(1)
    trees = [
        {"b": t, "a": None},
        {"b": t, "a": {"x": t}},  # a subtree where a leaf was
        {"b": t, "a": None},
        {"a": None, "b": t},  # the same keys in another order
        {"b": t, "c": None},  # another key
        collections.OrderedDict(b=t, a=None),
        {"b": t, "a": collections.OrderedDict(x=t)},
        {"b": t, "a": {"x": t}},
        {"b": t, "a": collections.defaultdict(int, x=t)},
        [[t, None], [t]],
        [[t, None], (t,)],  # a tuple where a list was
        [[t, None], [t]],
        [[t, None], t],  # a leaf where a list was
        [[t, None], [t]],
        [[t, None], [[t]]],
        [[t, None], [t, t]],  # a longer inner list
        [(t, None), [t]],
        (t, [t, None]),
        [torch.nn.Parameter(torch.zeros(2)), None],
        [1.0, t],  # a non-tensor leaf
        {"b": t, "a": None},
    ]
    # A reused spec must never meet a tree it does not fit: optree's error message would
    # format the tensors (milliseconds for real ones).
    def no_repr(self: torch.Tensor) -> str:
        raise AssertionError("a tensor was formatted")

    monkeypatch.setattr(torch.Tensor, "__repr__", no_repr)
    for _ in range(2):  # the second round runs on reused specs
        for tree in trees:
            leaves, spec = flatten(tree)
            fresh_leaves, fresh_spec = optree.tree_flatten(tree, none_is_leaf=True)
            assert spec == fresh_spec, tree
            assert [id(x) for x in leaves] == [id(x) for x in fresh_leaves], tree
            back = unflatten(spec, leaves)
            fresh_back = optree.tree_unflatten(fresh_spec, fresh_leaves)
            assert str(spec) == str(fresh_spec) and type(back) is type(fresh_back)
            if isinstance(back, dict):
                assert list(back) == list(fresh_back)  # key order


# --------------------------------------------------------------------------- memoized checks
@pytest.mark.parametrize("bad, error, match", [
    (torch.zeros(3, dtype=torch.int64), TypeError, r"updates\['b'\] has dtype torch\.int64"),
    (torch.zeros(3).to_sparse(), TypeError, r"updates\['b'\] is a sparse tensor"),
    (3.0, TypeError, r"updates\['b'\]: expected a torch\.Tensor or None, got float"),
])
def test_leaves_validation_is_memoized_but_never_fooled(bad, error, match) -> None:
    """Leaves' validation is remembered for metadata that passed; a leaf that changes
    afterwards is still refused, naming it as a first call does."""
    from gradchain._tree import Leaves

    good = {"a": torch.zeros(2), "b": torch.zeros(3)}
    for _ in range(3):
        Leaves(good)  # warm
    with pytest.raises(error, match=match):
        Leaves({"a": torch.zeros(2), "b": bad})


@pytest.mark.parametrize("state_b, match", [
    (torch.zeros(4), r"updates\['b'\] has shape \(3,\) but state\['b'\] has shape \(4,\)"),
    (torch.zeros(3, dtype=torch.float16), r"has dtype torch\.float32 but state\['b'\] has dtype "
                                         r"torch\.float16, which would round it"),
    (torch.zeros(3, device="meta"), r"updates\['b'\] is on cpu but state\['b'\] is on meta"),
    (None, r"updates\['b'\] is a tensor but state\['b'\] is None"),
])
def test_leaves_take_is_memoized_but_never_fooled(state_b, match) -> None:
    from gradchain._tree import Leaves

    grads = {"a": torch.zeros(2), "b": torch.zeros(3)}
    good = {"a": torch.ones(2), "b": torch.ones(3)}
    for _ in range(3):
        assert Leaves(grads).take(good)[1] is good["b"]  # warm
    # A wider state dtype still fits (the slow path's rule), and is not remembered as exact.
    wide = {"a": torch.ones(2, dtype=torch.float64), "b": torch.ones(3, dtype=torch.float64)}
    assert Leaves(grads).take(wide)[0] is wide["a"]
    with pytest.raises(ValueError, match=match):
        Leaves(grads).take({"a": torch.ones(2), "b": state_b})


def test_zero_views_are_shared_only_where_nothing_can_write() -> None:
    from gradchain import _ops

    xs = [torch.ones(4, 5), torch.ones(()), torch.ones(1), torch.ones(0), torch.ones(3)]
    first = _ops.zeros_view(xs)
    second = _ops.zeros_view([x.clone() for x in xs])  # same metadata: memoized
    for a, b, x in zip(first, second, xs):
        assert a.shape == b.shape == x.shape and a.dtype == b.dtype == x.dtype
        assert not a.any() and not b.any()
    assert first[0] is second[0] and first[4] is second[4]  # read-only views, reused
    for i in (1, 2, 3):  # writable (nothing overlaps): a fresh zero each call
        assert first[i].untyped_storage().data_ptr() != second[i].untyped_storage().data_ptr() or \
            first[i].numel() == 0
    second[1].add_(1.0)  # writing a fresh one changes nothing shared
    assert not _ops.zeros_view(xs)[1].any()
    with pytest.raises(RuntimeError):
        first[0].add_(1.0)  # shared views refuse writes
    other = _ops.zeros_view([torch.ones(4, 5, dtype=torch.float64)] + xs[1:])
    assert other[0].dtype == torch.float64  # changed metadata: recomputed
