"""Behaviour of clip_by_norm and clip_by_value, against torch.nn.utils."""

from __future__ import annotations

import math

import pytest
import torch
from _core_helpers import (
    assert_compiled_matches_eager,
    assert_tree_equal,
    assert_vmap_matches_loop,
    check_protocol,
    clone_tree,
    grad_trees,
    random_tree,
    structure,
)
from hypothesis import given
from hypothesis import strategies as st

import gradchain as gc
from gradchain.tree import global_norm

NORM_TYPES = [1.0, 2.0, 3.5, math.inf, "inf"]


def _torch_clip_norm(grads: dict, max_norm: float, norm_type, **kw):
    """Run torch.nn.utils.clip_grad_norm_ on parameters whose .grad are ``grads``.

    Empty gradients get no ``.grad`` (torch cannot take the inf-norm of an empty tensor;
    they contribute nothing to any norm) and come back as they were.
    """
    params = []
    for g in grads.values():
        if g is not None and g.numel() == 0:
            p = torch.nn.Parameter(g.clone())
        elif g is None:
            p = torch.nn.Parameter(torch.zeros(2))
        else:
            p = torch.nn.Parameter(torch.zeros_like(g))
            p.grad = g.clone()
        params.append(p)
    total = torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type=norm_type, **kw)
    out = {
        k: (g.clone() if g is not None and g.numel() == 0 else p.grad)
        for (k, g), p in zip(grads.items(), params)
    }
    return out, total


def _tol(dtype):
    return dict(rtol=1e-12, atol=1e-15) if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- clip_by_norm
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_clip_by_norm_matches_torch_clip_grad_norm(dtype, norm_type, seed):
    grads = random_tree(dtype, seed=seed, scale=3.0)
    ref_norm = float(global_norm(list(grads.values()), float(norm_type)))
    for max_norm in (0.1 * ref_norm, 0.7 * ref_norm):
        expected, total = _torch_clip_norm(grads, max_norm, norm_type)
        tx = gc.clip_by_norm(max_norm, norm_type=norm_type)
        before = clone_tree(grads)
        out, state = tx.update(grads, tx.init(grads))
        assert_tree_equal(grads, before)
        assert out["n"] is None
        assert structure(out) == structure(grads)
        for k in ("w", "s", "e", "b"):
            assert out[k].dtype == dtype and out[k].shape == grads[k].shape
            torch.testing.assert_close(out[k], expected[k], **_tol(dtype))
        # The recorded pre-clip norm is torch's returned total norm.
        assert state.norm.dtype == dtype
        torch.testing.assert_close(state.norm, total.to(dtype), **_tol(dtype))
        assert not bool(state.nonfinite_error)
        # Clipped to max_norm (up to the 1e-6 in the denominator), direction kept.
        new_norm = global_norm(list(out.values()), float(norm_type))
        torch.testing.assert_close(new_norm, torch.tensor(max_norm, dtype=dtype), rtol=1e-5, atol=0)
        coef = out["w"] / grads["w"]
        torch.testing.assert_close(coef, torch.full_like(coef, float(coef[0, 0])), **_tol(dtype))
        assert 0 < float(coef[0, 0]) < 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_clip_by_norm_is_identity_below_the_threshold(dtype, norm_type):
    grads = random_tree(dtype, seed=3)
    norm = float(global_norm(list(grads.values()), float(norm_type)))
    tx = gc.clip_by_norm(norm * 1.5, norm_type=norm_type)
    out, state = tx.update(grads, tx.init(grads))
    expected, total = _torch_clip_norm(grads, norm * 1.5, norm_type)
    for k in ("w", "s", "e", "b"):
        torch.testing.assert_close(out[k], grads[k], **_tol(dtype))
        torch.testing.assert_close(out[k], expected[k], **_tol(dtype))
    torch.testing.assert_close(state.norm, total.to(dtype), **_tol(dtype))


