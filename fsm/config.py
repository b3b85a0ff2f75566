"""What one queue's requests share: the configuration, the spec's tables in the form the poll loop runs,
and the ports; and the checks that refuse a configuration that cannot work before any request is taken.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Generic

from .errors import ConfigError, SpecError
from .kvpoll import LINK_ERROR, UNKNOWN_STATUS
from .ports import BlockAllocator, BlockBuffers, Clock, NoMetrics, PayloadT, RankGroup, ReceiverMetrics
from .spec import Guards, PollOutcome, ReceiverSpec
from .states import State

if TYPE_CHECKING:
    from .machine import SpecMachine


@dataclass(frozen=True, slots=True)
class ReceiverConfig:
    """What the Language side decides without knowing the payload."""

    default_alloc_tokens: int = 8192
    max_total_tokens: int = 1 << 24
    # Deadlines per state, in seconds (spec/receiver.toml [timeouts]); None waits forever. The states
    # that wait on the sender have one by default; the ones that wait for the pool do not.
    bootstrap_timeout_s: float | None = 60.0
    admission_timeout_s: float | None = None
    transfer_timeout_s: float | None = 60.0
    blocks_timeout_s: float | None = None
    resume_timeout_s: float | None = 60.0
    # How long a failed request fences blocks the sender may still write into, when the sender neither
    # acknowledges the abort nor reports a terminal status: then it is presumed gone. None fences until
    # the sender answers, which a dead sender never does.
    drain_timeout_s: float | None = 30.0
    # With several tensor-parallel ranks: compare the ranks' allocator fingerprints every this many
    # iterations, and the assembled payloads' checksums at Success.
    lockstep_every: int = 64
    compare_payloads: bool = True

    def __post_init__(self) -> None:
        """Every deadline field must be positive or None; which of them bound which state is the spec's, and
        the queue checks that against the spec it runs."""
        if self.default_alloc_tokens <= 0 or self.max_total_tokens <= 0 or self.lockstep_every <= 0:
            raise ConfigError("default_alloc_tokens, max_total_tokens and lockstep_every must be positive")
        for name in (f.name for f in fields(self) if f.name.endswith("_timeout_s")):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{name} must be positive or None")


@dataclass(frozen=True, slots=True)
class PollCell:
    """One cell of the poll table as the request runs it: the spec's outcome, with its guards turned into
    one call (``enabled``; None when a transition always takes the event) asked before any trigger."""

    event: str | None
    cause: str | None
    enabled: Callable[[Any], bool] | None = None


PollTable = Mapping[State, Mapping[int, PollCell]]


@dataclass(frozen=True, slots=True)
class Wiring(Generic[PayloadT]):
    """What every request of one queue shares: the spec's tables and the ports."""

    spec: ReceiverSpec
    polls: PollTable
    buffers: BlockBuffers[PayloadT]
    allocator: BlockAllocator
    config: ReceiverConfig
    clock: Clock
    deadlines: Mapping[State, float]
    ranks: RankGroup
    metrics: ReceiverMetrics = field(default_factory=NoMetrics)
    # The queue's Machine, which fires the requests' events (``ReceiverRequest.trigger``); None for
    # requests no Machine drives.
    machine: SpecMachine | None = None


def deadlines(spec: ReceiverSpec, config: ReceiverConfig) -> dict[State, float]:
    """The spec names which config field bounds each state; unset fields mean no deadline."""
    found = {}
    for state, timeout in spec.timeouts.items():
        if not hasattr(config, timeout.field):
            raise SpecError(f"timeouts.{state.name}: ReceiverConfig has no field {timeout.field!r}")
        value = getattr(config, timeout.field)
        if value is None:
            continue
        if value <= 0:
            raise ConfigError(f"{timeout.field} must be positive or None")
        found[state] = float(value)
    return found


def first_allocation(default_alloc_tokens: int, block_size: int) -> int:
    """Blocks in A0, the first allocation every request takes: D rounded up to whole blocks."""
    return -(-default_alloc_tokens // block_size)


def check_pool(config: ReceiverConfig, buffers: BlockBuffers[Any], allocator: BlockAllocator) -> None:
    """Refuse a pool no request could use: every request would otherwise fail PoolTooSmall, or its rows
    would be read with another block size than the one they were allocated with."""
    b = allocator.block_size
    if buffers.block_size != b:
        raise ConfigError(f"buffers.block_size={buffers.block_size} differs from allocator.block_size={b}")
    first = first_allocation(config.default_alloc_tokens, b)
    if first > allocator.num_blocks:
        raise ConfigError(
            f"ReceiverConfig.default_alloc_tokens={config.default_alloc_tokens} needs {first} blocks of "
            f"allocator.block_size={b} for the first allocation; the pool has allocator.num_blocks="
            f"{allocator.num_blocks} ({allocator.num_blocks * b} tokens)"
        )


def poll_table(spec: ReceiverSpec, model: type) -> PollTable:
    """Index the spec's poll table by plain int, the special values included, so that the per-poll fast
    path is one dict lookup and, for a guarded cell, one call: the guards are looked up on the request
    class (``model``) once, here. The repeated Transferring of every resumed request, and every poll of a
    fenced one, take this path every iteration."""
    table: dict[State, dict[int, PollCell]] = {}
    for state, outcomes in spec.polls.items():
        row = {int(value): _cell(outcome, model) for value, outcome in outcomes.items()}
        row[LINK_ERROR] = _cell(spec.link_error_in(state), model)
        row[UNKNOWN_STATUS] = _cell(spec.unknown_poll_in(state), model)
        table[state] = row
    return table


def _cell(outcome: PollOutcome, model: type) -> PollCell:
    return PollCell(outcome.event, outcome.cause, _enabled(outcome.enabled_if, model))


def _enabled(alternatives: tuple[Guards, ...], model: type) -> Callable[[Any], bool] | None:
    """One call that says whether some alternative holds; None when one always does. A single condition
    is the guard's own function."""
    if not alternatives:
        return None
    compiled = [
        ([getattr(model, name) for name in a.conditions], [getattr(model, name) for name in a.unless])
        for a in alternatives
    ]
    if len(compiled) == 1 and len(compiled[0][0]) == 1 and not compiled[0][1]:
        only: Callable[[Any], bool] = compiled[0][0][0]
        return only

    def enabled(request: Any) -> bool:
        return any(
            all(guard(request) for guard in conditions) and not any(guard(request) for guard in unless)
            for conditions, unless in compiled
        )

    return enabled
