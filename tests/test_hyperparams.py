"""Hyperparameters held in the state: inject_hyperparams and set_hyperparams."""

from __future__ import annotations

import io

import pytest
import torch
from _core_helpers import assert_tree_equal, clone_tree, stack_trees, unstack_tree

import gradchain as gc
from gradchain._tree import flatten
from gradchain.optim._fused import fused_plan_of


def _params(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return {"w": torch.randn(4, 3, generator=gen, dtype=dtype),
            "b": torch.randn(3, generator=gen, dtype=dtype)}


def _grads(seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(100 + seed)
    return {"w": torch.randn(4, 3, generator=gen, dtype=dtype),
            "b": torch.randn(3, generator=gen, dtype=dtype)}


def _run(tx, state, params, steps, lrs=None):
    outs = []
    for t, g in enumerate(steps):
        if lrs is not None and t in lrs:
            state = gc.set_hyperparams(state, lr=lrs[t])
        u, state = tx.update(g, state, params)
        params = gc.apply_updates(params, u)
        outs.append(u)
    return outs, state, params


# --------------------------------------------------------------------------- semantics
@pytest.mark.parametrize(
    "factory, kwargs, static",
    [
        (gc.sgd, dict(lr=0.1, momentum=0.9, weight_decay=0.01), ("momentum",)),
        (gc.adam, dict(lr=1e-2, weight_decay=0.01), ()),
        (gc.adamw, dict(lr=1e-2, weight_decay=0.1), ()),
    ],
)
def test_injected_equals_the_plain_rule_and_follows_changes(factory, kwargs, static):
    """Same trajectory as the plain rule built with the same values (float64: equal to
    1e-12), also across a change of lr mid-run (the plain rule rebuilt with the new lr,
    its state carried over)."""
    params = _params(torch.float64)
    steps = [_grads(i, torch.float64) for i in range(6)]
    tx = gc.inject_hyperparams(factory, static_args=static)(**kwargs)
    outs, state, final = _run(tx, tx.init(params), params, steps, lrs={3: kwargs["lr"] * 0.3})
    plain = factory(**kwargs)
    ref_state, p = plain.init(params), params
    for t, g in enumerate(steps):
        if t == 3:
            plain = factory(**{**kwargs, "lr": kwargs["lr"] * 0.3})
        u, ref_state = plain.update(g, ref_state, p)
        p = gc.apply_updates(p, u)
        for k in u:
            torch.testing.assert_close(outs[t][k], u[k], rtol=1e-12, atol=1e-15)
    assert_tree_equal(state.inner_state, ref_state)
    assert float(state.hyperparams["lr"]) == kwargs["lr"] * 0.3
    assert int(state.count) == len(steps)


def test_schedule_is_evaluated_from_the_count_and_the_used_value_is_logged():
    sched = gc.linear_schedule(1.0, 0.0, transition_steps=4)
    tx = gc.inject_hyperparams(gc.sgd)(lr=sched)
    params = {"w": torch.zeros(2, dtype=torch.float64)}
    state = tx.init(params)
    assert float(gc.tree_get(state, "hyperparams")["lr"]) == 1.0  # value at count 0
    for t in range(6):
        u, state = tx.update({"w": torch.ones(2, dtype=torch.float64)}, state, params)
        used = float(state.hyperparams["lr"])
        assert used == pytest.approx(float(sched(t)), abs=0)
        assert torch.equal(u["w"], torch.full((2,), -used, dtype=torch.float64))


def test_behind_a_gate_closed_steps_do_not_count():
    tx = gc.chain(gc.accumulate_every(2), gc.inject_hyperparams(gc.sgd)(
        lr=gc.linear_schedule(1.0, 0.0, transition_steps=4)))
    params = {"w": torch.zeros(1)}
    state = tx.init(params)
    for _ in range(4):
        _, state = tx.update({"w": torch.ones(1)}, state, params)
    assert int(state[1].count) == 2
    assert float(state[1].hyperparams["lr"]) == 0.75


def test_set_hyperparams_is_pure_and_validates():
    tx = gc.chain(gc.clip_by_norm(1.0), gc.inject_hyperparams(gc.adamw)(lr=1e-3,
                                                                        weight_decay=0.1))
    state = tx.init(_params())
    before = clone_tree(state)
    new = gc.set_hyperparams(state, lr=5e-4, weight_decay=torch.tensor(0.2))
    assert_tree_equal(state, before)  # the old state is untouched
    assert float(new[1].hyperparams["lr"]) == 5e-4
    assert float(new[1].hyperparams["weight_decay"]) == pytest.approx(0.2)
    assert new[1].hyperparams["lr"].dtype == torch.float64
    with pytest.raises(KeyError, match="'learning_rate'.*\\['lr', 'weight_decay'\\]"):
        gc.set_hyperparams(state, learning_rate=0.1)
    with pytest.raises(ValueError, match="finite"):
        gc.set_hyperparams(state, lr=float("nan"))
    with pytest.raises(ValueError, match="finite"):
        gc.set_hyperparams(state, lr=torch.tensor(float("inf")))
    with pytest.raises(TypeError, match="lr"):
        gc.set_hyperparams(state, lr="0.1")
    with pytest.raises(ValueError, match="shape"):
        gc.set_hyperparams(state, lr=torch.ones(3))
    with pytest.raises(KeyError, match="no InjectHyperparamsState"):
        gc.set_hyperparams(gc.sgd(0.1).init(_params()), lr=0.1)
    # (two rules cannot share a chain: a tuple of their states)
    one = gc.inject_hyperparams(gc.sgd)(lr=0.1)
    with pytest.raises(KeyError, match="several"):
        gc.set_hyperparams((one.init(_params()), one.init(_params())), lr=0.2)
    # A value the rule refuses: its own error, raised by the next update, nothing changed.
    bad = gc.set_hyperparams(state, lr=-1.0)
    with pytest.raises(ValueError, match="adamw: invalid learning rate"):
        tx.update(_grads(0), bad, _params())


def test_inject_validates_arguments():
    with pytest.raises(TypeError, match="factory"):
        gc.inject_hyperparams(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="inject_hyperparams\\(sgd\\)"):
        gc.inject_hyperparams(gc.sgd)(rate=0.1)
    with pytest.raises(TypeError, match="static_args"):
        gc.inject_hyperparams(gc.sgd, static_args=("nope",))(lr=0.1)
    with pytest.raises(ValueError, match="sgd: invalid learning rate"):
        gc.inject_hyperparams(gc.sgd)(lr=-0.1)
    tx = gc.inject_hyperparams(gc.sgd)(lr=0.1)
    with pytest.raises(TypeError, match="InjectHyperparamsState"):
        tx.update(_grads(0), gc.sgd(0.1).init(_params()), _params())


def test_state_dict_roundtrip():
    tx = gc.inject_hyperparams(gc.adamw)(lr=1e-3, weight_decay=0.05)
    params = _params()
    state = tx.init(params)
    _, state = tx.update(_grads(0), state, params)
    state = gc.set_hyperparams(state, lr=2e-4)
    buf = io.BytesIO()
    torch.save(gc.to_state_dict(state), buf)
    buf.seek(0)
    again = gc.from_state_dict(tx.init(params), torch.load(buf, weights_only=True))
    assert_tree_equal(again, state)
    assert float(again.hyperparams["lr"]) == 2e-4


# --------------------------------------------------------------------------- compile / vmap
def test_compiled_update_does_not_recompile_when_the_lr_changes():
    torch._dynamo.reset()
    tx = gc.inject_hyperparams(gc.adamw)(lr=1e-2, weight_decay=0.1)
    params = _params()
    compiled = torch.compile(tx.update, fullgraph=True)
    state_c = state_e = tx.init(params)
    lrs = [1e-2, 1e-2, 3e-3, 3e-3, 5e-4]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for t, lr in enumerate(lrs):
            state_c = gc.set_hyperparams(state_c, lr=lr)
            state_e = gc.set_hyperparams(state_e, lr=lr)
            g = _grads(t)
            u_c, state_c = compiled(g, state_c, params)
            u_e, state_e = tx.update(g, state_e, params)
            for k in u_e:
                torch.testing.assert_close(u_c[k], u_e[k], rtol=1e-6, atol=1e-8)
    assert float(state_c.hyperparams["lr"]) == 5e-4


def test_vmap_a_different_lr_per_ensemble_member():
    tx = gc.inject_hyperparams(gc.adam)(lr=1e-2)
    lrs = [1e-1, 1e-2, 1e-3]
    params_list = [{k: v + i for k, v in _params().items()} for i in range(3)]
    states = [gc.set_hyperparams(tx.init(p), lr=lr) for p, lr in zip(params_list, lrs)]
    batched = stack_trees(states)
    assert batched.hyperparams["lr"].shape == (3,)
    batched = gc.set_hyperparams(batched, lr=torch.tensor(lrs, dtype=torch.float64))
    vupdate = torch.func.vmap(lambda g, s, p: tx.update(g, s, p))
    bparams = stack_trees(params_list)
    first_updates = None
    for t in range(3):
        grads = [_grads(10 * t + i) for i in range(3)]
        u_b, batched = vupdate(stack_trees(grads), batched, bparams)
        first_updates = u_b if first_updates is None else first_updates
        for i in range(3):
            u, states[i] = tx.update(grads[i], states[i], params_list[i])
            for k in u:
                torch.testing.assert_close(unstack_tree(u_b, i)[k], u[k], rtol=1e-6, atol=1e-8)
    # Each member stepped with its own lr: the first Adam step is about -lr * sign(g).
    for i, lr in enumerate(lrs):
        torch.testing.assert_close(unstack_tree(first_updates, i)["b"].abs(),
                                   torch.full((3,), lr), rtol=1e-4, atol=0)
    assert torch.equal(batched.hyperparams["lr"], torch.tensor(lrs, dtype=torch.float64))


# --------------------------------------------------------------------------- fused
@pytest.mark.parametrize(
    "name, make_tx, make_torch",
    [
        ("adamw",
         lambda: gc.inject_hyperparams(gc.adamw)(lr=1e-2, weight_decay=0.1),
         lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=True)),
        ("adam",
         lambda: gc.inject_hyperparams(gc.adam)(lr=1e-2, weight_decay=0.01),
         lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.01, fused=True)),
        ("sgd",
         lambda: gc.inject_hyperparams(gc.sgd, static_args=("momentum",))(
             lr=0.1, momentum=0.9, weight_decay=0.01),
         lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01, fused=True)),
    ],
)
def test_update_and_apply_stays_fused_and_equals_torch_with_changed_hyperparams(
    name, make_tx, make_torch
):
    """The injected rule runs torch's fused kernel in update_and_apply_ and equals the torch
    optimizer with fused=True whose lr (and weight_decay) change mid-run, bit for bit."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    params = dict(model.named_parameters())
    ref = {k: p.detach().clone().requires_grad_(True) for k, p in params.items()}
    torch_opt = make_torch(list(ref.values()))
    tx = gc.chain(gc.skip_if_nonfinite(), make_tx())
    state = tx.init(params)
    grads = {k: torch.randn_like(p) for k, p in params.items()}
    p_leaves, spec = flatten(params)
    step = fused_plan_of(gc.chain_members(tx)[1])(state[1], p_leaves, spec.flatten_up_to(grads),
                                                   spec)
    assert step is not None  # the fused kernel fits this call
    changes = {2: dict(lr=torch_opt.param_groups[0]["lr"] * 0.3),
               4: dict(lr=torch_opt.param_groups[0]["lr"] * 2.0, weight_decay=0.05)}
    for t in range(6):
        if t in changes:
            state = gc.set_hyperparams(state, **changes[t])
            torch_opt.param_groups[0].update(changes[t])
        grads = {k: torch.randn_like(p) for k, p in params.items()}
        state = gc.update_and_apply_(tx, {k: g.clone() for k, g in grads.items()}, state, params)
        for k, p in ref.items():
            p.grad = grads[k].clone()
        torch_opt.step()
        for k in params:
            assert torch.equal(params[k].detach(), ref[k].detach()), (name, t, k)
    assert int(state[1].count) == 6
    assert float(gc.tree_get(state, "lr")) == changes[4]["lr"]


# --------------------------------------------------------------------------- against optax
@pytest.mark.parametrize("scheduled", [False, True])
def test_against_optax_inject_hyperparams(scheduled):
    """float64: the same trajectory as optax.inject_hyperparams(optax.adamw) with the lr and
    weight_decay changed mid-run through the state (rel 1e-12), or the lr a schedule (the
    schedules' values are float32 in both libraries and may round differently: rel 1e-6),
    and the same logged lr (the value the last step used)."""
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    import numpy as np

    jax.config.update("jax_enable_x64", True)
    params = _params(torch.float64)
    jparams = {k: jax.numpy.asarray(v.numpy()) for k, v in params.items()}
    lr = gc.linear_schedule(1e-2, 1e-3, 5) if scheduled else 1e-2
    ref_lr = optax.linear_schedule(1e-2, 1e-3, 5) if scheduled else 1e-2
    tx = gc.inject_hyperparams(gc.adamw)(lr=lr, weight_decay=0.1)
    ref = optax.inject_hyperparams(optax.adamw)(learning_rate=ref_lr, weight_decay=0.1, eps=1e-8)
    state, ref_state = tx.init(params), ref.init(jparams)
    rtol = 1e-6 if scheduled else 1e-12
    for t in range(8):
        if t == 3 and not scheduled:
            state = gc.set_hyperparams(state, lr=3e-3)
            ref_state.hyperparams["learning_rate"] = jax.numpy.asarray(3e-3)
        if t == 5:
            state = gc.set_hyperparams(state, weight_decay=0.3)
            ref_state.hyperparams["weight_decay"] = jax.numpy.asarray(0.3)
        g = _grads(t, torch.float64)
        u, state = tx.update(g, state, params)
        ru, ref_state = ref.update({k: jax.numpy.asarray(v.numpy()) for k, v in g.items()},
                                   ref_state, jparams)
        params = gc.apply_updates(params, u)
        jparams = optax.apply_updates(jparams, ru)
        for k in u:
            np.testing.assert_allclose(params[k].numpy(), np.asarray(jparams[k]), rtol=rtol,
                                       atol=0)
        assert float(gc.tree_get(state, "lr")) == pytest.approx(
            float(ref_state.hyperparams["learning_rate"]), rel=rtol)


# --------------------------------------------------------------------------- every rule
def _rules_with_an_lr():
    import inspect

    import gradchain.optim as optim

    found = []
    for name in optim.__all__:
        f = getattr(optim, name)
        if isinstance(f, type) or not callable(f):
            continue
        params = inspect.signature(f).parameters
        lr = "lr" if "lr" in params else "learning_rate" if "learning_rate" in params else None
        if lr is not None:
            found.append(pytest.param(f, lr, id=name))
    return found


RULES = _rules_with_an_lr()


def test_every_rule_is_covered():
    assert len(RULES) >= 20  # sgd, adam, adamw, ... (a rule added to optim/ joins by itself)


@pytest.mark.parametrize("rule, lr_name", RULES)
def test_every_rule_takes_an_injected_lr_eager_compiled_and_fused(rule, lr_name):
    """For every rule in gradchain.optim: the injected lr gives the plain rule's updates
    (with the lr changed mid-run), a compiled update does not recompile when it changes,
    and update_and_apply_ takes the rule's fused binding whenever the plain rule does, with
    bit-equal results."""
    gen = torch.Generator().manual_seed(7)
    params = {"w": torch.randn(4, 3, generator=gen), "v": torch.randn(3, 3, generator=gen)}
    grads = [{k: torch.randn(v.shape, generator=gen) for k, v in params.items()}
             for _ in range(4)]
    lrs = [1e-2, 1e-2, 3e-3, 3e-3]
    tx = gc.inject_hyperparams(rule)(**{lr_name: lrs[0]})
    # eager: the same updates as the plain rule rebuilt with each lr
    state, plain_state = tx.init(params), rule(**{lr_name: lrs[0]}).init(params)
    for g, lr in zip(grads, lrs):
        state = gc.set_hyperparams(state, **{lr_name: lr})
        u, state = tx.update(g, state, params)
        pu, plain_state = rule(**{lr_name: lr}).update(g, plain_state, params)
        assert_tree_equal(u, pu)
    assert_tree_equal(state.inner_state, plain_state)
    # compiled once for every lr
    torch._dynamo.reset()
    compiled = torch.compile(tx.update, fullgraph=True, backend="eager")
    state = tx.init(params)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for g, lr in zip(grads, lrs):
            state = gc.set_hyperparams(state, **{lr_name: lr})
            _, state = compiled(g, state, params)
    # fused: the binding is taken exactly when the plain rule's is, with the same results
    live, plain_live = clone_tree(params), clone_tree(params)
    state, plain_state = tx.init(live), rule(**{lr_name: lrs[0]}).init(plain_live)
    p_leaves, spec = flatten(live)
    plan, plain_plan = fused_plan_of(tx), fused_plan_of(rule(**{lr_name: lrs[0]}))
    if plain_plan is not None:
        g_leaves = spec.flatten_up_to(grads[0])
        fits = plain_plan(plain_state, p_leaves, g_leaves, spec) is not None
        assert (plan(state, p_leaves, g_leaves, spec) is not None) == fits
    for g, lr in zip(grads, lrs):
        state = gc.set_hyperparams(state, **{lr_name: lr})
        state = gc.update_and_apply_(tx, clone_tree(g), state, live)
        plain_state = gc.update_and_apply_(rule(**{lr_name: lr}), clone_tree(g), plain_state,
                                           plain_live)
        assert_tree_equal(live, plain_live)