def test_clip_by_norm_example_values():
    tx = gc.clip_by_norm(1.0)
    out, state = tx.update({"w": torch.tensor([3.0, 4.0])}, tx.init({"w": torch.zeros(2)}))
    torch.testing.assert_close(out["w"], torch.tensor([0.6, 0.8]))
    assert float(state.norm) == 5.0
    tx = gc.clip_by_norm(1.0, norm_type=1)
    out, state = tx.update({"w": torch.tensor([3.0, -1.0])}, tx.init({"w": torch.zeros(2)}))
    torch.testing.assert_close(out["w"], torch.tensor([0.75, -0.25]))
    assert float(state.norm) == 4.0


def test_clip_by_norm_mixed_dtypes_and_nested_trees():
    grads = {
        "a": [torch.tensor([3.0]), (torch.tensor([4.0], dtype=torch.float64), None)],
        "b": torch.zeros(2, 2),
    }
    tx = gc.clip_by_norm(1.0)
    out, state = tx.update(grads, tx.init(grads))
    assert structure(out) == structure(grads)
    assert out["a"][0].dtype == torch.float32 and out["a"][1][0].dtype == torch.float64
    assert out["a"][1][1] is None
    torch.testing.assert_close(out["a"][0], torch.tensor([0.6]))
    torch.testing.assert_close(out["a"][1][0], torch.tensor([0.8], dtype=torch.float64))
    # float64 anywhere -> float64 norm
    assert state.norm.dtype == torch.float64 and float(state.norm) == 5.0


def test_clip_by_norm_all_none_or_empty_tree():
    tx = gc.clip_by_norm(1.0)
    state = tx.init({"w": torch.zeros(2)})
    out, new_state = tx.update({"w": None}, state)
    assert out == {"w": None}
    assert_tree_equal(new_state, state)
    out, _ = tx.update({}, tx.init({}))
    assert out == {}


@pytest.mark.parametrize("max_norm", [1.0, 1e-3])
def test_clip_by_norm_float16_norm_beyond_65504(max_norm):
    # 1e5 entries of 300: true norm ~94868 > 65504 (float16 max).
    g = torch.full((100_000,), 300.0, dtype=torch.float16)
    grads = {
        "w": g,
        "b": torch.full((4,), 1.0, dtype=torch.float16),
        "s": torch.tensor(2.0, dtype=torch.float16),  # 0-dim: must stay float16 too
    }
    true_norm = torch.linalg.vector_norm(
        torch.cat([grads["w"], grads["b"], grads["s"][None]]).double()
    )

    tx = gc.clip_by_norm(max_norm)
    out, state = tx.update(grads, tx.init(grads))
    assert all(v.dtype == torch.float16 for v in out.values())
    assert out["s"].shape == ()
    assert all(torch.isfinite(v).all() for v in out.values())
    assert state.norm.dtype == torch.float32
    torch.testing.assert_close(state.norm.double(), true_norm, rtol=1e-4, atol=0)
    assert not bool(state.nonfinite_error)
    new_norm = torch.linalg.vector_norm(torch.cat([out["w"], out["b"], out["s"][None]]).double())
    torch.testing.assert_close(
        new_norm, torch.tensor(max_norm, dtype=torch.float64), rtol=1e-2, atol=0
    )

    # Documented difference: torch computes the norm in float16, gets inf, and zeroes.
    expected, total = _torch_clip_norm(grads, max_norm, 2.0)
    assert math.isinf(float(total))
    assert all(bool((v == 0).all()) for v in expected.values())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_clip_by_norm_error_if_nonfinite_passes_updates_unclipped(bad, norm_type):
    grads = random_tree(torch.float32, seed=5, scale=10.0)
    grads["w"][1, 2] = bad
    tx = gc.clip_by_norm(0.5, norm_type=norm_type, error_if_nonfinite=True)
    out, state = tx.update(grads, tx.init(grads))
    assert bool(state.nonfinite_error)
    assert not math.isfinite(float(state.norm))
    # torch raises before touching the grads; we pass them through unchanged.
    assert_tree_equal(out, grads)
    with pytest.raises(RuntimeError):
        _torch_clip_norm(grads, 0.5, norm_type, error_if_nonfinite=True)


