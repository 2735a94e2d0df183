"""Update rules: the pure twin of each ``torch.optim`` algorithm, one module per algorithm
(``sgd.py``: ``trace``, ``sgd``; ``adam.py``: ``scale_by_adam``, ``adam``, ``adamw``;
``adagrad.py``, ``adadelta.py``, ``adamax.py``, ``nadam.py``, ``radam.py``, ``rmsprop.py``,
``rprop.py``, ``asgd.py``, ``adafactor.py``, ``muon.py``: ``scale_by_<name>``, ``<name>``;
rules torch does not ship: ``lion.py``, ``lamb.py``, ``lars.py``, ``schedule_free.py``;
and ``from_torch.py``, any ``torch.optim.Optimizer`` as a transformation), each
with its building blocks, its torch-named alias (a short :func:`gradchain.chain` of
blocks) and its binding to torch's own kernel for :func:`gradchain.update_and_apply_`
(see :mod:`gradchain.optim._fused`).

The aliases take ``torch.optim``'s argument names and defaults and follow the same
trajectories: the loop

.. code-block:: python

    updates, state = tx.update(grads, state, params)
    params = gc.apply_updates(params, updates)

matches ``torch.optim.SGD`` / ``Adam`` / ``AdamW`` on the same gradients to float
rounding (float32 rtol 1e-5, float64 rtol 1e-12 after 100 steps; tested). They output
*updates* (``-lr * direction``) to be added to the parameters.

Conventions shared by everything here:

* The maths runs on flat leaf lists, grouped by (device, dtype), with ``torch._foreach_*``
  kernels where they can serve (see :mod:`gradchain._ops`). Scalars (bias corrections,
  scheduled learning rates) are 0-dim tensors cast to each group's dtype, like the Python
  scalars ``torch.optim`` passes to its kernels.
* Moments and momentum buffers have the parameter's dtype for float32/float64 (as in
  ``torch.optim``) and float32 for float16/bfloat16 parameters; the maths runs in that
  dtype and the updates come out in the gradient's dtype.
* Counters are int64 0-dim tensors on the device of the first parameter. A
  transformation's ``count`` advances on every step its ``update`` runs (closed gate
  steps do not run it, see :func:`gradchain.chain`).
* A ``None`` gradient passes through as ``None`` and its moments / buffers keep their
  value bit for bit.

**Deliberate differences from torch.optim.** ``torch.optim`` keeps one ``step`` per
parameter, gradchain one ``count`` per transformation (as optax does). They agree whenever
every parameter gets a gradient on every step. For a parameter whose gradient is ``None``
on some steps, torch bias-corrects it with its own step count (Adam) and starts its
momentum buffer from a copy of its first gradient (SGD, which matters only with
``dampening != 0``); gradchain uses the shared count. Also, float16/bfloat16 parameters
get float32 moments (torch keeps them in the parameter dtype). A step on which every
gradient is ``None`` still advances ``count`` (torch would advance no parameter's step).
"""

from gradchain.optim.adadelta import ScaleByAdadeltaState, adadelta, scale_by_adadelta
from gradchain.optim.adafactor import ScaleByAdafactorState, adafactor, scale_by_adafactor
from gradchain.optim.adagrad import ScaleByAdagradState, adagrad, scale_by_adagrad
from gradchain.optim.adam import ScaleByAdamState, adam, adamw, scale_by_adam
from gradchain.optim.adamax import ScaleByAdamaxState, adamax, scale_by_adamax
from gradchain.optim.asgd import ScaleByAsgdState, asgd, scale_by_asgd
from gradchain.optim.from_torch import FromTorchState, from_torch
from gradchain.optim.lamb import lamb
from gradchain.optim.lars import lars
from gradchain.optim.lion import ScaleByLionState, lion, scale_by_lion
from gradchain.optim.muon import ScaleByMuonState, muon, scale_by_muon
from gradchain.optim.nadam import ScaleByNadamState, nadam, scale_by_nadam
from gradchain.optim.radam import ScaleByRadamState, radam, scale_by_radam
from gradchain.optim.rmsprop import ScaleByRmspropState, rmsprop, scale_by_rmsprop
from gradchain.optim.rprop import ScaleByRpropState, rprop, scale_by_rprop
from gradchain.optim.schedule_free import (
    ScheduleFreeState,
    schedule_free_adamw,
    schedule_free_eval_params,
    schedule_free_sgd,
)
from gradchain.optim.sgd import TraceState, sgd, trace

__all__ = [
    "ScaleByAdadeltaState",
    "ScaleByAdafactorState",
    "ScaleByAdagradState",
    "ScaleByAdamaxState",
    "ScaleByAsgdState",
    "ScaleByMuonState",
    "ScaleByNadamState",
    "ScaleByRadamState",
    "ScaleByRmspropState",
    "ScaleByRpropState",
    "adadelta",
    "adafactor",
    "adagrad",
    "adamax",
    "asgd",
    "muon",
    "nadam",
    "radam",
    "rmsprop",
    "rprop",
    "scale_by_adadelta",
    "scale_by_adafactor",
    "scale_by_adagrad",
    "scale_by_adamax",
    "scale_by_asgd",
    "scale_by_muon",
    "scale_by_nadam",
    "scale_by_radam",
    "scale_by_rmsprop",
    "scale_by_rprop",
    "ScaleByAdamState",
    "TraceState",
    "adam",
    "adamw",
    "scale_by_adam",
    "sgd",
    "trace",
    # rules torch does not ship (docs/optimizers-modern.md)
    "ScaleByLionState",
    "scale_by_lion",
    "lion",
    "lamb",
    "lars",
    "ScheduleFreeState",
    "schedule_free_adamw",
    "schedule_free_sgd",
    "schedule_free_eval_params",
    # any torch.optim.Optimizer as a transformation
    "FromTorchState",
    "from_torch",
]
