"""A vLLM producer worker in a process of its own: our connector built by vLLM's worker path, fed by the EC mixin.

``python vllm_producer_process.py BOOTSTRAP HIDDEN BLOCK HASH:TOKENS ...``: vLLM's
``ensure_ec_transfer_initialized`` (vllm/distributed/ec_transfer/ec_transfer_state.py:26-40) builds the worker's
connector through the factory, and each item goes through ``ECConnectorModelRunnerMixin.maybe_save_ec_to_connector``
(vllm/v1/worker/ec_connector_model_runner_mixin.py:24-33), as after the encoder ran. The embeddings derive from
the hash (``encoded``), so the consumer's test checks every loaded tensor bit for bit. The process prints
``ready`` and serves until its standard input closes; a line ``stats`` on it is answered with the producer's
``stats()`` as one JSON line.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def encoded(mm_hash: str, tokens: int, hidden: int) -> torch.Tensor:
    """What the encoder produced for the item, the same in every process."""
    seed = int.from_bytes(hashlib.blake2b(mm_hash.encode(), digest_size=7).digest(), "big")
    return torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def main(bootstrap: str, hidden: int, block: int, items: list[str]) -> None:
    import vllm.distributed.ec_transfer.ec_transfer_state as ec_state
    from vllm.v1.worker.ec_connector_model_runner_mixin import ECConnectorModelRunnerMixin

    from support.vllm_engine import vllm_config

    config = vllm_config({"bootstrap": bootstrap, "hidden_size": hidden, "block_size": block})
    # vLLM refuses a producer-only config without a multimodal model (vllm/config/vllm.py:2889-2900), and no
    # model weights are at hand: the role is set once the rest of the config has been validated.
    assert config.ec_transfer_config is not None
    config.ec_transfer_config.ec_role = "ec_producer"
    ec_state.ensure_ec_transfer_initialized(config)
    encoder_cache: dict[str, torch.Tensor] = {}
    for spec in items:
        mm_hash, tokens = spec.rsplit(":", 1)
        encoder_cache[mm_hash] = encoded(mm_hash, int(tokens), hidden)
        ECConnectorModelRunnerMixin.maybe_save_ec_to_connector(encoder_cache, mm_hash)
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() == "stats":
            print(json.dumps(ec_state.get_ec_transfer().sender.stats()), flush=True)  # type: ignore[attr-defined]
    ec_state.ensure_ec_transfer_shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:])
