"""ReceiverConfig refuses what no queue could run with, and accepts the smallest that it can."""

from __future__ import annotations

import pytest

from epd_receiver.fsm import (
    ReceiverConfig,
)


@pytest.mark.parametrize(
    "fields",
    [
        {"default_alloc_tokens": 0},
        {"max_total_tokens": 0},
        {"max_total_tokens": -1},
        {"transfer_timeout_s": 0.0},
        {"resume_timeout_s": -1.0},
    ],
)
def test_impossible_configuration_is_refused(fields: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        ReceiverConfig(**fields)  # type: ignore[arg-type]


def test_the_smallest_configuration_is_accepted() -> None:
    config = ReceiverConfig(default_alloc_tokens=1, max_total_tokens=1, transfer_timeout_s=0.5)
    assert (config.default_alloc_tokens, config.max_total_tokens, config.transfer_timeout_s) == (1, 1, 0.5)
