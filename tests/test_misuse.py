"""The misuse catalogue: the mistakes a new user makes with gradchain, each refused with a
message that names what is wrong and what to do, raised before anything changes (or, where
the code may be right, a warning that says so).

Every row runs here in ``SETUP``: it must raise exactly its documented exception and message
(or warn exactly its message) and leave every parameter, gradient and state as it was. The
docs table ("Misuse catalogue" in docs/reliability.md) is generated from this table
(``python tests/test_misuse.py --write-docs``); rows of mistakes that need a training loop
(``SCENARIOS``) name the test that shows them.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import optree
import pytest
import torch

HERE = Path(__file__).resolve().parent
PAGE = HERE.parent / "docs" / "reliability.md"

# The setup every row runs in (shown on the docs page, verbatim).
SETUP = """\
import functools
import torch
import gradchain as gc

model = torch.nn.Linear(3, 2)
P = dict(model.named_parameters())  # the params tree
G = {k: torch.ones_like(p) for k, p in P.items()}  # gradients that fit it
tx = gc.chain(gc.clip_by_norm(1.0), gc.adamw(1e-3))
state = tx.init(P)
opt = gc.ChainedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3),
                          gc.chain(gc.clip_by_norm(1.0), gc.accumulate_every(2)))
for p in model.parameters():
    p.grad = torch.ones_like(p)
