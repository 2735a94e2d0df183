"""Checkpoint files: atomic writes, and loading that never runs code.

``save(path, obj)`` writes ``obj`` (plain data: dicts, lists, tuples, tensors, numbers,
strings; e.g. ``{"model": model.state_dict(), "opt": opt.state_dict(), "tx":
gc.to_state_dict(state)}``) with ``torch.save`` to a temporary file in the same directory,
flushes it to disk (``fsync``) and renames it over ``path`` with ``os.replace``, which is
atomic. A process killed at any moment, even in the middle of a save, leaves at ``path``
either the previous checkpoint or the new one, whole; never a torn file. (It may leave a
stray ``.<name>.*.tmp`` file next to it, which is safe to delete.)

``load(path)`` reads it back with ``torch.load(weights_only=True)``: only tensors and
plain containers are rebuilt, so a tampered or foreign file that would run code when
unpickled is refused with ``pickle.UnpicklingError`` instead of being executed.

Example:
    >>> import os, tempfile, torch, gradchain as gc
    >>> tx = gc.chain(gc.clip_by_norm(1.0), gc.adam(lr=1e-3))
    >>> params = {"w": torch.zeros(3)}
    >>> state = tx.init(params)
    >>> path = os.path.join(tempfile.mkdtemp(), "ckpt.pt")
    >>> gc.checkpoint.save(path, {"params": params, "tx": gc.to_state_dict(state), "step": 7})
    >>> ckpt = gc.checkpoint.load(path)
    >>> ckpt["step"], gc.from_state_dict(state, ckpt["tx"])[1][0].count
    (7, tensor(0))
"""

from __future__ import annotations

import collections
import os
import pickle
import re
import tempfile
from typing import Any

import torch

__all__ = ["save", "load"]

_PLAIN_LEAVES = (int, float, bool, complex, str, bytes, type(None), torch.dtype, torch.device)


def _check_plain(obj: Any, path: str) -> None:
    """Raise ``TypeError`` at the first object ``torch.load(weights_only=True)`` would
    refuse to read back, so that a save never writes a checkpoint that cannot be loaded."""
    if isinstance(obj, torch.Tensor):
        if type(obj) not in (torch.Tensor, torch.nn.Parameter):
            raise TypeError(
                f"checkpoint.save: obj{path} is a {type(obj).__name__}, a tensor subclass; "
                "save plain tensors (e.g. DTensor.full_tensor(), or use "
                "torch.distributed.checkpoint for sharded state)"
            )
        return
    if isinstance(obj, _PLAIN_LEAVES) or type(obj) is torch.Size:
        return
    if type(obj) in (dict, collections.OrderedDict):
        for key, value in obj.items():
            if not isinstance(key, (int, float, bool, str, bytes, type(None))):
                raise TypeError(
                    f"checkpoint.save: obj{path} has a key of type {type(key).__name__}; "
                    "use str or int keys"
                )
            _check_plain(value, f"{path}[{key!r}]")
        return
    if type(obj) in (list, tuple):
        for i, value in enumerate(obj):
            _check_plain(value, f"{path}[{i}]")
        return
    hint = (
        " (a gradchain state: convert it with gc.to_state_dict(state))"
        if isinstance(obj, tuple)
        else ""
    )
    raise TypeError(
        f"checkpoint.save: obj{path} is a {type(obj).__name__}, which "
        f"torch.load(weights_only=True) cannot read back{hint}; save plain data: dicts, "
        "lists, tuples, tensors, numbers and strings"
    )


def save(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` to ``path`` atomically: a temporary file in the same directory,
    ``fsync``, then ``os.replace`` (and an ``fsync`` of the directory, so the rename
    itself survives a power cut).

    ``obj`` must be plain data that :func:`load` can read back (dicts, lists, tuples,
    tensors, numbers, strings, ``None``); anything else raises ``TypeError`` naming its
    path before a byte is written. Gradchain states are NamedTuples: save
    ``gc.to_state_dict(state)`` and rebuild with ``gc.from_state_dict``.

    Args:
        path: the checkpoint file; its directory must exist.
        obj: the data to save.

    Example:
        >>> import os, tempfile, torch, gradchain as gc
        >>> path = os.path.join(tempfile.mkdtemp(), "ckpt.pt")
        >>> gc.checkpoint.save(path, {"w": torch.ones(2)})
        >>> gc.checkpoint.load(path)
        {'w': tensor([1., 1.])}
        >>> gc.checkpoint.save(path, gc.adam(1e-3).init({"w": torch.ones(2)}))
        Traceback (most recent call last):
        ...
        TypeError: checkpoint.save: obj[0] is a ScaleByAdamState, ... gc.to_state_dict(state)...
    """
    _check_plain(obj, "")
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(directory)


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load(path: str | os.PathLike[str], map_location: Any = None) -> Any:
    """Read a checkpoint written by :func:`save` (or any ``torch.save`` file of plain data)
    with ``torch.load(weights_only=True)``.

    A file that would run code when unpickled (any object other than tensors and plain
    containers) is refused with ``pickle.UnpicklingError``; nothing in it is executed.

    Args:
        path: the checkpoint file.
        map_location: as for ``torch.load`` (e.g. ``"cpu"``).

    Returns:
        The saved data.

    Example:
        >>> import os, pickle, tempfile, gradchain as gc
        >>> path = os.path.join(tempfile.mkdtemp(), "evil.pt")
        >>> class Evil:
        ...     def __reduce__(self):
        ...         return (print, ("this would run",))
        >>> with open(path, "wb") as f:
        ...     pickle.dump(Evil(), f, protocol=2)
        >>> gc.checkpoint.load(path)
        Traceback (most recent call last):
        ...
        _pickle.UnpicklingError: checkpoint.load: ... refused ...
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message is long; keep the sentence that names the refused global.
        found = re.search(r"(?:WeightsUnpickler error: )?([^\n]*GLOBAL.*?\.)(?: |$)", str(err),
                          re.MULTILINE)
        why = found.group(1).strip() if found else str(err).strip().splitlines()[0]
        why = re.sub(r"^WeightsUnpickler error: ", "", why)
        raise pickle.UnpicklingError(
            f"checkpoint.load: {os.fspath(path)} holds an object that is not a tensor or a "
            f"plain container ({why}); unpickling it could run code, so it was refused and "
            "nothing in it was executed (torch.load with weights_only=True)"
        ) from None
