"""The floors of docs/architecture.md: no package imports from its own floor or above."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import tocom

ROOT = Path(tocom.__file__).resolve().parent

PAGE = ROOT.parent / "docs" / "architecture.md"


def floors_of(page: str) -> dict[str, int]:
    """The floor table of docs/architecture.md: ``| N | `tocom/x/`, `tocom/y.py` | ... |`` rows."""
    floors = {}
    for floor, names in re.findall(r"^\| (\d+) \| ([^|]*`tocom/[^|]*)\|", page, flags=re.M):
        for name in re.findall(r"`tocom/([\w.]+?)(?:/|\.py)?`", names):
            floors[name] = int(floor)
    return floors


FLOORS = floors_of(PAGE.read_text())


def test_the_floor_table_is_read_from_the_page():
    assert FLOORS["compress"] == 1 and FLOORS["cli"] == FLOORS["__init__"] == 9
    table = "| 3 | `tocom/new/` | x |\n| 4 | `tocom/a.py`, `tocom/b/` | y |"
    assert floors_of(table) == {"new": 3, "a": 4, "b": 4}


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


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def module_imports(path: Path) -> set[str]:
    """Dotted tocom modules ``path`` imports (absolute or relative, at module level or inside functions;
    not under ``if TYPE_CHECKING``); ``from a import b`` names the submodule ``a.b`` when there is one."""
    here = ".".join(("tocom",) + path.relative_to(ROOT).with_suffix("").parts)
    package = here if path.name == "__init__.py" else here.rsplit(".", 1)[0]
    package = package.removesuffix(".__init__")
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _type_checking_only(node):
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if _module_file(sub) else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return {m for m in found if m.startswith("tocom.") and _module_file(m)}


def _module_file(dotted: str) -> Path | None:
    rel = Path(*dotted.split(".")[1:])
    for candidate in (ROOT / rel.with_suffix(".py"), ROOT / rel / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def import_cycles() -> list[list[str]]:
    """Every cycle of the file-level import graph. Package ``__init__`` files are left out: they
    re-export their submodules, which is not a dependency of the submodules on each other."""
    graph = {}
    for path in ROOT.rglob("*.py"):
        if path.name != "__init__.py":
            name = ".".join(("tocom",) + path.relative_to(ROOT).with_suffix("").parts)
            graph[name] = {m for m in module_imports(path) if not _module_file(m).name == "__init__.py"}
    cycles, state = [], {}

    def walk(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                walk(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            walk(node, [node])
    return cycles


def test_no_import_cycle_between_files():
    cycles = import_cycles()
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_the_cycle_checker_follows_relative_and_lazy_imports(tmp_path, monkeypatch):
    pkg = tmp_path / "tocom" / "pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    from tocom.pkg.a import x\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import x\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path / "tocom")
    assert module_imports(pkg / "a.py") == {"tocom.pkg.b"}
    assert module_imports(pkg / "c.py") == set()
    assert import_cycles() == [["tocom.pkg.a", "tocom.pkg.b", "tocom.pkg.a"]]


def test_no_job_function_takes_more_than_ten_parameters():
    """A job takes a config object (``DistillConfig``, ``FinetuneConfig``, ...), not 25 keywords."""
    long = []
    for path in sorted((ROOT / "jobs").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef):
                a = node.args
                count = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs)
                if count > 10:
                    long.append(f"jobs/{path.name}: {node.name} takes {count}")
    assert not long, "\n".join(long)


def test_no_library_module_reads_the_current_directory_or_the_repo_layout():
    """Library code takes paths as arguments or from documented environment variables only.

    (Defaults of output paths, such as ``out="demo-out"``, are arguments and are allowed.)"""
    implicit = re.compile(r"Path\.cwd\(|os\.getcwd\(|[\"']\.\./shared|Path\([\"'](plugins|docs|runs)\b")
    found = [f"{path.relative_to(ROOT)}:{i}: {line.strip()}"
             for path in sorted(ROOT.rglob("*.py"))
             for i, line in enumerate(path.read_text().splitlines(), 1)
             if implicit.search(line) and not line.lstrip().startswith("#")]
    assert not found, "\n".join(found)


def test_the_library_never_imports_the_research_code():
    """research/ (the papers' experiments, the probes) sits beside the package and is not installed."""
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            found += [f"{path.relative_to(ROOT)} imports {n}" for n in names if n.split(".")[0] == "research"]
    assert not found, "\n".join(found)


def test_package_docstrings_name_the_floor_the_page_gives():
    wrong = []
    for init in sorted(ROOT.glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        said = re.match(r"(?:Floor|Layer) (\d+)", doc)
        if said and int(said.group(1)) != FLOORS[init.parent.name]:
            wrong.append(f"{init.parent.name}: docstring says {said.group(0)}, the page floor "
                         f"{FLOORS[init.parent.name]}")
    assert not wrong, "\n".join(wrong)
