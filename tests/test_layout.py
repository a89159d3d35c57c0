"""The import graph, read statically (``ast``) from every .py file of the project, imports
inside functions included (and ``importlib.import_module("a.b")`` with a literal name):

    utils/  <  tools/  <  attack/, defense/  <  bench/  <  tests/, scripts/, benchmarks/

A module imports its own package and the packages below it, never one above: utils/ is the
ground floor, tools/ (the contract and the scaffold) serves attack/ and defense/, which never
import each other, and bench/ (the comparison) sits above both. The one exception is the
script alias defense/compare.py (``python defense/compare.py`` = ``python -m bench``).

A method file (a module of attack/ or defense/ that registers a class with
``@register_attack``/``@register_defense``) never imports another method file; methods share
code through small modules of their package (defense/bnprune.py, attack/frequency.py, ...).
"""

from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"utils": 0, "tools": 1, "attack": 2, "defense": 2, "bench": 3}
TOP = ("tests", "scripts", "benchmarks")  # import anything; nothing imports them
ALLOWED = {("defense/compare.py", "bench")}  # (file, package it may import above its own)
REGISTER = {"attack": "register_attack", "defense": "register_defense"}


def project_files() -> list[Path]:
    files = [ROOT / "setup.py"] if (ROOT / "setup.py").is_file() else []
    for folder in (*LAYERS, *TOP):
        files += sorted((ROOT / folder).rglob("*.py"))
    return [f for f in files if "__pycache__" not in f.parts]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


@lru_cache(maxsize=None)
def tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, anywhere in the file, as absolute dotted names; for
    ``from package import name`` also ``package.name`` when that is a module of the project."""
    own = module_name(path).split(".")
    package = own if path.name == "__init__.py" else own[:-1]
    found: set[str] = set()
    for node in ast.walk(tree(path)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                stem = package[: len(package) - node.level + 1]
                base = ".".join([*stem, base] if base else stem)
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names if is_module(f"{base}.{alias.name}")}
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.add(node.args[0].value)
    return found


def method_files() -> set[str]:
    """Modules of attack/ and defense/ that register a method (a decorated class)."""
    methods = set()
    for side, decorator in REGISTER.items():
        for path in sorted((ROOT / side).glob("*.py")):
            for node in ast.walk(tree(path)):
                if isinstance(node, ast.ClassDef) and any(
                    getattr(getattr(d, "func", d), "id", None) == decorator for d in node.decorator_list
                ):
                    methods.add(module_name(path))
                    break
    return methods


def edges() -> list[tuple[str, str, str]]:
    """(file, imported module, top package of the imported module) for the project's packages."""
    out = []
    for path in project_files():
        rel = path.relative_to(ROOT).as_posix()
        for name in sorted(imported_modules(path)):
            top = name.split(".")[0]
            if top in LAYERS:
                out.append((rel, name, top))
    return out


def test_the_graph_is_read_from_every_package_and_finds_imports_inside_functions():
    files = {p.relative_to(ROOT).parts[0] for p in project_files()}
    assert set(LAYERS) <= files and "tests" in files
    found = edges()
    assert ("bench/compare.py", "attack", "attack") in found  # `import attack` inside a function
    assert any(f == "defense/sau.py" and top == "utils" for f, _, top in found)
    methods = method_files()
    assert {"defense.sau", "attack.badnet"} <= methods and not methods & {
        "defense.base",
        "defense.bnprune",
        "attack.frequency",
        "defense.compare",
    }


def test_no_package_imports_one_above_it_or_a_sibling():
    bad = []
    for file, name, top in edges():
        own = file.split("/")[0]
        if own in TOP or own == top or (file, top) in ALLOWED:
            continue
        if own not in LAYERS or LAYERS[top] >= LAYERS[own]:
            bad.append(f"{file} imports {name}")
    assert not bad, "imports that go up or sideways (see tests/test_layout.py):\n  " + "\n  ".join(bad)


def test_no_method_file_imports_another_method_file():
    methods = method_files()
    bad = []
    for path in project_files():
        own = module_name(path)
        if own not in methods:
            continue
        for name in sorted(imported_modules(path)):
            if name in methods and name != own:
                bad.append(f"{path.relative_to(ROOT).as_posix()} imports {name}")
    assert not bad, (
        "a method file imports another one; share the code through a small module of the package "
        "instead:\n  " + "\n  ".join(bad)
    )
