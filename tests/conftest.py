"""Test configuration: hypothesis profiles and shared fixtures.

Profiles: ``ci`` (fixed seed, bounded examples; used when CI=true), ``dev`` (default,
a few more examples), ``long`` (for fuzzing sessions: HYPOTHESIS_PROFILE=long).
"""

from __future__ import annotations

import os

import torch
from hypothesis import HealthCheck, settings

_common = dict(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("ci", max_examples=25, derandomize=True, print_blob=True, **_common)
settings.register_profile("dev", max_examples=40, **_common)
settings.register_profile("long", max_examples=2000, **_common)
_default = "ci" if os.environ.get("CI", "").lower() in ("1", "true") else "dev"
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", _default))

torch.set_num_threads(1)
