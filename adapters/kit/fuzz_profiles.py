"""The fuzzer's Hypothesis profiles (``dev``, ``ci``, ``nightly``, ``mutation``), registered by the CLI and the
tests alike (``tests/conftest.py``), so that a run's budget is named, not repeated."""

from __future__ import annotations

import os
from typing import Any

from hypothesis import HealthCheck, Phase, settings

FAST_PHASES = [Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink]
PROFILES: dict[str, dict[str, Any]] = {
    # quick and random, for a developer's loop
    "dev": {"max_examples": 50, "stateful_step_count": 30, "deadline": None, "phases": FAST_PHASES},
    # derandomized; no explain or target phase (a failing stateful run there can take minutes)
    "ci": {
        "max_examples": 200,
        "stateful_step_count": 50,
        "derandomize": True,
        "database": None,
        "deadline": None,
        "print_blob": True,
        "report_multiple_bugs": False,
        "phases": FAST_PHASES,
    },
    # large and random
    "nightly": {"max_examples": 2000, "stateful_step_count": 100, "deadline": None},
    # mutation testing: the ci budget, but a failure only needs finding, not shrinking
    "mutation": {
        "max_examples": 200,
        "stateful_step_count": 50,
        "derandomize": True,
        "database": None,
        "deadline": None,
        "report_multiple_bugs": False,
        "phases": [Phase.explicit, Phase.generate],
    },
}


def register_profiles() -> None:
    """Register ``dev``, ``ci`` and ``nightly``; load ``HYPOTHESIS_PROFILE``, else ``ci`` under CI, else ``dev``."""
    for name, options in PROFILES.items():
        settings.register_profile(
            name, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much], **options
        )
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev"))
