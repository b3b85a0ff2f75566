"""The pool the block-buffer tests share: ``TorchBlockBuffers`` without deepstack and with two layers."""

from __future__ import annotations

import pytest
from support.block_tokens import NUM_BLOCKS, B, H

from epd_receiver.adapters.ports.buffers import TorchBlockBuffers


@pytest.fixture(params=[0, 2], ids=["no_deepstack", "deepstack_k2"])
def deepstack_layers(request: pytest.FixtureRequest) -> int:
    return int(request.param)


@pytest.fixture
def buffers(deepstack_layers: int) -> TorchBlockBuffers:
    return TorchBlockBuffers(NUM_BLOCKS, B, H, deepstack_layers)
