"""Hypothesis profiles (``dev``, ``ci``, ``nightly``) come from the fuzzer itself, so CLI and tests agree."""

from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path


def _use_mutated_core() -> None:
    """Under mutmut (run from its ``mutants/`` copy), make ``epd_receiver.fsm`` the mutated ``fsm`` package.

    mutmut names each mutant after the module path of the file it mutated (``fsm.request``), while the
    package is installed as ``epd_receiver.fsm``; aliasing the one to the other lets the tests exercise the
    mutants without a second import path in the product.
    """
    here = Path.cwd()
    if here.name != "mutants" or not (here / "fsm" / "__init__.py").exists():
        return
    core = importlib.import_module("fsm")
    sys.modules["epd_receiver.fsm"] = core
    for name in [m for m in list(sys.modules) if m.startswith("fsm.")]:
        sys.modules["epd_receiver." + name] = sys.modules[name]
    for path in sorted((here / "fsm").glob("*.py")):
        module = importlib.import_module(f"fsm.{path.stem}") if path.stem != "__init__" else core
        sys.modules[f"epd_receiver.fsm.{path.stem}"] = module


_use_mutated_core()

from epd_receiver.adapters.fuzz import register_profiles  # noqa: E402

register_profiles()
logging.getLogger("transitions").setLevel(logging.ERROR)
