"""A configuration that cannot work is refused, naming the fields: by ReceiverConfig alone, or when the
queue is built.

A first allocation larger than the pool used to make every request fail PoolTooSmall, progress senders
and one-token payloads included; ports of different block sizes would read rows with a B they were not
allocated with. Both are mistakes of whoever wires the queue, so they surface there, as a ConfigError.
"""

from __future__ import annotations

import pytest

from epd_receiver.adapters.ports.allocator import OwningBlockAllocator
from epd_receiver.adapters.ports.buffers import TorchBlockBuffers
from epd_receiver.fsm import ConfigError, ReceiverConfig, ReceiverQueue, load_spec

B = 4
BLOCKS = 8


def queue(default_alloc_tokens: int, *, buffers_b: int = B, allocator_b: int = B) -> ReceiverQueue[object]:
    return ReceiverQueue(
        TorchBlockBuffers(BLOCKS, buffers_b, 8),
        OwningBlockAllocator(BLOCKS, allocator_b),
        ReceiverConfig(default_alloc_tokens=default_alloc_tokens),
    )


def test_config_error_is_a_value_error_exported_by_the_core() -> None:
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize("tokens", [BLOCKS * B + 1, 10 * BLOCKS * B])
def test_a_first_allocation_larger_than_the_pool_is_refused_naming_the_fields(tokens: int) -> None:
    needed = -(-tokens // B)
    expected = (
        rf"^ReceiverConfig\.default_alloc_tokens={tokens} needs {needed} blocks of allocator\.block_size={B} "
        rf"for the first allocation; the pool has allocator\.num_blocks={BLOCKS} \({BLOCKS * B} tokens\)$"
    )
    with pytest.raises(ConfigError, match=expected):
        queue(tokens)


@pytest.mark.parametrize("tokens", [1, BLOCKS * B - B + 1, BLOCKS * B])
def test_a_first_allocation_that_fits_the_pool_is_accepted(tokens: int) -> None:
    assert len(queue(tokens)) == 0


def test_buffers_and_an_allocator_of_different_block_sizes_are_refused_naming_both_fields() -> None:
    with pytest.raises(ConfigError, match=r"^buffers\.block_size=8 differs from allocator\.block_size=4$"):
        queue(B, buffers_b=8)


@pytest.mark.parametrize("field", sorted({t.field for t in load_spec().timeouts.values()}))
def test_every_deadline_field_the_spec_names_must_be_positive_or_none(field: str) -> None:
    with pytest.raises(ConfigError, match=f"^{field} must be positive or None$"):
        ReceiverConfig(**{field: 0.0})  # type: ignore[arg-type]
    assert getattr(ReceiverConfig(**{field: None}), field) is None  # type: ignore[arg-type]


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
