"""fsm/ is the pure core: it reaches the world only through its ports.

The controller is fuzzable, replayable and embeddable in another server because fsm/ imports no tensor
library, no transport and no concurrency: those live in adapters/. One stray import would quietly make
the core depend on a GPU stack or a socket. These tests scan every module of fsm/ for such imports, and
check in a fresh interpreter that importing the core (and using it) does not load torch.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import epd_receiver.fsm

FSM_DIR = Path(epd_receiver.fsm.__file__).parent
MODULES = sorted(FSM_DIR.glob("*.py"))
FORBIDDEN = frozenset({"torch", "numpy", "socket", "zmq", "threading", "asyncio", "subprocess", "mooncake"})
# The standard library's own modules are loaded by logging and transitions whatever fsm/ does, so at run
# time only the third-party stacks can be told apart; the AST scan covers the rest.
HEAVY = frozenset({"torch", "numpy", "zmq", "mooncake"})


def imported_roots(tree: ast.AST) -> set[str]:
    """Top-level names of every absolute import, including ``__import__`` and ``importlib.import_module``."""
    roots: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            if name in {"__import__", "import_module"} and isinstance(node.args[0].value, str):
                roots.add(node.args[0].value.split(".")[0])
    return roots


def test_the_scan_sees_every_fsm_module() -> None:
    names = {path.stem for path in MODULES}
    assert {"__init__", "machine", "request", "queue", "window", "spec", "ports"} <= names


def test_the_scan_catches_each_kind_of_import() -> None:
    source = "import torch.cuda\nfrom numpy import array\n__import__('zmq')\nimportlib.import_module('socket')\n"
    assert imported_roots(ast.parse(source)) == {"torch", "numpy", "zmq", "socket"}


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_fsm_module_imports_nothing_impure(path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    assert imported_roots(tree) & FORBIDDEN == set()


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_fsm_module_does_not_import_the_adapters(path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert not (node.module or "").startswith(("epd_receiver.adapters", "adapters")), path.name
            assert not (node.level > 1), f"{path.name} reaches outside fsm/ with a relative import"


def _fresh_python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    return result.stdout.strip()


def test_importing_the_core_does_not_load_torch() -> None:
    assert _fresh_python("import epd_receiver.fsm, sys; print('torch' in sys.modules)") == "False"


def test_loading_the_spec_and_building_the_machine_loads_no_tensor_or_transport_library() -> None:
    code = (
        "import sys\n"
        "from epd_receiver.fsm import ReceiverRequest, load_spec\n"
        "from epd_receiver.fsm.machine import build_machine\n"
        "from epd_receiver.fsm.diagram import mermaid\n"
        "spec = load_spec()\n"
        "build_machine(spec, ReceiverRequest)\n"
        "mermaid(spec)\n"
        f"print(sorted(m for m in {sorted(HEAVY)!r} if m in sys.modules))\n"
    )
    assert _fresh_python(code) == "[]"
