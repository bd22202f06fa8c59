"""The library and the application are separate: ``fmaml/app/`` imports the library, never the
other way round, so ``import fmaml`` in a notebook loads no command-line code."""

from __future__ import annotations

import ast
from pathlib import Path

import fmaml

PACKAGE = Path(fmaml.__file__).parent
APP = PACKAGE / "app"


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_the_library_never_imports_the_application():
    library = [p for p in PACKAGE.rglob("*.py") if APP not in p.parents and p.name != "__main__.py"]
    assert len(library) > 10
    for path in library:
        bad = sorted(
            m for m in _imported_modules(path) if m == "fmaml.app" or m.startswith("fmaml.app.")
        )
        assert not bad, f"{path.relative_to(PACKAGE.parent)} imports the application: {bad}"


def test_the_application_has_one_module_per_command_and_job():
    modules = {p.relative_to(APP).as_posix() for p in APP.rglob("*.py")}
    assert {"main.py", "train.py", "plan.py", "demo.py"} <= modules
    assert {"jobs/sinusoid.py", "jobs/omniglot.py"} <= modules


def test_python_dash_m_fmaml_is_the_application():
    from fmaml import __main__
    from fmaml.app.main import main

    assert __main__.main is main
