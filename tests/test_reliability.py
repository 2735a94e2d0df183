"""Reliability: bad input, faults and checkpoints (docs/reliability.md).

* The bad-input catalogue: ``CASES`` is the one list the docs table is generated from
  (``python tests/test_reliability.py --write-docs``); every row runs here and must raise
  exactly its documented error and message, and change nothing.
* Fuzzing: random trees, dtypes, special values and chains of built-ins (hypothesis).
* Faults: a transactional ``ChainedOptimizer.step``, SIGKILL during training and during a
  checkpoint write, counters at their limits, malicious checkpoint files.
"""

from __future__ import annotations

import math
import os
import pickle
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import optree
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gradchain as gc
from gradchain.gating import is_gate
from gradchain.testing import strategies as gst
from gradchain.tree import Leaves, flatten

HERE = Path(__file__).resolve().parent
PAGE = HERE.parent / "docs" / "reliability.md"
INT64_MAX = torch.iinfo(torch.int64).max
F32 = torch.finfo(torch.float32)

# =========================================================================== catalogue
# The setup every row runs in (shown on the docs page, verbatim).
SETUP = """\
import torch
import gradchain as gc

P = {"w": torch.zeros(3), "b": torch.zeros(2)}  # params
G = {"w": torch.ones(3), "b": torch.ones(2)}  # gradients that fit them
adam = gc.adam(lr=1e-3)
state = adam.init(P)
model = torch.nn.Linear(3, 2)
opt = gc.ChainedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), gc.clip_by_norm(1.0))
"""


class Case(NamedTuple):
    section: str
    code: str
    error: type[BaseException]
    message: str


SECTIONS = {
    "ctor": "Constructors",
    "update": "Updates: gradients, states, params",
    "state": "State dicts and checkpoints",
}

