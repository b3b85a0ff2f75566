"""The spec overlays the catalogued variants apply to the real controller: a poll cell or a transition
changed, and the declaration of any action a deviation adds. ``variants.py`` names them, each with the
subclass (``deviations.py``) that implements a new action, and says which invariant must catch each.
Nothing in the product refers to them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def _action(name: str, doc: str) -> dict[str, Any]:
    return {"actions": {name: {"doc": doc}}}


def _merge(*overlays: Mapping[str, Any]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for overlay in overlays:
        for key, value in overlay.items():
            if isinstance(value, dict):
                merged.setdefault(key, {}).update(value)
            else:
                merged[key] = merged.get(key, []) + list(value)
    return merged


REHANDLE_TRANSFERRING = {"polls": {"RESUMING": {"Transferring": "first_chunk_landed"}}}

# ---- the original system's bugs, by number -------------------------------------------------------------

RANKS_DECIDE_ALONE = {  # 4
    "transitions": [
        {
            "trigger": "first_chunk_landed",
            "source": "TRANSFERRING",
            "dest": "WAITING_FOR_BLOCKS",
            "unless": ["is_warmup"],
            "reads": ["aux", "data"],
            "actions": [
                "learn_total",
                "check_total",
                "expect_remainder",
                "expect_landed",
                "gather_landed",
                "free_blocks",
            ],
        },
        {
            "trigger": "payload_landed",
            "source": "TRANSFERRING",
            "dest": "SUCCESS",
            "unless": ["is_warmup"],
            "reads": ["aux", "data"],
            "actions": [
                "learn_total",
                "check_total",
                "expect_no_remainder",
                "expect_landed",
                "gather_landed",
                "verify_checksum",
            ],
        },
    ]
}

AUX_OF_RESUME_BLOCKS_AT_SUCCESS = _merge(  # 3
    _action("learn_total_from_current", "T from the current allocation's first aux row."),
    {
        "transitions": [
            {
                "trigger": "payload_landed",
                "source": "RESUMING",
                "dest": "SUCCESS",
                "reads": ["aux", "data"],
                "actions": ["learn_total_from_current", "gather_landed"],
            }
        ]
    },
)

TRANSFERRING_REHANDLED = _merge(  # 5
    REHANDLE_TRANSFERRING,
    {
        "transitions": [
            {
                "trigger": "first_chunk_landed",
                "source": "RESUMING",
                "dest": "WAITING_FOR_BLOCKS",
                "reads": ["data"],
                "actions": ["gather_landed", "free_blocks"],
            }
        ]
    },
)

RESUME_DEDUPED_BY_BLOCKS = _merge(  # 6
    REHANDLE_TRANSFERRING,
    _action("rehandle_unless_same_blocks", "Free, re-allocate, resume unless the blocks repeat."),
    {
        "transitions": [
            {
                "trigger": "first_chunk_landed",
                "source": "RESUMING",
                "dest": "RESUMING",
                "internal": True,
                "actions": ["rehandle_unless_same_blocks"],
            }
        ]
    },
)

SEED_READS_RESUME_BLOCKS = _merge(  # 7
    REHANDLE_TRANSFERRING,
    _action("learn_total_from_current", "T from the current allocation's first aux row."),
    {
        "transitions": [
            {
                "trigger": "first_chunk_landed",
                "source": "RESUMING",
                "dest": "RESUMING",
                "internal": True,
                "reads": ["aux", "data"],
                "actions": ["learn_total_from_current", "gather_landed"],
            }
        ]
    },
)

A0_FREED_BUT_STILL_HELD = _merge(  # 14
    _action("free_but_keep_record", "Free the blocks and keep naming them."),
    {
        "transitions": [
            {
                "trigger": "first_chunk_landed",
                "source": "TRANSFERRING",
                "dest": "WAITING_FOR_BLOCKS",
                "unless": ["is_warmup"],
                "reads": ["aux", "data"],
                "actions": [
                    "learn_total",
                    "check_total",
                    "expect_remainder",
                    "gather_landed",
                    "free_but_keep_record",
                ],
            }
        ]
    },
)

FREE_THEN_TRY_ONCE = _merge(  # 15
    _action("alloc_remainder_once", "Allocate the remainder now or never."),
    {
        "transitions": [
            {
                "trigger": "first_chunk_landed",
                "source": "TRANSFERRING",
                "dest": "RESUMING",
                "unless": ["is_warmup"],
                "reads": ["aux", "data"],
                "actions": [
                    "learn_total",
                    "check_total",
                    "expect_remainder",
                    "gather_landed",
                    "free_blocks",
                    "alloc_remainder_once",
                ],
            }
        ]
    },
)

SECOND_ROUND_NEVER_TRIGGERED = {"polls": {"RESUMING": {"Transferring": "noop"}}}  # 21

STALE_AUX_ASSUMED_ZERO = _merge(  # 22
    _action("trust_nonzero_aux_of_current", "Take A1[0]'s aux as T unless it is zero."),
    {
        "transitions": [
            {
                "trigger": "payload_landed",
                "source": "RESUMING",
                "dest": "SUCCESS",
                "reads": ["data"],
                "actions": ["trust_nonzero_aux_of_current", "gather_landed"],
            }
        ]
    },
)

ABORT_FREES_BLOCKS_IN_FLIGHT = {  # 23
    "transitions": [
        {
            "trigger": "fail",
            "source": ["TRANSFERRING", "RESUMING"],
            "dest": "FAILED",
            "conditions": ["sender_may_write"],
            "actions": ["record_error", "notify_sender", "free_blocks"],
        }
    ]
}

HOLD_AND_WAIT = {  # 24
    "transitions": [
        {
            "trigger": "first_chunk_landed",
            "source": "TRANSFERRING",
            "dest": "WAITING_FOR_BLOCKS",
            "unless": ["is_warmup"],
            "reads": ["aux", "data"],
            "actions": ["learn_total", "check_total", "expect_remainder", "gather_landed"],
        },
        {
            "trigger": "blocks_granted",
            "source": "WAITING_FOR_BLOCKS",
            "dest": "RESUMING",
            "actions": ["free_blocks", "take_blocks", "send_resume"],
        },
    ]
}
