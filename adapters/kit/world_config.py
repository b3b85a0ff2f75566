"""The geometry and options of a World: what a scenario, a fuzzer draw or an explorer bound fixes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from epd_receiver.fsm import ReceiverConfig


@dataclass(frozen=True, slots=True)
class WorldConfig:
    block_size: int
    num_blocks: int
    default_alloc_tokens: int
    hidden_size: int
    deepstack: int = 0
    max_total_tokens: int = 1 << 24
    timeouts: dict[str, float | None] = field(default_factory=dict)  # ReceiverConfig *_timeout_s overrides
    sender_block_size: int | None = None  # the Encode side's B, when it is misconfigured to differ
    async_abort: bool = False  # the sender may still land a chunk after an abort, until it acts on it
    # Links conclude locally, as SGLang's receiver: an abort turns poll() to Failed and never reaches the
    # sender, which lands what it had in flight; terminal statuses latch.
    local_conclusion: bool = False

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WorldConfig:
        return cls(
            block_size=int(data["block_size"]),
            num_blocks=int(data["num_blocks"]),
            default_alloc_tokens=int(data["default_alloc_tokens"]),
            hidden_size=int(data["hidden_size"]),
            deepstack=int(data.get("deepstack", 0)),
            max_total_tokens=int(data.get("max_total_tokens", 1 << 24)),
            timeouts={k: None if v is None else float(v) for k, v in dict(data.get("timeouts", {})).items()},
            sender_block_size=None if data.get("sender_block_size") is None else int(data["sender_block_size"]),
            async_abort=bool(data.get("async_abort", False)),
            local_conclusion=bool(data.get("local_conclusion", False)),
        )

    def receiver_config(self) -> ReceiverConfig:
        return ReceiverConfig(self.default_alloc_tokens, self.max_total_tokens, **self.timeouts)  # type: ignore[arg-type]
