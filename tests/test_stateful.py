"""The real controller under the protocol fuzzer (adapters/fuzz.py): every invariant after every step."""

from __future__ import annotations

from epd_receiver.adapters.fuzz import ReceiverProtocol

TestReceiverProtocol = ReceiverProtocol.TestCase
