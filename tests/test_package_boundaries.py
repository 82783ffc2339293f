"""The folder tree reads as the architecture: the shared core (`mlops`) imports none of the other packages,
the request path (`service`) and the stream jobs (`streaming`) never import the training and registry-write side
(`lifecycle`) or each other, and no two packages import each other. Checked on every import statement in the
source, module-level or inside a function."""

from __future__ import annotations

import ast
from itertools import combinations
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mlops", "service", "streaming", "lifecycle", "tools", "harness", "bench", "feature_repo")
# What each package may import from the others (besides itself); the harness and benchmarks drive everything.
ALLOWED = {
    "mlops": set(),
    "service": {"mlops"},
    "streaming": {"mlops"},
    "lifecycle": {"mlops"},
    "feature_repo": {"mlops"},
}


def imports_of(package: str) -> dict[str, set[str]]:
    """For each other package the package imports, the files that do."""
    found: dict[str, set[str]] = {}
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in PACKAGES and top != package:
                    found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def test_each_package_imports_only_what_its_layer_allows():
    wrong = {package: {other: sorted(files) for other, files in imports_of(package).items() if other not in allowed}
             for package, allowed in ALLOWED.items()}
    assert {k: v for k, v in wrong.items() if v} == {}


def test_no_two_packages_import_each_other():
    graph = {package: set(imports_of(package)) for package in PACKAGES if (ROOT / package).is_dir()}
    both_ways = [(a, b) for a, b in combinations(graph, 2) if b in graph[a] and a in graph[b]]
    assert both_ways == []