# fmt: off
CASES: list[Case] = [
    # ------------------------------------------------------------------ constructors
    Case("ctor", 'gc.clip_by_norm(0.0)', ValueError,
         "clip_by_norm: max_norm must be a positive finite number, got 0.0"),
    Case("ctor", 'gc.clip_by_norm(float("nan"))', ValueError,
         "clip_by_norm: max_norm must be a positive finite number, got nan"),
    Case("ctor", 'gc.clip_by_norm("1.0")', TypeError,
         "clip_by_norm: max_norm must be a positive float, got str"),
    Case("ctor", 'gc.clip_by_norm(1.0, norm_type=0)', ValueError,
         "clip_by_norm: norm_type must be > 0 (1, 2, 3.5, inf, ...), got 0"),
    Case("ctor", 'gc.clip_by_norm(1.0, norm_type="fro")', ValueError,
         "clip_by_norm: norm_type must be a positive float or 'inf', got 'fro'"),
    Case("ctor", 'gc.clip_by_norm(1.0, error_if_nonfinite=1)', TypeError,
         "clip_by_norm: error_if_nonfinite must be a bool, got int"),
    Case("ctor", 'gc.clip_by_value(-1.0)', ValueError,
         "clip_by_value: min_value (1.0) must be <= max_value (-1.0) (with min_value=None the "
         "lower bound is -max_value)"),
    Case("ctor", 'gc.clip_by_value(float("nan"))', TypeError,
         "clip_by_value: max_value must be a float (not nan), got nan"),
    Case("ctor", 'gc.accumulate_every(0)', ValueError,
         "accumulate_every: n must be >= 1, got 0"),
    Case("ctor", 'gc.accumulate_every(2.0)', TypeError,
         "accumulate_every: n must be an int >= 1 or a schedule of the window count, got float"),
    Case("ctor", 'gc.accumulate_every(2, mean=1)', TypeError,
         "accumulate_every: mean must be a bool, got int"),
    Case("ctor", 'gc.accumulate_every(2, accumulator_dtype=torch.int32)', TypeError,
         "accumulate_every: accumulator_dtype must be a floating torch.dtype or None, got "
         "torch.int32"),
    Case("ctor", 'gc.loss_scale(init_scale=0.0)', ValueError,
         "loss_scale: init_scale must be a positive float within float32's normal range "
         "[1.17549e-38, 3.40282e+38] (the scale is kept in float32), got 0.0"),
    Case("ctor", 'gc.loss_scale(init_scale=1e39)', ValueError,
         "loss_scale: init_scale must be a positive float within float32's normal range "
         "[1.17549e-38, 3.40282e+38] (the scale is kept in float32), got 1e+39"),
    Case("ctor", 'gc.loss_scale(growth_factor=1.0)', ValueError,
         "loss_scale: growth_factor must be > 1 and finite, got 1.0"),
    Case("ctor", 'gc.loss_scale(backoff_factor=1.0)', ValueError,
         "loss_scale: backoff_factor must be in (0, 1), got 1.0"),
    Case("ctor", 'gc.loss_scale(backoff_factor=0.0)', ValueError,
         "loss_scale: backoff_factor must be in (0, 1), got 0.0"),
    Case("ctor", 'gc.loss_scale(growth_interval=0)', ValueError,
         "loss_scale: growth_interval must be >= 1, got 0"),
    Case("ctor", 'gc.loss_scale(growth_interval=1.5)', TypeError,
         "loss_scale: growth_interval must be an int >= 1, got float"),
    Case("ctor", 'gc.loss_scale(min_scale=2.0**20)', ValueError,
         "loss_scale: min_scale must be in (0, init_scale=65536.0], got 1048576.0"),
    Case("ctor", 'gc.loss_scale(dynamic="no")', TypeError,
         "loss_scale: dynamic must be a bool, got str"),
    Case("ctor", 'gc.sgd(lr=-0.1)', ValueError,
         "sgd: invalid learning rate lr=-0.1; expected lr >= 0"),
    Case("ctor", 'gc.sgd(lr="0.1")', TypeError,
         "sgd: lr must be a float or a 1-element tensor, got str"),
    Case("ctor", 'gc.sgd(lr=0.1, momentum=-0.9)', ValueError,
         "sgd: invalid momentum value momentum=-0.9; expected momentum >= 0"),
    Case("ctor", 'gc.sgd(lr=0.1, weight_decay=-1e-4)', ValueError,
         "sgd: invalid weight_decay value weight_decay=-0.0001; expected weight_decay >= 0"),
    Case("ctor", 'gc.sgd(lr=0.1, nesterov=True)', ValueError,
         "sgd: nesterov=True requires momentum > 0 and dampening == 0, got momentum=0.0, "
         "dampening=0.0"),
    Case("ctor", 'gc.sgd(lr=0.1, maximize="yes")', TypeError,
         "sgd: maximize must be a bool, got str"),
    Case("ctor", 'gc.adam(lr=float("nan"))', ValueError,
         "adam: invalid learning rate lr=nan; expected lr >= 0"),
    Case("ctor", 'gc.adam(lr=torch.tensor([1e-3, 1e-4]))', ValueError,
         "adam: Tensor lr must be 1-element, got shape (2,)"),
    Case("ctor", 'gc.adam(lr=torch.tensor(1))', TypeError,
         "adam: Tensor lr must be floating point, got torch.int64"),
    Case("ctor", 'gc.adam(betas=(1.0, 0.999))', ValueError,
         "adam: invalid beta parameter betas[0]=1.0; expected 0 <= betas[0] < 1"),
    Case("ctor", 'gc.adam(betas=(0.9,))', ValueError,
         "adam: betas must be a pair (beta1, beta2), got (0.9,)"),
    Case("ctor", 'gc.adam(eps=-1e-8)', ValueError,
         "adam: invalid epsilon value eps=-1e-08; expected eps >= 0"),
    Case("ctor", 'gc.adamw(weight_decay=-0.01)', ValueError,
         "adamw: invalid weight_decay value weight_decay=-0.01; expected weight_decay >= 0"),
    Case("ctor", 'gc.adamw(amsgrad="yes")', TypeError,
         "adamw: amsgrad must be a bool, got str"),
    Case("ctor", 'gc.scale_by_adam(b1=-0.1)', ValueError,
         "scale_by_adam: invalid beta parameter b1=-0.1; expected 0 <= b1 < 1"),
    Case("ctor", 'gc.trace(momentum=-1.0)', ValueError,
         "trace: invalid momentum value momentum=-1.0; expected momentum >= 0"),
    Case("ctor", 'gc.trace(0.9, dampening="0.1")', TypeError,
         "trace: dampening must be a float, got str"),
    Case("ctor", 'gc.scale(float("inf"))', ValueError,
         "scale: step_size must be finite, got inf"),
    Case("ctor", 'gc.scale_by_learning_rate("1e-3")', TypeError,
         "scale_by_learning_rate: learning_rate must be a float or a 1-element tensor, got str"),
    Case("ctor", 'gc.add_decayed_weights(None)', TypeError,
         "add_decayed_weights: weight_decay must be a float or a 1-element tensor, got NoneType"),
    Case("ctor", 'gc.chain(gc.clip_by_norm(1.0), "adam")', TypeError,
         "chain: argument 1 must be a GradientTransformation (init, update), got str"),
    Case("ctor", 'gc.masked(gc.sgd(0.1), {"w": 1, "b": True}).init(P)', TypeError,
         "masked: mask['w'] must be a Python bool, got int; masks are decided from the tree's "
         "structure (names, shapes), not from tensor values"),
    Case("ctor", 'gc.masked(gc.sgd(0.1), {"w": True}).init(P)', ValueError,
         "masked: mask must have the structure of the params (one entry per leaf): ['b'] is "
         "missing"),
    Case("ctor", 'gc.partition({}, {"w": "a", "b": "a"})', ValueError,
         "partition: transforms must hold at least one labelled transformation"),
    Case("ctor", 'gc.partition({"a": gc.sgd(0.1)}, {"w": "a", "b": "c"}).init(P)', ValueError,
         "partition: labels['b'] is 'c', which is not a label of transforms; known labels: "
         "['a']"),
    Case("ctor",
         'gc.partition({"a": gc.skip_if_nonfinite(), "b": gc.loss_scale()}, {"w": "a", "b": "b"})',
         ValueError,
         "partition: at most one member may be or contain a gate, got gates in ['a', 'b']; a "
         "gate shared by all subsets goes in a chain before partition, e.g. "
         "chain(accumulate_every(4), partition(...))"),
    Case("ctor", 'gc.constant_schedule(float("nan"))', ValueError,
         "constant_schedule: value must be finite, got nan"),
    Case("ctor", 'gc.linear_schedule(1.0, 0.0, transition_steps=-1)', ValueError,
         "linear_schedule: transition_steps must be a non-negative int, got -1"),
    Case("ctor", 'gc.cosine_decay_schedule(1.0, decay_steps=0)', ValueError,
         "cosine_decay_schedule: decay_steps must be a positive int, got 0"),
    Case("ctor", 'gc.exponential_decay(1.0, transition_steps=10, decay_rate=0.0)', ValueError,
         "exponential_decay: decay_rate must be > 0, got 0.0"),
    Case("ctor", 'gc.step_decay(1.0, step_size=0)', ValueError,
         "step_decay: step_size must be a positive int, got 0"),
    Case("ctor", 'gc.join_schedules([gc.constant_schedule(1.0)], [10])', ValueError,
         "join_schedules: expected len(schedules) == len(boundaries) + 1, got 1 schedules and "
         "1 boundaries"),
    Case("ctor", 'gc.warmup_cosine_decay_schedule(0.0, 1.0, warmup_steps=20, decay_steps=10)',
         ValueError,
         "warmup_cosine_decay_schedule: decay_steps (total steps, warmup included) must be > "
         "warmup_steps, got decay_steps=10, warmup_steps=20"),
    Case("ctor", 'gc.ChainedOptimizer(model, gc.clip_by_norm(1.0))', TypeError,
         "ChainedOptimizer: optimizer must be a torch.optim.Optimizer, got Linear"),
    Case("ctor", 'gc.ChainedOptimizer(opt.optimizer, gc.clip_by_norm)', TypeError,
         "ChainedOptimizer: transform is the function clip_by_norm, not a transformation: "
         "call it, e.g. clip_by_norm(...) (a factory returns the GradientTransformation)"),
    Case("ctor", 'gc.ChainedOptimizer(opt, gc.clip_by_norm(1.0))', TypeError,
         "ChainedOptimizer: wrap the inner optimizer once, with one chain"),
    Case("ctor", 'gc.ChainedOptimizer(opt.optimizer, gc.clip_by_norm(1.0), should_commit=True)',
         TypeError, "ChainedOptimizer: should_commit must be a callable returning bool"),
    Case("ctor",
         'gc.ChainedOptimizer(opt.optimizer, gc.clip_by_norm(1.0), transactional="yes")',
         TypeError, "ChainedOptimizer: transactional must be a bool, got str"),
    Case("ctor",
         'gc.ChainedOptimizer(torch.optim.LBFGS(model.parameters()), gc.skip_if_nonfinite())',
         ValueError,
         "ChainedOptimizer: LBFGS re-evaluates the closure several times per step, so gates "
         "(accumulate_every, skip_if_nonfinite, loss_scale) cannot decide per step; use a "
         "transformation without gates (e.g. clip_by_norm)"),
    # ------------------------------------------------------------------ updates
    Case("update", 'adam.update({"w": torch.ones(3)}, state, P)', ValueError,
         "mu does not have the structure of the updates: mu['b'] is not in the updates"),
    Case("update", 'adam.update(G | {"c": torch.ones(1)}, state, P)', ValueError,
         "mu does not have the structure of the updates: mu has no ['c'], which the updates "
         "have"),
    Case("update", 'adam.update([G["w"], G["b"]], state, P)', ValueError,
         "mu does not have the structure of the updates: the updates have a list at the root, "
         "mu has a dict"),
    Case("update", 'adam.update(G | {"w": torch.ones(4)}, state, P)', ValueError,
         "updates['w'] has shape (4,) but mu['w'] has shape (3,); the state was made for other "
         "params (call init on the params these gradients belong to, or move/cast the state "
         "with them)"),
    Case("update", 'adam.update(G | {"w": torch.ones(3, dtype=torch.float64)}, state, P)',
         ValueError,
         "updates['w'] has dtype torch.float64 but mu['w'] has dtype torch.float32, which would "
         "round it; the state was made for other params (call init on the params these "
         "gradients belong to, or move/cast the state with them)"),
    Case("update", 'adam.update(G | {"w": torch.ones(3, device="meta")}, state, P)', ValueError,
         "updates['w'] is on meta but mu['w'] is on cpu; the state was made for other params "
         "(call init on the params these gradients belong to, or move/cast the state with "
         "them)"),
    Case("update", 'adam.update(G | {"w": torch.ones(3, dtype=torch.int64)}, state, P)',
         TypeError,
         "updates['w'] has dtype torch.int64; gradients must be floating point (float16, "
         "bfloat16, float32 or float64), not integer"),
    Case("update", 'adam.update(G | {"w": torch.ones(3, dtype=torch.bool)}, state, P)',
         TypeError,
         "updates['w'] has dtype torch.bool; gradients must be floating point (float16, "
         "bfloat16, float32 or float64), not boolean"),
    Case("update", 'adam.update(G | {"w": torch.ones(3, dtype=torch.complex64)}, state, P)',
         TypeError,
         "updates['w'] has dtype torch.complex64; gradients must be floating point (float16, "
         "bfloat16, float32 or float64), not complex: view complex parameters as real ones "
         "(torch.view_as_real)"),
    Case("update", 'adam.update(G | {"w": torch.ones(3).to_sparse()}, state, P)', TypeError,
         "updates['w'] is a sparse tensor (torch.sparse_coo); gradchain transformations need "
         "dense gradients: convert with .to_dense(), or make the layer produce dense ones "
         "(e.g. nn.Embedding(..., sparse=False))"),
    Case("update", 'adam.update(G | {"w": 1.0}, state, P)', TypeError,
         "updates['w']: expected a torch.Tensor or None, got float"),
    Case("update", 'adam.update(G, gc.sgd(0.1, momentum=0.9).init(P), P)', TypeError,
         "scale_by_adam.update: state must be the ScaleByAdamState made by "
         "scale_by_adam(...).init(params), got TraceState (a state from another "
         "transformation, or from this one built with other arguments, e.g. a schedule "
         "instead of a constant: make it with this transformation's init)"),
    Case("update", 'adam.update(G, state[0], P)', ValueError,
         "chain.update: state must be the tuple of member states made by this chain's init, "
         "2 ([0] scale_by_adam; [1] scale_by_learning_rate), got ScaleByAdamState"),
    Case("update", 'gc.scale_by_adam().update(G, state)', TypeError,
         "scale_by_adam.update: state must be the ScaleByAdamState made by "
         "scale_by_adam(...).init(params), got tuple (a chain's state is a tuple of its "
         "members' states: give each member its own)"),
    Case("update",
         'gc.trace(0.9).update(G, gc.trace(0.9).init({"w": torch.zeros(3), "b": None}))',
         ValueError,
         "updates['b'] is a tensor but trace['b'] is None; the state was made for other params "
         "(call init on the params these gradients belong to, or move/cast the state with "
         "them)"),
    Case("update", 'gc.masked(adam, {"w": True, "b": False}).update(G, None)', ValueError,
         "masked.update: state must be a MaskedState (from this transformation's init), got "
         "NoneType"),
    Case("update",
         'm = gc.masked(adam, {"w": True, "b": False}); m.update({"w": G["w"]}, m.init(P))',
         ValueError,
         "masked: mask must have the structure of the updates (one entry per leaf): ['b'] is "
         "not in the updates"),
    Case("update", 'gc.add_decayed_weights(0.1).update(G, gc.EmptyState())', ValueError,
         "add_decayed_weights: params is None; weight decay needs the parameters, call "
         "tx.update(grads, state, params)"),
    Case("update",
         'gc.add_decayed_weights(0.1).update(G, gc.EmptyState(), {"w": torch.zeros(4), '
         '"b": torch.zeros(2)})',
         ValueError,
         "updates['w'] has shape (3,) but params['w'] has shape (4,); the gradients must have "
         "the structure and shapes of the params"),
    Case("update", 'gc.apply_updates(P, G | {"w": torch.ones(3, 1)})', ValueError,
         "apply_updates: updates['w'] has shape (3, 1) but params['w'] has shape (3,)"),
    Case("update", 'gc.apply_updates_(P, {"w": torch.ones(3)})', ValueError,
         "updates does not have the structure of params: updates has no ['b'], which params "
         "have"),
    Case("update",
         'gc.scale_loss(torch.tensor(1.0), (gc.loss_scale().init(P), gc.loss_scale().init(P)))',
         ValueError,
         "scale_loss: this state holds more than one loss_scale; use loss * "
         "gc.tree_get(<the sub-state you mean>, 'scale') instead"),
    Case("update", 'gc.tree_get(state, "scale")', KeyError,
         "tree_get: no 'scale' in this state"),
    Case("update", 'model.weight.grad = torch.ones(2, 3).to_sparse(); opt.step()', TypeError,
         "ChainedOptimizer: param_groups[0]['params'][0].grad is sparse (torch.sparse_coo); "
         "gradchain transformations need dense gradients (e.g. nn.Embedding(..., "
         "sparse=False))"),
    # ------------------------------------------------------------------ state dicts
    Case("state", 'sd = gc.to_state_dict(state); del sd[0]["mu"]; gc.from_state_dict(state, sd)',
         ValueError,
         "from_state_dict: state[0].mu does not fit this transformation's state: expected a "
         "value (key missing), got a dict with keys ['count', 'nu', 'nu_max']"),
    Case("state", 'sd = gc.to_state_dict(state); sd[0]["extra"] = 1; gc.from_state_dict(state, sd)',
         ValueError,
         "from_state_dict: state[0].extra does not fit this transformation's state: expected "
         "no such key in ScaleByAdamState, got a dict with keys ['count', 'extra', 'mu', 'nu', "
         "'nu_max']"),
    Case("state",
         'sd = gc.to_state_dict(state); sd[0]["mu"]["w"] = torch.zeros(4); '
         'gc.from_state_dict(state, sd)',
         ValueError,
         "from_state_dict: state[0].mu['w'] does not fit this transformation's state: expected "
         "a tensor of shape (3,) and dtype torch.float32, got a tensor of shape (4,) and dtype "
         "torch.float32"),
    Case("state",
         'sd = gc.to_state_dict(state); sd[0]["count"] = torch.tensor(0.0); '
         'gc.from_state_dict(state, sd)',
         ValueError,
         "from_state_dict: state[0].count does not fit this transformation's state: expected a "
         "tensor of shape () and dtype torch.int64, got a tensor of shape () and dtype "
         "torch.float32"),
    Case("state", 'gc.from_state_dict(state, gc.to_state_dict(gc.sgd(0.1, momentum=0.9).init(P)))',
         ValueError,
         "from_state_dict: state[0].mu does not fit this transformation's state: expected a "
         "value (key missing), got a dict with keys ['count', 'trace']"),
    Case("state",
         'gc.from_state_dict(state, gc.to_state_dict(gc.chain(gc.clip_by_norm(1.0), adam).init(P)))',
         ValueError,
         "from_state_dict: state[0].count does not fit this transformation's state: expected a "
         "value (key missing), got a dict with keys ['nonfinite_error', 'norm']"),
    Case("state",
         'gc.from_state_dict(gc.accumulate_every(4).init(P), '
         'gc.to_state_dict(gc.accumulate_every(2).init(P)))',
         ValueError,
         "from_state_dict: state.every is part of the transformation's configuration: this one "
         "has 4, the state dict has 2 (it comes from a differently configured transformation)"),
    Case("state", 'gc.from_state_dict(state, torch.zeros(1))', ValueError,
         "from_state_dict: state does not fit this transformation's state: expected a list of "
         "length 2, got a tensor of shape (1,) and dtype torch.float32"),
    Case("state", 'gc.to_state_dict({"f": print})', TypeError,
         "to_state_dict: cannot store a builtin_function_or_method in a state dict"),
    Case("state", 'opt.load_state_dict(opt.optimizer.state_dict())', ValueError,
         "ChainedOptimizer.load_state_dict: expected a dict with keys 'optimizer', 'transform' "
         "and 'gradchain' (from ChainedOptimizer.state_dict()), got ['param_groups', 'state']"),
    Case("state",
         'other = torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=0.1); '
         'opt.load_state_dict(gc.ChainedOptimizer(other, gc.clip_by_norm(1.0)).state_dict())',
         ValueError,
         "ChainedOptimizer.load_state_dict: the saved parameter groups have sizes [1], this "
         "optimizer's have [2]"),
    Case("state",
         'other = torch.optim.SGD(torch.nn.Linear(2, 3).parameters(), lr=0.1); '
         'opt.load_state_dict(gc.ChainedOptimizer(other, gc.clip_by_norm(1.0)).state_dict())',
         ValueError,
         "ChainedOptimizer.load_state_dict: param_groups[0]['params'][0] was saved with shape "
         "(3, 2), this optimizer's has shape (2, 3)"),
    Case("state",
         'other = torch.optim.SGD(torch.nn.Linear(3, 2).parameters(), lr=0.1); '
         'opt.load_state_dict(gc.ChainedOptimizer(other, gc.accumulate_every(2)).state_dict())',
         ValueError,
         "from_state_dict: state.norm does not fit this transformation's state: expected a "
         "value (key missing), got a dict with keys ['accumulated', 'every', 'is_open', "
         "'length', 'mini_step', 'nonempty', 'sums', 'windows']"),
    Case("state", 'gc.checkpoint.save("ckpt.pt", state)', TypeError,
         "checkpoint.save: obj[0] is a ScaleByAdamState, which torch.load(weights_only=True) "
         "cannot read back (a gradchain state: convert it with gc.to_state_dict(state)); save "
         "plain data: dicts, lists, tuples, tensors, numbers and strings"),
    Case("state", 'gc.checkpoint.save("ckpt.pt", {"opt": opt})', TypeError,
         "checkpoint.save: obj['opt'] is a ChainedOptimizer, which "
         "torch.load(weights_only=True) cannot read back; save plain data: dicts, lists, "
         "tuples, tensors, numbers and strings"),
    Case("state", 'gc.checkpoint.load("evil.pt")', pickle.UnpicklingError,
         "checkpoint.load: evil.pt holds an object that is not a tensor or a plain container "
         "(Trying to load unsupported GLOBAL posix.system whose module posix is blocked.); "
         "unpickling it could run code, so it was refused and nothing in it was executed "
         "(torch.load with weights_only=True)"),
]
# fmt: on

