"""The package's folders are layers: a module imports only from its own layer or below.

The order, bottom-up (docs/architecture.md): ``errors`` → ``core`` → ``zfs`` → ``keys`` →
``disk`` → ``config`` → ``server`` → ``service`` → ``cli``. Imports are read with ``ast``
(function-level and ``TYPE_CHECKING`` imports included), so a lazy import cannot hide an
upward dependency.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "zbackupd"

#: Layer of each top-level name inside ``zbackupd`` (a folder or a top-level module).
LAYERS: dict[str, int] = {
    "__init__": 0,
    "errors": 0,
    "core": 1,
    "zfs": 2,
    "keys": 3,
    "disk": 4,
    "config": 5,
    "server": 6,
    "service": 7,
    "cli": 8,
    "__main__": 8,
}

#: What the gate (run on the backup server with the standard library only) may import.
GATE_MODULES = frozenset(
    {
        "zbackupd",
        "zbackupd.errors",
        "zbackupd.core",
        "zbackupd.core.values",
        "zbackupd.server",
        "zbackupd.server.gate_config",
        "zbackupd.zfs",
        "zbackupd.zfs.names",
        "zbackupd.zfs.argv",
    }
)


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts).removesuffix(".__init__")


def layer_of(module: str) -> int:
    """``zbackupd.server.gate`` → the layer of ``server``."""
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    if top not in LAYERS:
        raise AssertionError(f"{module}: {top!r} is in no layer; add it to LAYERS and the docs")
    return LAYERS[top]


def imported_modules(path: Path, package_root: Path) -> list[tuple[int, str]]:
    """(line, module) for every ``zbackupd`` import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = module_name(path, package_root)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            # ``from zbackupd.x import y`` may name a module y: count it as such.
            found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]
            found.append((node.lineno, target))
    return [(line, name) for line, name in found if name.split(".")[0] == "zbackupd"]


def existing_module(name: str, package: Path = PACKAGE) -> str:
    """The longest prefix of ``name`` that is a module or package of zbackupd."""
    parts = name.split(".")
    while parts:
        candidate = package.parent.joinpath(*parts)
        if candidate.with_suffix(".py").is_file() or (candidate / "__init__.py").is_file():
            return ".".join(parts)
        parts.pop()
    raise AssertionError(f"import of {name!r}: no such zbackupd module")


def upward_imports(root: Path) -> list[str]:
    problems: dict[str, None] = {}
    for path in sorted(root.rglob("*.py")):
        here = module_name(path, root)
        for line, target in imported_modules(path, root):
            module = existing_module(target, root)
            if layer_of(module) > layer_of(here):
                problems[f"{path.relative_to(root.parent)}:{line}: {here} imports {module}"] = None
    return list(problems)


def test_no_module_imports_from_a_layer_above_its_own() -> None:
    assert upward_imports(PACKAGE) == []


def test_every_module_sits_in_a_known_layer() -> None:
    for path in PACKAGE.rglob("*.py"):
        layer_of(module_name(path))


def test_the_gate_imports_only_the_standard_library_and_its_own_few_modules() -> None:
    gate = PACKAGE / "server" / "gate.py"
    reached: set[str] = set()
    pending = ["zbackupd.server.gate"]
    while pending:
        module = pending.pop()
        if module in reached:
            continue
        reached.add(module)
        parts = module.split(".")
        path = PACKAGE.parent.joinpath(*parts)
        path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top == "zbackupd":
                    pending.append(existing_module(name))
                    # importing a submodule runs its parents' __init__ too
                    parent = existing_module(name).split(".")
                    pending += [".".join(parent[:i]) for i in range(1, len(parent))]
                else:
                    assert top in sys.stdlib_module_names or top == "__future__", (
                        f"{path}: the gate reaches {name}, which is not in the standard library"
                    )
    assert gate.is_file()
    assert reached - {"zbackupd.server.gate"} <= GATE_MODULES


@pytest.mark.parametrize(
    "path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE))
)
def test_modules_stay_small_enough_to_read(path: Path) -> None:
    """No module over 500 lines; ``zfs/argv.py`` is the one grammar table, kept whole."""
    if path == PACKAGE / "zfs" / "argv.py":
        return
    lines = len(path.read_text().splitlines())
    assert lines <= 500, f"{path.relative_to(PACKAGE.parent)} has {lines} lines"


def test_an_upward_import_is_caught(tmp_path: Path) -> None:
    """The checker itself: a lower layer importing a higher one is reported."""
    fake = tmp_path / "zbackupd"
    (fake / "core").mkdir(parents=True)
    (fake / "service").mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "core" / "__init__.py").write_text("")
    (fake / "service" / "__init__.py").write_text("")
    (fake / "service" / "daemon.py").write_text("X = 1\n")
    (fake / "core" / "plan.py").write_text(
        "def later():\n    from zbackupd.service.daemon import X\n    return X\n"
    )
    assert upward_imports(fake) == [
        "zbackupd/core/plan.py:2: zbackupd.core.plan imports zbackupd.service.daemon"
    ]
