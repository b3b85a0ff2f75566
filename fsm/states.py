"""The controller's states, named in code for type checking; spec/receiver.toml must declare exactly these."""

from __future__ import annotations

from enum import Enum


class State(Enum):
    BOOTSTRAPPING = "BOOTSTRAPPING"
    WAITING_FOR_INPUT = "WAITING_FOR_INPUT"
    TRANSFERRING = "TRANSFERRING"
    WAITING_FOR_BLOCKS = "WAITING_FOR_BLOCKS"
    RESUMING = "RESUMING"
    SUCCESS = "SUCCESS"
    FAILED = "FAILED"
