"""The house's floors: braincam (the core) imports none of the packages built on it;
the exporter and the service never import the trainer; the service never imports a
training framework. Read from the source (ast), every import statement, also those
inside functions, and `importlib.import_module("...")` with a literal name."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAINING = {"tensorflow", "keras", "tf_keras", "tf2onnx"}

# package -> top-level packages its modules must never import
FORBIDDEN: dict[str, set[str]] = {
    "braincam": {"trainer", "exporter", "service"},
    "exporter": {"trainer", "service"},
    "service": {"trainer", "exporter", *TRAINING},
}


def _modules(package: str, root: Path = ROOT) -> list[Path]:
    return sorted((root / package).rglob("*.py"))


def _absolute(module: str, level: int, path: Path, root: Path) -> str:
    """`from ..x import y` in `path` -> the absolute module name."""
    if level == 0:
        return module
    parts = list(path.relative_to(root).with_suffix("").parts)
    base = parts[:-level]  # the package `level` dots name, from the module's own
    return ".".join([*base, module] if module else base)


def imported(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, module) of every import in the file."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.lineno, _absolute(node.module or "", node.level, path, root)))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value))
    return found


def violations(package: str, root: Path = ROOT) -> list[str]:
    forbidden = FORBIDDEN[package]
    return [
        f"{path.relative_to(root)}:{line} imports {module}"
        for path in _modules(package, root)
        for line, module in imported(path, root)
        if module.split(".")[0] in forbidden
    ]


@pytest.mark.parametrize("package", list(FORBIDDEN))
def test_package_imports_nothing_above_it(package: str) -> None:
    assert _modules(package), f"no modules found under {package}/"
    assert violations(package) == []


def test_the_check_sees_imports_inside_functions(tmp_path: Path) -> None:
    # What the check was written for: a lazy import inside a function (the old
    # `braincam serve` reaching into service.__main__), relative imports, and a
    # module imported by name.
    package = tmp_path / "braincam"
    (package / "commands").mkdir(parents=True)
    (package / "commands" / "serve.py").write_text(
        "import importlib\n"
        "from ..datasets import DatasetError\n"
        "def run():\n"
        "    from service.__main__ import main\n"
        "    return main()\n"
        "def load():\n"
        "    return importlib.import_module('exporter.export')\n"
    )
    found = [m for _, m in imported(package / "commands" / "serve.py", tmp_path)]
    assert "braincam.datasets" in found
    assert violations("braincam", tmp_path) == [
        "braincam/commands/serve.py:4 imports service.__main__",
        "braincam/commands/serve.py:7 imports exporter.export",
    ]
