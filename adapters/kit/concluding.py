"""Links that fold their own conclusions into ``poll()``, as the SGLang fork's receiver does.

The controller must never take such a conclusion as evidence that a sender stopped writing: the fuzzer
runs with these links beside the plain ones, so that a controller that did would hand fenced blocks to
another request while the sender's late write is still on its way.
"""

from __future__ import annotations

from collections.abc import Sequence

from epd_receiver.adapters.ports.sender_links import ProgressSenderLink, SenderLink
from epd_receiver.fsm import KVPoll

_TERMINAL = (int(KVPoll.Failed), int(KVPoll.Success))


class LocallyConcludingLink:
    """A link shaped as the SGLang fork's ``MooncakeEmbeddingReceiver``, over the in-process sender.

    What it reproduces (ZhengWG/sglang cca20b0, python/sglang/srt/disaggregation/mooncake/conn_multimodal.py):
    ``abort()`` records a local conclusion of Failed and sends nothing to the Encode side (:1224-1230), so
    the sender never learns of it and lands whatever it had in flight; ``poll()`` returns that conclusion,
    and latches the first Failed or Success it reads from the status table (:1197-1205). The remote status
    stays readable beside it, as the manager's per-room table is (:156, :628-642): ``writes_stopped`` reads
    that, never the conclusion.
    """

    __slots__ = ("_inner", "aborted", "concluded")

    def __init__(self, inner: SenderLink) -> None:
        self._inner = inner
        self.concluded: int | None = None
        self.aborted = False

    def poll(self) -> int:
        if self.concluded is None:
            value = self._inner.poll()
            if value in _TERMINAL:
                self.concluded = value
            return value
        return self.concluded

    def init(self, blocks: Sequence[int], allocated_tokens: int) -> None:
        self._inner.init(blocks, allocated_tokens)

    def resume(self, blocks: Sequence[int], sent_tokens: int, allocated_tokens: int) -> None:
        self._inner.resume(blocks, sent_tokens, allocated_tokens)

    def abort(self) -> None:
        self.aborted = True
        self.concluded = int(KVPoll.Failed)

    def writes_stopped(self) -> bool:
        return self._inner.writes_stopped()

    def failure_reason(self) -> str | None:
        return self._inner.failure_reason()


class LocallyConcludingProgressLink(LocallyConcludingLink):
    """The same over a sender that reports progress (the fork has none; the fuzzer combines the two)."""

    __slots__ = ()

    def landed_tokens(self) -> int:
        return self._inner.landed_tokens()  # type: ignore[attr-defined, no-any-return]


def concluding(link: SenderLink) -> LocallyConcludingLink:
    if isinstance(link, ProgressSenderLink):
        return LocallyConcludingProgressLink(link)
    return LocallyConcludingLink(link)
