"""Properties of the module as a file: what it imports, what it exports."""

import ast
import sys
from typing import Set

from conftest import PROXY_SCRIPT

import websockify_min

STDLIB: Set[str] = set(getattr(sys, "stdlib_module_names", ())) | {"__future__"}


def module_tree() -> ast.Module:
    return ast.parse(PROXY_SCRIPT.read_text(encoding="utf-8"))


def test_module_level_imports_are_standard_library_only() -> None:
    """Extras such as jwcrypto may only be imported lazily, inside a function."""
    assert STDLIB, "sys.stdlib_module_names needs Python 3.10+ to run this test"
    outside = []
    for node in module_tree().body:  # top level only: a function body may import extras
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module]
        elif isinstance(node, ast.If):  # if TYPE_CHECKING: imports for mypy alone are fine
            continue
        outside += [name for name in names if name.split(".")[0] not in STDLIB]
    assert not outside


def test_no_function_imports_anything_but_stdlib_and_optional_extras() -> None:
    optional = {"jwcrypto"}
    found = set()
    for node in ast.walk(module_tree()):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split(".")[0])
    assert found - STDLIB <= optional, found - STDLIB


def test_every_public_name_is_exported() -> None:
    """The public API is what __all__ lists; everything else is _private or a CONSTANT."""
    defined = []
    nodes = list(module_tree().body)
    for node in nodes:
        if isinstance(node, ast.If):  # names defined for mypy alone, and their stand-ins
            nodes += node.body + node.orelse
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            defined.append(node.name)
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                elements = target.elts if isinstance(target, ast.Tuple) else [target]
                defined += [element.id for element in elements if isinstance(element, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            defined.append(node.target.id)
    public = {name for name in defined if not name.startswith("_") and not name.isupper()}
    assert public == set(websockify_min.__all__)
    assert len(websockify_min.__all__) == len(set(websockify_min.__all__))
