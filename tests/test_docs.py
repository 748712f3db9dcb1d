"""The docs a newcomer reads: the README stays a front door, and no relative link is dead."""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").rglob("*.md")),
         *sorted((ROOT / "research").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _relative_links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code blocks hold no links
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t) and not t.startswith("#")]


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    heads = re.findall(r"^#+\s+(.*)$", page.read_text(), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in heads}


def test_readme_is_a_front_door():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 150, f"README has {len(lines)} lines; move detail to docs/usage.md"
    # .ci/run reads these two blocks; without them nothing runs.
    assert "<!-- ci:main -->" in lines and "<!-- ci:test -->" in lines


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    dead = []
    for target in _relative_links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve()
        if not file.exists():
            dead.append(target)
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            dead.append(target)
    assert not dead, f"{page.relative_to(ROOT)} links to missing files or headings: {dead}"


def test_every_results_file_records_its_provenance_or_is_listed_as_lacking_it():
    results = ROOT / "docs" / "results"
    page = (results / "README.md").read_text()
    table = page.split("<!-- files-without-provenance -->")[1].split("<!-- /files-without-provenance -->")[0]
    listed = set(re.findall(r"^\| `([\w.-]+\.json)` \|", table, flags=re.M))
    assert len(listed) == 11
    lacking = set()
    for path in sorted(results.glob("*.json")):
        record = json.loads(path.read_text())
        prov = record.get("provenance", {}) if isinstance(record, dict) else {}
        if not (isinstance(prov, dict) and prov.get("commit")) and not record.get("commit"):
            lacking.add(path.name)
    assert lacking == listed, f"without provenance but not listed: {sorted(lacking - listed)}; " \
                              f"listed but recording it now: {sorted(listed - lacking)}"


def test_every_benchmark_is_quoted_by_a_doc():
    docs = "\n".join(p.read_text() for p in [*PAGES, *sorted((ROOT / "plugins").glob("*.md"))])
    unquoted = [p.name for p in sorted((ROOT / "benchmarks").iterdir())
                if p.is_file() and p.suffix in (".py", ".sh") and p.name not in docs]
    assert not unquoted, f"benchmarks/ keeps only what a doc quotes; move {unquoted} to research/"
