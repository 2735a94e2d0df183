"""Former home of :func:`~gradchain.update_and_apply_`, kept as a re-export: the function
now lives in :mod:`gradchain.update` (next to ``apply_updates_``), and each rule's binding
to torch's kernel in its own module of :mod:`gradchain.optim`."""

from gradchain.update import update_and_apply_

__all__ = ["update_and_apply_"]
