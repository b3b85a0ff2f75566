"""Run the Quint model's checks (typecheck, run tests, invariant simulation) and produce ITF traces, and
find the spec directory a command may write in.

Quint comes from npm (spec/package.json pins it, with the antlr4ts override Node 20 needs); every
command uses the TypeScript backend, which needs nothing from the network.

Reading the spec from the installed package is fine; writing there is not (a regenerated RECEIVER.md or an
``npm ci`` would change site-packages behind the package manager's back, and be lost on the next install).
So the commands that write (``spec sync``, and ``spec check``, whose Quint lives in the directory's
node_modules) take a checkout's spec directory: the one named, else ``./spec`` of the checkout they run in.
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


INSTALL_DIRS = frozenset({"site-packages", "dist-packages"})
SPEC_FILES = ("receiver.toml", "RECEIVER.md")  # what makes a directory a spec directory


class QuintMissing(RuntimeError):
    """Node or the pinned Quint is not installed; the message says how to get them."""


class SpecDirError(ValueError):
    """The spec directory a command would write in is missing, not a spec, or inside an installed package."""


def spec_dir() -> Path:
    """The installed package's spec: to read, never to write (see ``writable_spec_dir``)."""
    return Path(str(resources.files("epd_receiver.spec")))


def installed(path: Path) -> bool:
    """Whether ``path`` lies in an installed package: under site-packages or dist-packages, or inside the
    imported package when that is not a checkout (a checkout's root holds pyproject.toml; a wheel's never)."""
    resolved = path.resolve()
    if INSTALL_DIRS & set(resolved.parts):
        return True
    package = Path(str(resources.files("epd_receiver"))).resolve()
    return resolved.is_relative_to(package) and not (package / "pyproject.toml").is_file()


def writable_spec_dir(named: Path | None, cwd: Path | None = None) -> Path:
    """The spec directory a command may write in: ``named``, else the spec/ of the checkout ``cwd`` (the
    current directory) is; SpecDirError, saying to pass ``--spec-dir``, when there is none or it is installed."""
    directory = named if named is not None else (cwd or Path.cwd()) / "spec"
    missing = [name for name in SPEC_FILES if not (directory / name).is_file()]
    if missing:
        where = "--spec-dir" if named is not None else "the current directory is not a checkout:"
        found = f"{where} {directory} has no {' or '.join(missing)}"
        raise SpecDirError(f"{found}; pass --spec-dir with a checkout's spec/")
    if installed(directory):
        raise SpecDirError(
            f"{directory} is in an installed package, which epd-receiver never writes into; "
            "pass --spec-dir with the spec/ of a checkout of epd-receiver"
        )
    return directory


def quint_binary(directory: Path | None = None) -> Path:
    """The pinned Quint in ``directory``'s node_modules; QuintMissing says what to install, and where: never
    into an installed package."""
    directory = directory or spec_dir()
    local = directory / "node_modules" / ".bin" / "quint"
    node = "" if shutil.which("node") else "Node.js is not installed (Quint needs Node 18+): install `nodejs` and `npm`"
    if local.exists() and not node:
        return local
    if local.exists():
        raise QuintMissing(node)
    if installed(directory):
        where = f"not into the installed package ({directory}); pass --spec-dir with a checkout's spec/, `npm ci` there"
    else:
        where = f"run `npm ci` in {directory}"
    raise QuintMissing("; ".join(filter(None, [node, f"Quint is not installed: {where}"])))


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
