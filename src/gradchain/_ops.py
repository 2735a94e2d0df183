"""List maths for transformations: ``torch._foreach_*`` when it can serve, else leaf by leaf.

Every function takes lists of tensors (no ``None``) and returns new lists; nothing is
modified in place (except by the trailing-underscore functions at the end, which may
update lists of fresh intermediates their caller owns). ``torch._foreach_*`` kernels group by (device, dtype) internally; they
have no ``vmap`` batching rule and no ``torch.func`` autograd, so batched, wrapped or
grad-requiring tensors take the per-leaf path (which ``torch.compile`` fuses anyway).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from gradchain import _dist
from gradchain._tree import MISS, MetaMemo, flatten, group_by_device_dtype, unflatten

Scalar = float | torch.Tensor
_HAS_AMP_CHECK = hasattr(torch, "_amp_foreach_non_finite_check_and_unscale_")
TList = list[torch.Tensor]


def known_bool(flag: torch.Tensor) -> bool | None:
    """The value of a 0-dim bool flag if it can be read without a host-device sync and
    without breaking a trace; ``None`` when it must stay a tensor.

    Host (CPU) tensors are readable for free in eager mode: there is no device to wait
    for, so reading one is not a host-device sync. Under ``torch.compile`` or
    ``torch.func`` transforms (vmap, grad) flags are symbolic or batched, and stay tensors;
    on an accelerator they stay tensors too. Code that uses the value must give exactly
    the result the tensor path gives; it only skips work (a select, a discarded tail).
    """
    if flag.device.type != "cpu" or torch.compiler.is_compiling():
        return None
    if torch._C._functorch.is_functorch_wrapped_tensor(flag):
        return None
    if isinstance(flag, torch._subclasses.FakeTensor):
        return None
    return bool(flag)


_REQUIRES_GRAD = operator.attrgetter("requires_grad")
_DTYPE = operator.attrgetter("dtype")


def use_foreach(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether ``torch._foreach_*`` kernels can serve these tensors: plain eager tensors.

    Foreach ops have no vmap batching rule and no functorch autograd, so tensors that
    are batched, wrapped by ``torch.func``, or that require grad go leaf by leaf.
    """
    if not tensors:
        return False
    if torch.compiler.is_compiling():
        return True
    t = tensors[0]
    if torch._C._functorch.is_functorch_wrapped_tensor(t):
        return False
    if torch.is_grad_enabled() and any(map(_REQUIRES_GRAD, tensors)):
        return False
    # By exact type: a DTensor parameter (FSDP2's) passes isinstance(t, nn.Parameter).
    return type(t) is torch.Tensor or type(t) is torch.nn.Parameter


def is_broadcast_view(x: torch.Tensor) -> bool:
    """Whether elements of ``x`` share memory: a stride-0 view, such as the zeros a closed
    gate emits (broadcast views of one 0-dim zero). In-place kernels refuse them, and
    nothing may write into them."""
    return 0 in x.stride() and any(st == 0 and n > 1 for st, n in zip(x.stride(), x.shape))


def known_int(t: torch.Tensor) -> int | None:
    """The value of a 0-dim int64 counter where :func:`known_bool` could read a flag for
    free (an eager CPU tensor); ``None`` otherwise."""
    if t.device.type != "cpu" or torch.compiler.is_compiling():
        return None
    if torch._C._functorch.is_functorch_wrapped_tensor(t):
        return None
    if isinstance(t, torch._subclasses.FakeTensor):
        return None
    return int(t)


def known_float(t: float | torch.Tensor) -> float | None:
    """The value of a float hyperparameter where it can be read for free: a Python number
    as is, a 1-element tensor where :func:`known_int` could read a counter (an eager CPU
    tensor); ``None`` otherwise (on an accelerator, compiled, under ``torch.func``)."""
    if not isinstance(t, torch.Tensor):
        return float(t)
    if t.numel() != 1 or t.device.type != "cpu" or torch.compiler.is_compiling():
        return None
    if torch._C._functorch.is_functorch_wrapped_tensor(t):
        return None
    if isinstance(t, torch._subclasses.FakeTensor):
        return None
    return float(t.detach())


def _fe(*lists: list[torch.Tensor], scalar: object = None) -> bool:
    if torch.compiler.is_compiling():
        return bool(lists and lists[0])
    return _fe_eager(*lists, scalar=scalar)


def _fe_(*lists: list[torch.Tensor], scalar: object = None) -> bool:
    """Whether an owned in-place foreach kernel serves: eager only. Traced, the in-place
    form buys nothing (inductor plans the memory) and ``torch.cond`` refuses a list
    mutation inside a branch, so the owned helpers below return the out-of-place foreach
    result instead (the same graph after functionalization)."""
    if torch.compiler.is_compiling():
        return False
    return _fe_eager(*lists, scalar=scalar)


