"""Former home of ``masked`` and ``partition``, kept as a re-export: they now live in
:mod:`gradchain.combine`, with ``chain``."""

from gradchain.combine import MaskedState, PartitionState, masked, partition

__all__ = ["MaskedState", "masked", "PartitionState", "partition"]
