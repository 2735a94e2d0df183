"""The frame every torch-style alias shares: ``maximize``, weight decay (added to the
gradient, as torch's ``weight_decay``, or decoupled, added to the direction), the rule's
block, and the learning rate last."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gradchain.base import GradientTransformation
from gradchain.transforms import scale, scale_by_learning_rate


def rule_chain(
    block: GradientTransformation,
    *,
    lr: Any,
    maximize: bool,
    decay: GradientTransformation | None,
    decoupled: bool = False,
    after: Sequence[GradientTransformation] = (),
) -> tuple[list[GradientTransformation], int]:
    """The members of ``chain(scale(-1) if maximize, decay if not decoupled, block,
    *after, decay if decoupled, scale_by_learning_rate(lr))``, and the block's position
    (what the rule's binding reads its state from)."""
    txs: list[GradientTransformation] = [scale(-1.0)] if maximize else []
    if decay is not None and not decoupled:
        txs.append(decay)
    block_at = len(txs)
    txs += [block, *after]
    if decay is not None and decoupled:
        txs.append(decay)
    txs.append(scale_by_learning_rate(lr))
    return txs, block_at