def test_clip_by_norm_error_if_nonfinite_finite_step_clips_and_clears_flag():
    grads = random_tree(torch.float64, seed=6, scale=10.0)
    tx = gc.clip_by_norm(0.5, error_if_nonfinite=True)
    state = tx.init(grads)
    bad = clone_tree(grads)
    bad["b"][0] = float("inf")
    _, state = tx.update(bad, state)
    assert bool(state.nonfinite_error)
    out, state = tx.update(grads, state)
    assert not bool(state.nonfinite_error)
    expected, total = _torch_clip_norm(grads, 0.5, 2.0, error_if_nonfinite=True)
    for k in ("w", "s", "e", "b"):
        torch.testing.assert_close(out[k], expected[k], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_clip_by_norm_nonfinite_without_error_follows_torch(bad):
    grads = random_tree(torch.float32, seed=7)
    grads["b"][3] = bad
    tx = gc.clip_by_norm(1.0)
    out, state = tx.update(grads, tx.init(grads))
    expected, total = _torch_clip_norm(grads, 1.0, 2.0)
    assert not bool(state.nonfinite_error)  # only flagged with error_if_nonfinite=True
    assert not math.isfinite(float(state.norm))
    for k in ("w", "s", "e", "b"):
        torch.testing.assert_close(out[k], expected[k], equal_nan=True)


@pytest.mark.parametrize(
    "kwargs, exc",
    [
        (dict(max_norm=0.0), ValueError),
        (dict(max_norm=-1.0), ValueError),
        (dict(max_norm=float("nan")), ValueError),
        (dict(max_norm=float("inf")), ValueError),
        (dict(max_norm="1"), TypeError),
        (dict(max_norm=True), TypeError),
        (dict(max_norm=1.0, norm_type=0), ValueError),
        (dict(max_norm=1.0, norm_type=-2.0), ValueError),
        (dict(max_norm=1.0, norm_type="fro"), ValueError),
        (dict(max_norm=1.0, norm_type=None), TypeError),
        (dict(max_norm=1.0, error_if_nonfinite=1), TypeError),
    ],
)
def test_clip_by_norm_validates_arguments(kwargs, exc):
    with pytest.raises(exc, match="max_norm|norm_type|error_if_nonfinite"):
        gc.clip_by_norm(**kwargs)


def test_clip_by_norm_accepts_and_ignores_unknown_extras():
    tx = gc.clip_by_norm(1.0)
    g = {"w": torch.tensor([3.0, 4.0])}
    out, _ = tx.update(g, tx.init(g), None, flush=True, gate_open=None, whatever=3)
    torch.testing.assert_close(out["w"], torch.tensor([0.6, 0.8]))


# --------------------------------------------------------------------------- clip_by_value
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("clip", [0.1, 0.5, 2.0])
def test_clip_by_value_matches_torch_clip_grad_value(dtype, clip):
    grads = random_tree(dtype, seed=11)
    grads["b"][0] = float("inf")
    grads["b"][1] = float("-inf")
    grads["b"][2] = float("nan")
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads.values() if g is not None]
    for p, g in zip(params, [g for g in grads.values() if g is not None]):
        p.grad = g.clone()
    torch.nn.utils.clip_grad_value_(params, clip)
    tx = gc.clip_by_value(clip)
    before = clone_tree(grads)
    out, state = tx.update(grads, tx.init(grads))
    assert_tree_equal(grads, before)
    assert state == gc.EmptyState()
    assert out["n"] is None
    for k, p in zip(("w", "s", "e", "b"), params):
        assert_tree_equal(out[k], p.grad)
    assert torch.equal(out["b"][:2], torch.tensor([clip, -clip], dtype=dtype))
    assert math.isnan(float(out["b"][2]))