# Update-time messages, as patterns: what the fuzz accepts as a documented error.
UPDATE_PATTERNS = [
    r"^updates\S* has dtype \S+; gradients must be floating point",
    r"^updates\S* is a sparse tensor",
    r"^updates\S*: expected a torch\.Tensor or None, got",
    r"^updates\S* (has shape|has dtype|is on) .+ but \S+ (has shape|has dtype|is on) ",
    r"^updates\S* is a tensor but \S+ is None",
    r"^\S+ does not have the structure of (the updates|params): ",
    r"^(masked|partition): (mask|labels) must have the structure of the updates",
]


class Malicious:
    """Unpickling this runs ``os.system(touch <marker>)``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def write_malicious(path: Path, marker: Path) -> None:
    with open(path, "wb") as f:
        pickle.dump(Malicious(marker), f, protocol=2)


def _message(err: BaseException) -> str:
    return err.args[0] if isinstance(err, KeyError) else str(err)


def _tensors(namespace: dict[str, Any]) -> list[torch.Tensor]:
    """Every tensor the setup objects hold (params, grads, state, model, optimizer state)."""
    found: list[torch.Tensor] = []
    for name in ("P", "G", "state"):
        found += [x for x in optree.tree_leaves(namespace[name], none_is_leaf=True)
                  if isinstance(x, torch.Tensor)]
    found += list(namespace["model"].parameters())
    opt = namespace["opt"]
    found += [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    found += [x for x in optree.tree_leaves(opt.tx_state) if isinstance(x, torch.Tensor)]
    return found


@pytest.mark.parametrize("case", CASES, ids=[f"{c.section}:{c.code[:60]}" for c in CASES])
def test_bad_input_raises_its_documented_error_and_changes_nothing(
    case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "pwned"
    write_malicious(tmp_path / "evil.pt", marker)
    namespace: dict[str, Any] = {}
    exec(SETUP, namespace)  # noqa: S102
    watched = _tensors(namespace)
    before = [(t, t.detach().clone(), t._version) for t in watched]
    with pytest.raises(case.error) as info:
        exec(case.code, namespace)  # noqa: S102
    assert type(info.value) is case.error
    assert _message(info.value) == case.message
    for t, saved, version in before:
        assert t._version == version and torch.equal(t.detach(), saved)
    assert not marker.exists()
    assert not (tmp_path / "ckpt.pt").exists()


def catalogue_markdown() -> str:
    """The docs table(s) of the catalogue, generated from ``CASES``."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    def code(text: str) -> str:
        return f"`` {cell(text)} ``" if "`" in text else f"`{cell(text)}`"

    out: list[str] = []
    for key, title in SECTIONS.items():
        rows = [c for c in CASES if c.section == key]
        out += [f"**{title}** ({len(rows)} cases)", "", "| call | raises | message |",
                "| --- | --- | --- |"]
        out += [f"| {code(c.code)} | `{c.error.__name__}` | {code(c.message)} |" for c in rows]
        out.append("")
    return "\n".join(out).rstrip() + "\n"


