"""The wheel holds what a user runs: the package with its version, every module of fsm/ and adapters/, the
spec and its scenarios as data, and the ``epd-receiver`` console script; and it builds without a warning.

The checkout is the package (``package-dir = {"epd_receiver" = "."}``), so a module or a data file added
without being listed in pyproject.toml would silently be left out of the wheel: the editable install the
tests run from would never notice. The wheel is built from a copy of the checkout (what git would see:
no build/, .venv, node_modules or caches), so that a stale build/lib cannot add files that are gone and
two builds never share one build directory.
"""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

import epd_receiver

ROOT = Path(__file__).resolve().parent.parent
NOT_SOURCE = (".git", ".venv", "build", "dist", "mutants", "node_modules", "__pycache__", "*.egg-info", ".*_cache")
ENTRY_POINT = "epd_receiver.adapters.tools.cli:main"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[zipfile.ZipFile, str]:
    """The wheel built from a copy of the checkout, and everything pip and the build backend printed."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*NOT_SOURCE, ".hypothesis"))
    # PYTHONDONTWRITEBYTECODE makes setuptools warn that it skips byte-compiling: a remark on the
    # environment the build runs in, not on the package.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    command = [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation", "-w", str(work)]
    result = subprocess.run(
        [*command, str(source)], capture_output=True, text=True, timeout=300, env=env, cwd=work, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = work.glob("epd_receiver-*.whl")
    return zipfile.ZipFile(wheel), result.stdout + result.stderr


def test_the_wheel_builds_without_a_warning(built: tuple[zipfile.ZipFile, str]) -> None:
    _, output = built
    warnings = [line for line in output.splitlines() if "warning" in line.lower()]
    assert not warnings, "\n".join(warnings)


def test_the_wheel_holds_every_module_of_the_checkout(built: tuple[zipfile.ZipFile, str]) -> None:
    wheel, _ = built
    names = set(wheel.namelist())
    for layer in ("fsm", "adapters"):
        ours = {f"epd_receiver/{p.relative_to(ROOT).as_posix()}" for p in (ROOT / layer).rglob("*.py")}
        shipped = {n for n in names if n.startswith(f"epd_receiver/{layer}/") and n.endswith(".py")}
        assert shipped == ours, f"{layer}/: missing {sorted(ours - shipped)}, extra {sorted(shipped - ours)}"
    assert "__version__" in wheel.read("epd_receiver/__init__.py").decode()
    assert {n.split("/")[0] for n in names} == {"epd_receiver", _dist_info(wheel)}, "nothing but the package"


def test_the_wheel_holds_the_spec_and_every_scenario(built: tuple[zipfile.ZipFile, str]) -> None:
    wheel, _ = built
    names = set(wheel.namelist())
    for name in ("receiver.toml", "RECEIVER.md", "receiver.qnt"):
        assert f"epd_receiver/spec/{name}" in names
    scenarios = {
        f"epd_receiver/{p.relative_to(ROOT).as_posix()}" for p in (ROOT / "spec" / "scenarios").rglob("*.json")
    }
    assert scenarios and scenarios <= names, sorted(scenarios - names)
    assert (ROOT / "spec" / "scenarios" / "bugs").is_dir() and any("/scenarios/bugs/" in n for n in scenarios)


def test_the_wheel_declares_the_console_script(built: tuple[zipfile.ZipFile, str]) -> None:
    wheel, _ = built
    entry_points = configparser.ConfigParser()
    entry_points.read_string(wheel.read(f"{_dist_info(wheel)}/entry_points.txt").decode())
    assert dict(entry_points["console_scripts"]) == {"epd-receiver": ENTRY_POINT}


def test_the_wheel_version_is_the_package_version(built: tuple[zipfile.ZipFile, str]) -> None:
    """pyproject's version is dynamic, read from ``epd_receiver.__version__``."""
    wheel, _ = built
    metadata = wheel.read(f"{_dist_info(wheel)}/METADATA").decode()
    (version,) = re.findall(r"^Version: (\S+)$", metadata, re.MULTILINE)
    assert version == epd_receiver.__version__
    assert _dist_info(wheel) == f"epd_receiver-{version}.dist-info"


def _dist_info(wheel: zipfile.ZipFile) -> str:
    (name,) = {n.split("/")[0] for n in wheel.namelist() if n.split("/")[0].endswith(".dist-info")}
    return name


def test_the_mutation_selection_names_only_test_files_that_exist() -> None:
    """``make mutation`` runs these files against every mutant; one that was renamed or split away would make
    mutmut's first run fail (or, were it skipped, leave the mutants it used to kill surviving)."""
    mutmut = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["mutmut"]
    selection = [Path(p) for p in mutmut["pytest_add_cli_args_test_selection"]]
    missing = [p for p in selection if not (ROOT / p).is_file()]
    assert selection and not missing, missing
    staged = Path("src/epd_receiver")  # where the Makefile stages the package, so that mutant names match it
    for path in [*mutmut["source_paths"], *mutmut["also_copy"]]:
        local = Path(path).relative_to(staged) if Path(path).is_relative_to(staged) else Path(path)
        assert (ROOT / local).exists(), f"{path}: {local} is not in the checkout"
