"""The suite checks itself: no assert that cannot fail, no test that asserts nothing.

A small walk over tests/ with `ast`: `assert True`, an assert whose condition ends in
`or True` (or any other constant that is always true), and a test function that neither
asserts nor calls something that does (pytest.raises, playwright's expect, a helper in
tests/ that asserts, directly or through another helper) each fail this module.
"""

import ast
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
# Calls that are themselves checks: pytest's, playwright's, and the suite's own waits.
CHECKS = {"raises", "fail", "warns", "expect", "wait_for"}


def trees() -> dict[Path, ast.Module]:
    return {path: ast.parse(path.read_text(), filename=str(path))
            for path in sorted(TESTS.glob("*.py"))}


def _called(node: ast.AST) -> set[str]:
    names = set()
    for child in ast.walk(node):
        if isinstance(child, ast.Call):
            func = child.func
            names.add(func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", ""))
    return names


def _checks_itself(node: ast.AST) -> bool:
    return any(isinstance(child, ast.Assert | ast.Raise) for child in ast.walk(node)) \
        or bool(_called(node) & CHECKS)


def asserting_functions(modules: dict[Path, ast.Module]) -> set[str]:
    """Names of the functions in tests/ that check something, directly or through another."""
    functions: dict[str, list[ast.AST]] = {}
    for tree in modules.values():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                functions.setdefault(node.name, []).append(node)
    found = {name for name, nodes in functions.items() if any(map(_checks_itself, nodes))}
    grew = True
    while grew:
        grew = False
        for name, nodes in functions.items():
            if name not in found and any(_called(n) & found for n in nodes):
                found.add(name)
                grew = True
    return found


def always_true(test: ast.expr) -> bool:
    """An assert condition that holds whatever the code does."""
    if isinstance(test, ast.Constant):
        return bool(test.value)
    if isinstance(test, ast.BoolOp) and isinstance(test.op, ast.Or):
        return any(always_true(value) for value in test.values)
    return False


def tautologies(tree: ast.Module) -> list[int]:
    return [node.lineno for node in ast.walk(tree)
            if isinstance(node, ast.Assert) and always_true(node.test)]


def checkless_tests(tree: ast.Module, asserting: set[str]) -> list[str]:
    found = []
    bodies = [node for node in tree.body if isinstance(node, ast.FunctionDef)]
    for cls in (node for node in tree.body if isinstance(node, ast.ClassDef)):
        bodies += [node for node in cls.body if isinstance(node, ast.FunctionDef)]
    for node in bodies:
        if node.name.startswith("test_") and not _checks_itself(node) \
                and not (_called(node) & asserting):
            found.append(f"{node.name} (line {node.lineno})")
    return found


def test_the_scanners_catch_what_they_are_for():
    tree = ast.parse(
        "def helper(x):\n    assert x\n"
        "def test_tautology():\n    assert True\n"
        "def test_or_true(x):\n    assert x == 1 or True\n"
        "def test_nothing():\n    x = 1\n"
        "def test_through_a_helper():\n    helper(1)\n"
        "def test_raises():\n    with pytest.raises(ValueError):\n        int('x')\n"
        "def test_fine(x):\n    assert x == 1 or x == 2\n")
    assert tautologies(tree) == [4, 6]
    assert checkless_tests(tree, asserting_functions({Path("x.py"): tree})) == [
        "test_nothing (line 7)"]


@pytest.mark.parametrize("path", sorted(p.name for p in TESTS.glob("*.py")))
def test_no_assert_in_the_suite_is_always_true(path):
    found = tautologies(trees()[TESTS / path])
    assert not found, f"{path}: asserts that cannot fail at lines {found}"


def test_every_test_checks_something():
    modules = trees()
    asserting = asserting_functions(modules)
    found = {path.name: names for path, tree in modules.items()
             if (names := checkless_tests(tree, asserting))}
    assert not found, f"tests that assert nothing: {found}"