# --------------------------------------------------------------------------- figures
FUZZ_MULTIPLIER = 4  # each fuzz test runs this many times the profile's max_examples
FUZZ_TESTS = (
    "test_fuzz_random_chains_raise_only_documented_errors",
    "test_fuzz_gated_chains_keep_nonfinite_values_out",
)
FAULTS = [
    "the wrapped optimizer raises after updating half of the parameters (steady state)",
    "the wrapped optimizer raises on its very first step (after creating its state)",
    "KeyboardInterrupt inside the wrapped optimizer's step",
    "the closure raises after zeroing and accumulating into .grad in place",
    "a transformation raises (after an earlier member has accumulated)",
    "should_commit raises",
    "LBFGS: the closure raises on a later evaluation, after parameters moved",
    "SIGKILL at an arbitrary training step, then resume",
    "SIGKILL during a checkpoint write (between write and rename), then resume",
    "a torn temporary file next to the checkpoint",
    "a checkpoint file whose unpickling would run os.system",
]


def _profile_examples(name: str) -> int:
    return settings.get_profile(name).max_examples * FUZZ_MULTIPLIER


def figures_markdown() -> str:
    ci, long = _profile_examples("ci"), _profile_examples("long")
    n = len(FUZZ_TESTS)
    return textwrap.dedent(
        f"""\
        | what | figure |
        | --- | --- |
        | bad-input cases in the catalogue, each tested | {len(CASES)} |
        | fuzz tests | {n} |
        | fuzz examples per CI run (`CI=true`, fixed seed) | {n} × {ci} = {n * ci} |
        | fuzz examples per long run (`HYPOTHESIS_PROFILE=long`) | {n} × {long} = {n * long} |
        | faults injected | {len(FAULTS)} kinds |
        | state lost or corrupted by a fault | nothing (every test compares bit for bit) |
        """
    )


