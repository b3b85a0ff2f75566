"""Hypothesis profiles (``dev``, ``ci``, ``nightly``) come from the fuzzer itself, so CLI and tests agree."""

from __future__ import annotations

import logging

from epd_receiver.adapters.kit.fuzz_profiles import register_profiles

register_profiles()
logging.getLogger("transitions").setLevel(logging.ERROR)
