"""Update rules, one module per algorithm (see ``docs/optimizers-modern.md``)."""