def _block(text: str, name: str) -> str:
    start, end = f"<!-- {name}:start -->\n", f"<!-- {name}:end -->"
    i, j = text.index(start) + len(start), text.index(end)
    return text[i:j]


def _replace_block(text: str, name: str, body: str) -> str:
    start, end = f"<!-- {name}:start -->\n", f"<!-- {name}:end -->"
    i, j = text.index(start) + len(start), text.index(end)
    return text[:i] + body + text[j:]


def test_the_docs_page_shows_the_catalogue_the_figures_and_the_setup() -> None:
    text = PAGE.read_text()
    assert _block(text, "catalogue") == catalogue_markdown(), (
        "docs/reliability.md is out of date: run python tests/test_reliability.py --write-docs"
    )
    assert _block(text, "figures") == figures_markdown(), (
        "docs/reliability.md is out of date: run python tests/test_reliability.py --write-docs"
    )
    assert "```python\n" + SETUP + "```" in text
    for fault in FAULTS:
        assert fault in text
    for case in CASES:
        assert case.message.replace("|", "\\|") in text


def test_every_update_pattern_is_documented() -> None:
    messages = [c.message for c in CASES if c.section == "update"]
    for pattern in UPDATE_PATTERNS:
        assert any(re.search(pattern, m) for m in messages), pattern
    # ... and every documented update-time gradient/state error is recognised by the fuzz
    for case in CASES:
        if case.section == "update" and case.code.startswith("adam.update(G |"):
            assert any(re.search(p, case.message) for p in UPDATE_PATTERNS), case.code


# =========================================================================== validation
def test_validation_costs_metadata_only_and_little(capsys: pytest.CaptureFixture) -> None:
    """On the 148-tensor GPT-2 medium tree: the gradient checks of ``Leaves`` and the state
    checks of ``take`` cost well under 5 us per leaf (measured: a few hundred ns)."""
    names = [f"h{i}.{k}" for i in range(12) for k in range(12)] + ["wte", "wpe", "ln_f.w", "ln_f.b"]
    grads = {k: torch.ones(2) for k in names}
    state = {k: torch.zeros(2) for k in names}
    assert len(flatten(grads)[0]) == 148
    view = Leaves(grads)

    def best(fn: Callable[[], object], n: int = 50) -> float:
        times = []
        for _ in range(7):
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            times.append((time.perf_counter() - t0) / n)
        return min(times)

    def flat_only() -> object:
        leaves, _ = flatten(grads)
        return [x for x in leaves if x is not None]

    init = max(best(lambda: Leaves(grads)) - best(flat_only), 0.0)
    take = max(best(lambda: view.take(state)) - best(lambda: view.take(state, check=False)), 0.0)
    per_leaf = (init + take) / 148
    with capsys.disabled():
        print(f"\n[validation] Leaves {init * 1e6:.1f} us + take {take * 1e6:.1f} us per "
              f"148-leaf tree = {per_leaf * 1e9:.0f} ns per leaf")
    assert per_leaf < 5e-6


def test_validation_traces_under_compile_and_batches_under_vmap() -> None:
    P = {"w": torch.zeros(3), "b": torch.zeros(2)}
    tx = gc.chain(gc.clip_by_norm(1.0), gc.adam(1e-3))
    state = tx.init(P)
    grads = {"w": torch.ones(3), "b": torch.ones(2)}
    compiled = torch.compile(tx.update, fullgraph=True, backend="eager")
    out, _ = compiled(grads, state, P)
    torch.testing.assert_close(out, tx.update(grads, state, P)[0])
    # A bad input under fullgraph compile: dynamo reports it with the message inside.
    with pytest.raises(Exception, match=r"but mu\[\\?'w\\?'\] has shape \(3,\)"):
        compiled({"w": torch.ones(4), "b": torch.ones(2)}, state, P)
    # vmap: shapes are per example; batched state with shared (unbatched) gradients is fine
    batch = {k: torch.zeros(4, *v.shape) for k, v in P.items()}
    states = torch.func.vmap(tx.init)(batch)
    out, _ = torch.func.vmap(tx.update, in_dims=(None, 0, None))(grads, states, P)
    assert out["w"].shape == (4, 3)
    with pytest.raises(ValueError, match=r"has shape \(4,\) but mu\['w'\] has shape \(3,\)"):
        torch.func.vmap(tx.update)({"w": torch.ones(4, 4), "b": torch.ones(4, 2)}, states, batch)


def test_wider_state_is_fine_and_narrow_state_can_opt_out() -> None:
    """bfloat16 gradients into float32 moments are fine; a transformation whose state is
    narrower on purpose passes check=False (or dtype=False)."""
    P = {"w": torch.zeros(3, dtype=torch.bfloat16)}
    tx = gc.adam(1e-3)
    out, _ = tx.update({"w": torch.ones(3, dtype=torch.bfloat16)}, tx.init(P), P)
    assert out["w"].dtype == torch.bfloat16
    view = Leaves({"w": torch.ones(3, dtype=torch.float64)})
    narrow = {"w": torch.zeros(3, dtype=torch.bfloat16)}
    with pytest.raises(ValueError, match="which would round it"):
        view.take(narrow)
    assert view.take(narrow, dtype=False)[0] is narrow["w"]
    factored = {"w": torch.zeros(1)}
    assert view.take(factored, check=False)[0] is factored["w"]
    # an explicit, narrower accumulator is a choice, not a mismatch
    acc = gc.accumulate_every(2, accumulator_dtype=torch.bfloat16)
    acc.update({"w": torch.ones(3)}, acc.init({"w": torch.zeros(3)}))


# =========================================================================== fuzzing
FUZZ = settings(
    max_examples=settings.default.max_examples * FUZZ_MULTIPLIER,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much],
    deadline=None,
)
CORRUPTIONS = ("int", "bool", "complex", "sparse", "shape", "float64", "nontensor", "structure")


def _corrupt(grads: Any, kind: str, pick: int) -> Any:
    leaves, spec = flatten(grads)
    present = [i for i, g in enumerate(leaves) if g is not None]
    if kind == "structure":
        if isinstance(grads, dict) and grads:
            out = dict(grads)
            out.pop(sorted(out)[pick % len(out)])
            return out
        return {"unexpected": grads}
    if not present:
        return grads
    i = present[pick % len(present)]
    g = leaves[i]
    leaves = list(leaves)
    if kind == "int":
        leaves[i] = torch.zeros(g.shape, dtype=torch.int64)
    elif kind == "bool":
        leaves[i] = torch.zeros(g.shape, dtype=torch.bool)
    elif kind == "complex":
        leaves[i] = torch.zeros(g.shape, dtype=torch.complex64)
    elif kind == "sparse":
        leaves[i] = torch.zeros(g.shape, dtype=g.dtype).to_sparse()
    elif kind == "shape":
        leaves[i] = torch.zeros(g.numel() + 1, dtype=g.dtype)
    elif kind == "float64":
        leaves[i] = g.to(torch.float64) if g.dtype != torch.float64 else g.float()
    elif kind == "nontensor":
        leaves[i] = 0.5
    return optree.tree_unflatten(spec, leaves)


