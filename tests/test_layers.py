"""adapters/ is four layers, and imports run one way, as fsm/'s purity is enforced in test_purity.py.

tools may import anything below them; the kit builds on ports; integrations build on ports only; ports
import no other layer. Nothing but tools (and these tests) imports the kit, so a serving system that
embeds a port or an integration never loads the verification machinery. A module outside the four
layers, or a relative import that climbs out of its folder, would hide an edge from this scan, so both
are refused too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import epd_receiver.adapters

ADAPTERS = Path(epd_receiver.adapters.__file__).parent
PACKAGE = "epd_receiver.adapters"
LAYERS = ("ports", "integrations", "kit", "tools")
# Which layers each layer may import (its own included).
ALLOWED = {
    "ports": {"ports"},
    "integrations": {"ports", "integrations"},
    "kit": {"ports", "kit"},
    "tools": {"ports", "integrations", "kit", "tools"},
}
MODULES = sorted(p for p in ADAPTERS.rglob("*.py") if p.parent != ADAPTERS)


def layer_of(path: Path) -> str:
    return path.relative_to(ADAPTERS).parts[0]


def imported_layers(tree: ast.AST) -> dict[str, int]:
    """Each adapters layer a module imports, with the line of the first import of it."""
    found: dict[str, int] = {}
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            if name.startswith(PACKAGE + "."):
                found.setdefault(name.split(".")[2], node.lineno)
    return found


def test_every_module_lives_in_a_layer() -> None:
    assert {layer_of(p) for p in MODULES} == set(LAYERS)
    assert sorted(p.name for p in ADAPTERS.glob("*.py")) == ["__init__.py"]


def test_the_scan_sees_each_kind_of_import() -> None:
    source = (
        "import epd_receiver.adapters.kit.world\n"
        "from epd_receiver.adapters.tools import cli\n"
        "from epd_receiver.adapters import ports\n"
    )
    assert set(imported_layers(ast.parse(source))) == {"kit", "tools", "ports"}


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ADAPTERS)))
def test_imports_run_one_way(path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    layer = layer_of(path)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            raise AssertionError(f"{path.name}:{node.lineno}: a relative import; name the layer it reaches")
    forbidden = {name: line for name, line in imported_layers(tree).items() if name not in ALLOWED[layer]}
    assert not forbidden, f"{layer}/{path.relative_to(ADAPTERS / layer)} imports {forbidden} (layer: line)"


def test_a_backward_import_is_caught() -> None:
    """The check above on a module that breaks the rule: a port reaching into the kit."""
    tree = ast.parse("from epd_receiver.adapters.kit.world import World\n")
    assert set(imported_layers(tree)) - ALLOWED["ports"] == {"kit"}
