"""Bad input from the sender: impossible totals, totals that contradict the status, failures, wrong checksums.

Each must fail that request only, with a typed error naming the room and cause, and no lost block (I10).
"""

from __future__ import annotations

import pytest
from support.controller_bench import (
    BYSTANDER,
    MAX_T,
    POOL,
    RESUMED_TOTAL,
    SUBJECT,
    Bench,
    D,
    assert_failed_cleanly,
    bench_with_subject_in,
    subject_lands,
)
from support.fakes import ExplainingLink, FakePayload

from epd_receiver.fsm import (
    AuxRow,
    ChecksumAlgorithm,
    CorruptAux,
    IntegrityError,
    KVPoll,
    SenderFailed,
    SizeMismatch,
    State,
)

# ---- bad input from the sender --------------------------------------------------------------------------


@pytest.mark.parametrize("status", [KVPoll.Transferring, KVPoll.Success], ids=lambda s: s.name)
@pytest.mark.parametrize("total", [0, -1, -(1 << 31), MAX_T + 1])
def test_corrupt_aux_total_fails_with_corrupt_aux(status: KVPoll, total: int) -> None:
    bench, subject, bystander = subject_lands(total, status)

    assert_failed_cleanly(bench, subject, CorruptAux)
    assert subject.payload is None and subject.total_tokens is None
    assert bench.buffers.gathers == [((2, 3), D, 0)]  # the bystander's; nothing of the subject
    assert bench.links[SUBJECT].resumes == []
    assert bystander.state is State.SUCCESS


def test_largest_valid_total_is_not_corrupt() -> None:
    bench = Bench.make(num_blocks=POOL, default_alloc=D, max_total=D)
    request = bench.add(1)
    bench.step()
    bench.land(1, D, KVPoll.Success)
    bench.step()
    assert request.state is State.SUCCESS


@pytest.mark.parametrize(
    ("status", "total"),
    [(KVPoll.Transferring, t) for t in (1, D - 1, D)] + [(KVPoll.Success, t) for t in (D + 1, 3 * D)],
    ids=[
        "transferring-but-fits-1",
        "transferring-but-fits-D-1",
        "transferring-but-fits-D",
        "success-beyond-a0-D+1",
        "success-beyond-a0-3D",
    ],
)
def test_a_total_that_contradicts_the_status_fails_with_size_mismatch(status: KVPoll, total: int) -> None:
    """Transferring promises T > |A0|*B; Success from A0 promises T <= |A0|*B. Either lie fails closed."""
    bench, subject, bystander = subject_lands(total, status)

    assert_failed_cleanly(bench, subject, SizeMismatch)
    assert bench.buffers.gathers == [((2, 3), D, 0)]  # only the bystander's payload was read
    assert bench.links[SUBJECT].resumes == []
    assert bystander.state is State.SUCCESS


def test_sender_failure_mid_resume_frees_the_remainder_blocks() -> None:
    bench = bench_with_subject_in(State.RESUMING)
    subject = bench.queue.get(SUBJECT)
    assert subject is not None
    a1 = subject.blocks
    assert a1
    bench.links[SUBJECT].status = KVPoll.Failed

    bench.step()

    assert_failed_cleanly(bench, subject, SenderFailed)
    assert bench.allocator.frees[-1] == (SUBJECT, a1)


# ---- integrity ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("resumed", [False, True])
@pytest.mark.parametrize("algorithm", list(ChecksumAlgorithm))
def test_a_payload_that_does_not_match_the_senders_checksum_fails_closed(
    resumed: bool, algorithm: ChecksumAlgorithm
) -> None:
    bench = Bench.make()
    subject = bench.add(SUBJECT)
    bystander = bench.add(BYSTANDER)
    bench.step()
    total = RESUMED_TOTAL if resumed else D
    first_block = bench.links[SUBJECT].inits[0][0][0]
    bench.buffers.aux[first_block] = AuxRow(total, 7, checksum=0xDEADBEEF, checksum_algorithm=algorithm)
    bench.links[SUBJECT].status = KVPoll.Transferring if resumed else KVPoll.Success
    bench.land(BYSTANDER, D, KVPoll.Success)
    bench.step()
    if resumed:
        bench.links[SUBJECT].status = KVPoll.Success
        bench.step()

    assert_failed_cleanly(bench, subject, IntegrityError)
    assert "0xdeadbeef" in str(subject.error)
    assert bystander.state is State.SUCCESS


def test_a_payload_that_matches_the_senders_checksum_succeeds() -> None:
    bench = Bench.make()
    request = bench.add(1)
    bench.step()
    # what gathering A0 = (0, 1) yields
    expected = bench.buffers.checksum(FakePayload(D, 7, [0] * 4 + [1] * 4), ChecksumAlgorithm.XXH3_64)
    bench.buffers.aux[0] = AuxRow(D, 7, checksum=expected)
    bench.links[1].status = KVPoll.Success
    bench.step()
    assert request.state is State.SUCCESS and request.checksum == expected


def test_a_sender_failure_carries_the_senders_reason_when_the_link_has_one() -> None:
    bench = Bench.make()
    bench.links[SUBJECT] = ExplainingLink(KVPoll.WaitingForInput)
    subject = bench.queue.add(SUBJECT, bench.links[SUBJECT])
    bench.step()
    bench.links[SUBJECT].status = KVPoll.Failed
    bench.step()
    assert_failed_cleanly(bench, subject, SenderFailed)
    assert str(subject.error).endswith("poll Failed in TRANSFERRING: transfer engine returned -1")
