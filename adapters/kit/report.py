"""What a World reports: each request's outcome, the pool's balance and the violations, as plain data.

``simulate`` prints it, ``replay`` compares it with a scenario's expectations, and the conformance check
reads one request at a time through ``request_view``; a retired request is described by the judge's
outcome, since the controller has forgotten it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from epd_receiver.adapters.ports.allocator import OwningBlockAllocator
from epd_receiver.adapters.ports.payload import EmbeddingPayload
from epd_receiver.fsm import ReceiverQueue, Room

if TYPE_CHECKING:
    from epd_receiver.adapters.kit.judge import Outcome


class Reporting:
    """The reports of a World (mixed into it)."""

    queue: ReceiverQueue[EmbeddingPayload]
    allocator: OwningBlockAllocator
    outcomes: dict[Room, Outcome]

    def check(self) -> list[str]: ...

    def request_view(self, room: Room) -> dict[str, Any]:
        """The controller's view of one request, live or retired: state, blocks held, cached T, landed."""
        request = self.queue.get(room)
        outcome = self.outcomes[room]
        if request is None:
            return {"state": outcome.states[-1].name, "blocks": [], "total": outcome.total, "landed": outcome.landed}
        return {
            "state": request.state.name,
            "blocks": list(request.blocks),
            "total": request.total_tokens,
            "landed": request.landed,
        }

    def report(self) -> dict[str, Any]:
        requests: dict[str, Any] = {}
        for room, outcome in self.outcomes.items():
            request = self.queue.get(room)
            if request is not None and outcome.verified is None:
                outcome.reads, outcome.resumes = request.reads, request.resumes
            requests[str(room)] = {
                "state": outcome.states[-1].name,
                "reads": outcome.reads,
                "resumes": outcome.resumes,
                "verified": bool(outcome.verified),
                "error": outcome.error,
            }
        return {
            "requests": requests,
            "pool": {
                "free": self.allocator.free_count,
                "owned": self.allocator.owned_count,
                "fenced": self.allocator.fenced_count,
                "double_frees": self.allocator.rejected_frees,
            },
            "violations": self.check(),
        }
