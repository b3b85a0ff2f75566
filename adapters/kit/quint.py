"""Run the Quint model's checks (typecheck, run tests, invariant simulation) and produce ITF traces.

Quint comes from npm (spec/package.json pins it, with the antlr4ts override Node 20 needs); every
command uses the TypeScript backend, which needs nothing from the network.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

SIMULATION_SAMPLES = 3000
SIMULATION_STEPS = 30
INVARIANT = "invariants"
TRACE_SEED = 0x1ACE


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


def generate_traces(
    out: Path, count: int, steps: int = 25, directory: Path | None = None, jobs: int | None = None
) -> list[Path]:
    """``count`` random traces as ITF JSON with the action and picks of every step (``--mbt``).

    A Quint process uses one core, so the traces are shared out over ``jobs`` processes (one per core,
    at most two by default), each with a seed of its own.
    """
    directory = directory or spec_dir()
    out.mkdir(parents=True, exist_ok=True)
    jobs = max(1, min(count, jobs or min(2, os.cpu_count() or 1)))
    shares = [count // jobs + (job < count % jobs) for job in range(jobs)]

    def generate(job: int) -> Outcome:
        return _run(
            [
                "run",
                "--backend=typescript",
                "--mbt",
                f"--max-samples={shares[job]}",
                f"--n-traces={shares[job]}",
                f"--max-steps={steps}",
                f"--invariant={INVARIANT}",
                f"--seed={TRACE_SEED + job:#x}",
                f"--out-itf={out.resolve()}/trace_{job}_{{seq}}.itf.json",
                "receiver.qnt",
            ],
            directory,
        )

    with ThreadPoolExecutor(jobs) as pool:
        outcomes = list(pool.map(generate, range(jobs)))
    for outcome in outcomes:
        if outcome.returncode != 0:
            raise RuntimeError(f"{outcome.command} failed:\n{outcome.output}")
    return sorted(out.glob("trace_*.itf.json"))