def _documented(err: BaseException) -> bool:
    return isinstance(err, (TypeError, ValueError)) and any(
        re.search(p, str(err)) for p in UPDATE_PATTERNS
    )


@st.composite
def _runs(draw: st.DrawFn, gated: bool) -> tuple[Any, Any, list[Any], list[dict[str, bool]]]:
    params = draw(gst.params(max_leaves=5))
    if gated:
        gate = draw(st.sampled_from(["skip", "loss_scale"]))
        head = (gc.skip_if_nonfinite() if gate == "skip"
                else gc.loss_scale(init_scale=draw(st.sampled_from([1.0, 8.0, 2.0**16])),
                                   growth_interval=draw(st.sampled_from([1, 2, 2000]))))
        members = gst.legal_members(
            draw(st.lists(gst.transformations(gates=True, combinators=False), max_size=3)),
            head=(head,))
        tx: Any = (gc.chain(head, *members), gate, members)
    else:
        tx = draw(gst.transformations(gates=True, combinators=True, max_depth=2))
    n = draw(st.integers(1, 4))
    grads = [draw(gst.gradients(params, none=True, extremes=True, nonfinite=True))
             for _ in range(n)]
    extras = [{"flush": draw(st.booleans())} for _ in range(n)]
    return params, tx, grads, extras


@FUZZ
@given(_runs(gated=False), st.sampled_from((None,) + CORRUPTIONS), st.integers(0, 100),
       st.integers(0, 3))
def test_fuzz_random_chains_raise_only_documented_errors(
    run: tuple[Any, Any, list[Any], list[dict[str, bool]]], corruption: str | None, pick: int,
    at: int,
) -> None:
    """Random trees (nested dicts/lists/tuples/NamedTuples, 0-dim and empty tensors, four
    float dtypes), random built-in chains (with masked/partition), gradients with None
    leaves, zeros, subnormal, huge, nan and inf values: no exception. With one corrupted
    gradient tree (integer, boolean, complex, sparse, wrong shape, wider dtype, non-tensor
    leaf, wrong structure): nothing but a documented TypeError/ValueError."""
    params, tx, grads, extras = run
    state = tx.init(params)
    for step, (g, extra) in enumerate(zip(grads, extras)):
        if corruption is not None and step == at % len(grads):
            bad = _corrupt(g, corruption, pick)
            try:
                tx.update(bad, state, params, **extra)
            except Exception as err:  # noqa: BLE001 - the point is which ones
                assert _documented(err), f"undocumented {type(err).__name__}: {err}"
            continue
        updates, state = tx.update(g, state, params, **extra)
        out_leaves, out_spec = flatten(updates)
        in_leaves, in_spec = flatten(g)
        assert out_spec == in_spec
        for u, x in zip(out_leaves, in_leaves):
            assert (u is None) == (x is None)
            if u is not None:
                assert u.shape == x.shape and u.dtype == x.dtype


def _large(dtype: torch.dtype) -> float:
    # The largest values for which no built-in's own arithmetic can overflow (squares in
    # Adam's moments, sums over a window, momentum, x2 scales, loss-scale back-off).
    return torch.finfo(dtype).max ** 0.25 / 16


def _float_leaves(tree: Any) -> list[torch.Tensor]:
    return [x for x in optree.tree_leaves(tree, none_is_leaf=True)
            if isinstance(x, torch.Tensor) and x.is_floating_point()]


def _all_finite(tree: Any) -> bool:
    return all(bool(torch.isfinite(x).all()) for x in _float_leaves(tree))


@FUZZ
@given(_runs(gated=True), st.booleans())
def test_fuzz_gated_chains_keep_nonfinite_values_out(
    run: tuple[Any, Any, list[Any], list[dict[str, bool]]], huge: bool
) -> None:
    """``chain(skip_if_nonfinite() or loss_scale(), *random built-ins)`` on gradients with
    nan, inf, zeros, subnormal values and empty tensors: the updates and every state leaf
    stay finite on every step (values up to finfo.max**0.25/16, so that no member's own
    arithmetic overflows). With values up to the dtype's maximum, nothing non-finite passes
    the gate: on a step whose gradients hold nan/inf the gate closes, the plain members
    after it keep their state bit for bit and the chain emits zeros (unless an
    accumulate_every after the gate closes its window on the micro-steps it already holds),
    and the gate's own state stays finite (the loss scale within float32)."""
    params, (tx, gate, members), grads, extras = run
    state = tx.init(params)
    for g, extra in zip(grads, extras):
        if not huge:
            g = optree.tree_map(
                lambda x: None if x is None else torch.where(
                    torch.isfinite(x), x.clamp(-_large(x.dtype), _large(x.dtype)), x),
                g, none_is_leaf=True)
        nonfinite = not all(bool(torch.isfinite(x).all()) for x in _float_leaves(g))
        before = state
        updates, state = tx.update(g, state, params, **extra)
        if not huge:
            assert _all_finite(updates), "a non-finite update got out"
        head_state = state[0]
        assert _all_finite(head_state)
        if gate == "loss_scale":
            assert F32.tiny <= float(head_state.scale) <= F32.max
        if nonfinite:
            assert not bool(head_state.is_open)
            # An accumulate_every after the gate drops this micro-step but may still close
            # its window, passing on the (finite) mean of the micro-steps it did accumulate;
            # the members before it keep their state bit for bit, and without it the chain
            # emits zeros and is not applied.
            absorbing = [isinstance(x, gc.AccumulateState) for x in state[1:]]
            upto = absorbing.index(True) if any(absorbing) else len(members)
            for member, old, new in zip(members[:upto], before[1:], state[1:]):
                if not is_gate(member):
                    _assert_same(old, new)
            if not any(absorbing):
                assert not bool(gc.applied(state))
                assert all(bool((x == 0).all()) for x in _float_leaves(updates))
        if not huge:
            assert _all_finite(state), "a non-finite value got into the state"


def _assert_same(a: Any, b: Any) -> None:
    la, sa = optree.tree_flatten(a, none_is_leaf=True)
    lb, sb = optree.tree_flatten(b, none_is_leaf=True)
    assert sa == sb
    for x, y in zip(la, lb):
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and x.shape == y.shape
            if x.is_floating_point():
                assert torch.equal(x.isnan(), y.isnan())
                x, y = torch.nan_to_num(x, 0.0), torch.nan_to_num(y, 0.0)
            assert torch.equal(x, y)
        else:
            assert x == y


# =========================================================================== transactions
DT = torch.float64


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=gen, dtype=DT))
            for s in ((3, 2), (2,), (4,), (2, 2))]


def _set_grads(params: list[torch.nn.Parameter], i: int) -> None:
    gen = torch.Generator().manual_seed(100 + i)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=DT)


class FailingAdam(torch.optim.Adam):
    """Adam whose step, when armed, updates the first param group (params and state) and
    changes the second group's lr, then raises: a fault in the middle of the wrapped step."""

    armed: BaseException | None = None

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        if self.armed is None:
            return super().step(closure)
        groups = self.param_groups
        self.param_groups = groups[:1]
        try:
            super().step(closure)
        finally:
            self.param_groups = groups
        groups[1]["lr"] = 123.0
        raise self.armed


