"""The undo record of ``ChainedOptimizer(transactional=True)``: parameters, the wrapped
optimizer's state and its param_groups as they were before a step."""

from __future__ import annotations

import copy
from typing import Any

import torch

__all__ = ["Snapshot"]


class Snapshot:
    """Parameters, optimizer state and param_groups as they were, to undo a failed step.

    Tensors are copied (one copy of the parameters and of the optimizer's state tensors)
    and restored in place into the original tensor objects, so references held elsewhere
    (an EMA of the weights, a logger) stay valid. Other state values are deep-copied.

    Copies of CPU tensors go into ``buffers``, kept from step to step: a fresh large CPU
    allocation costs a page fault per page every step (measured: more than the copy
    itself), while accelerator allocators recycle memory, so there the copies are
    transient and their memory is free for activations between steps.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, buffers: list[torch.Tensor]) -> None:
        self.optimizer = optimizer
        self._buffers = buffers
        self._used = 0
        params = [p for g in optimizer.param_groups for p in g["params"]]
        with torch.no_grad():
            self.params = [(p, self._copy(p)) for p in params]
            self.state: list[tuple[Any, dict[Any, Any], list[tuple[Any, Any, Any]]]] = []
            for key, entry in optimizer.state.items():
                values: list[tuple[Any, Any, Any]] = []
                for k, v in entry.items():
                    if isinstance(v, torch.Tensor):
                        values.append((k, v, self._copy(v)))
                    else:
                        values.append((k, None, copy.deepcopy(v)))
                self.state.append((key, entry, values))
        self.groups = [dict(g) for g in optimizer.param_groups]
        del self._buffers[self._used :]  # tensors that are gone since the last step

    def _copy(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        if t.device.type != "cpu" or type(t) is not torch.Tensor:
            return t.clone()
        i, self._used = self._used, self._used + 1
        if i < len(self._buffers):
            buf = self._buffers[i]
            if buf.shape == t.shape and buf.dtype == t.dtype and buf.stride() == t.stride():
                return buf.copy_(t)
            self._buffers[i] = buf = torch.empty_like(t)
        else:
            buf = torch.empty_like(t)
            self._buffers.append(buf)
        return buf.copy_(t)

    def restore(self) -> None:
        with torch.no_grad():
            for p, saved in self.params:
                p.copy_(saved)
            state = self.optimizer.state
            known = {id(key) for key, _, _ in self.state}
            for key in [k for k in state if id(k) not in known]:
                del state[key]  # state the failed step created (lazy init)
            for key, entry, values in self.state:
                entry.clear()
                for k, orig, saved in values:
                    if orig is not None and orig.shape == saved.shape:
                        orig.copy_(saved)
                        entry[k] = orig
                    else:  # (a copy: a kept buffer is overwritten at the next step)
                        entry[k] = saved.clone() if isinstance(saved, torch.Tensor) else saved
                state[key] = entry
        for group, saved_group in zip(self.optimizer.param_groups, self.groups):
            group.clear()
            group.update(saved_group)