def _fe_eager(*lists: list[torch.Tensor], scalar: object = None) -> bool:
    if isinstance(scalar, torch.Tensor) and (
        scalar.requires_grad or torch._C._functorch.is_functorch_wrapped_tensor(scalar)
    ):
        return False
    return all(use_foreach(x) for x in lists)


def _mul1(x: torch.Tensor, y: Scalar) -> torch.Tensor:
    """``x * y`` in ``x``'s dtype, as ``torch._foreach_mul`` computes it: a wider 0-dim
    ``y`` (a float32 coefficient for float16 leaves) is not rounded to ``x``'s dtype first."""
    if (
        not isinstance(y, torch.Tensor)
        or y.dtype == x.dtype
        or x.dtype not in (torch.float16, torch.bfloat16)
    ):
        return x * y
    return (x.to(torch.promote_types(x.dtype, y.dtype)) * y).to(x.dtype)


def mul(xs: list[torch.Tensor], s: Scalar) -> TList:
    if _fe(xs, scalar=s):
        return list(torch._foreach_mul(xs, s))
    return [_mul1(x, s) for x in xs]


def mul_list(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> TList:
    if _fe(xs, ys):
        return list(torch._foreach_mul(xs, ys))
    return [_mul1(x, y) for x, y in zip(xs, ys)]


def add(xs: list[torch.Tensor], ys: list[torch.Tensor], alpha: float = 1.0) -> TList:
    if _fe(xs, ys):
        return list(torch._foreach_add(xs, ys, alpha=alpha))
    if alpha == 1.0:
        return [x + y for x, y in zip(xs, ys)]
    return [torch.add(x, y, alpha=alpha) for x, y in zip(xs, ys)]


def div(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> TList:
    if _fe(xs, ys):
        return list(torch._foreach_div(xs, ys))
    return [x / y for x, y in zip(xs, ys)]


def div_scalar(xs: list[torch.Tensor], s: Scalar) -> TList:
    if _fe(xs, scalar=s):
        return list(torch._foreach_div(xs, s))
    return [x / s for x in xs]


def add_scalar(xs: list[torch.Tensor], s: Scalar) -> TList:
    if _fe(xs, scalar=s) and not isinstance(s, torch.Tensor):
        return list(torch._foreach_add(xs, s))
    return [x + s for x in xs]


def lerp(xs: list[torch.Tensor], ys: list[torch.Tensor], weight: float) -> TList:
    if _fe(xs, ys):
        return list(torch._foreach_lerp(xs, ys, weight))
    return [torch.lerp(x, y, weight) for x, y in zip(xs, ys)]


def addcmul(
    xs: list[torch.Tensor],
    ys: list[torch.Tensor],
    zs: list[torch.Tensor],
    value: float,
) -> TList:
    if _fe(xs, ys, zs):
        return list(torch._foreach_addcmul(xs, ys, zs, value=value))
    return [torch.addcmul(x, y, z, value=value) for x, y, z in zip(xs, ys, zs)]


def sqrt(xs: list[torch.Tensor]) -> TList:
    if _fe(xs):
        return list(torch._foreach_sqrt(xs))
    return [torch.sqrt(x) for x in xs]


def maximum(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> TList:
    if _fe(xs, ys):
        return list(torch._foreach_maximum(xs, ys))
    return [torch.maximum(x, y) for x, y in zip(xs, ys)]


def abs(xs: list[torch.Tensor]) -> TList:
    if _fe(xs):
        return list(torch._foreach_abs(xs))
    return [torch.abs(x) for x in xs]


def sign(xs: list[torch.Tensor]) -> TList:
    if _fe(xs):
        return list(torch._foreach_sign(xs))
    return [torch.sign(x) for x in xs]


def rsqrt(xs: list[torch.Tensor]) -> TList:
    if _fe(xs):
        return list(torch._foreach_rsqrt(xs))
    return [torch.rsqrt(x) for x in xs]


def sub(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> TList:
    if _fe(xs, ys):
        return list(torch._foreach_sub(xs, ys))
    return [x - y for x, y in zip(xs, ys)]


def clamp(xs: list[torch.Tensor], lo: float, hi: float) -> TList:
    if _fe(xs):
        return list(torch._foreach_clamp_max(torch._foreach_clamp_min(xs, lo), hi))
    return [torch.clamp(x, lo, hi) for x in xs]


def cast(xs: list[torch.Tensor], dtypes: Sequence[torch.dtype]) -> TList:
    if not torch.compiler.is_compiling() and list(map(_DTYPE, xs)) == list(dtypes):
        return list(xs)  # the usual case, compared at C speed
    return [x if x.dtype == d else x.to(d) for x, d in zip(xs, dtypes)]


def where(flag: torch.Tensor, xs: list[torch.Tensor], ys: list[torch.Tensor]) -> TList:
    """``x`` where the 0-dim bool ``flag`` is true, else ``y``, leafwise.

    A flag known on the host (eager, CPU) picks a list without computing a select; the
    result may then alias ``xs`` or ``ys``, so never update it in place.
    """
    known = known_bool(flag)
    if known is not None:
        return list(xs) if known else list(ys)
    return [torch.where(flag.to(x.device), x, y) for x, y in zip(xs, ys)]


def zeros_like(xs: list[torch.Tensor]) -> TList:
    return [torch.zeros_like(x) for x in xs]


def zeros_view(xs: list[torch.Tensor]) -> TList:
    """Zeros shaped like ``xs`` that take no memory: one 0-dim zero per (device, dtype),
    broadcast (``expand``) to each shape. Read-only: writing into one raises (clone first).

    The views depend on the metadata alone, and no one can write into them, so they are
    memoized on it (:class:`~gradchain._tree.MetaMemo`): a gate that holds micro-steps
    back makes them once per run. A leaf whose view could be written (one element or
    none: nothing overlaps) gets a fresh zero on every call.
    """
    if not xs:
        return []
    compiling = torch.compiler.is_compiling()
    # A hit proves the leaves' exact types too: only plain tensors' views are stored.
    found: tuple[list[torch.Tensor | None], bool] | Any = (
        MISS if compiling else _ZEROS.get(len(xs), xs)
    )
    if found is MISS:
        views = _zero_views(xs)
        found = (views, all(v is not None for v in views))
        plain = all(type(x) is torch.Tensor or type(x) is torch.nn.Parameter for x in xs)
        if plain and not compiling:
            _ZEROS.put(len(xs), xs, found)
    views, complete = found
    if complete:
        return list(views)  # every leaf a shared view (the usual case: no fresh zero)
    out: list[torch.Tensor | None] = list(views)
    fresh: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
    for i, v in enumerate(out):
        if v is not None:
            continue
        x = xs[i]
        if type(x) is not torch.Tensor and type(x) is not torch.nn.Parameter:
            # A subclass (DTensor: sharded, with placements) keeps its type: real zeros.
            out[i] = torch.zeros_like(x)
            continue
        z = fresh.get((x.device, x.dtype))
        if z is None:
            z = fresh[(x.device, x.dtype)] = torch.zeros((), dtype=x.dtype, device=x.device)
        out[i] = z.expand(x.shape)
    return out  # type: ignore[return-value]


_ZEROS = MetaMemo(16)


def _zero_views(xs: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """:func:`zeros_view`'s read-only broadcast views; ``None`` where a leaf needs a fresh
    zero (a subclass, or a view that could be written)."""
    zero: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
    views: list[torch.Tensor | None] = [None] * len(xs)
    for i, x in enumerate(xs):
        if type(x) is not torch.Tensor and type(x) is not torch.nn.Parameter:
            continue
        z = zero.get((x.device, x.dtype))
        if z is None:
            z = zero[(x.device, x.dtype)] = torch.zeros((), dtype=x.dtype, device=x.device)
        view = z.expand(x.shape)
        if is_broadcast_view(view):
            views[i] = view
    return views


def unscale_check_(xs: list[torch.Tensor], inv: torch.Tensor) -> torch.Tensor | None:
    """Multiply float32 ``xs`` by ``inv`` in place and return whether they were all finite,
    in one pass (``GradScaler.unscale_``'s kernel); ``None`` (nothing done) where that does
    not give exactly ``all_finite(xs * inv)``.

    The kernel checks the values before the multiply; after it they can only overflow when
    ``inv > 1``, so it is used for an inverse scale known (on the host, for free) to be
    at most 1, on CPU tensors that foreach kernels serve.
    """
    if (
        not _HAS_AMP_CHECK or not xs or torch.compiler.is_compiling() or not _fe(xs)
        or inv.device.type != "cpu" or any(x.device.type != "cpu" for x in xs)
        or any(x.dtype != torch.float32 for x in xs)
    ):
        return None
    if torch._C._functorch.is_functorch_wrapped_tensor(inv) or not bool(inv <= 1.0):
        return None
    found = torch.zeros((), dtype=torch.float32)
    torch._amp_foreach_non_finite_check_and_unscale_(xs, found, inv.to(torch.float32))
    return found == 0


def all_finite(xs: list[torch.Tensor]) -> torch.Tensor:
    """A 0-dim bool tensor: no nan/inf anywhere in ``xs`` (``True`` for an empty list).

    One reduction per leaf and one over the leaves; no host-device sync. With DTensor
    leaves, every rank gets the same answer (one all-reduce of a flag per group of leaves
    sharded alike), so every rank must call it.
    """
    if not xs:
        return torch.tensor(True)
    if _dist.has_dtensor(xs):
        return _sharded_all_finite(xs)
    device = xs[0].device
    # Empty tensors are finite, and the inf-norm of one raises (no identity): leave them out.
    xs = [x for x in xs if x.numel() > 0]
    if not xs:
        return torch.ones((), dtype=torch.bool, device=device)
    if torch.compiler.is_compiling():
        # Traced: a pure max-reduction per leaf (nan and inf propagate through max). The
        # in-place AMP kernel below would be functionalized into copies of every gradient.
        # (Not ``_foreach_norm(xs, inf)``: one extern call, but aten's CPU inf-norm is not
        # vectorized, 8x slower than inductor's reductions on the small benchmark set.)
        norms = [torch.linalg.vector_norm(x, float("inf")) for x in xs]  # exact in any dtype
        return torch.stack([torch.isfinite(n).to(device) for n in norms]).all()
    if _fe(xs) and _HAS_AMP_CHECK:
        # GradScaler's fused kernel: with an inverse scale of 1 it only reads (no write),
        # one pass per (device, dtype) group; much faster than an inf-norm on CPU. Being an
        # in-place kernel it refuses broadcast views (a closed gate's zeros): those are
        # checked apart.
        finite = [torch.isfinite(x).all().to(device) for x in xs if is_broadcast_view(x)]
        if finite:
            xs = [x for x in xs if not is_broadcast_view(x)]
        for (group,) in group_by_device_dtype([(x,) for x in xs]):
            found_inf = torch.zeros((), dtype=torch.float32, device=group[0].device)
            torch._amp_foreach_non_finite_check_and_unscale_(
                group, found_inf, torch.ones((), dtype=torch.float32, device=group[0].device)
            )
            finite.append(found_inf.to(device) == 0)
        return torch.stack(finite).all() if len(finite) > 1 else finite[0]
    flags = [torch.isfinite(x).all().to(device) for x in xs]
    return torch.stack(flags).all()


def _sharded_all_finite(xs: list[torch.Tensor]) -> torch.Tensor:
    """:func:`all_finite` when some leaves are DTensors: one all-reduce of a flag per group
    of leaves sharded alike (see :mod:`gradchain._dist`), so every rank gets the same
    answer and a nan in one rank's shard closes the gates on all ranks."""
    plain, groups = _dist.local_parts(xs, exact=False)
    flags = [all_finite(plain)] if plain else []
    for mesh, dims, locals_ in groups:
        # As a float (gloo reduces no bools): the min over ranks is 1 iff all are finite.
        local = all_finite(locals_).to(device=locals_[0].device, dtype=torch.float32)
        flags.append(_dist.all_reduce(local, mesh, dims, "min") > 0)
    device = xs[0].device
    return torch.stack([f.to(device) for f in flags]).all()


# --------------------------------------------------------------------------- owned in-place
# For lists the caller *owns*: fresh intermediates it has just computed, never inputs or
# state. They are updated in place when foreach serves (plain eager tensors, no autograd),
# saving an allocation per leaf (on CPU a fresh large tensor costs far more than the maths);
# otherwise (autograd may have saved them, vmap, torch.func) new tensors are returned.
# DTensors (FSDP2) are updated in place through their local shards, with the same foreach
# kernels as plain tensors (see _dist.inplace_shards), instead of DTensor's dispatch per
# leaf. Always use the return value.
def _shards(lists: tuple[list[torch.Tensor], ...], *args: Any) -> tuple[TList, ...] | None:
    """The local shards of DTensor ``lists`` for an in-place foreach kernel on the first
    (``args``: its scalars, plain), or ``None`` (then the caller takes its leafwise path)."""
    xs = lists[0]
    if not xs or not _dist.is_dtensor(xs[0]):
        return None
    grad = torch.is_grad_enabled()
    for a in args:
        if isinstance(a, torch.Tensor) and (_dist.is_dtensor(a) or (grad and a.requires_grad)):
            return None
    return _dist.inplace_shards(*lists)


def mul_(xs: list[torch.Tensor], s: Scalar) -> TList:
    if _fe_(xs, scalar=s):
        torch._foreach_mul_(xs, s)
        return xs
    if (sh := _shards((xs,), s)) is not None:
        torch._foreach_mul_(sh[0], s)
        return xs
    return mul(xs, s) if torch.compiler.is_compiling() else [x * s for x in xs]


def mul_list_(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> TList:
    if _fe_(xs, ys):
        torch._foreach_mul_(xs, ys)
        return xs
    if (sh := _shards((xs, ys))) is not None:  # e.g. FSDP2 gradients clipped in place
        torch._foreach_mul_(sh[0], sh[1])
        return xs
    return mul_list(xs, ys)


def add_(xs: list[torch.Tensor], ys: list[torch.Tensor], alpha: float = 1.0) -> TList:
    if _fe_(xs, ys):
        torch._foreach_add_(xs, ys, alpha=alpha)
        return xs
    if (sh := _shards((xs, ys))) is not None:
        torch._foreach_add_(sh[0], sh[1], alpha=alpha)
        return xs
    return add(xs, ys, alpha=alpha)


def div_(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> TList:
    if _fe_(xs, ys):
        torch._foreach_div_(xs, ys)
        return xs
    if (sh := _shards((xs, ys))) is not None:
        torch._foreach_div_(sh[0], sh[1])
        return xs
    return div(xs, ys) if torch.compiler.is_compiling() else [x / y for x, y in zip(xs, ys)]


def div_scalar_(xs: list[torch.Tensor], s: Scalar) -> TList:
    if _fe_(xs, scalar=s):
        torch._foreach_div_(xs, s)
        return xs
    if (sh := _shards((xs,), s)) is not None:
        torch._foreach_div_(sh[0], s)
        return xs
    return div_scalar(xs, s) if torch.compiler.is_compiling() else [x / s for x in xs]


def rdiv_scalar_(xs: list[torch.Tensor], s: Scalar) -> TList:
    """``s / x`` for owned ``xs``: with foreach kernels as ``1 / (x / s)`` (torch's foreach
    RAdam order, bit for bit), leaf by leaf (autograd, vmap) as ``s / x``, whose gradient
    stays finite at ``s = 0`` (the reciprocal form's is ``0 * inf``)."""
    if _fe_(xs, scalar=s):
        torch._foreach_div_(xs, s)
        torch._foreach_reciprocal_(xs)
        return xs
    if (sh := _shards((xs,), s)) is not None:
        torch._foreach_div_(sh[0], s)
        torch._foreach_reciprocal_(sh[0])
        return xs
    if torch.compiler.is_compiling():
        return list(torch._foreach_reciprocal(torch._foreach_div(xs, s)))
    return [s / x for x in xs]


def add_scalar_(xs: list[torch.Tensor], s: Scalar) -> TList:
    if _fe_(xs, scalar=s) and not isinstance(s, torch.Tensor):
        torch._foreach_add_(xs, s)
        return xs
    if not isinstance(s, torch.Tensor) and (sh := _shards((xs,))) is not None:
        torch._foreach_add_(sh[0], s)
        return xs
    return [x + s for x in xs]


def addcmul_(
    xs: list[torch.Tensor], ys: list[torch.Tensor], zs: list[torch.Tensor], value: float
) -> TList:
    if _fe_(xs, ys, zs):
        torch._foreach_addcmul_(xs, ys, zs, value=value)
        return xs
    if (sh := _shards((xs, ys, zs))) is not None:
        torch._foreach_addcmul_(sh[0], sh[1], sh[2], value=value)
        return xs
    return [torch.addcmul(x, y, z, value=value) for x, y, z in zip(xs, ys, zs)]


def lerp_(xs: list[torch.Tensor], ys: list[torch.Tensor], weight: float) -> TList:
    if _fe_(xs, ys):
        torch._foreach_lerp_(xs, ys, weight)
        return xs
    if (sh := _shards((xs, ys), weight)) is not None:
        torch._foreach_lerp_(sh[0], sh[1], weight)
        return xs
    return lerp(xs, ys, weight)


def clamp_(xs: list[torch.Tensor], lo: float, hi: float) -> TList:
    if _fe_(xs):
        torch._foreach_clamp_min_(xs, lo)
        torch._foreach_clamp_max_(xs, hi)
        return xs
    if (sh := _shards((xs,))) is not None:
        torch._foreach_clamp_min_(sh[0], lo)
        torch._foreach_clamp_max_(sh[0], hi)
        return xs
    return clamp(xs, lo, hi)


def copy_(dst: list[torch.Tensor], src: list[torch.Tensor]) -> TList:
    """``src``'s values in ``dst``'s memory when foreach serves, else in fresh tensors;
    never aliasing ``src``."""
    if _fe_(dst, src):
        torch._foreach_copy_(dst, src)
        return dst
    if (sh := _shards((dst, src))) is not None:
        torch._foreach_copy_(sh[0], sh[1])
        return dst
    return [s.clone() for s in src]


def sqrt_into(dst: list[torch.Tensor], xs: list[torch.Tensor]) -> TList:
    """``sqrt(x)`` written into ``dst`` (owned, same dtypes) when foreach serves, else fresh."""
    if _fe_(dst, xs) and not torch.compiler.is_compiling():
        for d, x in zip(dst, xs):
            torch.sqrt(x, out=d)
        return dst
    if not torch.compiler.is_compiling() and (sh := _shards((dst, xs))) is not None:
        for d, x in zip(sh[0], sh[1]):
            torch.sqrt(x, out=d)
        return dst
    return sqrt(xs)


def rdiv_(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> TList:
    """``y / x`` written into the owned ``xs`` when foreach serves, else fresh."""
    if _fe_(xs, ys) and not torch.compiler.is_compiling():
        for x, y in zip(xs, ys):
            torch.div(y, x, out=x)
        return xs
    if not torch.compiler.is_compiling() and (sh := _shards((xs, ys))) is not None:
        for x, y in zip(sh[0], sh[1]):
            torch.div(y, x, out=x)
        return xs
    return div(ys, xs)


def maximum_(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> TList:
    if _fe_(xs, ys):
        torch._foreach_maximum_(xs, ys)
        return xs
    if (sh := _shards((xs, ys))) is not None:
        torch._foreach_maximum_(sh[0], sh[1])
        return xs
    return maximum(xs, ys)


def zero_(xs: list[torch.Tensor]) -> TList:
    if _fe_(xs):
        torch._foreach_zero_(xs)
        return xs
    if (sh := _shards((xs,))) is not None:
        torch._foreach_zero_(sh[0])
        return xs
    return zeros_like(xs)


def where_zeros(flag: torch.Tensor, xs: list[torch.Tensor], donated: bool = False) -> TList:
    """``x`` where the 0-dim bool ``flag`` is true, else zeros, leafwise.

    Allocates no gradient-sized zeros: a flag known on the host picks (the result may
    alias ``xs``), and a tensor flag selects against a 0-dim zero. With ``donated`` (the
    caller owns ``xs``) a known-false flag zeroes ``xs`` in place.
    """
    known = known_bool(flag)
    if known is True:
        return list(xs)
    if known is False:
        return zero_(xs) if donated else zeros_like(xs)
    return [
        torch.where(flag.to(x.device), x, torch.zeros((), dtype=x.dtype, device=x.device))
        for x in xs
    ]


def inplace_ok(xs: list[torch.Tensor], *others: list[torch.Tensor]) -> bool:
    """Whether donated ``xs`` can hold results computed with ``others`` bit for bit as the
    out-of-place path does: same dtypes leaf by leaf, no float16/bfloat16 (whose
    out-of-place maths may run in float32 and round once)."""
    dtypes = [x.dtype for x in xs]
    if torch.float16 in dtypes or torch.bfloat16 in dtypes:
        return False
    return all(len(o) == len(xs) and [x.dtype for x in o] == dtypes for o in others)


# --------------------------------------------------------------------------- norms
def norm_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    """float32 at least, float64 if any tensor is float64."""
    return torch.float64 if torch.float64 in {t.dtype for t in tensors} else torch.float32


def global_norm(tensors: Sequence[torch.Tensor | None], norm_type: float = 2.0) -> torch.Tensor:
    """The norm of the concatenation of ``tensors`` (``None`` entries are skipped).

    Computed in float32 at least (float64 when any tensor is float64), so float16 or
    bfloat16 gradients whose norm exceeds their range still get a finite norm. Matches
    ``torch.nn.utils.get_total_norm`` for ``norm_type`` 1, 2, any p > 0 and ``inf``.
    Empty input gives ``0.``.

    DTensor leaves (FSDP2 ``fully_shard``, tensor parallel) count with all their shards:
    the result is a plain tensor, the same on every rank, from one all-reduce per group of
    leaves sharded alike (one for FSDP2). So every rank must call it. Plain tensors mixed
    in are taken as replicated (counted once).

    Example:
        >>> import torch
        >>> from gradchain.tree import global_norm
        >>> global_norm([torch.tensor([3.0]), None, torch.tensor([4.0])])
        tensor(5.)
        >>> global_norm([torch.full((4,), 60000.0, dtype=torch.float16)])
        tensor(120000.)
    """
    if not isinstance(tensors, (list, tuple)):
        raise TypeError(
            f"global_norm: tensors must be a list or tuple of tensors, got a "
            f"{type(tensors).__name__}; for a tree (e.g. a dict of gradients) pass its "
            "leaves: global_norm(list(grads.values())) or "
            "global_norm(gradchain.tree.flatten(grads)[0])"
        )
    ts = [t for t in tensors if t is not None]
    if not ts:
        return torch.tensor(0.0)
    return norm_of(ts, norm_type, layout(ts))


def norm_of(ts: list[torch.Tensor], norm_type: float, lay: Layout) -> torch.Tensor:
    """:func:`global_norm` of a non-empty list of tensors whose :func:`layout` the caller
    already has (a clip reads it for its own multiply: one metadata proof, not two)."""
    dtype = lay.norm_dtype
    device = ts[0].device
    p = float(norm_type)
    if math.isinf(p):
        # The inf-norm of an empty tensor raises (a max has no identity); empty tensors add
        # nothing to any norm (a p-norm of one is 0), so only this case filters them.
        ts = [t for t in ts if t.numel() > 0]
        if not ts:
            return torch.zeros((), dtype=dtype, device=device)
        lay = layout(ts)
    if lay.sharded:
        return _sharded_global_norm(ts, p, dtype, device)
    stacked = torch.stack(_leaf_norms(ts, p, dtype, device, lay))
    return torch.linalg.vector_norm(stacked, p)


def _leaf_norms(
    ts: Sequence[torch.Tensor], p: float, dtype: torch.dtype, device: torch.device,
    lay: Layout | None = None,
) -> list[torch.Tensor]:
    """The ``p``-norm of each (non-empty) tensor, in ``dtype`` on ``device``; in ``ts``'
    order when they are in one (device, dtype) group, else group by group."""
    lay = layout(ts) if lay is None else lay
    if len(lay.groups) == 1 and lay.foreach:
        found = list(torch._foreach_norm(list(ts), p, dtype=dtype))
        return found if lay.keys[0][0] == device else [n.to(device) for n in found]
    norms: list[torch.Tensor] = []
    for (group_device, _), idx in zip(lay.keys, lay.groups):
        group = [ts[i] for i in idx]
        if use_foreach(group):
            found = list(torch._foreach_norm(group, p, dtype=dtype))
        else:
            found = [torch.linalg.vector_norm(t, p, dtype=dtype) for t in group]
        norms.extend(found if group_device == device else [n.to(device) for n in found])
    return norms


def _sharded_global_norm(
    ts: Sequence[torch.Tensor], p: float, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """:func:`global_norm` when some leaves are DTensors: a plain tensor, equal on all ranks.

    Each rank takes the norms of its local shards; per group of leaves sharded alike
    (see :mod:`gradchain._dist`) they are all-reduced once. For a finite ``p`` that is
    what torch does for DTensors (``clip_grad_norm_`` on FSDP2 gradients, DTensor's norm
    partial): the ``p``-th powers of the leaves' local norms are summed over the ranks
    (one all-reduce of a vector), their ``p``-th roots are the leaves' norms, and the norm
    of those is the group's; so the result is torch's bit for bit (for float32 and float64
    gradients, which torch's norms keep). For ``inf`` the max is all-reduced, with a nan
    flag in the same all-reduce, since a max reduction may drop a nan.
    """
    plain, groups = _dist.local_parts(ts, exact=True)
    inf = math.isinf(p)

    def norm_of(norms: list[torch.Tensor], on: torch.device) -> torch.Tensor:
        if not norms:
            return torch.zeros((), dtype=dtype, device=on)
        stacked = torch.stack(norms)
        return stacked.max() if inf else torch.linalg.vector_norm(stacked, p)

    parts: list[torch.Tensor] = []
    if plain:  # replicated by the user's contract: counted once, not reduced
        parts.append(norm_of(_leaf_norms(plain, p, dtype, device), device))
    for mesh, dims, locals_ in groups:
        on = locals_[0].device
        if inf:
            # An inf-norm of an empty shard raises (a max has no identity): left out.
            local = norm_of(_leaf_norms([x for x in locals_ if x.numel() > 0], p, dtype, on), on)
            isnan = torch.isnan(local)
            packed = torch.stack([torch.where(isnan, 0.0, local), isnan.to(dtype)])
            packed = _dist.all_reduce(packed, mesh, dims, "max")
            local = torch.where(packed[1] > 0, torch.nan, packed[0])
        else:
            # Every rank has a norm (0 for an empty shard) for every leaf, in one order.
            powers = torch.stack(_leaf_norms(locals_, p, dtype, on)).pow(p)
            leaf_norms = _dist.all_reduce(powers, mesh, dims, "sum").pow(1.0 / p)
            local = torch.linalg.vector_norm(leaf_norms, p)
        parts.append(local.to(device))
    if len(parts) == 1:
        return parts[0]
    return norm_of(parts, device)


# --------------------------------------------------------------------------- counters, dtypes, groups
_INT64_MAX = torch.iinfo(torch.int64).max


def safe_increment(count: torch.Tensor) -> torch.Tensor:
    """``count + 1`` for an int64 counter, saturating at the int64 maximum instead of
    wrapping to a negative count (two tiny ops on a 0-dim tensor; no sync).

    Example:
        >>> import torch
        >>> from gradchain._ops import safe_increment
        >>> safe_increment(torch.tensor(3)), safe_increment(torch.tensor(2**63 - 1))
        (tensor(4), tensor(9223372036854775807))
    """
    return torch.clamp(count, max=_INT64_MAX - 1) + 1


def first_device(params: Any) -> torch.device:
    """The device of the first tensor leaf of ``params`` (CPU when there is none)."""
    for p in flatten(params)[0]:
        if isinstance(p, torch.Tensor):
            return p.device
    return torch.device("cpu")


def zero_count(params: Any) -> torch.Tensor:
    """A fresh int64 0-dim counter on the device of the first parameter."""
    return torch.zeros((), dtype=torch.int64, device=first_device(params))


LOW_PRECISION = (torch.float16, torch.bfloat16)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype state and accumulators keep for leaves of ``dtype``: float32 for
    float16/bfloat16, the leaf's own dtype otherwise."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


def buffers_like(params: Any, dtype: torch.dtype | None = None) -> Any:
    """Zeros shaped like ``params`` (``None`` stays ``None``) in ``dtype``, by default
    each leaf's accumulator dtype (:func:`acc_dtype`)."""
    leaves, spec = flatten(params)
    out = [
        None
        if p is None
        else torch.zeros_like(
            p, dtype=dtype or acc_dtype(p.dtype), memory_format=torch.preserve_format
        )
        for p in leaves
    ]
    return unflatten(spec, out)


def scalar_dtype(device: torch.device) -> torch.dtype:
    """The dtype for scalar maths on ``device`` (bias corrections, schedules): float64, as
    torch.optim computes them on the host, except on MPS, which has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


def state_scalar_dtype() -> torch.dtype:
    """The dtype torch.optim gives its per-parameter scalar state (``step``, NAdam's
    ``mu_product``, ASGD's ``eta`` and ``mu``): float64 when the default dtype is float64,
    else float32 (``torch.optim.optimizer._get_scalar_dtype``). Rules that keep such a
    scalar in their state use it, so that they round it exactly as torch does."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


class Layout(NamedTuple):
    """What the metadata of a list of tensors says, for the list maths of one call (see
    :func:`layout`). Shared between calls: never modify its lists."""

    keys: list[tuple[torch.device, torch.dtype]]  # one (device, dtype) per group
    groups: list[list[int]]  # positions per group, in first-seen order
    dtypes: list[torch.dtype]  # per tensor
    foreach: bool  # torch._foreach_* serve every tensor (see use_foreach)
    low: bool  # a float16 or bfloat16 tensor is among them
    sharded: bool  # a DTensor is among them
    norm_dtype: torch.dtype  # float32, or float64 when a tensor is float64
    broadcast: bool  # a broadcast view (see is_broadcast_view) is among them
    meta: bool  # a tensor on the meta device is among them


_LAYOUTS = MetaMemo(32)


def layout(xs: Sequence[torch.Tensor]) -> Layout:
    """The :class:`Layout` of ``xs`` (a non-empty list of tensors).

    It depends on the tensors' metadata only (and on grad mode), so it is memoized on
    that metadata (:class:`~gradchain._tree.MetaMemo`): a training loop computes it once,
    then proves it with one C++ check per call.
    """
    if torch.compiler.is_compiling():
        return _layout(xs)
    first = xs[0]
    # (The type: FSDP2's DTensor gradients and their local shards, both met on every step,
    # keep an entry each.)
    key = (len(xs), first.dtype, first.device, torch.is_grad_enabled(), type(first))
    found = _LAYOUTS.get(key, xs)
    if found is MISS:
        found = _LAYOUTS.put(key, xs, _layout(xs))
    return found


def _layout(xs: Sequence[torch.Tensor]) -> Layout:
    found: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, x in enumerate(xs):
        found.setdefault((x.device, x.dtype), []).append(i)
    dtypes = [x.dtype for x in xs]
    return Layout(
        keys=list(found), groups=list(found.values()), dtypes=dtypes,
        foreach=all(use_foreach([x]) for x in xs),
        low=torch.float16 in dtypes or torch.bfloat16 in dtypes,
        sharded=_dist.has_dtensor(xs),
        norm_dtype=torch.float64 if torch.float64 in dtypes else torch.float32,
        broadcast=any(map(is_broadcast_view, xs)),
        meta=any(device.type == "meta" for device, _ in found),
    )


def groups(xs: Sequence[torch.Tensor]) -> list[list[int]]:
    """Indices of ``xs`` grouped by (device, dtype); one group for a uniform tree. Shared
    between calls (see :func:`layout`): never modify them."""
    return layout(xs).groups if xs else []


def pick(xs: Sequence[Any], idx: list[int]) -> list[Any]:
    """``xs`` at ``idx`` (the list itself, copied, when ``idx`` covers it)."""
    if len(idx) == len(xs):
        return list(xs)
    return [xs[i] for i in idx]


def scatter(out: list[Any], idx: list[int], values: Sequence[Any]) -> None:
    """Write ``values`` into ``out`` at ``idx``."""
    for i, v in zip(idx, values):
        out[i] = v


def scalar_for(s: float | torch.Tensor, like: torch.Tensor) -> float | torch.Tensor:
    """``s`` as a scalar for a kernel on tensors like ``like``: a float stays a float, a
    tensor is cast to their device and dtype (what torch does with a Python scalar)."""
    if isinstance(s, torch.Tensor):
        return s.to(device=like.device, dtype=like.dtype)
    return s