def test_clip_by_value_min_value():
    g = {"w": torch.tensor([-2.0, -0.5, 0.0, 0.3, 4.0])}
    out, _ = gc.clip_by_value(1.0, min_value=0.0).update(g, gc.EmptyState())
    assert torch.equal(out["w"], torch.tensor([0.0, 0.0, 0.0, 0.3, 1.0]))
    out, _ = gc.clip_by_value(1.0, min_value=-0.25).update(g, gc.EmptyState())
    assert torch.equal(out["w"], torch.tensor([-0.25, -0.25, 0.0, 0.3, 1.0]))
    out, _ = gc.clip_by_value(1.0).update(g, gc.EmptyState())
    assert torch.equal(out["w"], torch.tensor([-1.0, -0.5, 0.0, 0.3, 1.0]))
    # A degenerate interval is allowed.
    out, _ = gc.clip_by_value(0.5, min_value=0.5).update(g, gc.EmptyState())
    assert torch.equal(out["w"], torch.full((5,), 0.5))


def test_clip_by_value_validates_arguments():
    with pytest.raises(ValueError, match="min_value"):
        gc.clip_by_value(1.0, min_value=2.0)
    with pytest.raises(ValueError, match="min_value"):
        gc.clip_by_value(-1.0)  # the default lower bound +1 exceeds -1
    with pytest.raises(TypeError, match="max_value"):
        gc.clip_by_value(float("nan"))
    with pytest.raises(TypeError, match="max_value"):
        gc.clip_by_value("1")
    with pytest.raises(TypeError, match="min_value"):
        gc.clip_by_value(1.0, min_value=float("nan"))


# --------------------------------------------------------------------------- properties
@given(grad_trees(), st.floats(1e-3, 1e3))
def test_property_clip_by_norm(grads, max_norm):
    ((out, state),) = check_protocol(gc.clip_by_norm(max_norm), [grads])
    present = [g for g in grads.values() if g is not None]
    norm = global_norm(present)
    if present:
        torch.testing.assert_close(state.norm.double(), norm.double(), rtol=1e-6, atol=1e-6)
    new = float(global_norm([g for g in out.values() if g is not None]))
    assert new <= max_norm * (1 + 1e-5) + 1e-6


@given(grad_trees(nonfinite=True), st.floats(0.0, 1e3))
def test_property_clip_by_value(grads, v):
    ((out, _),) = check_protocol(gc.clip_by_value(v), [grads])
    for k, g in grads.items():
        if g is not None:
            o = out[k]
            ok = o.isnan() | ((o >= -v) & (o <= v))
            assert bool(ok.all())
            assert torch.equal(o.isnan(), g.isnan())


# --------------------------------------------------------------------------- compile / vmap / grad
_PARAMS = {"w": torch.zeros(3, 2), "b": torch.zeros(2), "s": torch.zeros(())}


def _g(seed, bad=None):
    gen = torch.Generator().manual_seed(seed)
    g = {k: torch.randn(v.shape, generator=gen) * 2 for k, v in _PARAMS.items()}
    if bad is not None:
        g["b"][0] = bad
    return g


CLIPS = {
    "clip_by_norm": lambda: gc.clip_by_norm(1.0),
    "clip_by_norm_inf_error": lambda: gc.clip_by_norm(0.5, "inf", error_if_nonfinite=True),
    "clip_by_value": lambda: gc.clip_by_value(0.5, min_value=-0.1),
}


@pytest.mark.parametrize("name", list(CLIPS))
def test_compiled_update_matches_eager(name):
    torch._dynamo.reset()
    tx = CLIPS[name]()
    compiled = torch.compile(tx.update, fullgraph=True)
    steps = [_g(0), _g(1, bad=float("nan")), _g(2), _g(3, bad=float("inf"))]
    assert_compiled_matches_eager(compiled, tx, _PARAMS, steps)


