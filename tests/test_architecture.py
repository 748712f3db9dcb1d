"""The floors of docs/architecture.md: no package imports from its own floor or above."""

from __future__ import annotations

import ast
from pathlib import Path

import tocom

ROOT = Path(tocom.__file__).resolve().parent

FLOORS = {
    "atomic": 0, "compress": 1, "data": 1, "models": 2, "peft": 3, "compensator": 4, "pyra": 4,
    "finetuned": 5, "seg": 5, "train": 6, "report": 6, "jobs": 7, "experiments": 8, "serve": 8,
    "cli": 9, "__init__": 9, "__main__": 10,
}


def package_of(path: Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def imported_packages(path: Path) -> set[str]:
    """Top-level tocom packages that ``path`` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "tocom":
                found.add(parts[1] if len(parts) > 1 else "__init__")
    return found


def test_every_package_has_a_floor():
    packages = {package_of(p) for p in ROOT.rglob("*.py")}
    assert packages <= set(FLOORS), f"add {sorted(packages - set(FLOORS))} to docs/architecture.md and FLOORS"


def test_no_package_imports_its_own_floor_or_above():
    broken = []
    for path in sorted(ROOT.rglob("*.py")):
        here = package_of(path)
        for other in imported_packages(path) - {here}:
            if FLOORS[other] >= FLOORS[here]:
                broken.append(f"{path.relative_to(ROOT)} (floor {FLOORS[here]}) imports {other} "
                              f"(floor {FLOORS[other]})")
    assert not broken, "\n".join(broken)


def test_the_checker_sees_function_level_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from tocom.jobs.demo import run_demo\n")
    assert imported_packages(probe) == {"jobs"}
