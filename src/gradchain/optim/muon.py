"""Muon: :func:`scale_by_muon` and the ``torch.optim.Muon`` twin :func:`muon`.

Muon orthogonalizes the momentum of **2-D** parameters (hidden-layer matrices). Every
other parameter (biases, norms, embeddings, heads by choice) goes to another rule; with
:func:`~gradchain.partition` that is one line:

.. code-block:: python

    tx = gc.partition(
        {"muon": gc.muon(lr=0.02), "adamw": gc.adamw(lr=3e-4)},
        lambda params: optree.tree_map(lambda p: "muon" if p.ndim == 2 else "adamw", params),
    )

(``torch.optim.Muon``'s own recipe is two optimizers over the two parameter lists.)
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch.optim import _muon as torch_muon

from gradchain import _checks, _ops
from gradchain._tree import Leaves, flatten, leaf_paths
from gradchain.base import GradientTransformation, donation, expect_state
from gradchain.combine import chain
from gradchain.optim._fused import FusedPlan, bind_fused, torch_rule_plan
from gradchain.transforms import add_decayed_weights, scale_by_learning_rate

__all__ = ["ScaleByMuonState", "scale_by_muon", "muon"]

#: torch.optim.Muon's defaults.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
EPS = 1e-7
_ADJUST = (None, "original", "match_rms_adamw")


class ScaleByMuonState(NamedTuple):
    """State of :func:`scale_by_muon`.

    Attributes:
        count: int64 0-dim tensor, the number of updates done.
        momentum: the momentum buffers (torch's ``momentum_buffer``).

    Example:
        >>> import torch, gradchain as gc
        >>> gc.scale_by_muon().init({"w": torch.zeros(1, 2)})
        ScaleByMuonState(count=tensor(0), momentum={'w': tensor([[0., 0.]])})
    """

    count: torch.Tensor  # type: ignore[assignment]  # shadows tuple.count, as in optax
    momentum: Any


def newton_schulz(
    x: torch.Tensor, ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    ns_steps: int = NS_STEPS, eps: float = EPS,
) -> torch.Tensor:
    """Approximate orthogonalization :math:`\\approx U V^\\top` of a 2-D ``x`` by
    ``ns_steps`` quintic Newton-Schulz iterations in bfloat16, operation for operation as
    ``torch.optim.Muon`` does:

    .. math::
        X_0 = \\frac{x}{\\max(\\|x\\|_F, \\epsilon)}, \\quad
        A = X X^\\top, \\quad X \\leftarrow a X + (b A + c A^2) X

    (on :math:`x^\\top` when ``x`` has more rows than columns). Returns bfloat16.

    Example:
        >>> import torch
        >>> from gradchain.optim.muon import newton_schulz
        >>> newton_schulz(torch.eye(2) * 5.0)
        tensor([[1.1250, 0.0000],
                [0.0000, 1.1250]], dtype=torch.bfloat16)
    """
    a, b, c = ns_coefficients
    ortho = x.bfloat16()
    tall = x.size(0) > x.size(1)
    if tall:
        ortho = ortho.T
    ortho = ortho / ortho.norm().clamp(min=eps)
    for _ in range(ns_steps):
        gram = ortho @ ortho.T
        gram_update = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        ortho = torch.addmm(ortho, gram_update, ortho, beta=a)
    return ortho.T if tall else ortho


def _adjust_ratio(shape: torch.Size, adjust_lr_fn: str | None) -> float:
    rows, cols = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return math.sqrt(max(1, rows / cols))
    return 0.2 * math.sqrt(max(rows, cols))


def _check(
    momentum: Any, nesterov: Any, ns_coefficients: Any, eps: Any, ns_steps: Any,
    adjust_lr_fn: Any, fn: str,
) -> tuple[float, bool, tuple[float, float, float], float, int]:
    momentum = _checks.nonneg(momentum, "momentum", "momentum value", fn)
    nesterov = _checks.as_bool(nesterov, "nesterov", fn)
    if not isinstance(ns_coefficients, (tuple, list)) or len(ns_coefficients) != 3:
        raise ValueError(f"{fn}: ns_coefficients must be 3 floats (a, b, c), got {ns_coefficients!r}")
    coefs = tuple(_checks.as_float(x, "ns_coefficients", fn) for x in ns_coefficients)
    eps = _checks.as_float(eps, "eps", fn)
    if isinstance(ns_steps, bool) or not isinstance(ns_steps, int) or not 0 <= ns_steps < 100:
        raise ValueError(f"{fn}: invalid ns_steps={ns_steps!r}; expected an int, 0 <= ns_steps < 100")
    if adjust_lr_fn not in _ADJUST:
        raise ValueError(
            f"{fn}: invalid adjust_lr_fn={adjust_lr_fn!r}; expected None, 'original' or "
            "'match_rms_adamw'"
        )
    return momentum, nesterov, coefs, eps, ns_steps  # type: ignore[return-value]


def _require_matrices(tree: Any, fn: str, name: str = "params") -> None:
    leaves, _ = flatten(tree)
    for i, p in enumerate(leaves):
        if isinstance(p, torch.Tensor) and p.dim() != 2:
            path = leaf_paths(tree)[i]
            raise ValueError(
                f"{fn}: {name}{path} has shape {tuple(p.shape)}; Muon orthogonalizes 2-D "
                "matrices only. Send the other parameters to another rule, e.g. "
                "gc.partition({'muon': gc.muon(...), 'adamw': gc.adamw(...)}, lambda ps: "
                "optree.tree_map(lambda p: 'muon' if p.ndim == 2 else 'adamw', ps))"
            )


def scale_by_muon(
    momentum: float = 0.95,
    nesterov: bool = True,
    ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    eps: float = EPS,
    ns_steps: int = NS_STEPS,
    adjust_lr_fn: str | None = None,
) -> GradientTransformation:
    """Muon's direction for 2-D parameters, as in ``torch.optim.Muon``.

    .. math::
        B_t = \\mu B_{t-1} + (1 - \\mu) g_t, \\quad
        \\tilde B_t = g_t + \\mu (B_t - g_t) \\text{ (nesterov) else } B_t, \\quad
        u_t = r \\cdot \\mathrm{NS}(\\tilde B_t)

    with :func:`newton_schulz` (bfloat16) and the shape ratio :math:`r` of
    ``adjust_lr_fn``: ``"original"`` (default, Keller Jordan's)
    :math:`\\sqrt{\\max(1, A/B)}`, ``"match_rms_adamw"`` (Moonshot's)
    :math:`0.2\\sqrt{\\max(A, B)}` for an :math:`A \\times B` parameter. The ratio sits
    here, not in the learning rate, because torch scales only the orthogonalized step
    by it (not the weight decay). Follow with :func:`~gradchain.scale_by_learning_rate`.

    Per-parameter maths (a matrix iteration per leaf), so this rule loops over the
    leaves, as torch does. ``init`` and ``update`` raise for a parameter that is not 2-D
    (see the module docs for the partition recipe).

    Under ``torch.func.vmap`` the bfloat16 matmuls run batched (``bmm``), which rounds
    differently from one matmul per member; the Newton-Schulz iterations, which leave each
    normalized singular value somewhere in about ``[0.68, 1.20]`` rather than at 1, amplify
    that 1-ulp bfloat16 difference to up to about 0.5 per entry, so the testing kit's
    ``vmap`` law holds for this rule only within ``atol=0.55`` (tested so).

    Args:
        momentum: momentum factor (>= 0).
        nesterov: Nesterov momentum.
        ns_coefficients: the quintic's ``(a, b, c)``.
        eps: floor of the Frobenius norm in the normalization.
        ns_steps: Newton-Schulz iterations (``0 <= ns_steps < 100``).
        adjust_lr_fn: ``None`` / ``"original"`` or ``"match_rms_adamw"``.

    Returns:
        A :class:`~gradchain.GradientTransformation` with state :class:`ScaleByMuonState`.

    Raises:
        ValueError: for invalid arguments and for params that are not 2-D.

    Example:
        >>> import torch, gradchain as gc
        >>> tx = gc.scale_by_muon(momentum=0.0)
        >>> params = {"w": torch.zeros(2, 2)}
        >>> tx.update({"w": torch.eye(2) * 5.0}, tx.init(params))[0]["w"]
        tensor([[1.1250, 0.0000],
                [0.0000, 1.1250]])
        >>> tx.init({"b": torch.zeros(3)})
        Traceback (most recent call last):
        ...
        ValueError: scale_by_muon: params['b'] has shape (3,); Muon orthogonalizes 2-D matrices only...
    """
    fn = "scale_by_muon"
    momentum, nesterov, coefs, eps, ns_steps = _check(
        momentum, nesterov, ns_coefficients, eps, ns_steps, adjust_lr_fn, fn
    )

    def init(params: Any) -> ScaleByMuonState:
        _require_matrices(params, fn)
        return ScaleByMuonState(count=_ops.zero_count(params), momentum=_ops.buffers_like(params))

    def update(
        updates: Any, state: ScaleByMuonState, params: Any = None, **extra: Any
    ) -> tuple[Any, ScaleByMuonState]:
        del params
        expect_state(state, ScaleByMuonState, fn)
        donation(extra, fn)
        _require_matrices(updates, fn, "updates")
        view = Leaves(updates)
        bufs: list[Any] = view.take(state.momentum, "momentum")
        out: list[Any] = []
        new: list[Any] = []
        for g, buf in zip(view.values, bufs):
            gw = g.to(buf.dtype)
            buf = torch.lerp(buf, gw, 1.0 - momentum)
            direction = torch.lerp(gw, buf, momentum) if nesterov else buf
            ortho = newton_schulz(direction, coefs, ns_steps, eps)
            u = ortho.to(buf.dtype) * _adjust_ratio(g.shape, adjust_lr_fn)
            out.append(u.to(g.dtype))
            new.append(buf)
        return view.put(out), ScaleByMuonState(
            count=_ops.safe_increment(state.count), momentum=view.put_into(state.momentum, new)
        )

    return GradientTransformation(init, update)


def muon(
    lr: Any = 1e-3,
    weight_decay: float = 0.1,
    momentum: float = 0.95,
    nesterov: bool = True,
    ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    eps: float = EPS,
    ns_steps: int = NS_STEPS,
    adjust_lr_fn: str | None = None,
) -> GradientTransformation:
    """Muon, as ``torch.optim.Muon`` (same arguments and defaults), for 2-D params.

    .. math::
        u = -\\eta_t \\left(r\\, \\mathrm{NS}(\\tilde B_t) + \\lambda p\\right)

    i.e. torch's ``p.mul_(1 - lr * weight_decay)`` followed by
    ``p.add_(NS(B), alpha=-lr * r)``, with the direction of :func:`scale_by_muon`.

    ``chain(scale_by_muon(momentum, nesterov, ns_coefficients, eps, ns_steps,
    adjust_lr_fn), add_decayed_weights(weight_decay) if weight_decay,
    scale_by_learning_rate(lr))``. For a model with other parameters see the partition
    recipe in :mod:`gradchain.optim.muon`.

    Args:
        lr: learning rate: float, 1-element tensor, or schedule of the update count.
        weight_decay: decoupled weight decay (>= 0).
        momentum: momentum factor (>= 0).
        nesterov: Nesterov momentum.
        ns_coefficients: the Newton-Schulz quintic's ``(a, b, c)``.
        eps: floor of the norm in the normalization.
        ns_steps: Newton-Schulz iterations (< 100).
        adjust_lr_fn: ``None`` / ``"original"`` or ``"match_rms_adamw"``.

    Returns:
        A :class:`~gradchain.GradientTransformation` (a chain).

    Raises:
        ValueError: for ``lr``, ``momentum`` or ``weight_decay`` below 0 or an unknown
            ``adjust_lr_fn``, as torch does; for params that are not 2-D.

    Example:
        >>> import torch, gradchain as gc
        >>> tx = gc.muon(lr=0.1, weight_decay=0.0, momentum=0.0)
        >>> params = {"w": torch.zeros(2, 2)}
        >>> updates, state = tx.update({"w": torch.eye(2)}, tx.init(params), params)
        >>> updates["w"]
        tensor([[-0.1125, -0.0000],
                [-0.0000, -0.1125]])
    """
    fn = "muon"
    lr = _checks.check_lr(lr, fn)
    weight_decay = _checks.nonneg(weight_decay, "weight_decay", "weight_decay value", fn)
    _check(momentum, nesterov, ns_coefficients, eps, ns_steps, adjust_lr_fn, fn)
    txs: list[GradientTransformation] = [
        scale_by_muon(momentum, nesterov, ns_coefficients, eps, ns_steps, adjust_lr_fn)
    ]
    if weight_decay != 0:
        txs.append(add_decayed_weights(weight_decay))
    txs.append(scale_by_learning_rate(lr))
    momentum, nesterov, coefs, eps, ns_steps = _check(
        momentum, nesterov, ns_coefficients, eps, ns_steps, adjust_lr_fn, fn
    )
    return bind_fused(chain(*txs), _muon_plan(
        lr, len(txs), weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
        ns_coefficients=coefs, eps=eps, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn))


def _muon_plan(lr: Any, size: int, **hyper: Any) -> FusedPlan:
    """``muon``'s binding to torch's Muon step (``torch.optim._muon.muon``, what
    ``torch.optim.Muon`` runs: torch has no foreach or fused Muon), for
    :func:`~gradchain.update_and_apply_`."""

    def kernel(ps: Any, gs: Any, bufs: Any, steps: Any, lr_now: Any, st: Any) -> dict[str, Any]:
        torch_muon.muon(ps, gs, bufs[0], lr=lr_now, has_complex=False, **hyper)
        return {}

    return torch_rule_plan(lr, size, 0, ScaleByMuonState, [(0, "momentum")], kernel)
