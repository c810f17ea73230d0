"""The package's layering (docs/architecture.md): no module imports from a layer above its own."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

# Lowest first. A module may import from its own layer and the layers before it.
LAYERS = ["base", "store", "document", "prompt", "engine", "model", "index", "retrieval", "ingest", "chat", "bench",
          "cli"]
BASE = {"errors", "paths", "files", "buffers", "ui", "choices", "intrinsics", "__init__"}
ALSO = {"manifest": "store", "markup": "document", "word": "document", "collection": "document", "citations": "chat", "sessions": "chat", "cached": "ingest", "sources": "ingest"}  # modules whose layer is not their name
PACKAGE = REPO / "ra_cli"


def layer_of(module: str) -> str:
    """'ra_cli.index.graph' -> 'index'; 'ra_cli.files' -> 'base'; '__main__' runs the CLI."""
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    if top in BASE:
        return "base"
    return "cli" if top == "__main__" else ALSO.get(top, top)


def imports_of(path: Path) -> set[str]:
    """Every ra_cli module a file imports, at any depth of the file (function-level imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ra_cli"):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names
                         if (PACKAGE / Path(*node.module.split(".")[1:]) / f"{alias.name}.py").exists())
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("ra_cli"))
    return found


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield ".".join(("ra_cli",) + path.relative_to(PACKAGE).with_suffix("").parts), path


def test_every_module_sits_in_a_stated_layer():
    assert {layer_of(name) for name, _ in modules()} <= set(LAYERS)


def test_no_module_imports_from_a_layer_above_it():
    upward = []
    for name, path in modules():
        own = LAYERS.index(layer_of(name))
        for target in imports_of(path):
            if target != "ra_cli" and LAYERS.index(layer_of(target)) > own:
                upward.append(f"{name} ({layer_of(name)}) imports {target} ({layer_of(target)})")
    assert not upward, "\n".join(upward)


def test_the_checker_sees_function_level_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from ra_cli.chat import ChatSession\n    import ra_cli.bench.recall\n")
    assert imports_of(probe) == {"ra_cli.chat", "ra_cli.bench.recall"}
    assert LAYERS.index(layer_of("ra_cli.chat")) > LAYERS.index(layer_of("ra_cli.store"))


def test_modules_stay_small():
    sizes = {name: len(path.read_text().splitlines()) for name, path in modules()}
    assert not {name: size for name, size in sizes.items() if size > 350}
    assert not {name: size for name, size in sizes.items() if name.startswith("ra_cli.cli") and size > 250}
