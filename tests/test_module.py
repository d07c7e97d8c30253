"""Properties of the module as a file: what it imports, what it exports."""

import ast
import sys
from typing import Set

from conftest import PROXY_SCRIPT

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
