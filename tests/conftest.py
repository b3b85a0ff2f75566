"""Hypothesis profiles for the stateful fuzzing.

``dev`` is quick and random, ``ci`` is derandomized and skips the explain and target phases (a failing
stateful run there can take minutes), ``nightly`` is large and random. ``ci`` is the default when the
``CI`` variable is set; ``HYPOTHESIS_PROFILE`` picks any of them explicitly.
"""

from __future__ import annotations

import logging
import os

from hypothesis import HealthCheck, Phase, settings

FAST_PHASES = [Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink]

settings.register_profile(
    "dev",
    max_examples=50,
    stateful_step_count=30,
    deadline=None,
    phases=FAST_PHASES,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "ci",
    max_examples=200,
    stateful_step_count=50,
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    report_multiple_bugs=False,
    phases=FAST_PHASES,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
settings.register_profile(
    "nightly",
    max_examples=2000,
    stateful_step_count=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev"))

logging.getLogger("transitions").setLevel(logging.ERROR)
