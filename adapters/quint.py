"""Run the Quint model's checks (typecheck, run tests, invariant simulation) and produce ITF traces.

Quint comes from npm (spec/package.json pins it, with the antlr4ts override Node 20 needs); every
command uses the TypeScript backend, which needs nothing from the network.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

SIMULATION_SAMPLES = 3000
SIMULATION_STEPS = 30
INVARIANT = "invariants"


class QuintMissing(RuntimeError):
    """Node or the pinned Quint is not installed; the message says how to get them."""


def spec_dir() -> Path:
    return Path(str(resources.files("epd_receiver.spec")))


def quint_binary(directory: Path | None = None) -> Path:
    directory = directory or spec_dir()
    local = directory / "node_modules" / ".bin" / "quint"
    if shutil.which("node") is None:
        raise QuintMissing("Node.js is not installed (Quint needs Node 18+): install `nodejs` and `npm`")
    if not local.exists():
        raise QuintMissing(f"Quint is not installed: run `npm ci` in {directory}")
    return local


@dataclass(frozen=True, slots=True)
class Outcome:
    command: str
    returncode: int
    output: str


def _run(arguments: list[str], directory: Path, timeout: float = 600) -> Outcome:
    binary = quint_binary(directory)
    process = subprocess.run(
        [str(binary), *arguments], cwd=directory, capture_output=True, text=True, timeout=timeout, check=False
    )
    return Outcome(" ".join(["quint", *arguments]), process.returncode, process.stdout + process.stderr)


def check_all(
    directory: Path | None = None,
    samples: int = SIMULATION_SAMPLES,
    steps: int = SIMULATION_STEPS,
    *,
    simulate: bool = True,
) -> list[Outcome]:
    """Typecheck, the `run` tests, and (unless ``simulate`` is off) a simulation that checks every
    invariant after every step."""
    directory = directory or spec_dir()
    results = [_run(["typecheck", "receiver.qnt"], directory)]
    results.append(_run(["test", "--backend=typescript", "receiver.qnt"], directory))
    if not simulate:
        return results
    results.append(
        _run(
            [
                "run",
                "--backend=typescript",
                f"--max-samples={samples}",
                f"--max-steps={steps}",
                f"--invariant={INVARIANT}",
                "--seed=0x5eed",
                "receiver.qnt",
            ],
            directory,
        )
    )
    return results


def generate_traces(out: Path, count: int, steps: int = 25, directory: Path | None = None) -> list[Path]:
    """``count`` random traces as ITF JSON with the action and picks of every step (``--mbt``)."""
    directory = directory or spec_dir()
    out.mkdir(parents=True, exist_ok=True)
    outcome = _run(
        [
            "run",
            "--backend=typescript",
            "--mbt",
            f"--max-samples={count}",
            f"--n-traces={count}",
            f"--max-steps={steps}",
            f"--invariant={INVARIANT}",
            "--seed=0x1ace",
            f"--out-itf={out.resolve()}/trace_{{seq}}.itf.json",
            "receiver.qnt",
        ],
        directory,
    )
    if outcome.returncode != 0:
        raise RuntimeError(f"{outcome.command} failed:\n{outcome.output}")
    return sorted(out.glob("trace_*.itf.json"))
