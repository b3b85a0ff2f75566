"""The controller in place of the SGLang fork's Language-side queues: ``install`` and ``receiver_factory``."""

from epd_receiver.adapters.integrations.sglang.install import install, receiver_factory

__all__ = ["install", "receiver_factory"]
