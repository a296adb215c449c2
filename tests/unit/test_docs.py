"""The README is a front page and the documentation's links and named modules exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
MODULE = re.compile(r"`((?:flows|tasks|tests|benchmarks|deployments)/[A-Za-z0-9_./*-]*)`")


def _anchor(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    return {
        _anchor(line.lstrip("#"))
        for line in page.read_text().splitlines()
        if line.startswith("#") and not line.startswith("#!")
    }


def test_readme_is_a_front_page() -> None:
    assert (ROOT / "README.md").stat().st_size <= 8 * 1024


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_exist(page: Path) -> None:
    for target in LINK.findall(page.read_text()):
        if re.match(r"^[a-z]+:", target):  # http://, https://, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.exists(), f"{page.name}: link to missing {target}"
        if anchor and dest.suffix == ".md":
            assert anchor in _anchors(dest), f"{page.name}: no heading for {target}"


def test_modules_named_in_architecture_exist() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text()
    named = MODULE.findall(text)
    assert len(named) >= 10
    for name in named:
        matches = list(ROOT.glob(name.rstrip("/")))
        assert matches, f"docs/architecture.md names {name}, which does not exist"


def test_architecture_names_every_module() -> None:
    """Every module of flows/, every top-level module of tasks/ and every tasks/ package."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    modules = [p for pkg in ("flows", "tasks") for p in (ROOT / pkg).glob("*.py")]
    packages = [p for p in (ROOT / "tasks").iterdir() if (p / "__init__.py").exists()]
    names = [p.relative_to(ROOT).as_posix() for p in modules if p.name != "__init__.py"]
    names += [p.relative_to(ROOT).as_posix() + "/" for p in packages]
    missing = [name for name in sorted(names) if f"`{name}`" not in text]
    assert not missing, f"add a row to docs/architecture.md's module table for: {missing}"
