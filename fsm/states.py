"""The controller's states, named in code for type checking; spec/receiver.toml must declare exactly these."""

from __future__ import annotations

from enum import Enum


class State(Enum):
    # Members are singletons compared by identity, so identity hashing agrees with equality; Enum's own
    # __hash__ is a Python-level call, and every poll of every request looks its state up in a dict.
    __hash__ = object.__hash__

    BOOTSTRAPPING = "BOOTSTRAPPING"
    WAITING_FOR_INPUT = "WAITING_FOR_INPUT"
    TRANSFERRING = "TRANSFERRING"
    WAITING_FOR_BLOCKS = "WAITING_FOR_BLOCKS"
    RESUMING = "RESUMING"
    SUCCESS = "SUCCESS"
    FAILED = "FAILED"
