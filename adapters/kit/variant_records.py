"""What is kept of each catalogued variant once the fuzzer has caught it: its shrunk program, recorded as
a replay scenario under ``spec/scenarios/bugs/``, and the VERIFICATION.md table drawn from those records.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from epd_receiver.adapters.kit.variants import CATALOGUE, PENDING, Variant


def scenario_path(directory: Path, variant: Variant) -> Path:
    number = "new" if variant.bug is None else f"{variant.bug:02d}"
    return directory / f"{number}-{variant.name}.json"


def record_catch(directory: Path, variant: Variant, catch: Any) -> Path:
    """Keep the fuzzer's shrunk program for ``variant`` as a replay scenario, with what caught it."""
    path = scenario_path(directory, variant)
    directory.mkdir(parents=True, exist_ok=True)
    scenario = {
        "description": f"{'new' if variant.bug is None else f'#{variant.bug}'}: {variant.trigger}",
        "caught_by": catch.by,
        "first_violation": catch.violation,
        "steps": catch.steps,
        **catch.scenario,
    }
    path.write_text(json.dumps(scenario, indent=1) + "\n", encoding="utf-8")
    return path


def variants_markdown(directory: Path) -> str:
    """The VERIFICATION.md table: bug, variant, what caught it, and the recorded minimal schedule."""
    rows = [
        "| bug | variant (trigger) | caught by | shrunk steps | minimal schedule |",
        "|---|---|---|---|---|",
    ]
    for variant in sorted(CATALOGUE, key=lambda v: (v.bug is None, v.bug or 0)):
        path = scenario_path(directory, variant)
        recorded = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
        schedule = f"`bugs/{path.name}`" if recorded else "not recorded"
        rows.append(
            f"| {'new' if variant.bug is None else f'#{variant.bug}'} | `{variant.name}`: {variant.trigger} "
            f"| {recorded.get('caught_by', '?')} "
            f"| {recorded.get('steps', '?')} | {schedule} |"
        )
    rows += [f"| #{bug} | pending: {why} | | | |" for bug, why in sorted(PENDING.items())]
    return "\n".join(rows)
