"""Argument validation for the factories: one idiom, one ``who`` (the public function's
name, which every message starts with).

A ``bool`` is never a number here (``True`` is an ``int`` to Python, and ``lr=True`` is a
bug), and a tensor hyperparameter is read only where that is free (an eager host tensor, as
:func:`gradchain.inject_hyperparams` keeps them): never on an accelerator (a host-device
sync), under ``torch.compile`` (a graph break) or under ``torch.func`` transforms.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from typing import Any

import optree
import torch

from gradchain._ops import known_float
from gradchain._tree import path_str


def is_number(value: object) -> bool:
    """Whether ``value`` is a Python int or float (not a bool)."""
    return not isinstance(value, bool) and isinstance(value, (int, float))


def as_float(value: Any, name: str, who: str, kind: str = "a float") -> float:
    """``value`` as a float; ``TypeError`` unless it is an int or float (not a bool)."""
    if not is_number(value):
        raise TypeError(f"{who}: {name} must be {kind}, got {type(value).__name__}")
    return float(value)


def as_int(value: Any, name: str, who: str, kind: str = "an int") -> int:
    """``value`` as an int; ``TypeError`` unless it is an int (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{who}: {name} must be {kind}, got {type(value).__name__}")
    return value


def as_bool(value: Any, name: str, who: str) -> bool:
    """``value`` itself; ``TypeError`` unless it is a bool."""
    if not isinstance(value, bool):
        raise TypeError(f"{who}: {name} must be a bool, got {type(value).__name__}")
    return value


def finite(value: float | torch.Tensor, name: str, who: str) -> None:
    """A float must be finite (a tensor is not read: that would sync)."""
    if not isinstance(value, torch.Tensor) and not math.isfinite(value):
        raise ValueError(f"{who}: {name} must be finite, got {value}")


def is_schedule(value: object) -> bool:
    """Whether ``value`` is a schedule (a callable that is not a tensor)."""
    return callable(value) and not isinstance(value, torch.Tensor)


def as_scalar(value: float | torch.Tensor, name: str, who: str) -> float | torch.Tensor:
    """A float or a 1-element floating tensor hyperparameter; tensors become 0-dim."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"{who}: Tensor {name} must be 1-element, got shape {tuple(value.shape)}"
            )
        if not value.is_floating_point():
            raise TypeError(f"{who}: Tensor {name} must be floating point, got {value.dtype}")
        return value.reshape(())
    return as_float(value, name, who, "a float or a 1-element tensor")


def check_lr(lr: Any, who: str) -> Any:
    """A learning rate: a schedule, a 1-element tensor, or a float >= 0 (a tensor is
    checked where it can be read for free)."""
    if is_schedule(lr):
        return lr
    value = as_scalar(lr, "lr", who)
    known = known_float(value)
    if known is not None and not 0.0 <= known:
        raise ValueError(f"{who}: invalid learning rate lr={known}; expected lr >= 0")
    return value


def nonneg(value: Any, name: str, what: str, who: str) -> float:
    """A float >= 0 (``what`` names it in the message, e.g. ``"momentum value"``)."""
    value = as_scalar(value, name, who)
    if isinstance(value, torch.Tensor):
        raise TypeError(
            f"{who}: {name} must be a float, got a tensor ({name} cannot be a tensor "
            f"hyperparameter; with inject_hyperparams, list it in static_args)"
        )
    if not 0.0 <= value:
        raise ValueError(f"{who}: invalid {what} {name}={value}; expected {name} >= 0")
    return value


def nonneg_scalar(value: Any, name: str, what: str, who: str) -> float | torch.Tensor:
    """A float >= 0 or a 1-element tensor (0-dim; checked where it can be read for free):
    a hyperparameter that may be injected (see :func:`gradchain.inject_hyperparams`)."""
    value = as_scalar(value, name, who)
    known = known_float(value)
    if known is not None and not 0.0 <= known:
        raise ValueError(f"{who}: invalid {what} {name}={known}; expected {name} >= 0")
    if known is not None and not math.isfinite(known):
        raise ValueError(f"{who}: {name} must be finite, got {known}")
    return value


def maybe_nonzero(value: float | torch.Tensor) -> bool:
    """Whether a term scaled by ``value`` must be kept: a tensor always (its value may
    change without the structure changing), a float when it is not 0."""
    return isinstance(value, torch.Tensor) or value != 0


def beta(value: Any, name: str, who: str) -> float:
    """A decay rate in ``[0, 1)``."""
    value = as_float(value, name, who)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{who}: invalid beta parameter {name}={value}; expected 0 <= {name} < 1")
    return value


def betas(pair: Any, who: str) -> tuple[float, float]:
    """A pair ``(beta1, beta2)`` of decay rates."""
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise ValueError(f"{who}: betas must be a pair (beta1, beta2), got {pair!r}")
    return beta(pair[0], "betas[0]", who), beta(pair[1], "betas[1]", who)


def in_range(
    value: Any, name: str, who: str, lo: float = -math.inf, hi: float = math.inf,
    lo_open: bool = False, hi_open: bool = False,
) -> float:
    """``value`` as a float checked against ``lo <= value <= hi`` (``<`` where open); the
    message names the function, the argument, the value and the expected range."""
    v = as_float(value, name, who)
    ok = (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)
    if not ok:
        left = "" if lo == -math.inf else f"{lo:g} {'<' if lo_open else '<='} "
        right = "" if hi == math.inf else f" {'<' if hi_open else '<='} {hi:g}"
        raise ValueError(f"{who}: invalid {name}={v!r}; expected {left}{name}{right}")
    return v


def params_tree(params: Any, who: str) -> None:
    """Refuse, at ``init``, what is not a tree of parameters: a module, an iterator (a
    generator such as ``model.parameters()`` would be used up by the first member's
    ``init``), a leaf that is not a tensor or ``None``, an integer or bool tensor; warn for
    a ``state_dict()`` (it holds buffers too). Runs once per ``init`` (never in
    ``update``)."""
    if isinstance(params, torch.nn.Module):
        raise TypeError(
            f"{who}: params is the module {type(params).__name__}, not a tree of its "
            "parameters: pass dict(model.named_parameters())"
        )
    if isinstance(params, Iterator):
        raise TypeError(
            f"{who}: params is a {type(params).__name__} (e.g. model.parameters()), which "
            "the first member's init would use up, leaving the others nothing: pass "
            "dict(model.named_parameters()) (or list(model.parameters()))"
        )
    if isinstance(params, dict) and hasattr(params, "_metadata"):
        warnings.warn(
            f"{who}: params looks like a module's state_dict(), which holds its buffers "
            "too (e.g. BatchNorm's running statistics, an int64 batch counter) and detached "
            "tensors: the state would have entries the gradients lack; pass "
            "dict(model.named_parameters()) unless this tree is what you mean",
            UserWarning,
            stacklevel=3,
        )
    paths, leaves, _ = optree.tree_flatten_with_path(params, none_is_leaf=True)
    for path, leaf in zip(paths, leaves):
        if leaf is None:
            continue
        where = f"params{path_str(path)}"
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(
                f"{who}: {where} is a {type(leaf).__name__}, not a tensor: a params tree "
                "holds torch.Tensor leaves (torch.as_tensor(...) a number or an array) or None"
            )
        if not (leaf.is_floating_point() or leaf.is_complex()):
            raise TypeError(
                f"{who}: {where} has dtype {leaf.dtype}: gradient transformations update "
                "floating-point (or complex) parameters; leave integer tensors out of the "
                "tree (or give them None)"
            )
