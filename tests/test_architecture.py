"""The package rules of bundle/docs/architecture.md, read from the source with ``ast`` (imports inside functions
too)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "custom"

# part of custom -> the other parts of custom it may import (bundle/docs/architecture.md, "What may import what")
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "checkpoints": {"networks", "errors"},  # builds only networks of custom.networks, never a name read from a file
    "distributed": set(),
    "tables": set(),
    "transforms": set(),
    "networks": set(),
    "losses": set(),
    "data": {"errors"},
    "writers": {"data"},
    "metrics": {"data", "losses", "tables"},
    "engines": {"metrics", "transforms", "checkpoints", "distributed"},
    "handlers": {"engines", "metrics", "transforms", "distributed", "checkpoints", "networks"},
    "inference": {"checkpoints", "data", "distributed", "transforms", "writers"},
    "report": {"engines", "handlers", "metrics", "writers", "tables", "checkpoints", "transforms"},
}
# single modules with a wider licence, and why
EXCEPTIONS: dict[str, set[str]] = {
    "data.synthetic": {"writers"},  # the sample data set builder writes its slides as pyramidal TIFF and ASAP XML
    "data.virtual_slides": {"writers"},  # so does the builder of virtual slides of real tissue
}
# third-party readers and writers of file formats: engines train and evaluate tensors, they parse no file
FILE_FORMAT_MODULES = {"PIL", "tifffile", "nibabel", "cucim", "openslide", "imagecodecs", "csv", "json", "xml"}
NO_FILE_FORMATS = {"engines", "networks", "losses"}


def module_name(path: Path, root: Path) -> str:
    """``custom/data/slide.py`` -> ``data.slide`` (the part of the package and the module inside it)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imported_modules(path: Path, root: Path) -> set[str]:
    """Every module ``path`` imports, absolute (``custom.`` prefix kept) or resolved from a relative import."""
    package = module_name(path, root).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                names.add(".".join([root.name, *base, *([node.module] if node.module else [])]))
            else:
                names.add(node.module or "")
    return names


def violations(root: Path) -> list[str]:
    """One line per import that breaks ``ALLOWED``, ``EXCEPTIONS`` or ``NO_FILE_FORMATS``, naming file and import."""
    found = []
    for path in sorted(root.rglob("*.py")):
        module = module_name(path, root)
        if not module:
            continue
        part = module.split(".")[0]
        allowed = ALLOWED.get(part)
        if allowed is None:
            found.append(f"{path}: '{part}' is not in the architecture's table")
            continue
        allowed = allowed | EXCEPTIONS.get(module, set()) | {part}
        for name in imported_modules(path, root):
            top = name.split(".")
            if top[0] == root.name:
                if len(top) > 1 and top[1] not in allowed:
                    found.append(f"{path}: {part} may not import {name}")
            elif part in NO_FILE_FORMATS and top[0] in FILE_FORMAT_MODULES:
                found.append(f"{path}: {part} parses no file format, but imports {name}")
    return found


def test_the_package_keeps_its_import_rules():
    assert violations(PACKAGE) == []


def test_every_part_of_the_package_is_in_the_table():
    parts = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
             if p.suffix == ".py" or (p / "__init__.py").is_file()}
    assert parts - {"__init__"} == set(ALLOWED)


@pytest.mark.parametrize(
    "module, source, problem",
    [
        ("networks/net.py", "from custom.data.slide import open_slide\n", "networks may not import custom.data.slide"),
        ("losses/loss.py", "def f():\n    from ..data import read_rgb\n", "losses may not import custom.data"),
        ("data/reader.py", "import custom.networks\n", "data may not import custom.networks"),
        ("engines/run.py", "import tifffile\n", "engines parses no file format, but imports tifffile"),
        ("inference/x.py", "from ..engines import stages\n", "inference may not import custom.engines"),
    ],
)
def test_a_forbidden_import_is_reported(tmp_path, module, source, problem):
    root = tmp_path / "custom"
    path = root / module
    path.parent.mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (path.parent / "__init__.py").write_text("")
    path.write_text(source)
    assert [line.split(": ", 1)[1] for line in violations(root)] == [problem]


def test_allowed_and_relative_imports_pass(tmp_path):
    root = tmp_path / "custom"
    (root / "writers").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "writers" / "__init__.py").write_text("from .geo import write\n")
    (root / "writers" / "geo.py").write_text("import json\nfrom custom.data.polygons import mask_polygons\n")
    assert violations(root) == []
