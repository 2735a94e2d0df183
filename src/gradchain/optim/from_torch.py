"""Any ``torch.optim.Optimizer`` (torch's or a third party's) as a gradient transformation.

:func:`from_torch` runs the optimizer class itself, on copies: every ``update`` builds a
fresh optimizer over copies of the params, puts the state kept in :class:`FromTorchState`
into it, sets copies of the gradients as ``.grad``, calls ``step()`` and returns
``updates = new_params - params`` and the optimizer's new state, read back into plain
tensors. Nothing of the optimizer outlives the call, so ``update`` is a pure function of
its inputs (same inputs, same outputs; inputs never modified), the state is data (saved by
:func:`~gradchain.to_state_dict`, loaded with ``torch.load(weights_only=True)``), and the
optimizer can sit in a chain behind clipping, gates or ``partition``.

**Exactness.** The optimizer's state and its new params are bit for bit those of the
optimizer object stepped live on the same gradients (it is the same code on the same
numbers). The updates are ``new - old`` rounded to the param dtype, and
:func:`~gradchain.apply_updates` adds them back: ``old + (new - old)`` is exactly ``new``
whenever ``new`` and ``old`` are within a factor 2 of each other with the same sign
(Sterbenz: the subtraction is then exact), i.e. for every element a step moves by less
than half its magnitude. An element that crosses zero or moves by more than half of
itself (a zero-initialised bias on its first steps, say) can come out one rounding away
from torch's value: there ``old + (new - old)`` is the correctly rounded sum, not
``new`` (at most one rounding of the sum away). Measured (tests/optim/test_from_torch.py,
params fed back from the live optimizer at each step, 17 elements x 100 steps): every
element bit-exact for Adam (lr 1e-2 and 1e-3), Adagrad, Rprop and SGD with momentum at
lr 1e-3, in float32 and float64; 2 of 1700 off by one rounding for AdamW(lr=0.1,
amsgrad), 2-3 for RMSprop(centered, momentum), 35-43 for SGD(lr=0.1, nesterov), all at
elements whose step crossed zero or more than halved them. The state is bit for bit the
optimizer's in every case.

**Exact params.** :func:`~gradchain.update_and_apply_` (the in-place training step) does
not add updates for this rule: it copies the optimizer's new params into the live ones,
so the params are bit for bit torch's in every case (tested over 30 steps of
``SGD(lr=0.1, nesterov)``, and behind ``skip_if_nonfinite``, ``clip_by_norm`` and
``accumulate_every`` against :class:`~gradchain.ChainedOptimizer` wrapping the optimizer).

**Where it cannot be pure in torch's sense.** The step is Python code on stateful
objects, with host reads (``.item()``, Python branches on counts) and in-place kernels:

* ``torch.compile``: ``update`` is never traced (``torch.compiler.disable``): with
  ``fullgraph=True`` compiling it, or a chain holding it, fails with dynamo's error, which
  gives the reason (naming ``from_torch``); without ``fullgraph`` it is a graph break and
  runs eagerly between the compiled graphs of the other members;
* ``torch.func`` transforms (``vmap`` ensembles, ``grad`` through ``update``): ``update``
  raises ``TypeError`` for functorch-wrapped inputs; the updates are not differentiable
  (they are computed on detached copies);
* it syncs with the device (the optimizer reads its step counts, and ``update`` reads
  which params already have state), and it costs a copy of the params, the gradients and
  the state per call, plus one construction of the optimizer;
* the state layout is taken from a first step on zero gradients that ``init`` runs on
  throwaway copies; an optimizer whose state gains entries after its first step (or
  changes a non-tensor value such as a string) makes ``update`` raise ``RuntimeError``.

All parameters form one param group; per-group hyperparameters come from
:func:`~gradchain.partition` with one ``from_torch`` per group.

**LBFGS** (and any optimizer whose ``step`` needs a ``closure``) cannot be a gradient
transformation: it re-evaluates the loss several times per step. Wrap it instead, with
the gradient processing in front::

    opt = gc.ChainedOptimizer(torch.optim.LBFGS(model.parameters(), lr=1.0),
                              gc.clip_by_norm(1.0))
    def closure():
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss
    opt.step(closure)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import optree
import torch

from gradchain import _ops
from gradchain._tree import Leaves, flatten, flatten_like
from gradchain.base import GradientTransformation, Params, Updates, expect_state
from gradchain.optim._fused import FusedStep, bind_fused

__all__ = ["FromTorchState", "from_torch"]

_INT, _FLOAT, _BOOL, _TENSOR, _STATIC = "int", "float", "bool", "tensor", "static"


class FromTorchState(NamedTuple):
    """State of :func:`from_torch`: the wrapped optimizer's state as plain tensors.

    Attributes:
        count: int64 0-dim tensor, the number of updates done.
        has_state: 1-D bool tensor, one entry per param (the params tree's tensor leaves,
            ``None`` leaves left out, in ``optree`` leaf order, i.e. the order of the
            optimizer's one param group): whether the optimizer holds state for that param
            (it creates it on the first step the param has a gradient, as ``torch.optim``
            does).
        slots: a dict from path to tensor: every per-param state value
            (``"state/<i>/<key>"``, ``i`` the param's position in that order, e.g.
            ``"state/0/exp_avg"``) and every param-group
            value (``"group/<key>"``, e.g. ``"group/lr"``, ``"group/betas/0"``). Python
            numbers are stored as 0-dim tensors (int64, float64, bool) and given back to
            the optimizer as Python numbers of the same type; other non-tensor values
            (``None``, strings) are fixed and not stored. Entries of params without state
            hold zeros.

    Example:
        >>> import torch, gradchain as gc
        >>> state = gc.from_torch(torch.optim.Adam, lr=0.1).init({"w": torch.zeros(2)})
        >>> sorted(state.slots)[:4]
        ['group/amsgrad', 'group/betas/0', 'group/betas/1', 'group/capturable']
        >>> state.slots["state/0/exp_avg"], state.has_state
        (tensor([0., 0.]), tensor([False]))
    """

    count: torch.Tensor  # type: ignore[assignment]  # shadows tuple.count, as in optax
    has_state: torch.Tensor
    slots: dict[str, torch.Tensor]


class _Layout(NamedTuple):
    """The static description of an optimizer's state: its tree structure, and per leaf
    its key (or ``None`` when fixed), kind and, for fixed leaves, the value."""

    spec: Any
    keys: list[str | None]
    kinds: list[str]
    fixed: list[Any]


def _key(path: tuple[Any, ...]) -> str:
    return "/".join(str(k) for k in path)


def _kind(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return _TENSOR
    if isinstance(value, bool):
        return _BOOL
    if isinstance(value, int):
        return _INT
    if isinstance(value, float):
        return _FLOAT
    return _STATIC


def _snapshot(opt: torch.optim.Optimizer, copies: list[torch.Tensor], which: list[int]) -> Any:
    """The optimizer's mutable data as a tree: per-param state of the params ``which`` (by
    position) and the group values."""
    group = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
    state = {str(i): opt.state[copies[i]] for i in which}
    return {"state": state, "group": group}


def _layout_of(tree: Any) -> _Layout:
    paths, leaves, spec = optree.tree_flatten_with_path(tree, none_is_leaf=True)
    kinds = [_kind(v) for v in leaves]
    keys = [None if k == _STATIC else _key(p) for p, k in zip(paths, kinds)]
    fixed = [v if k == _STATIC else None for v, k in zip(leaves, kinds)]
    return _Layout(spec, keys, kinds, fixed)


def _as_tensor(value: Any, kind: str, device: torch.device) -> torch.Tensor:
    if kind == _TENSOR:
        return value.detach()
    dtype = {_INT: torch.int64, _FLOAT: torch.float64, _BOOL: torch.bool}[kind]
    return torch.tensor(value, dtype=dtype, device=device)


def _from_tensor(value: torch.Tensor, kind: str) -> Any:
    if kind == _TENSOR:
        return value.clone()
    if kind == _INT:
        return int(value)
    if kind == _FLOAT:
        return float(value)
    return bool(value)


def _is_traced(xs: list[Any]) -> bool:
    return any(
        isinstance(x, torch.Tensor) and torch._C._functorch.is_functorch_wrapped_tensor(x)
        for x in xs
    )


def from_torch(
    optimizer_class: type[torch.optim.Optimizer],
    *,
    setup: Callable[[torch.optim.Optimizer], Any] | None = None,
    **hyperparams: Any,
) -> GradientTransformation:
    """A gradient transformation that does what ``optimizer_class(params, **hyperparams)``
    does to the params, for any ``torch.optim.Optimizer`` subclass (torch's own or a third
    party's, e.g. ``heavyball``, ``lion_pytorch``).

    .. math:: u = \\mathrm{step}(p, g, s) - p, \\qquad s \\leftarrow s'

    where :math:`\\mathrm{step}` is the optimizer's ``step()`` on copies of the params
    :math:`p` with gradients :math:`g` and state :math:`s` (see the module docstring for
    the mechanism, exactness, and what it cannot do: ``torch.compile``, ``vmap``).

    A ``None`` gradient leaves its param out of the step (``.grad = None``, as in torch),
    its update is ``None`` and its state does not change. Gradients are cast to the
    param's dtype before the step; updates come out in the gradient's dtype.

    Args:
        optimizer_class: a subclass of ``torch.optim.Optimizer`` whose ``step()`` runs
            without a closure (not ``LBFGS``: see the module docstring).
        setup: optional callable run on every optimizer this transformation builds, right
            after construction (e.g. ``lambda opt: opt.train()`` for the ``schedulefree``
            optimizers, which refuse to step in eval mode).
        **hyperparams: the optimizer's keyword arguments (``lr``, ``betas``, ...).

    Returns:
        A :class:`~gradchain.GradientTransformation` with state :class:`FromTorchState`.
        ``init`` and ``update`` need the params.

    Raises:
        TypeError: ``optimizer_class`` is not a ``torch.optim.Optimizer`` subclass; at
            ``update``, under a ``torch.func`` transform (and ``torch.compile`` with
            ``fullgraph=True`` refuses to trace it, with a message naming ``from_torch``).
        ValueError: ``optimizer_class`` is ``LBFGS``; invalid hyperparameters (the
            optimizer's own error, raised here, before any state exists).

    Example:
        >>> import torch, gradchain as gc
        >>> tx = gc.chain(gc.clip_by_norm(1.0), gc.from_torch(torch.optim.RMSprop, lr=0.01))
        >>> params = {"w": torch.tensor([1.0, -1.0])}
        >>> state = tx.init(params)
        >>> updates, state = tx.update({"w": torch.tensor([3.0, -4.0])}, state, params)
        >>> gc.apply_updates(params, updates)["w"]
        tensor([ 0.9000, -0.9000])
    """
    if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, torch.optim.Optimizer)):
        raise TypeError(
            "from_torch: optimizer_class must be a torch.optim.Optimizer subclass (the class, "
            f"not an instance), got {optimizer_class!r}"
        )
    name = f"from_torch({optimizer_class.__name__})"
    if issubclass(optimizer_class, torch.optim.LBFGS):
        raise ValueError(
            f"{name}: LBFGS needs a closure that re-evaluates the loss, which a gradient "
            "transformation cannot call; wrap it instead: gc.ChainedOptimizer("
            "torch.optim.LBFGS(model.parameters()), transform) and opt.step(closure)"
        )
    if setup is not None and not callable(setup):
        raise TypeError(f"{name}: setup must be a callable taking the optimizer")

    def build(copies: list[torch.Tensor]) -> torch.optim.Optimizer:
        opt = optimizer_class(copies, **hyperparams)
        if setup is not None:
            setup(opt)
        return opt

    # Validate the hyperparameters now, with the optimizer's own checks.
    build([torch.zeros(1, requires_grad=True)])

    layouts: dict[Any, tuple[_Layout, dict[str, torch.Tensor], dict[str, Any], Any]] = {}

    def copies_of(ps: list[torch.Tensor]) -> list[torch.Tensor]:
        return [p.detach().clone().requires_grad_(True) for p in ps]

    def layout_for(
        ps: list[torch.Tensor],
    ) -> tuple[_Layout, dict[str, torch.Tensor], dict[str, Any], Any]:
        """The state layout (from a first step on zero gradients, on throwaway copies), a
        zero tensor per stored key, and the group values before any step (by path, and as
        the snapshot tree); cached per
        (shape, dtype, device) signature of the params (a cache of constants: no state)."""
        sig = tuple((tuple(p.shape), p.dtype, p.device) for p in ps)
        if sig not in layouts:
            before = _snapshot(build(copies_of(ps)), [], [])
            probe = copies_of(ps)
            opt = build(probe)
            for p in probe:
                p.grad = torch.zeros_like(p)
            opt.step()
            tree = _snapshot(opt, probe, list(range(len(ps))))
            layout = _layout_of(tree)
            values = optree.tree_leaves(tree, none_is_leaf=True)
            zeros = {
                key: torch.zeros_like(_as_tensor(v, kind, ps[0].device))
                for key, kind, v in zip(layout.keys, layout.kinds, values)
                if key is not None
            }
            paths, leaves, _ = optree.tree_flatten_with_path(before, none_is_leaf=True)
            start = {_key(p): v for p, v in zip(paths, leaves)}
            layouts[sig] = (layout, zeros, start, before)
        return layouts[sig]

    def present(params: Params) -> tuple[list[Any], Any, list[int]]:
        leaves, spec = flatten(params)
        return leaves, spec, [i for i, p in enumerate(leaves) if p is not None]

    def init(params: Params) -> FromTorchState:
        if params is None:
            raise ValueError(f"{name}.init: params is None; from_torch builds the optimizer on them")
        leaves, _, idx = present(params)
        ps = [leaves[i] for i in idx]
        device = ps[0].device if ps else torch.device("cpu")
        slots: dict[str, torch.Tensor] = {}
        if ps:
            layout, zeros, start, _ = layout_for(ps)
            for key, kind in zip(layout.keys, layout.kinds):
                if key is None:
                    continue
                zero = zeros[key]
                value = start.get(key)
                # The group values the optimizer starts with; zeros where they appear only
                # with the first step (the state of each param starts absent: has_state).
                if value is not None and _kind(value) == kind:
                    value = _as_tensor(value, kind, device)
                    if value.shape == zero.shape and value.dtype == zero.dtype:
                        slots[key] = value.clone()
                        continue
                slots[key] = zero.clone()
        return FromTorchState(
            count=torch.zeros((), dtype=torch.int64, device=device),
            has_state=torch.zeros(len(ps), dtype=torch.bool, device=device),
            slots=slots,
        )

    def eager_update(
        updates: Updates, state: FromTorchState, params: Params | None = None, **extra: Any
    ) -> tuple[Updates, FromTorchState]:
        expect_state(state, FromTorchState, name)
        if params is None:
            raise ValueError(
                f"{name}: params is None; the optimizer steps copies of the params, call "
                "tx.update(grads, state, params)"
            )
        Leaves(updates)  # validates the gradient leaves (dense floating tensors or None)
        leaves, spec, idx = present(params)
        grads = flatten_like(spec, updates, "updates", "the params")
        if _is_traced(leaves) or _is_traced(grads) or _is_traced(list(state.slots.values())):
            raise TypeError(
                f"{name}: cannot run under torch.func transforms (vmap, grad, ...): it steps "
                f"a stateful {optimizer_class.__name__} on plain copies of the params; use "
                "one transformation per ensemble member, or a gradchain rule"
            )
        if not idx:
            return updates, state
        if any(g is not None for i, g in enumerate(grads) if leaves[i] is None):
            raise ValueError(f"{name}: a gradient arrived for a params leaf that is None")
        ps = [leaves[i] for i in idx]
        gs = [grads[i] for i in idx]
        copies, new_state = step_copies(ps, gs, state)
        out = list(grads)
        with torch.no_grad():
            for k, i in enumerate(idx):
                g = grads[i]
                if g is not None:
                    out[i] = (copies[k].detach() - ps[k].detach()).to(g.dtype)
        return optree.tree_unflatten(spec, out), new_state

    def step_copies(
        ps: list[torch.Tensor], gs: list[Any], state: FromTorchState
    ) -> tuple[list[torch.Tensor], FromTorchState]:
        """Step a fresh optimizer on copies of ``ps`` with gradients ``gs`` (``None``
        where absent) from ``state``; the stepped copies and the new state."""
        layout, _, _, before = layout_for(ps)
        if state.has_state.shape != (len(ps),):
            raise ValueError(
                f"{name}: the state was made for {state.has_state.numel()} params, got "
                f"{len(ps)}; use tx.init(params) with these params"
            )
        copies = copies_of(ps)
        opt = build(copies)
        has_state = [bool(h) for h in state.has_state.tolist()]
        if int(state.count) > 0:
            values = [
                layout.fixed[j] if key is None else _from_tensor(state.slots[key], kind)
                for j, (key, kind) in enumerate(zip(layout.keys, layout.kinds))
            ]
            tree = optree.tree_unflatten(layout.spec, values)
            opt.param_groups[0].update(tree["group"])
            for i, p in enumerate(copies):
                if has_state[i]:
                    opt.state[p] = tree["state"][str(i)]
        else:
            # Before the first step the optimizer has no per-param state and its group is
            # the constructed one: give it the group values the state holds (a changed lr).
            opt.param_groups[0].update(_group_before(layout, state.slots, before["group"]))
        for p, g in zip(copies, gs):
            p.grad = None if g is None else g.detach().to(dtype=p.dtype, copy=True)
        opt.step()

        new_has = [has_state[i] or len(opt.state.get(p, {})) > 0 for i, p in enumerate(copies)]
        which = [i for i, h in enumerate(new_has) if h]
        snap = _snapshot(opt, copies, which)
        slots = dict(state.slots)
        _read_back(snap, layout, slots, new_has, int(state.count) + 1)
        return copies, FromTorchState(
            count=_ops.safe_increment(state.count),
            has_state=torch.tensor(new_has, dtype=torch.bool, device=state.has_state.device),
            slots=slots,
        )

    def plan(
        state: Any, p_leaves: list[Any], g_leaves: list[Any], spec: Any
    ) -> FusedStep | None:
        """Inside :func:`~gradchain.update_and_apply_`: the optimizer's new params are
        copied into the live params (bit for bit torch's), instead of adding updates."""
        if not isinstance(state, FromTorchState) or torch.compiler.is_compiling():
            return None
        idx = [i for i, p in enumerate(p_leaves) if p is not None]
        if not idx or _is_traced(p_leaves) or _is_traced(g_leaves):
            return None
        if any(g is not None for g, p in zip(g_leaves, p_leaves) if p is None):
            return None
        ps = [p_leaves[i] for i in idx]

        def step(grads: list[Any], keep: torch.Tensor | None) -> FromTorchState:
            if keep is not None and not bool(keep):  # a gate closed on device data: a sync
                return state
            Leaves(grads)
            copies, new_state = step_copies(ps, [grads[i] for i in idx], state)
            with torch.no_grad():
                for p, new, i in zip(ps, copies, idx):
                    if grads[i] is not None:
                        p.copy_(new)
            return new_state

        return step

    def _read_back(
        snap: Any, layout: _Layout, slots: dict[str, torch.Tensor], has: list[bool], step: int
    ) -> None:
        """Write the snapshot's values into ``slots`` (new dict, same keys), checking that
        the layout is the one of the first step."""
        paths, values, _ = optree.tree_flatten_with_path(snap, none_is_leaf=True)
        where = {_key(p): (v, _kind(v)) for p, v in zip(paths, values)}
        flat_keys = optree.tree_paths(optree.tree_unflatten(layout.spec, layout.kinds))
        expected = {_key(p) for p in flat_keys}
        for j, path in enumerate(flat_keys):
            key = _key(path)
            owner = key.split("/")[1] if key.startswith("state/") else None
            if owner is not None and not has[int(owner)]:
                continue
            if key not in where:
                raise RuntimeError(
                    f"{name}: after step {step} the optimizer has no {key!r}, which its first "
                    "step created; from_torch needs a state layout fixed from the first step"
                )
            value, kind = where[key]
            if kind != layout.kinds[j]:
                raise RuntimeError(
                    f"{name}: after step {step} the optimizer's {key!r} is a "
                    f"{type(value).__name__}, it was a {layout.kinds[j]} after the first step"
                )
            if kind == _STATIC:
                if not _same(value, layout.fixed[j]):
                    raise RuntimeError(
                        f"{name}: after step {step} the optimizer's {key!r} changed "
                        f"({layout.fixed[j]!r} -> {value!r}); from_torch stores only tensors "
                        "and numbers"
                    )
                continue
            old = slots[key]
            new = _as_tensor(value, kind, old.device)
            if new.shape != old.shape or new.dtype != old.dtype:
                raise RuntimeError(
                    f"{name}: after step {step} the optimizer's {key!r} has shape "
                    f"{tuple(new.shape)} and dtype {new.dtype}, the first step gave "
                    f"{tuple(old.shape)} and {old.dtype}"
                )
            slots[key] = new
        extra = sorted(set(where) - expected)
        if extra:
            raise RuntimeError(
                f"{name}: after step {step} the optimizer has state its first step did not "
                f"create ({', '.join(extra[:5])}); from_torch needs a state layout fixed from "
                "the first step"
            )

    # Never traced: under torch.compile(fullgraph=True) a call to it fails with this reason
    # (dynamo's error names it); without fullgraph it is a graph break and runs eagerly.
    not_traced = _disable(eager_update, f"{name} cannot run under torch.compile: {_NOT_TRACED}")

    def update(
        updates: Updates, state: FromTorchState, params: Params | None = None, **extra: Any
    ) -> tuple[Updates, FromTorchState]:
        return not_traced(updates, state, params, **extra)  # type: ignore[no-any-return]

    return bind_fused(GradientTransformation(init, update), plan)


_NOT_TRACED = (
    "it steps a stateful torch.optim.Optimizer on copies of the params (Python control "
    "flow, host reads, in-place kernels); compile the other members of the chain "
    "(fullgraph=False runs it eagerly between graphs), or wrap the optimizer in "
    "gc.ChainedOptimizer"
)
_DISABLE_TAKES_REASON = "reason" in inspect.signature(torch.compiler.disable).parameters


def _disable(fn: Callable[..., Any], reason: str) -> Callable[..., Any]:
    """``torch.compiler.disable(fn)``, with ``reason`` where this torch takes one."""
    if _DISABLE_TAKES_REASON:
        return torch.compiler.disable(fn, reason=reason)
    return torch.compiler.disable(fn)


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a is b or type(a) is type(b) and a == b)
    except Exception:  # a value whose == is not a bool
        return a is b


def _group_before(layout: _Layout, slots: dict[str, torch.Tensor], before: dict[str, Any]) -> Any:
    """The constructed group's values (``before``) with those stored in ``slots`` where the
    stored kind is the constructed value's (tuples such as ``betas`` element by element)."""
    kinds = {key: kind for key, kind in zip(layout.keys, layout.kinds) if key is not None}

    def stored(key: str, value: Any) -> Any:
        kind = kinds.get(key)
        if kind is None or kind == _STATIC or _kind(value) != kind or key not in slots:
            return value
        return _from_tensor(slots[key], kind)

    group: dict[str, Any] = {}
    for name, value in before.items():
        if isinstance(value, tuple):
            group[name] = tuple(stored(f"group/{name}/{j}", v) for j, v in enumerate(value))
        else:
            group[name] = stored(f"group/{name}", value)
    return group