@pytest.mark.parametrize("name", list(CLIPS))
def test_vmap_over_a_batch_of_states_matches_a_loop(name):
    tx = CLIPS[name]()
    params_list = [dict(_PARAMS) for _ in range(4)]
    steps = [
        [_g(10 * t + i, bad=float("inf") if t == i else None) for i in range(4)] for t in range(3)
    ]
    assert_vmap_matches_loop(tx, params_list, steps)


def test_gradients_flow_through_clip_by_norm():
    params = {"w": torch.randn(4, dtype=torch.float64), "b": torch.randn(2, dtype=torch.float64)}
    gb = torch.randn(2, dtype=torch.float64)
    tx = gc.clip_by_norm(0.5)  # the gradients below have norm > 0.5: clipping is active

    def loss_of_grad(gw):
        updates, _ = tx.update({"w": gw, "b": gb}, tx.init(params), params)
        new = gc.apply_updates(params, updates)
        return (new["w"] ** 2).sum() + new["b"].sin().sum()

    gw = 3 * torch.randn(4, dtype=torch.float64)
    gw.requires_grad_(True)
    (grad,) = torch.autograd.grad(loss_of_grad(gw), gw)
    assert bool((grad != 0).any())
    assert torch.autograd.gradcheck(loss_of_grad, (gw,))


# --------------------------------------------------------------------------- optax's other clips
from gradchain.clipping import (  # noqa: E402
    adaptive_grad_clip,
    clip_by_block_rms,
    per_example_global_norm_clip,
)
from gradchain.testing import check_transformation  # noqa: E402


@pytest.fixture(scope="module")
def ox():
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield jax, optax
    jax.config.update("jax_enable_x64", before)


def _j(t):
    import jax.numpy as jnp

    return jnp.asarray(t.detach().numpy())


def _rel(ours: torch.Tensor, theirs) -> float:
    import numpy as np

    want = np.asarray(theirs, dtype=np.float64)
    got = ours.detach().numpy()
    scale = max(float(np.abs(want).max(initial=0.0)), 1e-300)
    return float(np.abs(got - want).max(initial=0.0)) / scale


def _agc_tree(seed: int) -> tuple[dict, dict]:
    gen = torch.Generator().manual_seed(seed)
    shapes = {"w": (5, 4), "conv": (3, 2, 3, 3), "b": (5,), "s": ()}
    params = {k: torch.randn(s, generator=gen, dtype=torch.float64) for k, s in shapes.items()}
    params["w"][1] = 0.0  # a zero-initialised unit: eps floor
    # Gradients whose unit norms straddle 0.1 x the param norms: some units clipped.
    grads = {k: torch.randn(s, generator=gen, dtype=torch.float64) * (0.02 if k == "b" else 0.2)
             for k, s in shapes.items()}
    return params, grads


_TO_FLAX = {"w": lambda t: t.T, "conv": lambda t: t.permute(2, 3, 1, 0), "b": lambda t: t,
            "s": lambda t: t}


def test_adaptive_grad_clip_matches_optax_on_flax_layout(ox):
    """torch's (out, in[, kh, kw]) units are flax's (in, out) / (kh, kw, in, out) ones."""
    _, optax = ox
    worst = 0.0
    for seed in range(3):
        params, grads = _agc_tree(seed)
        tx = adaptive_grad_clip(0.1)
        out, _ = tx.update(grads, tx.init(params), params)
        ref = optax.adaptive_grad_clip(0.1)
        jp = {k: _j(_TO_FLAX[k](v)) for k, v in params.items()}
        jg = {k: _j(_TO_FLAX[k](v)) for k, v in grads.items()}
        want, _ = ref.update(jg, ref.init(jp), jp)
        for k in params:
            worst = max(worst, _rel(_TO_FLAX[k](out[k]), want[k]))
        assert not torch.equal(out["w"], grads["w"])  # something was clipped
    assert worst <= 1e-15, worst


