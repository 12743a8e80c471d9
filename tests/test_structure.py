"""The shape of the package: adaclip's modules import each other without cycles, and only downwards
through the layers below (the intended architecture, bottom to top).

Every `import` and `from ... import` of an adaclip module counts, also inside functions (a lazy import
is still a dependency); imports under `if TYPE_CHECKING:` do not (they never run). A module's own
package `__init__` is not counted as imported by its submodules.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "adaclip"

# Bottom to top. A module may import modules of its own layer or of a layer below, never above. An entry
# names a module or a package (which then holds all its submodules not named elsewhere).
LAYERS: list[tuple[str, list[str]]] = [
    (
        "foundations: standard library or nothing of adaclip's",
        [
            "adaclip._version",
            "adaclip.errors",
            "adaclip.identity",
            "adaclip.method_catalog",
            "adaclip.metrics",
            "adaclip.output",
            "adaclip.tensor_ring",
            "adaclip._interrupt",
            "adaclip.defaults",
        ],
    ),
    (
        "shared services: checks, user files, logging, templates, processes, hooks",
        [
            "adaclip.checks",
            "adaclip.files",
            "adaclip.ui",
            "adaclip.templates",
            "adaclip.distributed",
            "adaclip.inject",
        ],
    ),
    (
        "file formats: images, adapter files, tracking logs",
        ["adaclip.images", "adaclip.adapter_file", "adaclip.tracking"],
    ),
    (
        "inputs: image folders, checkpoints, backbones",
        ["adaclip.data", "adaclip.checkpoint", "adaclip.backbone", "adaclip.lite"],
    ),
    ("methods: configs, parts and the registry", ["adaclip.methods"]),
    ("the model: backbone + a method's parts", ["adaclip.model"]),
    (
        "running a model: inference, predictions, labels, training, test-time adaptation",
        ["adaclip.inference", "adaclip.predictions", "adaclip.labels", "adaclip.training", "adaclip.tta"],
    ),
    ("the Adapter object", ["adaclip.adapter"]),
    (
        "library API: fit/load, compare, reports, export",
        ["adaclip.api", "adaclip.comparison", "adaclip.report", "adaclip.interop", "adaclip.describe"],
    ),
    ("how results look on stdout", ["adaclip.views"]),
    ("the server", ["adaclip.serve"]),
    (
        "command line and entry points (may import anything)",
        ["adaclip", "adaclip.__main__", "adaclip.cli", "adaclip.serve.asgi"],
    ),
]


def module_files() -> dict[str, Path]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The adaclip modules `name` imports: `from .x import y` is adaclip.x.y when that is a module,
    else adaclip.x."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def nearest_module(dotted: str) -> str:
        while dotted not in modules and "." in dotted:
            dotted = dotted.rpartition(".")[0]
        return dotted

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for statement in child.orelse:
                    visit_one(statement)
                continue
            visit_one(child)

    def visit_one(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            found.update(nearest_module(a.name) for a in node.names if a.name.split(".")[0] == "adaclip")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] == "adaclip":
                for alias in node.names:
                    submodule = f"{source}.{alias.name}"
                    found.add(submodule if submodule in modules else nearest_module(source))
        visit(node)

    visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def layer_of(module: str) -> int | None:
    """The layer that names `module`, or the package holding it most closely."""
    best: tuple[int, int] | None = None  # (length of the matching entry, layer)
    for index, (_, entries) in enumerate(LAYERS):
        for entry in entries:
            if (module == entry or module.startswith(entry + ".")) and (best is None or len(entry) > best[0]):
                best = (len(entry), index)
    return None if best is None else best[1]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state:
            cycle = visit(module)
            if cycle:
                return cycle
    return None


def test_the_import_walk_sees_lazy_imports_and_skips_type_checking_ones():
    graph = import_graph()
    assert "adaclip.cli" in graph["adaclip.__main__"]  # imported inside main()
    assert "adaclip.api" in graph["adaclip.cli.train"]  # imported inside the commands
    assert "adaclip.model" not in graph["adaclip.methods.contexts"]  # only under TYPE_CHECKING
    assert "adaclip.methods.rada" in graph["adaclip.tta.settings"]  # `from ..methods.rada import ...`


def test_find_cycle_reports_the_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_every_module_has_a_layer():
    missing = sorted(m for m in import_graph() if layer_of(m) is None)
    assert not missing, f"add these modules to LAYERS in {Path(__file__).name}: {missing}"


def test_imports_go_down_the_layers():
    upward = []
    for module, targets in sorted(import_graph().items()):
        here = layer_of(module)
        for target in sorted(targets):
            there = layer_of(target)
            if here is not None and there is not None and there > here:
                upward.append(f"{module} ({LAYERS[here][0]}) imports {target} ({LAYERS[there][0]})")
    assert not upward, "imports up the layers:\n" + "\n".join(upward)


def layout_table_names() -> set[str]:
    """The files and folders README's "Project layout" table names: `adaclip/x.py` or, after the first
    name of a row, the short `x.py`; folders end with a slash."""
    readme = (PACKAGE.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Project layout", 1)[1].split("\n## ", 1)[0]
    names = set()
    for line in section.splitlines():
        cells = line.split("|")
        if len(cells) > 2 and "`adaclip/" in cells[1]:
            for name in re.findall(r"`([^`]+)`", cells[1]):
                names.add(name.removeprefix("adaclip/"))
    return names


def test_readme_layout_table_matches_the_package():
    """README's layout table names every module of adaclip/ (a sub-package as `name/`), and nothing
    that is not there."""
    actual = {p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py"}
    actual |= {f"{p.parent.name}/" for p in PACKAGE.glob("*/__init__.py")}
    listed = layout_table_names()
    assert not actual - listed, f"README's layout table does not name: {sorted(actual - listed)}"
    assert not listed - actual, f"README's layout table names what is gone: {sorted(listed - actual)}"
