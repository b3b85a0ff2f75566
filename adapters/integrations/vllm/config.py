"""What the connector reads from vLLM's ``ECTransferConfig``: the pool, the deadlines and the transport.

vLLM's factory builds a connector from ``(vllm_config, role)`` alone, so everything that is ours comes from
``ec_transfer_config.ec_connector_extra_config``. Callables (the link factory, the clock) are named there by
``"package.module:attribute"``, since that dictionary travels as JSON on vLLM's command line.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from epd_receiver.fsm import ConfigError, ReceiverConfig

__all__ = ["ConsumerConfig", "import_named"]

_DEADLINES = (
    "bootstrap_timeout_s",
    "admission_timeout_s",
    "transfer_timeout_s",
    "blocks_timeout_s",
    "resume_timeout_s",
    "drain_timeout_s",
)


def import_named(name: str) -> Any:
    """``"package.module:attribute"`` imported; a name without a colon is refused, not guessed."""
    module, sep, attribute = name.partition(":")
    if not sep or not module or not attribute:
        raise ConfigError(f"{name!r} must be written 'package.module:attribute'")
    return getattr(importlib.import_module(module), attribute)


@dataclass(frozen=True, slots=True)
class ConsumerConfig:
    """The receive pool's geometry, the controller's limits and where links and time come from."""

    hidden_size: int
    num_blocks: int = 64
    block_size: int = 1024
    receiver: ReceiverConfig = field(default_factory=lambda: ReceiverConfig(default_alloc_tokens=1024))
    link_factory: str | None = None
    clock: str | None = None
    workers: int = 1  # tensor-parallel workers that must each load every item
    extra: Mapping[str, Any] = field(default_factory=dict)  # the whole extra config, for the link factory

    @classmethod
    def from_vllm_config(cls, vllm_config: Any) -> ConsumerConfig:
        """From ``ec_connector_extra_config``; the hidden size falls back to the model's when a model is set."""
        extra: Mapping[str, Any] = vllm_config.ec_transfer_config.ec_connector_extra_config or {}
        hidden = extra.get("hidden_size")
        if hidden is None and vllm_config.model_config is not None:
            hidden = vllm_config.model_config.get_hidden_size()
        if hidden is None:
            raise ConfigError("ec_connector_extra_config needs hidden_size when vLLM has no model config")
        block_size = int(extra.get("block_size", 1024))
        deadlines = {name: extra[name] for name in _DEADLINES if name in extra}
        receiver = ReceiverConfig(default_alloc_tokens=int(extra.get("default_alloc_tokens", block_size)), **deadlines)
        return cls(
            hidden_size=int(hidden),
            num_blocks=int(extra.get("num_blocks", 64)),
            block_size=block_size,
            receiver=receiver,
            link_factory=extra.get("link_factory"),
            clock=extra.get("clock"),
            workers=int(vllm_config.parallel_config.tensor_parallel_size),
            extra=dict(extra),
        )

    def make_clock(self) -> Any:
        """The clock the deadlines run on: the named class's instance, or the controller's default (None)."""
        return None if self.clock is None else import_named(self.clock)()

    def make_link_factory(self) -> Callable[..., Any]:
        if self.link_factory is None:
            raise ConfigError("ec_connector_extra_config needs link_factory ('package.module:attribute')")
        factory: Callable[..., Any] = import_named(self.link_factory)
        return factory
