"""The docs site builds with no broken link, anchor or orphan page, and the README's links land."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from markdown import Markdown

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def mkdocs_build(root: Path, site: Path) -> subprocess.CompletedProcess:
    # No -q: at quiet level MkDocs does not count warnings, and --strict then passes a broken link.
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)], cwd=root,
                          capture_output=True, text=True, timeout=180,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})


def anchors(page: Path) -> set[str]:
    """The heading ids MkDocs gives the page (Python-Markdown's toc slugs)."""
    md = Markdown(extensions=["toc", "tables", "fenced_code"])
    md.convert(page.read_text())
    found: set[str] = set()

    def walk(tokens: list[dict]) -> None:
        for token in tokens:
            found.add(token["id"])
            walk(token["children"])

    walk(md.toc_tokens)  # type: ignore[attr-defined]
    return found


def test_the_docs_site_builds_strict(tmp_path):
    result = mkdocs_build(ROOT, tmp_path / "site")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "site" / "drift" / "index.html").exists()


@pytest.mark.parametrize("page, broken", [
    ("orphan.md", "# Not in the nav\n"),
    ("drift.md", "[gone](no-such-page.md)\n"),
    ("serving.md", "[gone](drift.md#no-such-heading)\n"),
])
def test_the_strict_build_fails_on_a_broken_link_or_an_orphan_page(tmp_path, page, broken):
    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "docs", copy / "docs")
    shutil.copy(ROOT / "mkdocs.yml", copy / "mkdocs.yml")
    target = copy / "docs" / page
    target.write_text((target.read_text() if target.exists() else "") + "\n" + broken)
    result = mkdocs_build(copy, tmp_path / "site")
    assert result.returncode != 0, "the broken page built"


def test_every_readme_link_lands_on_a_file_and_heading():
    readme = FENCE.sub("", (ROOT / "README.md").read_text())
    links = [link for link in LINK.findall(readme) if not link.startswith(("http://", "https://"))]
    assert links, "the README links to no page"
    for link in links:
        path, _, anchor = link.partition("#")
        target = ROOT / path
        assert target.is_file(), f"README links to a missing file: {link}"
        if anchor:
            assert anchor in anchors(target), f"README links to a missing heading: {link}"


def test_the_architecture_picture_is_the_same_in_the_readme_and_the_docs():
    def picture(path: Path) -> str:
        return re.search(r"^```text\n.*?^```", path.read_text(), re.S | re.M).group(0)  # type: ignore[union-attr]

    assert picture(ROOT / "README.md") == picture(ROOT / "docs" / "architecture.md")
