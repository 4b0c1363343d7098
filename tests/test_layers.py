"""The rooms' arrows point down: each package of ``pipeline`` imports only the rooms below it, and no
module imports itself back through another (no import circle), lazy imports inside functions included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.helpers import ROOT

# Room -> the rooms it may import (besides itself). Each subpackage's __init__ docstring says the same.
# pipeline.modes (the enums) sits below pipeline.config, which re-exports it: whoever may import config may import it.
MAY_IMPORT: dict[str, set[str]] = {
    "cache": set(),
    "pipeline.modes": set(),
    "pipeline.config": {"cache"},
    "pipeline.hints": {"cache", "pipeline.config"},
    "pipeline.demo": {"pipeline.config"},
    "pipeline.transport": {"cache", "pipeline.config"},
    "pipeline.fetch": {"cache", "pipeline.config", "pipeline.hints", "pipeline.transport", "pipeline.demo"},
    "pipeline.data": {"cache", "pipeline.config", "pipeline.hints", "pipeline.transport", "pipeline.fetch"},
    "pipeline.train": {
        "cache",
        "pipeline.config",
        "pipeline.hints",
        "pipeline.transport",
        "pipeline.fetch",
        "pipeline.data",
    },
}
for _room_name, _below in MAY_IMPORT.items():
    if "pipeline.config" in _below or _room_name == "pipeline.config":
        _below.add("pipeline.modes")
TOP = ("pipeline.cli", "pipeline.commands", "pipeline.flags", "pipeline.__main__", "pipeline")  # may import anything


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted([*(ROOT / "pipeline").rglob("*.py"), *(ROOT / "cache").rglob("*.py")]):
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = p
    return out


MODULES = _modules()


def _runtime_nodes(tree: ast.AST):
    """Every node of ``tree`` but those under ``if TYPE_CHECKING:`` (imports for annotations, never run)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            yield from (n for child in node.orelse for n in [child, *_runtime_nodes(child)])
            continue
        yield node
        yield from _runtime_nodes(node)


def _imports(name: str, path: Path) -> set[str]:
    """Every tess module ``name`` imports when it runs, at the top or inside a function (relative imports
    resolved); imports under ``TYPE_CHECKING`` do not count."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, *([base] if base else [])])
            for a in node.names:
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base)
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _third_party(path: Path) -> set[str]:
    """The top-level names of the packages a module imports at run time."""
    found = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.split(".")[0])
    return found


# Third-party packages and the only modules that may import them (prefixes).
ONLY_IN = {
    "boto3": ("pipeline.transport.boto",),
    "botocore": ("pipeline.transport.",),
    "torch": ("pipeline.data.", "pipeline.train.", "pipeline.fetch.worker_dataset"),
    "moto": ("pipeline.demo.server",),
    "werkzeug": ("pipeline.demo.server",),
}


def _room(module: str) -> str | None:
    for room in sorted(MAY_IMPORT, key=len, reverse=True):
        if module == room or module.startswith(room + "."):
            return room
    return None


def test_every_module_has_a_room():
    homeless = [m for m in MODULES if _room(m) is None and m not in TOP]
    assert not homeless, f"modules outside every room of MAY_IMPORT: {homeless}"


@pytest.mark.parametrize("room", sorted(MAY_IMPORT))
def test_a_room_imports_only_the_rooms_below_it(room):
    wrong = sorted(
        f"{m} imports {dep}"
        for m, deps in GRAPH.items()
        if _room(m) == room
        for dep in deps
        if _room(dep) not in {room, *MAY_IMPORT[room]}
    )
    assert not wrong, f"{room} may import only {sorted(MAY_IMPORT[room])}: " + "; ".join(wrong)


def test_no_import_circle():
    state: dict[str, int] = {}  # 1: on the path being walked, 2: done
    circles: list[list[str]] = []

    def walk(m: str, path: list[str]) -> None:
        state[m] = 1
        for dep in sorted(GRAPH[m]):
            if state.get(dep) == 1:
                circles.append([*path[path.index(dep) :], dep])
            elif dep not in state:
                walk(dep, [*path, dep])
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            walk(m, [m])
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)


@pytest.mark.parametrize("room", [r for r in MAY_IMPORT if r.count(".") == 1 and (ROOT / r.replace(".", "/")).is_dir()])
def test_each_subpackage_says_what_it_owns_and_may_import(room):
    doc = ast.get_docstring(ast.parse((ROOT / room.replace(".", "/") / "__init__.py").read_text())) or ""
    assert "May import" in doc or "may import" in doc, f"{room}/__init__.py does not say what it may import"
    for other in MAY_IMPORT[room] - {"cache", "pipeline.modes"}:
        assert other in doc, f"{room}/__init__.py does not name {other}, which it may import"


def test_the_checker_sees_lazy_imports_and_skips_type_checking_ones():
    # A function-level import counts: pipeline.fetch.stage imports the worker dataset only for -w N.
    assert "pipeline.fetch.worker_dataset" in GRAPH["pipeline.fetch.stage"]
    # The ranged path names Mirror in annotations only (the mirror imports it at run time).
    assert "pipeline.fetch.mirror_ranged" in GRAPH["pipeline.fetch.mirror"]
    assert "pipeline.fetch.mirror" not in GRAPH["pipeline.fetch.mirror_ranged"]


@pytest.mark.parametrize("package", sorted(ONLY_IN))
def test_a_third_party_package_stays_in_its_room(package):
    wrong = sorted(m for m, p in MODULES.items() if package in _third_party(p) and not m.startswith(ONLY_IN[package]))
    assert not wrong, f"{package} may be imported only by {ONLY_IN[package]}; also imported by {wrong}"


MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80


def test_rooms_stay_small_enough_to_read():
    """Modules under ~400 lines and functions under ~80: a newcomer reads a room in minutes."""
    long_modules, long_functions = [], []
    for name, path in [*MODULES.items(), ("train_vae", ROOT / "train_vae.py")]:
        text = path.read_text()
        if text.count("\n") > MAX_MODULE_LINES:
            long_modules.append(f"{name} ({text.count(chr(10))} lines)")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno is not None:
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long_functions.append(f"{name}.{node.name} ({n} lines)")
    assert not long_modules, f"modules over {MAX_MODULE_LINES} lines: {long_modules}"
    assert not long_functions, f"functions over {MAX_FUNCTION_LINES} lines: {long_functions}"
