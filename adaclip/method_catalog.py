"""The built-in methods' names and one-line summaries, without importing them.

Method modules import torch (seconds); `adaclip methods` and shell completion only need each config
class's `name`, `summary` and `class_agnostic` class variables, so they are read from the modules'
source with `ast` instead. The registry (adaclip.methods) stays the authority: a test checks that both
agree.
"""

from __future__ import annotations

import ast
import functools
from dataclasses import dataclass
from pathlib import Path

BUILTIN_MODULES = ("zeroshot", "linear_probe", "adaring", "lora", "coop", "tip_adapter", "full_finetune", "rada")
_METHODS_DIR = Path(__file__).parent / "methods"
_DEFAULTS = {"name": "", "summary": "", "class_agnostic": True}  # MethodConfig's


@dataclass(frozen=True)
class MethodSummary:
    name: str
    summary: str
    class_agnostic: bool


def _class_variables(node: ast.ClassDef) -> dict[str, object]:
    found: dict[str, object] = {}
    for statement in node.body:
        if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name) and statement.value:
            target, value = statement.target.id, statement.value
        elif isinstance(statement, ast.Assign) and len(statement.targets) == 1:
            target, value = getattr(statement.targets[0], "id", None), statement.value
        else:
            continue
        if target in _DEFAULTS:
            try:
                found[target] = ast.literal_eval(value)
            except ValueError:
                continue
    return found


def _sources() -> list[Path]:
    """The built-in method modules' files: `<name>.py`, or every file of a package `<name>/`."""
    files = []
    for module in BUILTIN_MODULES:
        path = _METHODS_DIR / f"{module}.py"
        files += [path] if path.exists() else sorted((_METHODS_DIR / module).glob("*.py"))
    return files


@functools.cache
def builtin_methods() -> tuple[MethodSummary, ...]:
    """Every class decorated with `@register_method` in the built-in modules, sorted by name; class
    variables a class does not set come from its base classes (looked up across the modules)."""
    classes: dict[str, tuple[list[str], dict[str, object], bool]] = {}
    for source in _sources():
        tree = ast.parse(source.read_text(encoding="utf-8"))
        for node in tree.body:
            if isinstance(node, ast.ClassDef):
                registered = any(getattr(d, "id", None) == "register_method" for d in node.decorator_list)
                bases = [b.id for b in node.bases if isinstance(b, ast.Name)]
                classes[node.name] = (bases, _class_variables(node), registered)

    def lookup(class_name: str, key: str) -> object:
        if class_name not in classes:
            return _DEFAULTS[key]
        bases, variables, _ = classes[class_name]
        if key in variables:
            return variables[key]
        return lookup(bases[0], key) if bases else _DEFAULTS[key]

    summaries = [
        MethodSummary(
            name=str(lookup(c, "name")),
            summary=str(lookup(c, "summary")),
            class_agnostic=bool(lookup(c, "class_agnostic")),
        )
        for c, (_, _, registered) in classes.items()
        if registered
    ]
    return tuple(sorted(summaries, key=lambda m: m.name))


def builtin_method_names() -> list[str]:
    return [m.name for m in builtin_methods()]
