"""Gates: transformations that hold a step back (accumulation, non-finite skipping, loss scaling).

In ``chain(a, gate, b, c)`` a gate governs ``b`` and ``c``: on a step the gate closes they
keep their state and the chain emits zeros (see :func:`gradchain.chain`). Each gate's
state carries a 0-dim bool ``is_open``; :func:`gradchain.applied` combines them.

A gate receives the combined flag of the gates before it as the extra keyword
``gate_open`` (a 0-dim bool tensor, or ``None`` when every earlier gate is known open)
and keeps its own state on steps an earlier gate closed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from gradchain import _checks, _ops
from gradchain._ops import LOW_PRECISION, first_device, known_bool, known_int, safe_increment
from gradchain._tree import Leaves, named_nodes
from gradchain.base import (
    HOLDS,
    PASSIVE,
    UNSCALES,
    GradientTransformation,
    add_roles,
    donation,
    expect_state,
)
from gradchain.gating import (
    Window,
    expect_chain_state,
    gate_state,
    keep_where_closed,
    mark_gate,
    select_tree,
)
from gradchain.state import config_fields

__all__ = [
    "AccumulateState",
    "SkipIfNonfiniteState",
    "LossScaleState",
    "accumulate_every",
    "skip_if_nonfinite",
    "loss_scale",
    "scale_loss",
]

_F32_MAX = float(torch.finfo(torch.float32).max)
_F32_TINY = float(torch.finfo(torch.float32).tiny)


def _window_length(schedule: Callable[[torch.Tensor], Any], windows: torch.Tensor) -> torch.Tensor:
    """A window-length schedule's value at ``windows`` as an int64 0-dim tensor on the
    device of ``windows`` (the host): checked where it can be read for free, else rounded
    and clamped to ``>= 1`` (traced)."""
    value = schedule(windows)
    if isinstance(value, torch.Tensor):
        known = value.reshape(()) if value.numel() == 1 else value
        if (
            known.dim() == 0 and not torch.compiler.is_compiling()
            and not torch._C._functorch.is_functorch_wrapped_tensor(known)
            and known.device.type == "cpu"
        ):
            value = known.item()
        else:
            return torch.round(value.to(windows.device)).to(torch.int64).clamp(min=1)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) \
            or value < 1:
        raise ValueError(
            f"accumulate_every: the window-length schedule must give a whole number >= 1, got "
            f"{value!r} at window {int(windows)}"
        )
    return torch.full_like(windows, int(value))


# --------------------------------------------------------------------------- accumulate_every
@config_fields("every")
@gate_state(
    flags=("is_open", "nonempty"),
    host_flags=("is_open",),
    absorbs_upstream=True,
    window=Window(position="mini_step", length="length", sums="sums"),
)
class AccumulateState(NamedTuple):
    """State of :func:`accumulate_every`.

    Attributes:
        mini_step: calls taken in the current window, ``0 <= mini_step < length`` (int64,
            kept on the host so that the window position is known without reading the
            device).
        accumulated: micro-steps actually accumulated in the window (int64; smaller than
            ``mini_step`` only when an earlier gate dropped some micro-steps).
        sums: the running sums, shaped like the params, in the accumulator dtype.
        is_open: whether the last call closed the window (bool, host).
        nonempty: whether the closed window held at least one micro-step (bool).
        every: the fixed window length ``n``, or ``0`` when the length is a schedule
            (int64, host; configuration: a checkpoint of one does not load into the other).
        length: the length of the current window (int64, host): ``n``, or the schedule's
            value at ``windows``; so that code holding only the state (e.g.
            ``ChainedOptimizer.no_sync``) knows when the window closes.
        windows: windows closed so far (int64, host; optax's ``gradient_step``), the
            argument of a window-length schedule.

    Example:
        >>> import torch, gradchain as gc
        >>> tx = gc.accumulate_every(3)
        >>> params = {"w": torch.zeros(1)}
        >>> _, state = tx.update({"w": torch.ones(1)}, tx.init(params))
        >>> int(state.mini_step), int(state.length), int(state.windows), state.sums
        (1, 3, 0, {'w': tensor([1.])})
    """

    mini_step: torch.Tensor
    accumulated: torch.Tensor
    sums: Any
    is_open: torch.Tensor
    nonempty: torch.Tensor
    every: torch.Tensor
    length: torch.Tensor
    windows: torch.Tensor


def accumulate_every(
    n: int | Callable[[torch.Tensor], Any],
    mean: bool = True,
    accumulator_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    r"""Gate: accumulate ``n`` micro-steps and pass on their mean (or sum) every ``n``-th call.

    On calls ``1 .. n-1`` of a window it emits zeros and everything after it in a chain
    keeps its state; on call ``n`` it emits

    .. math:: \frac{1}{k}\sum_{i=1}^{k} g_i \quad (\texttt{mean=True}), \qquad \sum_i g_i \quad (\texttt{mean=False})

    where ``k`` is the number of micro-steps accumulated, and starts a new window. So an
    adam after it counts windows, not micro-steps. ``update(..., flush=True)`` closes a
    partial window early with the exact mean over its ``k < n`` micro-steps (e.g. the
    last, short window of an epoch).

    **Performance.** The window position ``mini_step`` is a host (CPU) int64 tensor, so
    in eager mode the chain knows, without a host-device sync, that a micro-step does not
    close the window and skips the rest of the chain entirely: a micro-step costs one
    add into the accumulator. Under ``torch.compile`` a chain branches on the position
    with ``torch.cond`` (read on the host, no sync): a micro-step runs the add and copies
    the later members' states, the closing call runs the rest of the chain (see
    :func:`~gradchain.chain`). Under ``vmap`` the position is data; the rest of the chain
    is then computed and discarded with ``torch.where`` (correct, but the tail costs its
    full price on every micro-step). If you move the state to an accelerator, the same
    happens; keep ``mini_step`` on the host. The zeros
    a micro-step emits take no memory: they are broadcast views of one 0-dim zero per
    (device, dtype), made once per run (read-only; ``clone()`` one before writing into
    it; a leaf of one element or none gets a fresh zero instead).

    **A schedule of window lengths.** ``n`` may be a callable of the number of windows
    closed so far (an int64 0-dim tensor, ``0`` for the first window) returning the length
    of the next window (an int, or a tensor holding an integer, ``>= 1``), as optax's
    ``MultiSteps(every_k_schedule=...)``: e.g. ``lambda w: 1 if w < 100 else 4`` or a
    :mod:`gradchain.schedules` schedule whose values are whole numbers. It is evaluated
    once per window, when the previous one closes, on the host count ``windows``, so the
    window position stays known without a device read and everything said above holds;
    ``length`` in the state is the current window's length. A value that is not a whole
    number ``>= 1`` raises ``ValueError`` where it can be read for free (eager mode);
    traced, it is rounded and clamped to ``>= 1``. The tail still advances once per
    window, and ``flush=True`` closes a partial window with the exact mean and starts the
    next one (its length is the schedule's value at the new window count).

    **Behind another gate.** After ``skip_if_nonfinite`` or ``loss_scale``, a micro-step
    that gate drops is not accumulated, but it still counts towards the window (the
    window closes every ``n`` calls, a count known without reading the device); the mean
    is over the micro-steps actually accumulated, and a window whose micro-steps were all
    dropped is not applied.

    A ``None`` gradient adds nothing. On the closing call it stays ``None`` (the update
    tree keeps the gradient's structure) and that leaf's sum is carried into the next
    window rather than dropped.

    Args:
        n: window length, an int ``>= 1``, or a schedule of it (see above).
        mean: pass on the mean (default) or the sum of the window.
        accumulator_dtype: dtype of the sums; by default float32 for float16/bfloat16
            params and the param dtype otherwise. Updates are cast back to the gradient dtype.

    Returns:
        A gate :class:`GradientTransformation` with :class:`AccumulateState`.

    Example:
        >>> import torch, gradchain as gc
        >>> tx = gc.accumulate_every(2)
        >>> params = {"w": torch.zeros(1)}
        >>> state = tx.init(params)
        >>> out, state = tx.update({"w": torch.tensor([1.0])}, state)
        >>> out["w"], bool(gc.applied(state))
        (tensor([0.]), False)
        >>> out, state = tx.update({"w": torch.tensor([3.0])}, state)
        >>> out["w"], bool(gc.applied(state))
        (tensor([2.]), True)

        Windows of 1 micro-step for the first 2 windows, then of 3:

        >>> tx = gc.accumulate_every(lambda windows: 1 if windows < 2 else 3)
        >>> state = tx.init(params)
        >>> opened = []
        >>> for _ in range(8):
        ...     _, state = tx.update({"w": torch.ones(1)}, state)
        ...     opened.append(int(gc.applied(state)))
        >>> opened, int(state.windows)
        ([1, 1, 0, 0, 1, 0, 0, 1], 4)
    """
    schedule: Callable[[torch.Tensor], Any] | None = None
    if callable(n) and not isinstance(n, torch.Tensor):
        schedule = n
    else:
        _checks.as_int(n, "n", "accumulate_every", "an int >= 1 or a schedule of the window count")
    if schedule is None and n < 1:  # type: ignore[operator]
        raise ValueError(f"accumulate_every: n must be >= 1, got {n}")
    _checks.as_bool(mean, "mean", "accumulate_every")
    if accumulator_dtype is not None and not (
        isinstance(accumulator_dtype, torch.dtype) and accumulator_dtype.is_floating_point
    ):
        raise TypeError(
            f"accumulate_every: accumulator_dtype must be a floating torch.dtype or None, "
            f"got {accumulator_dtype!r}"
        )

    def length_at(windows: torch.Tensor) -> torch.Tensor:
        """The length of the window that starts after ``windows`` closed windows."""
        if schedule is None:
            return torch.full_like(windows, n)  # type: ignore[arg-type]
        return _window_length(schedule, windows)

    def init(params: Any) -> AccumulateState:
        sums = _ops.buffers_like(params, accumulator_dtype)
        device = first_device(params)
        windows = torch.zeros((), dtype=torch.int64)
        return AccumulateState(
            mini_step=torch.zeros((), dtype=torch.int64),
            accumulated=torch.zeros((), dtype=torch.int64, device=device),
            sums=sums,
            is_open=torch.zeros((), dtype=torch.bool),
            nonempty=torch.zeros((), dtype=torch.bool, device=device),
            every=torch.tensor(0 if schedule is not None else n, dtype=torch.int64),
            length=length_at(windows),
            windows=windows,
        )

    def update(
        updates: Any,
        state: AccumulateState,
        params: Any = None,
        *,
        gate_open: torch.Tensor | None = None,
        flush: bool | torch.Tensor = False,
        window_closes: bool | None = None,
        **extra: Any,
    ) -> tuple[Any, AccumulateState]:
        del params
        expect_state(state, AccumulateState, "accumulate_every")
        _, donated_s = donation(extra, "accumulate_every")
        view = Leaves(updates)
        gs = view.values
        # An explicitly narrower accumulator_dtype rounds on purpose.
        sums = view.take(state.sums, "state.sums", dtype=accumulator_dtype is None)
        contrib = _ops.cast(gs, [s.dtype for s in sums])
        if gate_open is not None:
            contrib = _ops.where_zeros(gate_open, contrib)
        # Donated, the window sums grow in place (torch's ``_foreach_add_``); the old state
        # is given up with them.
        new_sums = _ops.add_(sums, contrib) if donated_s else _ops.add(sums, contrib)
        step = state.mini_step + 1
        count = state.accumulated + (
            1 if gate_open is None else gate_open.to(state.accumulated.device).long()
        )

        known_step = known_int(state.mini_step)
        known_length = known_int(state.length)
        known_flush = flush if isinstance(flush, bool) else known_bool(flush)
        if window_closes is not None:
            # A chain traced under torch.compile branched on this window (see
            # gating.window_closes): inside each branch, whether it closes is known.
            closing: bool | torch.Tensor = window_closes
        elif known_step is not None and known_length is not None and known_flush is not None:
            closing = known_flush or known_step + 1 >= known_length
        else:
            closing = torch.logical_or(
                torch.as_tensor(flush, device=step.device), step >= state.length
            )

        if closing is False:
            new_state = AccumulateState(
                mini_step=step,
                accumulated=count,
                sums=view.put_into(state.sums, new_sums),
                is_open=torch.zeros((), dtype=torch.bool),
                nonempty=count > 0,
                every=state.every,
                length=state.length,
                windows=state.windows,
            )
            # The incoming updates are in the sums now. The zeros emitted take no memory
            # and no pass over it (broadcast views of one zero; read-only, memoized).
            return view.put(_ops.zeros_view(gs)), new_state

        out = new_sums if not mean else _ops.div_scalar(new_sums, count.clamp(min=1))
        out = _ops.cast(out, [g.dtype for g in gs])
        nonempty = count > 0
        if gate_open is not None:
            out = _ops.where(nonempty, out, _ops.zeros_like(out))
        if closing is True and donated_s and mean and _ops.inplace_ok(new_sums):
            # The mean is a fresh tensor: the donated sums start the next window in place.
            zero_sums = _ops.zero_(new_sums)
        else:
            zero_sums = _ops.zeros_like(new_sums)
        windows = safe_increment(state.windows)
        if closing is True:
            new_state = AccumulateState(
                mini_step=torch.zeros_like(step),
                accumulated=torch.zeros_like(count),
                sums=view.put_into(state.sums, zero_sums),
                is_open=torch.ones((), dtype=torch.bool),
                nonempty=nonempty,
                every=state.every,
                length=length_at(windows) if schedule is not None else state.length,
                windows=windows,
            )
            return view.put(out), new_state
        # Window position is data (compiled, vmapped, or state moved off the host).
        assert isinstance(closing, torch.Tensor)
        closing_t = closing
        new_state = AccumulateState(
            mini_step=torch.where(closing_t, torch.zeros_like(step), step),
            accumulated=torch.where(
                closing_t.to(count.device), torch.zeros_like(count), count
            ),
            sums=view.put_into(state.sums, _ops.where(closing_t, zero_sums, new_sums)),
            is_open=closing_t.to(state.is_open.device),
            nonempty=nonempty,
            every=state.every,
            length=state.length if schedule is None else torch.where(
                closing_t, length_at(windows), state.length
            ),
            windows=torch.where(closing_t, windows, state.windows),
        )
        return view.put(_ops.where(closing_t, out, _ops.zeros_like(out))), new_state

    def gated_update(
        updates: Any,
        state: AccumulateState,
        params: Any = None,
        *,
        host_open: torch.Tensor | None = None,
        **extra: Any,
    ) -> tuple[Any, AccumulateState]:
        out, new_state = update(updates, state, params, **extra)
        if host_open is None:
            return out, new_state
        # An earlier window is closed (known only as a tensor: compiled or vmapped): behave
        # exactly as if not called, as the eager chain does by not calling it.
        view = Leaves(out)
        return (
            view.put(_ops.where_zeros(host_open, view.values)),
            select_tree(host_open, new_state, state),
        )

    # A gate on the gradients: before the rule; reads no value, commutes with scaling.
    return GradientTransformation(init, add_roles(mark_gate(gated_update), HOLDS, PASSIVE))


# --------------------------------------------------------------------------- skip_if_nonfinite
@gate_state()
class SkipIfNonfiniteState(NamedTuple):
    """State of :func:`skip_if_nonfinite`.

    Attributes:
        is_open: whether the last incoming updates were all finite (bool).
        consecutive_skips: skipped steps since the last finite one (int64, saturating).
        total_skips: all skipped steps (int64, saturating).

    Example:
        >>> import torch, gradchain as gc
        >>> tx = gc.skip_if_nonfinite()
        >>> state = tx.init({"w": torch.zeros(1)})
        >>> for g in (float("inf"), float("nan"), 1.0):
        ...     _, state = tx.update({"w": torch.tensor([g])}, state)
        >>> int(state.consecutive_skips), int(state.total_skips), bool(state.is_open)
        (0, 2, True)
    """

    is_open: torch.Tensor
    consecutive_skips: torch.Tensor
    total_skips: torch.Tensor


def skip_if_nonfinite(max_consecutive_errors: int | None = None) -> GradientTransformation:
    """Gate: drop a step whose incoming updates contain nan or inf.

    On such a step it emits zeros, everything after it in a chain keeps its state
    bit-identical, and it counts the skip. Non-finite values never pass through it.

    **Performance.** Finiteness is data on the device, so the decision stays a tensor: the
    rest of the chain is computed on every step and its new state is selected with
    ``torch.where``. That costs one reduction per step and no host-device sync. On DTensor
    (FSDP2) gradients the flag is all-reduced (one scalar per step), so a nan in one rank's
    shard closes the step on every rank.

    **Giving up.** With ``max_consecutive_errors=N``, the step that would be the
    ``N + 1``-th non-finite step in a row raises ``FloatingPointError`` instead of being
    skipped: the run stops loudly rather than skipping forever. This is the step on which
    optax's ``apply_if_finite(inner, N)`` gives up by *passing the non-finite update on*;
    gradchain raises instead, because that update would write nan/inf into every
    parameter, and into every later checkpoint, while an exception leaves the parameters
    and the optimizer state as they were after the last finite step (nothing has been
    touched by the failing call: it returns nothing; in ``ChainedOptimizer`` the call is
    discarded), so the run can be saved, inspected or resumed with a smaller learning
    rate. The cost is a read of one int64 counter per step, only when ``N`` is set: free
    when the state is on the CPU, one host-device sync per step on an accelerator (as
    ``GradScaler``'s step). Under ``torch.compile`` the check is a
    ``torch._assert_async`` in the graph (a ``RuntimeError`` at run time on the CPU, a
    device-side assert on CUDA), and under ``torch.func.vmap`` it cannot be expressed, so
    ``update`` refuses a batched state (read ``consecutive_skips`` per member instead).
    Members before this gate in a chain have run when it raises; place it first.

    Args:
        max_consecutive_errors: ``None`` (default: skip for ever) or an int ``N >= 0``:
            raise on the ``N + 1``-th consecutive non-finite step.

    Returns:
        A gate :class:`GradientTransformation` with :class:`SkipIfNonfiniteState`.

    Raises:
        FloatingPointError: (from ``update``) on the ``N + 1``-th consecutive non-finite
            step, naming ``N`` and the total count of skipped steps.

    Example:
        >>> import torch, gradchain as gc
        >>> tx = gc.skip_if_nonfinite()
        >>> out, state = tx.update({"w": torch.tensor([1.0, float("nan")])}, tx.init({}))
        >>> out["w"], bool(gc.applied(state)), int(state.total_skips)
        (tensor([0., 0.]), False, 1)

        Give up after 2 non-finite steps in a row:

        >>> tx = gc.skip_if_nonfinite(max_consecutive_errors=2)
        >>> state = tx.init({})
        >>> for _ in range(2):
        ...     _, state = tx.update({"w": torch.tensor([float("inf")])}, state)
        >>> tx.update({"w": torch.tensor([float("inf")])}, state)
        Traceback (most recent call last):
        ...
        FloatingPointError: skip_if_nonfinite: 3 consecutive steps with non-finite updates ...
    """
    who = "skip_if_nonfinite"
    if max_consecutive_errors is not None:
        if isinstance(max_consecutive_errors, bool) or not isinstance(max_consecutive_errors, int):
            raise TypeError(
                f"{who}: max_consecutive_errors must be None or an int >= 0, got "
                f"{type(max_consecutive_errors).__name__}"
            )
        if max_consecutive_errors < 0:
            raise ValueError(
                f"{who}: max_consecutive_errors must be >= 0, got {max_consecutive_errors}"
            )
    limit = max_consecutive_errors

    def give_up_check(consecutive: torch.Tensor, total: torch.Tensor) -> None:
        """Raise when ``consecutive`` (this step's count) exceeds the limit."""
        if limit is None:
            return
        over = consecutive > limit
        message = (
            f"{who}: {limit + 1} consecutive steps with non-finite updates (more than "
            f"max_consecutive_errors={limit}); giving up rather than writing nan/inf into "
            "the parameters. The parameters and the state are those after the last finite "
            "step"
        )
        if torch.compiler.is_compiling():
            torch._assert_async(torch.logical_not(over), message)
            return
        if torch._C._functorch.is_functorch_wrapped_tensor(over):
            raise TypeError(
                f"{who}: max_consecutive_errors cannot raise inside torch.func transforms "
                "(vmap); use max_consecutive_errors=None and read consecutive_skips per member"
            )
        if bool(over):  # one read per step, only with a limit (see the docstring)
            raise FloatingPointError(f"{message} ({int(total)} skipped steps in total)")

    def init(params: Any) -> SkipIfNonfiniteState:
        device = first_device(params)
        zero = torch.zeros((), dtype=torch.int64, device=device)
        return SkipIfNonfiniteState(
            is_open=torch.ones((), dtype=torch.bool, device=device),
            consecutive_skips=zero,
            total_skips=zero.clone(),
        )

    def update(
        updates: Any,
        state: SkipIfNonfiniteState,
        params: Any = None,
        *,
        gate_open: torch.Tensor | None = None,
        **extra: Any,
    ) -> tuple[Any, SkipIfNonfiniteState]:
        del params
        expect_state(state, SkipIfNonfiniteState, who)
        donated, _ = donation(extra, who)
        view = Leaves(updates)
        gs = view.values
        finite = _ops.all_finite(gs).to(state.is_open.device)
        skipped = torch.logical_not(finite)
        counters = (
            torch.where(finite, torch.zeros_like(state.consecutive_skips),
                        safe_increment(state.consecutive_skips)),
            torch.where(skipped, safe_increment(state.total_skips), state.total_skips),
        )
        counters = keep_where_closed(gate_open, counters, (state.consecutive_skips,
                                                             state.total_skips))
        # Before anything is emitted: a give-up raises with the inputs untouched.
        give_up_check(*counters)
        out = _ops.where_zeros(finite, gs, donated)
        # On a step an earlier gate closed, the flag stays too (as when the chain skips us).
        is_open = keep_where_closed(gate_open, finite, state.is_open)
        return view.put(out), SkipIfNonfiniteState(is_open, *counters)

    return GradientTransformation(init, add_roles(mark_gate(update), HOLDS))  # before the rule


# --------------------------------------------------------------------------- loss_scale
@gate_state()
class LossScaleState(NamedTuple):
    """State of :func:`loss_scale`.

    Attributes:
        scale: the current loss scale (float32).
        growth_tracker: consecutive finite steps since the last change of scale (int64).
        is_open: whether the last step's unscaled updates were all finite (bool).

    Example:
        >>> import torch, gradchain as gc
        >>> tx = gc.loss_scale(init_scale=4.0, growth_interval=2)
        >>> state = tx.init({"w": torch.zeros(1)})
        >>> for _ in range(2):
        ...     _, state = tx.update({"w": torch.ones(1)}, state)
        >>> float(state.scale), int(state.growth_tracker)
        (8.0, 0)
    """

    scale: torch.Tensor
    growth_tracker: torch.Tensor
    is_open: torch.Tensor


def loss_scale(
    init_scale: float = 2.0**16,
    growth_factor: float = 2.0,
    backoff_factor: float = 0.5,
    growth_interval: int = 2000,
    min_scale: float | None = None,
    dynamic: bool = True,
) -> GradientTransformation:
    r"""Gate: unscale the gradients of a scaled loss, skip non-finite steps, adapt the scale.

    Call backward on ``gc.scale_loss(loss, state)`` (the loss times the current scale);
    this transformation multiplies the gradients by ``1 / scale`` (float32, as
    ``torch.amp.GradScaler``) and, when any unscaled entry is nan or inf, emits zeros and
    closes the step. The scale then follows GradScaler's algorithm exactly:

    * non-finite step: ``scale = max(scale * backoff_factor, min_scale)``, tracker 0
      (without ``min_scale`` the floor is the smallest normal float32, ~1.2e-38, so the
      scale never underflows to 0, from which GradScaler never recovers);
    * finite step: tracker + 1; when it reaches ``growth_interval``, ``scale *= growth_factor``
      if the result is finite, and the tracker restarts at 0.

    With ``dynamic=False`` the scale stays ``init_scale`` and non-finite steps are still
    skipped. Put it first in a mixed-precision chain, so clipping sees unscaled gradients;
    put it after ``accumulate_every`` to unscale and check once per window as GradScaler
    does with accumulation (an inf in any micro-step then drops the window).

    Differences from GradScaler: finiteness is checked on the *unscaled* values (so an
    overflow caused by unscaling with a scale below 1 is caught too), float16 gradients are
    accepted (unscaled in float32), there is an optional floor ``min_scale``, and the
    decision never needs a host-device sync (finiteness is selected with ``torch.where``).
    On DTensor (FSDP2) gradients the finiteness flag is all-reduced (one scalar per step),
    so every rank skips the same steps and keeps the same scale.

    The scale stays within float32's normal range whatever happens (no growth to inf, no
    underflow to 0), and ``growth_tracker`` saturates at the int64 maximum.

    Args:
        init_scale: the first scale (> 0, within float32's normal range).
        growth_factor: factor applied after ``growth_interval`` finite steps (> 1).
        backoff_factor: factor applied on a non-finite step, in (0, 1).
        growth_interval: finite steps between growths (int >= 1).
        min_scale: optional floor for backoff (> 0, <= init_scale).
        dynamic: adapt the scale (default) or keep it fixed.

    Returns:
        A gate :class:`GradientTransformation` with :class:`LossScaleState`.

    Example:
        >>> import torch, gradchain as gc
        >>> tx = gc.loss_scale(init_scale=1024.0)
        >>> state = tx.init({"w": torch.zeros(1)})
        >>> loss = gc.scale_loss(torch.tensor(2.0), state)
        >>> loss
        tensor(2048.)
        >>> out, state = tx.update({"w": torch.tensor([512.0])}, state)
        >>> out["w"], bool(gc.applied(state))
        (tensor([0.5000]), True)
        >>> out, state = tx.update({"w": torch.tensor([float("inf")])}, state)
        >>> out["w"], float(state.scale)
        (tensor([0.]), 512.0)
    """
    init_scale = _checks.as_float(init_scale, "init_scale", "loss_scale")
    growth_factor = _checks.as_float(growth_factor, "growth_factor", "loss_scale")
    backoff_factor = _checks.as_float(backoff_factor, "backoff_factor", "loss_scale")
    if not _F32_TINY <= init_scale <= _F32_MAX:
        raise ValueError(
            "loss_scale: init_scale must be a positive float within float32's normal range "
            f"[{_F32_TINY:.6g}, {_F32_MAX:.6g}] (the scale is kept in float32), got {init_scale}"
        )
    if not growth_factor > 1.0 or growth_factor == float("inf"):
        raise ValueError(f"loss_scale: growth_factor must be > 1 and finite, got {growth_factor}")
    if not 0.0 < backoff_factor < 1.0:
        raise ValueError(f"loss_scale: backoff_factor must be in (0, 1), got {backoff_factor}")
    _checks.as_int(growth_interval, "growth_interval", "loss_scale", "an int >= 1")
    if growth_interval < 1:
        raise ValueError(f"loss_scale: growth_interval must be >= 1, got {growth_interval}")
    if min_scale is not None:
        min_scale = _checks.as_float(min_scale, "min_scale", "loss_scale")
        if not 0.0 < min_scale <= init_scale:
            raise ValueError(
                f"loss_scale: min_scale must be in (0, init_scale={init_scale}], got {min_scale}"
            )
    _checks.as_bool(dynamic, "dynamic", "loss_scale")
    floor = _F32_TINY if min_scale is None else max(min_scale, _F32_TINY)

    def init(params: Any) -> LossScaleState:
        device = first_device(params)
        return LossScaleState(
            scale=torch.full((), init_scale, dtype=torch.float32, device=device),
            growth_tracker=torch.zeros((), dtype=torch.int64, device=device),
            is_open=torch.ones((), dtype=torch.bool, device=device),
        )

    def update(
        updates: Any,
        state: LossScaleState,
        params: Any = None,
        *,
        gate_open: torch.Tensor | None = None,
        **extra: Any,
    ) -> tuple[Any, LossScaleState]:
        del params
        expect_state(state, LossScaleState, "loss_scale")
        donated, _ = donation(extra, "loss_scale")
        view = Leaves(updates)
        gs = view.values
        scale = state.scale
        inv = torch.reciprocal(scale.double()).float()
        checked = _ops.unscale_check_(gs, inv) if donated else None
        if checked is not None:
            # Donated float32 on CPU: unscaled in place and checked in one pass.
            unscaled, finite = gs, checked.to(scale.device)
        else:
            unscaled = _unscale(gs, inv, donated)
            finite = _ops.all_finite(unscaled).to(scale.device)
        if dynamic:
            successful = safe_increment(state.growth_tracker)
            grow = torch.logical_and(finite, successful >= growth_interval)
            grown = scale * growth_factor
            # Never below the floor: min_scale, else the smallest normal float32, so the
            # scale cannot underflow to 0 (a scale of 0 would skip every later step).
            backed_off = torch.clamp(scale * backoff_factor, min=floor)
            new_scale = torch.where(
                finite,
                torch.where(torch.logical_and(grow, torch.isfinite(grown)), grown, scale),
                backed_off,
            )
            new_tracker = torch.where(
                torch.logical_or(grow, torch.logical_not(finite)),
                torch.zeros_like(successful),
                successful,
            )
            new_scale, new_tracker = keep_where_closed(
                gate_open, (new_scale, new_tracker), (scale, state.growth_tracker)
            )
        else:
            new_scale, new_tracker = scale, state.growth_tracker
        out = _ops.where_zeros(finite, unscaled, donated)
        # On a step an earlier gate closed, the flag stays too (as when the chain skips us).
        is_open = keep_where_closed(gate_open, finite, state.is_open)
        return view.put(out), LossScaleState(new_scale, new_tracker, is_open)

    # Before the rule, and before anything that reads the gradients' values (clips).
    return GradientTransformation(init, add_roles(mark_gate(update), HOLDS, UNSCALES))


def _unscale(gs: list[torch.Tensor], inv: torch.Tensor, donated: bool = False) -> list[torch.Tensor]:
    """Multiply by the float32 inverse scale; float16/bfloat16 in float32, cast back.
    Donated float32/float64 leaves are unscaled in place (as ``GradScaler.unscale_``)."""
    if all(g.dtype not in LOW_PRECISION for g in gs):
        if donated and all(g.dtype == torch.float32 for g in gs):
            return _ops.mul_(gs, inv)
        return _ops.mul(gs, inv)
    # Only the low-precision leaves go through float32: a float64 leaf keeps its precision.
    return [
        (g.float() * inv.to(g.device)).to(g.dtype) if g.dtype in LOW_PRECISION
        else g * inv.to(g.device)
        for g in gs
    ]


def scale_loss(loss: torch.Tensor, state: Any) -> torch.Tensor:
    """Multiply ``loss`` by the current loss scale found in a chain's ``state``.

    Returns ``loss`` unchanged when the chain has no :func:`loss_scale`. Call
    ``backward()`` on the result.

    Example:
        >>> import torch, gradchain as gc
        >>> tx = gc.chain(gc.loss_scale(init_scale=8.0), gc.sgd(lr=0.1))
        >>> gc.scale_loss(torch.tensor(0.5), tx.init({"w": torch.zeros(1)}))
        tensor(4.)
        >>> gc.scale_loss(torch.tensor(0.5), gc.sgd(lr=0.1).init({"w": torch.zeros(1)}))
        tensor(0.5000)
    """
    expect_chain_state(
        state, "scale_loss", "call opt.scale_loss(loss) (or gc.scale_loss(loss, opt.tx_state))"
    )
    found = [node for _, node in named_nodes(state) if isinstance(node, LossScaleState)]
    if not found:
        return loss
    if len(found) > 1:
        raise ValueError(
            "scale_loss: this state holds more than one loss_scale; use "
            "loss * gc.tree_get(<the sub-state you mean>, 'scale') instead"
        )
    return loss * found[0].scale.to(loss.device)

