"""The upstream code under our patches is checked at import (service/upstream.py), and the BentoML defect we
patch is reproduced as written up for upstream (docs/upstream/)."""

from __future__ import annotations

import asyncio
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from service import bentoml_fixes, upstream

ROOT = Path(__file__).resolve().parents[1]
TARGET = "bentoml._internal.server.http.traffic:TimeoutMiddleware.__call__"


def test_the_installed_code_is_the_code_the_patches_were_written_for():
    assert upstream.problems() == []
    bentoml_fixes.apply()  # the check reads upstream's originals, not our replacements
    assert upstream.problems() == []
    upstream.check()


def test_a_changed_or_missing_function_or_another_version_is_named_in_one_line(monkeypatch):
    changed = upstream.problems({TARGET: "0" * 16})
    assert len(changed) == 1 and changed[0].startswith(f"{TARGET} changed (source hash ")
    gone = upstream.problems({"uvicorn.protocols.http.h11_impl:H11Protocol.no_such_method": "0" * 16})
    assert gone == ["uvicorn.protocols.http.h11_impl:H11Protocol.no_such_method is gone (AttributeError)"]
    monkeypatch.setitem(upstream.VERSIONS, "bentoml", "9.9.9")
    monkeypatch.setitem(upstream.SOURCES, TARGET, "0" * 16)
    with pytest.raises(upstream.UpstreamChanged) as err:
        upstream.check()
    message = str(err.value)
    assert "bentoml 1.4.39 is installed, the patches were written for 9.9.9" in message
    assert "(and 1 more: python -m service.upstream)" in message and "\n" not in message


def test_the_cli_reports_the_code_as_patched():
    run = subprocess.run([sys.executable, "-m", "service.upstream"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0 and run.stdout.startswith("upstream code as patched: bentoml 1.4.39"), run.stdout


def test_the_reproduction_for_upstream_still_shows_the_leak():
    """Run without our patch (a process of its own): the day it shows no leak, the patch can go."""
    run = subprocess.run([sys.executable, str(ROOT / "docs/upstream/timeout_middleware_leak.py")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "1000 timers outlived their requests", run.stdout
    spec = importlib.util.spec_from_file_location("leak", ROOT / "docs/upstream/timeout_middleware_leak.py")
    leak = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(leak)
    bentoml_fixes.apply()
    assert asyncio.run(leak.leaked(200)) == 0  # and the patch fixes it


def test_the_images_pin_the_versions_the_patches_were_written_for():
    """A Bento image resolving another BentoML or uvicorn would refuse to serve (the check above)."""
    import yaml

    for bentofile in (ROOT / "bentofile.yaml", ROOT / "deploy/bento/bentofile.gpu.yaml"):
        packages = set(yaml.safe_load(bentofile.read_text())["python"]["packages"])
        for package, version in upstream.VERSIONS.items():
            assert f"{package}=={version}" in packages, (bentofile.name, package)