def _failing_opt(params: list[torch.nn.Parameter], tx: Any = None, **kw: Any) -> Any:
    inner = FailingAdam([{"params": params[:2]}, {"params": params[2:]}], lr=0.05)
    tx = tx or gc.chain(gc.accumulate_every(2), gc.clip_by_norm(0.5))
    kw.setdefault("transactional", True)  # the opt-in undo these tests are about
    return gc.ChainedOptimizer(inner, tx, **kw)


def _everything(opt: Any) -> dict[str, Any]:
    """Params, their grads, the transformation state, the wrapped optimizer's state and
    groups, as plain cloned data."""
    params = [p for g in opt.param_groups for p in g["params"]]
    return {
        "params": [p.detach().clone() for p in params],
        "grads": [None if p.grad is None else p.grad.clone() for p in params],
        "grad_ids": [id(p.grad) for p in params],
        "tx": gc.to_state_dict(opt.tx_state),
        "opt": optree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x,
                               opt.optimizer.state_dict()),
        # tensors are restored in place (references held elsewhere stay valid)
        "state_ids": {id(p): {k: id(v) for k, v in s.items() if isinstance(v, torch.Tensor)}
                      for p, s in opt.state.items()},
        "applied": opt.last_step_applied,
    }


def _assert_everything_same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        _assert_same(a[key], b[key])


@pytest.mark.parametrize("first_step", [False, True], ids=["steady", "first-step"])
@pytest.mark.parametrize("fault", [RuntimeError("injected"), KeyboardInterrupt()],
                         ids=["error", "interrupt"])
def test_a_wrapped_step_that_fails_halfway_is_undone(
    first_step: bool, fault: BaseException
) -> None:
    params = _params()
    opt = _failing_opt(params)
    ref_params = _params()
    ref = _failing_opt(ref_params)
    start = 0 if first_step else 4  # 4 calls: 2 applied windows
    for i in range(start):
        for o, ps in ((opt, params), (ref, ref_params)):
            _set_grads(ps, i)
            o.step()
    _set_grads(params, start)
    opt.step()  # a micro-step (windows of 2); the next call applies
    _set_grads(params, start + 1)
    before = _everything(opt)
    opt.optimizer.armed = fault
    with pytest.raises(type(fault)):
        opt.step()
    _assert_everything_same(_everything(opt), before)
    # a retry goes through and equals a run that never failed
    opt.optimizer.armed = None
    opt.step()
    for i in (start, start + 1):
        _set_grads(ref_params, i)
        ref.step()
    for p, r in zip(params, ref_params):
        assert torch.equal(p, r)
    _assert_same(gc.to_state_dict(opt.tx_state), gc.to_state_dict(ref.tx_state))
    _assert_same(opt.optimizer.state_dict(), ref.optimizer.state_dict())


def test_without_transactions_a_failing_wrapped_step_leaves_its_partial_update() -> None:
    """What ``transactional=False`` (the default) gives up: a wrapped step that fails halfway
    stays half done, as with torch.optim itself."""
    params = _params()
    opt = _failing_opt(params, gc.clip_by_norm(0.5), transactional=False)
    _set_grads(params, 0)
    before = [p.detach().clone() for p in params]
    opt.optimizer.armed = RuntimeError("injected")
    with pytest.raises(RuntimeError):
        opt.step()
    changed = [not torch.equal(p, b) for p, b in zip(params, before)]
    assert changed == [True, True, False, False]
    assert opt.param_groups[1]["lr"] == 123.0


def test_a_closure_that_fails_after_touching_grads_in_place_is_undone() -> None:
    params = _params()
    opt = _failing_opt(params)
    for i in range(3):
        _set_grads(params, i)
        opt.step()
    _set_grads(params, 3)
    before = _everything(opt)

    def closure() -> torch.Tensor:
        opt.zero_grad(set_to_none=False)  # zeroes the existing .grad in place
        loss = sum((p * p).sum() for p in params)
        loss.backward()  # accumulates into them in place
        raise ValueError("data loader failed")

    with pytest.raises(ValueError, match="data loader"):
        opt.step(closure)
    _assert_everything_same(_everything(opt), before)


class _Boom(Exception):
    pass


