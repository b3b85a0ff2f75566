"""epd-receiver: the Language side's receiver of multimodal embeddings, chunked into a bounded block pool.

``epd_receiver.fsm`` is the pure protocol core (a state machine generated from ``spec/receiver.toml``);
``epd_receiver.adapters`` holds, in layers, the ports' implementations, the integrations into serving
systems, the verification kit and the command-line tools.
"""

__version__ = "0.2.0"