"""


class Misuse(NamedTuple):
    section: str
    mistake: str
    code: str
    raises: type[BaseException] | type[Warning]
    message: str
    why: str


SECTIONS = {
    "chain": "Building a chain",
    "adapter": "Building a ChainedOptimizer",
    "init": "init",
    "update": "update, states, params",
    "state": "Checkpoints",
    "hyper": "Hyperparameters and schedules",
}

# fmt: off
MISUSES: list[Misuse] = [
    Misuse('chain', '`loss_scale` after a clip',
           'gc.chain(gc.clip_by_norm(1.0), gc.loss_scale(), gc.adamw(1e-3))',
           ValueError,
           'chain: loss_scale, in member 1 (loss_scale), comes after member 0 (clip_by_norm), '
           'which then sees the gradients still multiplied by the loss scale (2**16 by default):'
           ' a clip would always clip, a decay, a skip or a rule would act on the wrong values; '
           'put loss_scale first (only accumulate_every may come before it)',
           'the clip sees gradients still multiplied by 2**16: it always clips, and the step '
           'comes out ~2**-16 of what was meant'),
    Misuse('chain', '`loss_scale` after `skip_if_nonfinite`',
           'gc.chain(gc.skip_if_nonfinite(), gc.loss_scale())',
           ValueError,
           'chain: loss_scale, in member 1 (loss_scale), comes after member 0 '
           '(skip_if_nonfinite), which then sees the gradients still multiplied by the loss '
           'scale (2**16 by default): a clip would always clip, a decay, a skip or a rule would '
           'act on the wrong values; put loss_scale first (only accumulate_every may come before'
           ' it)',
           'the skip hides every overflow from the scale, which then never backs off: every '
           'later step is skipped'),
    Misuse('chain', '`loss_scale` after weight decay',
           'gc.chain(gc.add_decayed_weights(1e-2), gc.loss_scale(), gc.sgd(0.1))',
           ValueError,
           'chain: loss_scale, in member 1 (loss_scale), comes after member 0 '
           '(add_decayed_weights), which then sees the gradients still multiplied by the loss '
           'scale (2**16 by default): a clip would always clip, a decay, a skip or a rule would '
           'act on the wrong values; put loss_scale first (only accumulate_every may come before'
           ' it)',
           'the decay is added to scaled gradients, then divided by the scale: ~2**-16 of the '
           'decay'),
    Misuse('chain', 'two update rules in one chain',
           'gc.chain(gc.sgd(0.1), gc.adam(1e-3))',
           ValueError,
           'chain: two update rules, member 0 (chain(scale_by_learning_rate)) and member 1 '
           '(chain(scale_by_adam, scale_by_learning_rate)): each turns its input into a step '
           "(and applies its learning rate), so the second would take the first's step for a "
           'gradient; keep one rule per chain (different rules for different parameters: '
           'gc.partition)',
           "the second rule takes the first's step for a gradient (the learning rate twice, "
           'moments of steps)'),
    Misuse('chain', 'a rule after a partition of rules',
           'gc.chain(gc.partition({"a": gc.adam(1e-3), "b": gc.sgd(0.1)}, '
           '{"weight": "a", "bias": "b"}), gc.adam(1e-3))',
           ValueError,
           'chain: member 1 (chain(scale_by_adam, scale_by_learning_rate)) is an update rule for'
           ' every parameter and member 0 (partition) applies an update rule to some of them: '
           "those parameters would get two rules (the second taking the first's step for a "
           'gradient); give each parameter one rule: put every rule inside the partition (a '
           'label per rule), or use the one rule alone',
           "the partitioned params step twice: Adam takes the partition's step for a "
           'gradient'),
    Misuse('chain', 'a learning rate applied after the rule (the sign flipped twice)',
           'gc.chain(gc.adam(1e-3), gc.scale_by_learning_rate(0.5))',
           ValueError,
           'chain: two update rules, member 0 (chain(scale_by_adam, scale_by_learning_rate)) and'
           ' member 1 (scale_by_learning_rate): each turns its input into a step (and applies '
           "its learning rate), so the second would take the first's step for a gradient; keep "
           'one rule per chain (different rules for different parameters: gc.partition)',
           '`scale_by_learning_rate` negates: after a rule it turns descent into ascent'),
    Misuse('chain', '`accumulate_every` after the update rule',
           'gc.chain(gc.adamw(1e-3), gc.accumulate_every(4))',
           ValueError,
           'chain: member 1 (accumulate_every) holds gradients back but comes after the update '
           'rule, member 0 (chain(scale_by_adam, add_decayed_weights, scale_by_learning_rate)): '
           'the rule would run on every call (its state taking in every micro-batch, and '
           'non-finite gradients, before the gate decides) and the gate would then hold back '
           'steps, not gradients; put the gate before the rule (to sum updates after the rule as'
           ' optax.apply_every does, use gc.apply_every)',
           'the rule steps (and advances its moments) on every micro-batch; the window then '
           "averages steps (optax's `apply_every` semantics, which `gc.apply_every` offers)"),
    Misuse('chain', '`skip_if_nonfinite` after the update rule',
           'gc.chain(gc.sgd(0.1, momentum=0.9), gc.skip_if_nonfinite())',
           ValueError,
           'chain: member 1 (skip_if_nonfinite) holds gradients back but comes after the update '
           'rule, member 0 (chain(trace, scale_by_learning_rate)): the rule would run on every '
           'call (its state taking in every micro-batch, and non-finite gradients, before the '
           'gate decides) and the gate would then hold back steps, not gradients; put the gate '
           'before the rule (to sum updates after the rule as optax.apply_every does, use '
           'gc.apply_every)',
           "the rule's state has already taken in the nan when the skip decides: the run is "
           'poisoned for good'),
    Misuse('chain', '`loss_scale` after the update rule',
           'gc.chain(gc.adam(1e-3), gc.loss_scale())',
           ValueError,
           'chain: member 1 (loss_scale) holds gradients back but comes after the update rule, '
           'member 0 (chain(scale_by_adam, scale_by_learning_rate)): the rule would run on every'
           ' call (its state taking in every micro-batch, and non-finite gradients, before the '
           'gate decides) and the gate would then hold back steps, not gradients; put the gate '
           'before the rule (to sum updates after the rule as optax.apply_every does, use '
           'gc.apply_every)',
           "the rule runs on scaled gradients (Adam's moments, momentum, the step)"),
    Misuse('chain', 'a gate after a rule, both nested',
           'gc.chain(gc.chain(gc.clip_by_norm(1.0), gc.adam(1e-3)), '
           'gc.chain(gc.accumulate_every(2)))',
           ValueError,
           'chain: member 1 (chain(accumulate_every)) holds gradients back but comes after the '
           'update rule, member 0 (chain(clip_by_norm, chain(scale_by_adam, '
           'scale_by_learning_rate))): the rule would run on every call (its state taking in '
           'every micro-batch, and non-finite gradients, before the gate decides) and the gate '
           'would then hold back steps, not gradients; put the gate before the rule (to sum '
           'updates after the rule as optax.apply_every does, use gc.apply_every)',
           'nesting hides nothing: roles propagate through chains'),
    Misuse('chain', 'a gate after a masked rule',
           'gc.chain(gc.masked(gc.adam(1e-3), {"weight": True, "bias": False}), '
           'gc.skip_if_nonfinite())',
           ValueError,
           'chain: member 1 (skip_if_nonfinite) holds gradients back but comes after the update '
           'rule, member 0 (masked): the rule would run on every call (its state taking in every'
           ' micro-batch, and non-finite gradients, before the gate decides) and the gate would '
           'then hold back steps, not gradients; put the gate before the rule (to sum updates '
           'after the rule as optax.apply_every does, use gc.apply_every)',
           'the rule on the masked leaves steps on every micro-batch'),
    Misuse('chain', 'an uncalled factory in a chain',
           'gc.chain(gc.clip_by_norm, gc.adamw(1e-3))',
           TypeError,
           'chain: argument 0 is the function clip_by_norm, not a transformation: call it, e.g. '
           'clip_by_norm(...) (a factory returns the GradientTransformation)',
           '`gc.clip_by_norm` is the factory; `gc.clip_by_norm(1.0)` the transformation'),
    Misuse('chain', 'a list given to chain',
           'gc.chain([gc.clip_by_norm(1.0), gc.adamw(1e-3)])',
           TypeError,
           'chain: argument 0 is a list of 2 transformations: pass gc.chain(*transformations) '
           '(or the transformations as separate arguments of chain)',
           "optax's `chain` takes the transformations as arguments"),
    Misuse('adapter', "an update rule as the adapter's transform",
           'gc.ChainedOptimizer(torch.optim.AdamW(model.parameters()), gc.adamw(1e-3))',
           ValueError,
           'ChainedOptimizer: the transform holds an update rule (transform = '
           'chain(scale_by_adam, add_decayed_weights, scale_by_learning_rate)), and the wrapped '
           'AdamW applies its own: every step would apply two rules (the learning rate twice, '
           'the sign flipped twice); keep gradient processing in the transform (clip, '
           'accumulate_every, loss_scale, skip_if_nonfinite) and the rule in AdamW, or run the '
           'whole chain with gc.update_and_apply_',
           'the wrapped optimizer applies its own rule: two steps in one, the sign flipped twice'),
    Misuse('adapter', "`sgd` inside the adapter's chain",
           'gc.ChainedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), '
           'gc.chain(gc.clip_by_norm(1.0), gc.sgd(0.1)))',
           ValueError,
           'ChainedOptimizer: the transform holds an update rule (transform[1] = '
           'chain(scale_by_learning_rate)), and the wrapped SGD applies its own: every step '
           'would apply two rules (the learning rate twice, the sign flipped twice); keep '
           'gradient processing in the transform (clip, accumulate_every, loss_scale, '
           'skip_if_nonfinite) and the rule in SGD, or run the whole chain with '
           'gc.update_and_apply_',
           'same, found inside the chain, named by its position'),
    Misuse('adapter', "`scale_by_learning_rate` inside the adapter's chain",
           'gc.ChainedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), '
           'gc.chain(gc.accumulate_every(2), gc.scale_by_learning_rate(0.1)))',
           ValueError,
           'ChainedOptimizer: the transform holds an update rule (transform[1] = '
           'scale_by_learning_rate), and the wrapped SGD applies its own: every step would apply'
           ' two rules (the learning rate twice, the sign flipped twice); keep gradient '
           'processing in the transform (clip, accumulate_every, loss_scale, skip_if_nonfinite) '
           'and the rule in SGD, or run the whole chain with gc.update_and_apply_',
           "it is the rule's last act (the step and the sign): the wrapped optimizer does it "
           'again'),
    Misuse('adapter', "a rule from `gradchain.optim` inside the adapter's chain",
           'gc.ChainedOptimizer(torch.optim.RMSprop(model.parameters()), '
           'gc.chain(gc.clip_by_norm(1.0), gc.rmsprop(1e-2)))',
           ValueError,
           'ChainedOptimizer: the transform holds an update rule (transform[1] = '
           'chain(scale_by_rmsprop, scale_by_learning_rate)), and the wrapped RMSprop applies '
           'its own: every step would apply two rules (the learning rate twice, the sign flipped'
           ' twice); keep gradient processing in the transform (clip, accumulate_every, '
           'loss_scale, skip_if_nonfinite) and the rule in RMSprop, or run the whole chain with '
           'gc.update_and_apply_',
           'every rule with a torch binding declares itself a rule'),
    Misuse('adapter', 'an uncalled factory as the transform',
           'gc.ChainedOptimizer(torch.optim.AdamW(model.parameters()), gc.clip_by_norm)',
           TypeError,
           'ChainedOptimizer: transform is the function clip_by_norm, not a transformation: call'
           ' it, e.g. clip_by_norm(...) (a factory returns the GradientTransformation)',
           'as in a chain'),
    Misuse('adapter', 'an uncalled optimizer factory',
           'gc.ChainedOptimizer(functools.partial(torch.optim.AdamW, lr=1e-3), '
           'gc.clip_by_norm(1.0))',
           TypeError,
           'ChainedOptimizer: optimizer is a callable (partial), not an optimizer: call it to '
           'make one, e.g. torch.optim.AdamW(model.parameters(), lr=...)',
           'a `functools.partial` or a lambda is not an optimizer yet'),
    Misuse('adapter', 'the optimizer class instead of an instance',
           'gc.ChainedOptimizer(torch.optim.AdamW, gc.clip_by_norm(1.0))',
           TypeError,
           'ChainedOptimizer: optimizer is the class AdamW, not an optimizer; pass an instance, '
           'e.g. AdamW(model.parameters(), lr=...)',
           'nothing to wrap'),
    Misuse('adapter', 'the model instead of an optimizer',
           'gc.ChainedOptimizer(model, gc.clip_by_norm(1.0))',
           TypeError,
           'ChainedOptimizer: optimizer must be a torch.optim.Optimizer, got Linear',
           'nothing to wrap'),
    Misuse('adapter', 'the two arguments swapped',
           'gc.ChainedOptimizer(gc.clip_by_norm(1.0), torch.optim.AdamW(model.parameters()))',
           TypeError,
           'ChainedOptimizer: the arguments are swapped: pass the torch optimizer first, '
           'ChainedOptimizer(optimizer, transform)',
           'the torch optimizer comes first'),
    Misuse('adapter', 'an adapter wrapped in an adapter',
           'gc.ChainedOptimizer(opt, gc.clip_by_norm(1.0))',
           TypeError,
           'ChainedOptimizer: wrap the inner optimizer once, with one chain',
           'one chain per optimizer'),
    Misuse('adapter', 'gates in front of LBFGS',
           'gc.ChainedOptimizer(torch.optim.LBFGS(model.parameters()), gc.accumulate_every(2))',
           ValueError,
           'ChainedOptimizer: LBFGS re-evaluates the closure several times per step, so gates '
           '(accumulate_every, skip_if_nonfinite, loss_scale) cannot decide per step; use a '
           'transformation without gates (e.g. clip_by_norm)',
           'LBFGS calls the closure several times per step'),
    Misuse('init', '`tx.init(model)`',
           'tx.init(model)',
           TypeError,
           'chain.init: params is the module Linear, not a tree of its parameters: pass '
           'dict(model.named_parameters())',
           'a module is not a tree of tensors (it failed deep inside with `no attribute '
           "'dtype'`)"),
    Misuse('init', '`tx.init(model.parameters())` (a generator)',
           'tx.init(model.parameters())',
           TypeError,
           'chain.init: params is a generator (e.g. model.parameters()), which the first '
           "member's init would use up, leaving the others nothing: pass "
           'dict(model.named_parameters()) (or list(model.parameters()))',
           "the first member's init would use up the generator and the others would get nothing"),
    Misuse('init', '`tx.init(model.state_dict())`',
           'tx.init(model.state_dict())',
           UserWarning,
           "chain.init: params looks like a module's state_dict(), which holds its buffers too "
           "(e.g. BatchNorm's running statistics, an int64 batch counter) and detached tensors: "
           'the state would have entries the gradients lack; pass dict(model.named_parameters())'
           ' unless this tree is what you mean',
           'a warning, not an error: for a model without buffers it is the same tree; with '
           'buffers the state gets entries no gradient has'),
    Misuse('init', 'integer parameters',
           'tx.init({"step": torch.zeros((), dtype=torch.int64), **P})',
           TypeError,
           "chain.init: params['step'] has dtype torch.int64: gradient transformations update "
           'floating-point (or complex) parameters; leave integer tensors out of the tree (or '
           'give them None)',
           'no gradient flows to an integer tensor; a moment or accumulator for it makes no '
           'sense'),
    Misuse('init', 'a Python number as a parameter',
           'tx.init({"scale": 1.0, **P})',
           TypeError,
           "chain.init: params['scale'] is a float, not a tensor: a params tree holds "
           'torch.Tensor leaves (torch.as_tensor(...) a number or an array) or None',
           'leaves are tensors (a number has no device, dtype or shape to build state with)'),
    Misuse('init', '`global_norm` of a dict',
           'gc.tree.global_norm(G)',
           TypeError,
           'global_norm: tensors must be a list or tuple of tensors, got a dict; for a tree '
           '(e.g. a dict of gradients) pass its leaves: global_norm(list(grads.values())) or '
           'global_norm(gradchain.tree.flatten(grads)[0])',
           'it failed with an `AttributeError` about `.dtype` (iterating a dict gives its keys)'),
    Misuse('update', 'a stale schedule state (a constant rate now)',
           'gc.chain(gc.clip_by_norm(1.0), gc.scale_by_learning_rate(0.1)).update(G, '
           'gc.chain(gc.clip_by_norm(1.0), gc.scale_by_learning_rate(gc.linear_schedule(0.1, '
           '0.0, 100))).init(P), P)',
           TypeError,
           'scale_by_learning_rate.update: state must be the EmptyState made by '
           'scale_by_learning_rate(...).init(params), got ScaleByScheduleState (a state from '
           'another transformation, or from this one built with other arguments, e.g. a schedule'
           " instead of a constant: make it with this transformation's init)",
           'ran silently before (a stateless member ignored the state it was given)'),
    Misuse('update', 'the state of a chain with a member less',
           'gc.chain(gc.clip_by_norm(1.0), gc.accumulate_every(2), gc.adamw(1e-3)).update(G, '
           'state, P)',
           ValueError,
           'chain.update: state must hold one state per member, 3 ([0] clip_by_norm; [1] '
           'accumulate_every; [2] chain(scale_by_adam, add_decayed_weights, '
           'scale_by_learning_rate)), got a tuple of 2 ([0] ClipByNormState; [1] '
           '(ScaleByAdamState, EmptyState, EmptyState)): it comes from a chain of another shape '
           "(a member more or less); make it with this chain's init",
           "names this chain's members and what the state holds"),
    Misuse('update', "another transformation's state for a member",
           'gc.chain(gc.clip_by_value(1.0), gc.adamw(1e-3)).update(G, state, P)',
           TypeError,
           'clip_by_value.update: state must be the EmptyState made by '
           'clip_by_value(...).init(params), got ClipByNormState (a state from another '
           'transformation, or from this one built with other arguments, e.g. a schedule instead'
           " of a constant: make it with this transformation's init)",
           'ran silently before (a stateless member ignored the state)'),
    Misuse('update', 'computed (non-leaf) tensors as the params of an in-place step',
           'gc.update_and_apply_(tx, G, state, {k: p * 1.0 for k, p in P.items()})',
           ValueError,
           "update_and_apply_: params['bias'] is not a leaf tensor (it was computed from "
           'others: grad_fn=MulBackward0); an in-place update would change this copy, not the '
           'parameter it was computed from (torch.optim refuses it too: can\'t optimize a '
           'non-leaf Tensor); pass the parameters themselves (e.g. '
           'dict(model.named_parameters()))',
           'the copies were updated and the model was not: the run did not train'),
    Misuse('update', 'arguments in the wrong order',
           'tx.update(G, P, state)',
           ValueError,
           "chain.update: state must be the tuple of member states made by this chain's init, 2 "
           '([0] clip_by_norm; [1] chain(scale_by_adam, add_decayed_weights, '
           'scale_by_learning_rate)), got dict (arguments in the wrong order? it is '
           'update(updates, state, params))',
           '`update(updates, state, params)`, as optax'),
    Misuse('update', 'params left out where the rule needs them',
           'tx.update(G, state)',
           ValueError,
           'add_decayed_weights: params is None; weight decay needs the parameters, call '
           'tx.update(grads, state, params)',
           'weight decay reads the parameters'),
    Misuse('update', 'NumPy arrays as gradients',
           'tx.update({k: g.numpy() for k, g in G.items()}, state, P)',
           TypeError,
           "updates['bias']: expected a torch.Tensor or None, got ndarray",
           'leaves are tensors'),
    Misuse('update', 'gradients of other parameters',
           'tx.update({"weight": G["weight"]}, state, P)',
           ValueError,
           "mu does not have the structure of the updates: mu['bias'] is not in the updates",
           "the gradients must have the params' structure"),
    Misuse('update', '`apply_updates` with trees that differ',
           'gc.apply_updates(P, {"weight": G["weight"]})',
           ValueError,
           "updates does not have the structure of params: updates has no ['bias'], which params"
           ' have',
           'names the first path that differs'),
    Misuse('update', '`gc.scale_loss(loss, opt)` with the adapter',
           'gc.scale_loss(torch.tensor(1.0), opt)',
           TypeError,
           'scale_loss: got the optimizer ChainedOptimizer, not a chain state; call '
           'opt.scale_loss(loss) (or gc.scale_loss(loss, opt.tx_state))',
           'silently 1x the loss before'),
    Misuse('update', '`gc.applied(opt)` with the adapter',
           'gc.applied(opt)',
           TypeError,
           'applied: got the optimizer ChainedOptimizer, not a chain state; use '
           'opt.last_step_applied (or gc.applied(opt.tx_state))',
           'a wrong flag before'),
    Misuse('update', '`gc.applied(tx)` with the transformation',
           'gc.applied(tx)',
           TypeError,
           'applied: got a GradientTransformation, not its state; pass the state that tx.init() '
           '/ tx.update() returned',
           'the flag is in the state'),
    Misuse('update', '`gc.scale_loss(loss, tx)` with the transformation',
           'gc.scale_loss(torch.tensor(1.0), tx)',
           TypeError,
           'scale_loss: got a GradientTransformation, not its state; pass the state that '
           'tx.init() / tx.update() returned',
           'the scale is in the state'),
    Misuse('state', 'a checkpoint with a member less',
           'gc.from_state_dict(gc.chain(gc.clip_by_norm(1.0), gc.accumulate_every(2), '
           'gc.adamw(1e-3)).init(P), gc.to_state_dict(state))',
           ValueError,
           "from_state_dict: state does not fit this transformation's state: it holds 3 member "
           'states (ClipByNormState, AccumulateState, (ScaleByAdamState, EmptyState, '
           'EmptyState)), the saved state 2; member state[1] (AccumulateState) is missing from '
           'the saved state: it was saved from a chain with a member less (load it into a chain '
           'of the same members, in the same order)',
           'gave list lengths before; names the missing member now'),
    Misuse('state', 'a checkpoint with a member more',
           'gc.from_state_dict(state, gc.to_state_dict(gc.chain(gc.clip_by_norm(1.0), '
           'gc.skip_if_nonfinite(), gc.adamw(1e-3)).init(P)))',
           ValueError,
           "from_state_dict: state does not fit this transformation's state: it holds 2 member "
           'states (ClipByNormState, (ScaleByAdamState, EmptyState, EmptyState)), the saved '
           'state 3; the saved state has an extra member at state[1] (with keys {is_open, '
           'consecutive_skips, total_skips}), which this chain lacks: it was saved from a chain '
           'with a member more (load it into a chain of the same members, in the same order)',
           'names the extra member and its keys'),
    Misuse('state', 'an adapter checkpoint with a member more',
           'opt.load_state_dict(gc.ChainedOptimizer(torch.optim.AdamW(model.parameters()), '
           'gc.chain(gc.clip_by_norm(1.0), gc.skip_if_nonfinite(), '
           'gc.accumulate_every(2))).state_dict())',
           ValueError,
           "from_state_dict: state does not fit this transformation's state: it holds 2 member "
           'states (ClipByNormState, AccumulateState), the saved state 3; the saved state has an'
           ' extra member at state[1] (with keys {is_open, consecutive_skips, total_skips}), '
           'which this chain lacks: it was saved from a chain with a member more (load it into a'
           ' chain of the same members, in the same order)',
           'the same check through `ChainedOptimizer.load_state_dict`; nothing is loaded'),
    Misuse('hyper', 'a negative schedule peak',
           'gc.warmup_cosine_decay_schedule(0.0, -1e-3, warmup_steps=100, decay_steps=1000)',
           ValueError,
           'warmup_cosine_decay_schedule: peak_value must be >= 0, got -0.001: a schedule gives '
           'learning rates, and a negative one would step up the loss (use gradchain.scale for a'
           ' signed factor)',
           'a negative learning rate steps up the loss'),
    Misuse('hyper', 'a negative schedule initial value',
           'gc.linear_schedule(-1e-3, 0.0, transition_steps=100)',
           ValueError,
           'linear_schedule: init_value must be >= 0, got -0.001: a schedule gives learning '
           'rates, and a negative one would step up the loss (use gradchain.scale for a signed '
           'factor)',
           'same'),
    Misuse('hyper', 'the learning rate as a string',
           'gc.adamw(lr="1e-3")',
           TypeError,
           'adamw: lr must be a float or a 1-element tensor, got str',
           'as torch.optim (read from a config file unparsed)'),
    Misuse('hyper', 'the learning rate as a bool',
           'gc.sgd(lr=True)',
           TypeError,
           'sgd: lr must be a float or a 1-element tensor, got bool',
           '`True` is an int to Python, never a learning rate'),
    Misuse('hyper', 'an empty accumulation window',
           'gc.accumulate_every(0)',
           ValueError,
           'accumulate_every: n must be >= 1, got 0',
           'a window holds at least one micro-batch'),
    Misuse('hyper', 'a negative clip threshold',
           'gc.clip_by_norm(-1.0)',
           ValueError,
           'clip_by_norm: max_norm must be a positive finite number, got -1.0',
           'as `clip_grad_norm_` would silently flip the gradients'),
]


class Scenario(NamedTuple):
    mistake: str
    raises: type[BaseException] | type[Warning]
    message: str
    why: str
    test: str  # "tests/<file>.py::<test function>"


# Mistakes that need a training loop: each is shown by the named test.
SCENARIOS: list[Scenario] = [
    Scenario("`step()` when no parameter has a gradient", UserWarning,
             "... no parameter has a gradient ... the chain state did not advance",
             "torch.optim does nothing; a chain would count the call (the window must not "
             "advance)",
             "tests/test_adapter_contract.py::test_step_without_any_gradient_warns_and_does_not_advance_the_window"),
    Scenario("`step()` twice without a backward", UserWarning,
             "... called again with the gradients of the last applied step ...",
             "a warning: torch.optim applies them again too, and it may be meant; usually "
             "a missing `zero_grad()` / `backward()`",
             "tests/test_adapter_contract.py::test_step_twice_without_a_backward_warns"),
    Scenario("a scheduler stepped on a held-back step", UserWarning,
             "the learning rate changed after a held-back step ... opt.step_scheduler",
             "schedules would advance per micro-batch (torch's own \"before optimizer.step()\" "
             "warning is the model)",
             "tests/test_adapter_contract.py::test_a_scheduler_stepped_on_held_back_steps_warns"),
    Scenario("`GradScaler.step(opt)` with a chain that has its own `loss_scale`", ValueError,
             "GradScaler.step() is driving an adapter whose chain has its own loss_scale()",
             "the gradients would be unscaled twice",
             "tests/test_adapter_contract.py::test_a_gradscaler_driving_a_chain_with_its_own_loss_scale_is_refused"),
    Scenario("Lightning: `Trainer(accumulate_grad_batches=...)` with a chain that accumulates",
             ValueError, "ChainedOptimization: Trainer(accumulate_grad_batches=4) and the "
             "ChainedOptimizer's accumulate_every(4) would both accumulate ...",
             "each window would be divided twice",
             "tests/integration/test_lightning_auto.py::test_doing_the_work_twice_is_refused_naming_both"),
    Scenario("Lightning: `Trainer(gradient_clip_val=...)` with a chain that clips", ValueError,
             "ChainedOptimization: Trainer(gradient_clip_val=1.0) and the ChainedOptimizer's "
             "clip_by_norm would both clip ...",
             "the gradients would be clipped twice",
             "tests/integration/test_lightning_auto.py::test_doing_the_work_twice_is_refused_naming_both"),
]
# fmt: on


def _tensors(namespace: dict[str, Any]) -> list[torch.Tensor]:
    """Every tensor the setup holds: params and their .grad, gradients, states, the
    adapter's wrapped state and chain state."""
    found: list[torch.Tensor] = []
    for name in ("P", "G", "state"):
        found += [x for x in optree.tree_leaves(namespace[name], none_is_leaf=True)
                  if isinstance(x, torch.Tensor)]
    model = namespace["model"]
    found += list(model.parameters()) + [p.grad for p in model.parameters()]
    opt = namespace["opt"]
    found += [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    found += [x for x in optree.tree_leaves(opt.tx_state) if isinstance(x, torch.Tensor)]
    return found


def _message(err: BaseException) -> str:
    return err.args[0] if isinstance(err, KeyError) else str(err)


@pytest.mark.parametrize("case", MISUSES, ids=[m.mistake for m in MISUSES])
def test_each_misuse_is_loud_and_changes_nothing(case: Misuse) -> None:
    namespace: dict[str, Any] = {}
    exec(SETUP, namespace)  # noqa: S102
    watched = _tensors(namespace)
    before = [(t, t.detach().clone(), t._version) for t in watched]
    grads = [p.grad for p in namespace["model"].parameters()]
    tx_state, opt_state = namespace["opt"].tx_state, namespace["opt"].state_dict()
    if issubclass(case.raises, Warning):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            exec(case.code, namespace)  # noqa: S102
        assert [str(w.message) for w in caught] == [case.message]
        assert all(w.category is case.raises for w in caught)
    else:
        with pytest.raises(case.raises) as info:  # type: ignore[arg-type]
            exec(case.code, namespace)  # noqa: S102
        assert type(info.value) is case.raises
        assert _message(info.value) == case.message
    # Nothing changed: values, versions, the .grad objects, both adapter states.
    for t, saved, version in before:
        assert t._version == version and torch.equal(t.detach(), saved)
    assert [p.grad for p in namespace["model"].parameters()] == grads
    assert namespace["opt"].tx_state is tx_state
    assert str(namespace["opt"].state_dict()) == str(opt_state)


@pytest.mark.parametrize("case", SCENARIOS, ids=[s.mistake for s in SCENARIOS])
def test_each_scenario_names_a_test_that_exists(case: Scenario) -> None:
    path, name = case.test.split("::")
    assert f"\ndef {name}(" in (HERE.parent / path).read_text()


def test_the_catalogue_holds_at_least_40_misuses() -> None:
    assert len(MISUSES) + len(SCENARIOS) >= 40
    assert len({m.mistake for m in MISUSES} | {s.mistake for s in SCENARIOS}) == (
        len(MISUSES) + len(SCENARIOS))


def catalogue_markdown() -> str:
    """The docs table of the catalogue, generated from ``MISUSES`` and ``SCENARIOS``."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    def code(text: str) -> str:
        return f"`` {cell(text)} ``" if "`" in text else f"`{cell(text)}`"

    def kind(t: type) -> str:
        return f"`{t.__name__}`" + (" (warning)" if issubclass(t, Warning) else "")

    out = [f"{len(MISUSES) + len(SCENARIOS)} misuses, each tested.", ""]
    for key, title in SECTIONS.items():
        rows = [m for m in MISUSES if m.section == key]
        out += [f"**{title}** ({len(rows)})", "", "| mistake | code | raises | message | why |",
                "| --- | --- | --- | --- | --- |"]
        out += [f"| {cell(m.mistake)} | {code(m.code)} | {kind(m.raises)} | {code(m.message)} "
                f"| {cell(m.why)} |" for m in rows]
        out.append("")
    out += [f"**In a training loop** ({len(SCENARIOS)})", "",
            "| mistake | raises | message | why | test |", "| --- | --- | --- | --- | --- |"]
    out += [f"| {cell(s.mistake)} | {kind(s.raises)} | {code(s.message)} | {cell(s.why)} "
            f"| `{s.test.split('::')[1]}` |" for s in SCENARIOS]
    return "\n".join(out).rstrip() + "\n"


def _block(text: str) -> str:
    start, end = "<!-- misuse:start -->\n", "<!-- misuse:end -->"
    return text[text.index(start) + len(start):text.index(end)]


def test_the_docs_page_shows_the_catalogue_and_the_setup() -> None:
    text = PAGE.read_text()
    assert _block(text) == catalogue_markdown(), (
        "docs/reliability.md is out of date: run python tests/test_misuse.py --write-docs"
    )
    assert "```python\n" + SETUP + "```" in text


if __name__ == "__main__":
    if "--write-docs" in sys.argv:
        text = PAGE.read_text()
        start, end = "<!-- misuse:start -->\n", "<!-- misuse:end -->"
        i, j = text.index(start) + len(start), text.index(end)
        PAGE.write_text(text[:i] + catalogue_markdown() + text[j:])
        print(f"wrote {PAGE}")