def _raising(after: int) -> gc.GradientTransformation:
    """A transformation that raises on its ``after``-th call."""
    calls = {"n": 0}

    def init(params: Any) -> gc.EmptyState:
        return gc.EmptyState()

    def update(updates: Any, state: Any, params: Any = None, **extra: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == after:
            raise _Boom("transformation failed")
        return updates, state

    return gc.GradientTransformation(init, update)


def test_a_transformation_or_should_commit_that_fails_is_undone() -> None:
    params = _params()
    # accumulate_every runs (and accumulates) before the failing member on call 4
    opt = _failing_opt(params, gc.chain(gc.accumulate_every(3), gc.trace(0.9), _raising(2)))
    for i in range(6):
        _set_grads(params, i)
        before = _everything(opt)
        try:
            opt.step()
        except _Boom:
            _assert_everything_same(_everything(opt), before)
            break
    else:
        pytest.fail("the transformation never raised")
    answers = iter([True])

    def should_commit() -> bool:
        if next(answers, None) is None:
            raise ConnectionError("lighthouse unreachable")
        return True

    params = _params()
    opt = _failing_opt(params, gc.clip_by_norm(0.5), should_commit=should_commit)
    _set_grads(params, 0)
    opt.step()
    _set_grads(params, 1)
    before = _everything(opt)
    with pytest.raises(ConnectionError):
        opt.step()
    _assert_everything_same(_everything(opt), before)


def test_lbfgs_whose_closure_fails_on_a_later_evaluation_is_undone() -> None:
    params = _params()
    opt = gc.ChainedOptimizer(torch.optim.LBFGS(params, lr=0.5, max_iter=5),
                              gc.clip_by_norm(10.0), transactional=True)
    calls = {"n": 0, "fail_at": None}

    def closure() -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == calls["fail_at"]:
            raise RuntimeError("evaluation failed")
        opt.zero_grad()
        loss = sum(((p - 1.0) ** 2).sum() for p in params)
        loss.backward()
        return loss

    opt.step(closure)
    before = _everything(opt)
    calls["fail_at"] = calls["n"] + 3  # the third evaluation of the next step
    with pytest.raises(RuntimeError, match="evaluation failed"):
        opt.step(closure)
    _assert_everything_same(_everything(opt), before)


# =========================================================================== long runs
def _saturated(state: Any) -> None:
    for x in optree.tree_leaves(state, none_is_leaf=True):
        if isinstance(x, torch.Tensor) and x.dtype == torch.int64:
            assert int(x) >= 0


def test_counters_saturate_at_int64_max_instead_of_wrapping() -> None:
    P = {"w": torch.zeros(2)}
    g = {"w": torch.ones(2)}
    nan = {"w": torch.tensor([float("nan"), 1.0])}
    near = torch.tensor(INT64_MAX - 1)

    skip = gc.skip_if_nonfinite()
    s = skip.init(P)._replace(consecutive_skips=near.clone(), total_skips=near.clone())
    for _ in range(3):
        _, s = skip.update(nan, s)
    assert int(s.consecutive_skips) == int(s.total_skips) == INT64_MAX

    for tx, field in ((gc.scale_by_adam(), "count"), (gc.trace(0.9), "count"),
                      (gc.scale_by_learning_rate(gc.constant_schedule(0.1)), "count")):
        s = tx.init(P)._replace(count=near.clone())
        for _ in range(3):
            out, s = tx.update(g, s, P)
            assert bool(torch.isfinite(out["w"]).all())
        assert int(getattr(s, field)) == INT64_MAX

    # accumulate_every with the longest window: counters near the limit close it exactly
    acc = gc.accumulate_every(INT64_MAX)
    s = acc.init(P)._replace(mini_step=torch.tensor(INT64_MAX - 2),
                             accumulated=torch.tensor(INT64_MAX - 2))
    _, s = acc.update(g, s)
    assert int(s.mini_step) == INT64_MAX - 1 and not bool(gc.applied(s))
    out, s = acc.update(g, s)
    assert bool(gc.applied(s)) and int(s.mini_step) == 0 and int(s.accumulated) == 0
    assert bool(torch.isfinite(out["w"]).all())

    # the loss-scale growth tracker
    ls = gc.loss_scale(init_scale=4.0, growth_interval=INT64_MAX)
    s = ls.init(P)._replace(growth_tracker=torch.tensor(INT64_MAX))
    _, s = ls.update(g, s)
    assert int(s.growth_tracker) == 0 and float(s.scale) == 8.0  # grew, no wrap
    _saturated(s)


def test_loss_scale_stays_within_float32() -> None:
    P = {"w": torch.zeros(2)}
    g = {"w": torch.ones(2)}
    inf = {"w": torch.tensor([float("inf"), 1.0])}
    # growth stops below float32's max instead of reaching inf
    ls = gc.loss_scale(init_scale=2.0**126, growth_interval=1)
    s = ls.init(P)
    for _ in range(5):
        _, s = ls.update(g, s)
    assert float(s.scale) == 2.0**127 and math.isfinite(float(s.scale))
    # the floor is respected
    ls = gc.loss_scale(init_scale=2.0**4, min_scale=1.0)
    s = ls.init(P)
    for _ in range(50):
        _, s = ls.update(inf, s)
    assert float(s.scale) == 1.0
    # without a floor the scale stops at the smallest normal float32, never 0, and recovers
    ls = gc.loss_scale(growth_interval=1)
    s = ls.init(P)
    for _ in range(400):
        _, s = ls.update(inf, s)
    assert float(s.scale) == F32.tiny
    out, s = ls.update(g, s)
    assert bool(gc.applied(s)) and float(s.scale) == 2 * F32.tiny
    assert bool(torch.isfinite(out["w"]).all())


# =========================================================================== checkpoints
def test_checkpoint_load_refuses_a_pickle_that_would_run_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    raw, zipped = tmp_path / "raw.pt", tmp_path / "zipped.pt"
    write_malicious(raw, marker)
    torch.save({"model": {"w": torch.zeros(1)}, "extra": Malicious(marker)}, zipped)
    for path in (raw, zipped):
        with pytest.raises(pickle.UnpicklingError, match="refused.*nothing in it was executed"):
            gc.checkpoint.load(path)
        assert not marker.exists()
    # the files really are exploits: an unsafe load runs the command
    torch.load(zipped, weights_only=False)
    assert marker.exists()


def test_checkpoint_round_trips_both_states_and_ignores_torn_temp_files(tmp_path: Path) -> None:
    params = _params()
    opt = _failing_opt(params)
    for i in range(3):
        _set_grads(params, i)
        opt.step()
    tx = gc.chain(gc.loss_scale(), gc.accumulate_every(2), gc.adam(1e-3))
    P = {"w": torch.zeros(3, dtype=DT)}
    state = tx.update({"w": torch.ones(3, dtype=DT)}, tx.init(P), P)[1]
    path = tmp_path / "ckpt.pt"
    gc.checkpoint.save(path, {"opt": opt.state_dict(), "tx": gc.to_state_dict(state)})
    # a torn temporary file from a save that was killed half-way
    (tmp_path / ".ckpt.pt.abc123.tmp").write_bytes(path.read_bytes()[:100])
    loaded = gc.checkpoint.load(path)
    torch.load(path, weights_only=True)  # plain torch loads it safely too
    _assert_same(gc.from_state_dict(state, loaded["tx"]), state)
    opt2 = _failing_opt(_params(1))
    opt2.load_state_dict(loaded["opt"])
    _assert_same(opt2.state_dict(), opt.state_dict())
    gc.checkpoint.save(path, {"again": torch.ones(1)})  # saving over it still works
    assert torch.equal(gc.checkpoint.load(path)["again"], torch.ones(1))
    assert sorted(x.name for x in tmp_path.iterdir()) == [".ckpt.pt.abc123.tmp", "ckpt.pt"]


def _spawn(*args: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, str(HERE / "_crash_worker.py"), *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )


def _kill_when(proc: subprocess.Popen[str], line: str, timeout: float = 120.0) -> list[str]:
    """Read the worker's output until ``line``, then SIGKILL it; returns what it printed."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    for out in proc.stdout:
        seen.append(out.strip())
        if out.strip() == line:
            proc.send_signal(signal.SIGKILL)
            break
        assert time.monotonic() < deadline, seen[-5:]
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, seen[-5:]
    return seen


def test_sigkill_during_training_and_during_a_save_then_resume_is_bit_identical(
    tmp_path: Path,
) -> None:
    """A training run checkpoints every 4 steps. It is killed (SIGKILL) in the middle of
    a save, between writing the temporary file and renaming it: the previous checkpoint
    is still there and loads. The run resumes from it, is killed again at an arbitrary
    step, resumes again and finishes: the result equals an uninterrupted run bit for bit
    (params, functional state, ChainedOptimizer state, scheduler)."""
    from _crash_worker import train

    steps, every = 30, 4
    rng = random.Random(7)
    save_kill = every * rng.randint(2, 4)  # a save to die in: 8, 12 or 16
    step_kill = rng.randint(save_kill + 1, steps - 3)  # then an arbitrary step after it
    (tmp_path / "ref").mkdir()
    reference = train(tmp_path / "ref", steps, every)
    run = tmp_path / "run"
    run.mkdir()

    seen = _kill_when(_spawn(str(run), "--steps", str(steps), "--every", str(every),
                             "--slow-save-at", str(save_kill)), f"renaming {save_kill}")
    assert f"saved {save_kill - every}" in seen
    temps = [x for x in run.iterdir() if x.name.endswith(".tmp")]
    assert len(temps) == 1  # the new checkpoint, written but never renamed
    assert gc.checkpoint.load(run / "ckpt.pt")["step"] == save_kill - every  # previous one

    seen = _kill_when(_spawn(str(run), "--steps", str(steps), "--every", str(every),
                             "--resume"), f"step {step_kill}")
    assert seen[0] == f"step {save_kill - every}"  # resumed where the checkpoint was
    last = gc.checkpoint.load(run / "ckpt.pt")["step"]
    assert last <= step_kill + 1 and last % every == 0

    final = train(run, steps, every, resume=True)
    assert final["step"] == steps
    _assert_same(final, reference)


if __name__ == "__main__":
    import conftest  # noqa: F401 - registers the hypothesis profiles

    if "--write-docs" in sys.argv:
        text = PAGE.read_text()
        text = _replace_block(text, "catalogue", catalogue_markdown())
        text = _replace_block(text, "figures", figures_markdown())
        PAGE.write_text(text)
        print(f"wrote {PAGE}")
    else:
        print(catalogue_markdown())
        print(figures_markdown())
