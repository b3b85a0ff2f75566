"""The spec overlays the catalogued variants apply to the real controller: a poll cell or a transition
changed, and the declaration of any action a deviation adds. ``variants.py`` names them, each with the
subclass (``deviations.py``) that implements a new action, and says which invariant must catch each.
Nothing in the product refers to them.
"""

from __future__ import annotations

import copy
import tomllib
from collections.abc import Mapping, Sequence
from typing import Any

from epd_receiver.fsm.spec import default_spec_text


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


_PACKAGED_TRANSITIONS = tomllib.loads(default_spec_text())["transitions"]


def _edited(
    trigger: str,
    source: str | Sequence[str],
    *,
    replace: Mapping[str, Sequence[str]] | None = None,
    drop: Sequence[str] = (),
    before: Sequence[str] = (),
    after: Sequence[str] = (),
    dest: str | None = None,
    conditions: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The packaged transition of ``trigger`` from ``source`` (the one whose guards ``conditions`` names,
    when several share them), with only the deviation changed: actions replaced, dropped or added, or
    another destination. Whatever else the spec says of that transition stays as the spec says it, so a
    variant never drifts from the controller in more than its one deviation."""
    sources = [source] if isinstance(source, str) else list(source)
    matches = [
        t
        for t in _PACKAGED_TRANSITIONS
        if t["trigger"] == trigger
        and ([t["source"]] if isinstance(t["source"], str) else t["source"]) == sources
        and (conditions is None or t.get("conditions", []) == list(conditions))
    ]
    if len(matches) != 1:
        raise ValueError(f"{trigger} from {sources}: {len(matches)} packaged transitions match, not one")
    edited = copy.deepcopy(matches[0])
    actions = [name for action in edited.get("actions", []) for name in (replace or {}).get(action, [action])]
    edited["actions"] = [*before, *(a for a in actions if a not in drop), *after]
    if dest is not None:
        edited["dest"] = dest
    return edited


REHANDLE_TRANSFERRING = {"polls": {"RESUMING": {"Transferring": "first_chunk_landed"}}}

# ---- the original system's bugs, by number -------------------------------------------------------------

RANKS_DECIDE_ALONE = {  # 4: no agreement across ranks, before judging or after assembling
    "transitions": [
        _edited(trigger, "TRANSFERRING", drop=["agree_across_ranks", "agree_on_payload"], conditions=[])
        for trigger in ("first_chunk_landed", "payload_landed")
    ]
}

# #3 and #22 restate the original system's whole Success-after-resume step, not one action of ours changed:
# the original had none of the checks that follow the gather (the landed count, the ranks' agreement, the
# checksum), and with them the wrong T would be caught for another reason than the one each bug shows.
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
    {"transitions": [_edited("first_chunk_landed", "TRANSFERRING", replace={"free_blocks": ["free_but_keep_record"]})]},
)

FREE_THEN_TRY_ONCE = _merge(  # 15
    _action("alloc_remainder_once", "Allocate the remainder now or never."),
    {
        "transitions": [
            _edited("first_chunk_landed", "TRANSFERRING", after=["alloc_remainder_once"], dest="RESUMING"),
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
        _edited(
            "fail",
            ["TRANSFERRING", "RESUMING"],
            replace={"fence_blocks": ["free_blocks"]},
            conditions=["sender_may_write"],
        )
    ]
}

HOLD_AND_WAIT = {  # 24: A0 is freed only once the remainder's blocks are granted
    "transitions": [
        _edited("first_chunk_landed", "TRANSFERRING", drop=["free_blocks"]),
        _edited("blocks_granted", "WAITING_FOR_BLOCKS", before=["free_blocks"]),
    ]
}
