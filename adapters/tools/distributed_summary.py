"""The summary of a distributed run: the in-process summary's keys over every rank, and where ranks differ.

Every rank reports plain data; rank 0's outcomes speak for the run, and the others' are compared with
them (I9), checked for bit-identical payloads (I6) and for blocks left owned or fenced by no one (I5).
"""

from __future__ import annotations

from typing import Any

from epd_receiver.adapters.kit.world_config import WorldConfig
from epd_receiver.adapters.ports.payload import token_bytes
from epd_receiver.adapters.tools.rank_job import Arrival


def summarize(
    config: WorldConfig, arrivals: list[Arrival], results: list[dict[str, Any]], elapsed: float
) -> dict[str, Any]:
    """The in-process summary's keys, over every rank, plus the ranks' agreement and the transfer throughput."""
    rooms = [a.room for a in arrivals]
    first = results[0]["outcomes"]
    agree = [r for r in rooms if all(_decision(res["outcomes"].get(r)) == _decision(first.get(r)) for res in results)]
    ended = [r for r in rooms if first.get(r, {}).get("state") in ("SUCCESS", "FAILED")]
    succeeded = [r for r in ended if first[r]["state"] == "SUCCESS"]
    verified = [r for r in succeeded if all(res["outcomes"].get(r, {}).get("verified") for res in results)]
    violations = _violations(rooms, results, agree, succeeded, verified)
    leaked = sum(res["owned_blocks"] for res in results)
    seconds = max(res["seconds"] for res in results)
    tokens = results[0]["tokens"]
    bytes_per_token = token_bytes(config.hidden_size, config.deepstack)
    transfer = dict(results[0]["transfer"])
    if transfer.get("bytes") and seconds:
        transfer["end_to_end_gb_per_s"] = round(transfer["bytes"] / seconds / 1e9, 3)
    return {
        "requests": len(rooms),
        "succeeded": len(succeeded),
        "failed": len(ended) - len(succeeded),
        "unfinished": len(rooms) - len(ended),
        "resumed": sum(1 for r in ended if first[r]["resumes"] > 0),
        "resume_rounds": sum(first[r]["resumes"] for r in ended),
        "verified": len(verified),
        "mean_reads_per_request": round(sum(first[r]["reads"] for r in ended) / max(1, len(ended)), 3),
        "max_reads_per_request": max((first[r]["reads"] for r in ended), default=0),
        "leaked_blocks": leaked,
        "iterations": results[0]["iterations"],
        "tokens": tokens,
        "seconds": round(seconds, 3),
        "requests_per_s": round(len(ended) / seconds, 1) if seconds else 0.0,
        "payload_gb_per_s": round(tokens * bytes_per_token * len(results) / seconds / 1e9, 3) if seconds else 0.0,
        "config": {
            "block_size": config.block_size,
            "num_blocks": config.num_blocks,
            "default_alloc_tokens": config.default_alloc_tokens,
            "hidden_size": config.hidden_size,
            "deepstack": config.deepstack,
        },
        "violations": violations,
        "transport": "mooncake",
        "ranks": len(results),
        "verified_on_every_rank": len(verified) == len(succeeded),
        "fenced_blocks": [res["fenced_blocks"] for res in results],
        "causes": _causes(first, ended),
        "errors": {room: _errors(room, results) for room in ended if first[room]["error"]},
        "driver_seconds": round(elapsed, 3),
        "transfer": transfer,
        "per_rank": [
            {k: res[k] for k in ("rank", "iterations", "owned_blocks", "fenced_blocks", "fenced_rooms", "collectives")}
            | {"extension": res["extension"], "dropped": res["dropped"]}
            | {"seconds": round(res["seconds"], 3)}
            for res in results
        ],
    }


def _decision(outcome: dict[str, Any] | None) -> tuple[Any, ...]:
    """What every rank must have decided alike for a room: its end state, the cause, the total, the resumes."""
    if outcome is None:
        return (None,)
    return outcome["state"], outcome["cause"], outcome["total_tokens"], outcome["resumes"], outcome["reads"]


def _violations(
    rooms: list[int], results: list[dict[str, Any]], agree: list[int], succeeded: list[int], verified: list[int]
) -> list[str]:
    found = []
    if len(agree) != len(rooms):
        found.append(f"I9: the ranks ended {sorted(set(rooms) - set(agree))[:10]} differently")
    for room in sorted(set(succeeded) - set(verified)):
        wrong = {res["rank"]: res["outcomes"][room]["mismatches"] for res in results}
        found.append(f"I6: room {room} not bit-identical on every rank: {wrong}")
    for res in results:
        if res["owned_blocks"]:
            found.append(f"I5: rank {res['rank']}: {res['owned_blocks']} blocks still owned at the end")
        if res["fenced_blocks"] and not res["fenced_rooms"]:
            found.append(f"I5: rank {res['rank']}: {res['fenced_blocks']} blocks fenced by no request")
    return found


def _errors(room: int, results: list[dict[str, Any]]) -> list[str]:
    """Each rank's account of a failure: the sender's reason reaches the rank it failed on, the MIN the rest."""
    return sorted({res["outcomes"][room]["error"] for res in results if res["outcomes"].get(room, {}).get("error")})


def _causes(first: dict[int, dict[str, Any]], ended: list[int]) -> dict[str, int]:
    causes: dict[str, int] = {}
    for room in ended:
        cause = first[room]["cause"]
        if cause is not None:
            causes[cause] = causes.get(cause, 0) + 1
    return causes