def test_adaptive_grad_clip_explicit_axis_matches_optax(ox):
    _, optax = ox
    params, grads = _agc_tree(5)
    params, grads = {"w": params["w"]}, {"w": grads["w"]}
    for axis in (0, 1, (0, 1)):
        tx = adaptive_grad_clip(0.05, eps=1e-2, axis=axis)
        out, _ = tx.update(grads, tx.init(params), params)
        ref = optax.adaptive_grad_clip(0.05, eps=1e-2, axis=axis)
        jp, jg = {"w": _j(params["w"])}, {"w": _j(grads["w"])}
        want, _ = ref.update(jg, ref.init(jp), jp)
        assert _rel(out["w"], want["w"]) <= 1e-15, axis


def test_clip_by_block_rms_matches_optax(ox):
    _, optax = ox
    gen = torch.Generator().manual_seed(0)
    grads = {"a": 3 * torch.randn(4, 5, generator=gen, dtype=torch.float64),
             "b": 0.1 * torch.randn(7, generator=gen, dtype=torch.float64),
             "s": torch.tensor(5.0, dtype=torch.float64)}
    tx = clip_by_block_rms(1.0)
    out, _ = tx.update(grads, tx.init(grads))
    ref = optax.clip_by_block_rms(1.0)
    want, _ = ref.update({k: _j(v) for k, v in grads.items()}, ref.init(None))
    assert max(_rel(out[k], want[k]) for k in grads) <= 1e-15
    assert torch.equal(out["b"], grads["b"])  # under the threshold: untouched


@pytest.mark.parametrize("clip", [math.inf, 0.0, 1.25, 3.0])
def test_per_example_global_norm_clip_matches_optax(ox, clip):
    _, optax = ox
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(6, 3, generator=gen, dtype=torch.float64),
             torch.randn(6, 2, 2, generator=gen, dtype=torch.float64)]
    grads[0][2] = 0.0
    grads[1][2] = 0.0  # a zero example: 0/0 coefficient is 1, as optax
    out, n = per_example_global_norm_clip(grads, clip)
    want, wn = optax.per_example_global_norm_clip([_j(g) for g in grads], clip)
    assert max(_rel(o, w) for o, w in zip(out, want)) <= 1e-15
    assert int(n) == int(wn) and n.dtype == torch.int64


def test_per_example_global_norm_clip_errors_name_the_leaf():
    with pytest.raises(ValueError, match=r"grads\['b'\] has batch size 3"):
        per_example_global_norm_clip({"a": torch.ones(2, 1), "b": torch.ones(3)}, 1.0)
    with pytest.raises(ValueError, match=r"grads\['s'\] must be a tensor with a batch"):
        per_example_global_norm_clip({"a": torch.ones(2, 1), "s": torch.tensor(1.0)}, 1.0)
    with pytest.raises(ValueError, match="l2_norm_clip must be >= 0"):
        per_example_global_norm_clip([torch.ones(2, 1)], -1.0)


def test_adaptive_grad_clip_needs_params_and_valid_arguments():
    tx = adaptive_grad_clip(0.1)
    with pytest.raises(ValueError, match="params are required"):
        tx.update({"w": torch.ones(2)}, tx.init(None))
    with pytest.raises(ValueError, match="clipping must be > 0"):
        adaptive_grad_clip(0.0)
    with pytest.raises(ValueError, match="threshold must be > 0"):
        clip_by_block_rms(-1.0)


@pytest.mark.parametrize("make", [lambda: adaptive_grad_clip(0.1), lambda: clip_by_block_rms(0.5)],
                         ids=["adaptive_grad_clip", "clip_by_block_rms"])
def test_new_clips_obey_the_laws(make):
    check_transformation(make(), vmap=True, max_examples=15)
