"""The original system's receiver bugs, and plausible bugs of our own making, re-created as variants.

A variant is one named, small deviation applied to the real controller from outside: a spec overlay
(a poll cell or a transition changed) and/or a subclass that replaces one action. The product has no
switch for any of them. The fuzzer must catch every variant (``epd-receiver variants``,
``tests/kit/test_variants.py``); a variant it cannot catch is a hole in the suite. The overlays are
in ``variant_overlays.py``, the subclasses in ``deviations.py``; ``variant_records.py`` keeps what the
fuzzer found for each variant.

Numbers are those of the original system's bug catalogue (spec/RECEIVER.md §6); a variant without one
is a plausible bug that only a property beyond safety catches (a good request lost, a deadline fired
early, the allocation order broken: I12-I14).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from epd_receiver.adapters.kit.deviations import (
    AdmissionsFirst,
    AuxView,
    ChecksumOverEmbeddingsOnly,
    DeadlineFromArrival,
    DedupeByBlocks,
    DeltaDropped,
    FreeKeepsRecord,
    InitWithRequestedTokens,
    OwnFailedAsEvidence,
    StaleAuxTrusted,
    TotalFromCurrentBlocks,
    TryRemainderOnce,
    WarmupTreatedAsReal,
)
from epd_receiver.adapters.kit.eager_fan_in import EagerFanIn
from epd_receiver.adapters.kit.variant_overlays import (
    A0_FREED_BUT_STILL_HELD,
    ABORT_FREES_BLOCKS_IN_FLIGHT,
    AUX_OF_RESUME_BLOCKS_AT_SUCCESS,
    FREE_THEN_TRY_ONCE,
    HOLD_AND_WAIT,
    RANKS_DECIDE_ALONE,
    RESUME_DEDUPED_BY_BLOCKS,
    SECOND_ROUND_NEVER_TRIGGERED,
    SEED_READS_RESUME_BLOCKS,
    STALE_AUX_ASSUMED_ZERO,
    TRANSFERRING_REHANDLED,
)
from epd_receiver.adapters.ports.payload import EmbeddingPayload
from epd_receiver.fsm import ReceiverQueue, ReceiverRequest, ReceiverSpec, load_spec

Request = ReceiverRequest[EmbeddingPayload]


@dataclass(frozen=True)
class Variant:
    name: str
    bug: int | None  # the original's bug number; None for a plausible bug of our own making
    trigger: str
    request_class: type[Request] = ReceiverRequest
    overlay: Mapping[str, Any] = field(default_factory=dict)
    caught_by: frozenset[str] = frozenset()  # the invariants or guards expected to speak first
    ranks: int = 1  # a bug between tensor-parallel ranks is hunted on that many simulated ranks
    rig: Callable[[Any], object] | None = None  # a change to the bench (a sender bug), not to the controller
    queue_class: type[ReceiverQueue[EmbeddingPayload]] = ReceiverQueue  # a deviation of the allocation pass

    def spec(self) -> ReceiverSpec:
        return _spec(self.name)

    def options(self) -> dict[str, Any]:
        """What a World (or a replay) takes to run this variant instead of the controller."""
        return {"spec": self.spec(), "request_class": self.request_class, "queue_class": self.queue_class}


@functools.cache
def _spec(name: str) -> ReceiverSpec:
    return load_spec(overlay=VARIANTS[name].overlay)


# ---- the catalogue -----------------------------------------------------------------------------------

CATALOGUE = (
    Variant(
        "ranks-decide-alone",
        4,
        "Each tensor-parallel rank decides from its own aux row: a rank that read another T (or 0) takes "
        "another branch than its peers, and their pools drift apart.",
        overlay=RANKS_DECIDE_ALONE,
        caught_by=frozenset({"I9"}),
        ranks=2,
    ),
    Variant(
        "init-requested-tokens",
        2,
        "Init carries the requested default D, not the granted len(blocks)*B.",
        InitWithRequestedTokens,
        caught_by=frozenset({"I3", "I12"}),  # the sender refuses the init: a good request is lost
    ),
    Variant(
        "aux-of-resume-blocks-at-success",
        3,
        "At Success after a resume, T is read from the aux row of A1[0], which the sender never wrote.",
        TotalFromCurrentBlocks,
        AUX_OF_RESUME_BLOCKS_AT_SUCCESS,
        frozenset({"ReadOutsideWindow"}),
    ),
    Variant(
        "transferring-rehandled",
        5,
        "Every Transferring poll after the resume re-reads the resume blocks, frees them and resumes again.",
        overlay=TRANSFERRING_REHANDLED,
        caught_by=frozenset({"I1", "I3", "I4", "I5"}),
    ),
    Variant(
        "resume-deduped-by-blocks",
        6,
        "Transferring after the resume re-allocates; a resume is skipped only when the same blocks come back.",
        DedupeByBlocks,
        RESUME_DEDUPED_BY_BLOCKS,
        frozenset({"I1", "I4", "I5", "I6", "I8"}),  # or stuck: a round it thinks it already resumed
    ),
    Variant(
        "seed-reads-resume-blocks",
        7,
        "The seed: every Transferring after the resume reads the resume blocks and takes T from their aux row.",
        TotalFromCurrentBlocks,
        SEED_READS_RESUME_BLOCKS,
        frozenset({"ReadOutsideWindow"}),
    ),
    Variant(
        "a0-freed-but-still-held",
        14,
        "A0 is freed at the first Transferring but still recorded; a failure while waiting frees it again.",
        FreeKeepsRecord,
        A0_FREED_BUT_STILL_HELD,
        frozenset({"I5", "OwnershipError"}),
    ),
    Variant(
        "free-then-try-once",
        15,
        "A0 is freed, the remainder is tried once; if the pool is short the request never tries again.",
        TryRemainderOnce,
        FREE_THEN_TRY_ONCE,
        frozenset({"I8", "I5"}),  # stuck, or reading a "round" of no blocks when the sender reports progress
    ),
    Variant(
        "resume-fan-in-race",
        16,
        "The Encode side starts a resume chunk for every rank on the first rank's resume, aimed at the blocks "
        "the other ranks named before (already freed), and drops their own resumes.",
        rig=EagerFanIn,
        caught_by=frozenset({"I5", "I1", "I6", "I9"}),
        ranks=2,
    ),
    Variant(
        "aux-aliases-pool",
        17,
        "The cached T is a view of A0[0]'s aux row, which the next owner of that block overwrites.",
        AuxView,
        caught_by=frozenset({"I2", "I5"}),
    ),
    Variant(
        "mrope-delta-dropped",
        18,
        "The payload leaves without its M-RoPE delta, so the model treats an image prompt as text.",
        DeltaDropped,
        caught_by=frozenset({"I6"}),
    ),
    Variant(
        "warmup-treated-as-real",
        20,
        "Warm-up (fake) requests go down the real path: they take blocks, send a real init and read the pool.",
        WarmupTreatedAsReal,
        caught_by=frozenset({"I11", "I5", "I2", "I10"}),
    ),
    Variant(
        "second-round-never-triggered",
        21,
        "A Transferring after a resume is always ignored, so a remainder larger than one round never completes.",
        overlay=SECOND_ROUND_NEVER_TRIGGERED,
        caught_by=frozenset({"I8"}),
    ),
    Variant(
        "stale-aux-assumed-zero",
        22,
        "At Success after a resume, a non-zero aux row in A1[0] (stale, from an earlier request) is taken as T.",
        StaleAuxTrusted,
        STALE_AUX_ASSUMED_ZERO,
        frozenset({"I2", "I5"}),
    ),
    Variant(
        "abort-frees-blocks-in-flight",
        23,
        "A request that fails while its sender may still write frees its blocks at once, so the late write "
        "lands in a free block or in the request that is handed it next.",
        overlay=ABORT_FREES_BLOCKS_IN_FLIGHT,
        caught_by=frozenset({"I5", "I6"}),
    ),
    Variant(
        "fence-lifted-by-own-failed",
        23,
        "A Failed that the link reports of its own accord (SGLang's receiver after a local abort or timeout) "
        "is taken as the sender's, so the fence lifts while the late write is still on its way.",
        OwnFailedAsEvidence,
        caught_by=frozenset({"I5", "I6", "I13"}),  # the fence lifts early, or the late write lands
    ),
    Variant(
        "checksum-over-embeddings-only",
        None,
        "The integrity check hashes the embeddings alone, so every good request with a checksum fails.",
        ChecksumOverEmbeddingsOnly,
        caught_by=frozenset({"I12"}),
    ),
    Variant(
        "deadline-from-arrival",
        None,
        "Deadlines count from the request's arrival, not from entering the state: a request that waited for "
        "the pool times out as soon as its transfer starts.",
        DeadlineFromArrival,
        caught_by=frozenset({"I13"}),
    ),
    Variant(
        "admissions-before-remainders",
        None,
        "The allocation pass serves new admissions before the remainders of requests already under way.",
        queue_class=AdmissionsFirst,
        caught_by=frozenset({"I14"}),
    ),
    Variant(
        "hold-and-wait",
        24,
        "A0 is held while waiting for the remainder and freed only once it is granted: a full pool deadlocks.",
        overlay=HOLD_AND_WAIT,
        caught_by=frozenset({"I8"}),
    ),
)

VARIANTS: dict[str, Variant] = {v.name: v for v in CATALOGUE}

# Catalogued receiver bugs whose variants need a feature this version does not have yet; each is added
# by the work that builds the feature, and must then be caught like the others.
PENDING: dict[int, str] = {}
