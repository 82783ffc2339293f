"""`bentoml build` on bentofile.yaml and its GPU twin; the image carries what its entry points import.

The manifests, alert rules and dashboard have their own suites: test_k8s_manifests.py, test_alert_rules.py,
test_prometheus_scrape.py.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.integration
@pytest.mark.slow
def test_bentoml_build_packs_service_code_and_model(workspace):
    bentoml = Path(sys.executable).with_name("bentoml")
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true"}
    result = subprocess.run([str(bentoml), "build", "-o", "tag"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    tag = result.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    info = subprocess.run([str(bentoml), "get", tag, "-o", "json"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    bento = json.loads(info.stdout)
    from lifecycle import model_store

    assert [m["tag"] for m in bento["models"]] == [model_store.load("fraud_detector").tag]  # :latest
    bento_dir = Path(os.environ["BENTOML_HOME"]) / "bentos" / tag.replace(":", "/")
    assert (bento_dir / "src" / "service" / "service.py").exists()
    assert (bento_dir / "src" / "feature_repo" / "feature_store.yaml").exists()
    needed: set[Path] = set()  # every project file the image's entry points import (subpackages too)
    third_party_imports(ENTRY_POINTS, needed)
    missing = sorted(str(p) for p in needed if not (bento_dir / "src" / p).exists())
    assert not missing, f"imported by an entry point but not packed (bentofile.yaml include): {missing}"
    assert (bento_dir / "env" / "docker" / "Dockerfile").exists()
    requirements = (bento_dir / "env" / "python" / "requirements.txt").read_text()
    assert "onnxruntime==1.32.0" in requirements and "feast" in requirements


@pytest.mark.integration
@pytest.mark.slow
def test_gpu_bento_builds_on_cuda_with_onnxruntime_gpu(workspace):
    bentoml = Path(sys.executable).with_name("bentoml")
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true"}
    result = subprocess.run([str(bentoml), "build", "-f", str(GPU_BENTOFILE), "-o", "tag"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    tag = result.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    assert tag.startswith("fraud_detector_gpu:")
    bento_dir = Path(os.environ["BENTOML_HOME"]) / "bentos" / tag.replace(":", "/")
    requirements = (bento_dir / "env" / "python" / "requirements.txt").read_text()
    assert "onnxruntime-gpu==1.31.1" in requirements and "onnxruntime==" not in requirements
    # The pin's [cuda,cudnn] extras, locked: CUDA 13 and cuDNN 9 as pip packages (the service preloads them).
    assert "nvidia-cuda-runtime==13." in requirements and "nvidia-cublas==13." in requirements
    assert "nvidia-cudnn-cu13==9." in requirements
    dockerfile = (bento_dir / "env" / "docker" / "Dockerfile").read_text()
    assert "nvidia/cuda:" not in dockerfile  # CUDA 13 comes with onnxruntime-gpu's extras, not a 12.x base image
    assert (bento_dir / "src" / "streaming" / "cli.py").exists()  # the drift consumer runs from this image too


GPU_BENTOFILE = ROOT / "deploy" / "bento" / "bentofile.gpu.yaml"


def test_gpu_bentofile_differs_from_the_cpu_one_only_in_the_gpu_parts():
    """Also no CUDA base image: onnxruntime-gpu 1.31 links CUDA 13 (measured on an H200, bench/results/gpu-*),
    BentoML's newest CUDA image is 12.8, so the libraries come as the pin's pip extras."""
    cpu = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    gpu = yaml.safe_load(GPU_BENTOFILE.read_text())
    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    swapped = [p if not p.startswith("onnxruntime==") else pins[0] for p in cpu["python"]["packages"]]
    assert gpu["python"]["packages"] == swapped
    assert gpu["name"] == cpu["name"] + "_gpu"
    for key in ("service", "include", "exclude", "models", "envs"):
        assert gpu[key] == cpu[key], key
    assert gpu["docker"] == cpu["docker"]


def module_level(tree: ast.Module) -> list[ast.stmt]:
    """Statements that run when the module is imported (inside if/try blocks too, not in functions or classes'
    methods): what a process needs installed to start at all."""
    out: list[ast.stmt] = []
    todo: list[ast.stmt] = list(tree.body)
    while todo:
        node = todo.pop()
        out.append(node)
        if isinstance(node, ast.If | ast.Try | ast.With):
            todo.extend(node.body + getattr(node, "orelse", []) + getattr(node, "finalbody", []))
            todo.extend(stmt for handler in getattr(node, "handlers", []) for stmt in handler.body)
    return out


# What the image runs (bentofile.yaml, deploy/k8s): the service, the stream consumers, the rollout and
# retraining controllers, the batch scorer.
ENTRY_POINTS = ["service.service", "streaming.__main__", "streaming.cli", "lifecycle.rollout.controller",
                "lifecycle.batch.cli", "lifecycle.retrain.__main__"]


def third_party_imports(entry_modules: list[str], local_files: set[Path] | None = None) -> set[str]:
    """Top-level third-party modules that the entry modules, and the project modules they import, import when
    they load (imports inside functions run later, if ever, and are left out); ``local_files`` collects the
    project's files on the way."""
    local = {"service", "streaming", "mlops", "lifecycle", "tools", "feature_repo"}
    seen: set[str] = set()
    found: set[str] = set()
    todo = list(entry_modules)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        base = ROOT.joinpath(*module.split("."))
        path = base / "__init__.py" if (base / "__init__.py").exists() else base.with_suffix(".py")
        if not path.exists():
            continue
        if local_files is not None:
            local_files.add(path.relative_to(ROOT))
        for node in module_level(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in local:
                    todo.append(name)
                elif top not in sys.stdlib_module_names:
                    found.add(top)
    return found


def installed_closure(requirements: list[str]) -> set[str]:
    """Normalised names of the distributions these requirements pull in (installed ones, markers applied)."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    todo = [(Requirement(r), "") for r in requirements]
    seen: set[str] = set()
    while todo:
        req, extra = todo.pop()
        if req.marker and not req.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(req.name)
        key = f"{name}[{','.join(sorted(req.extras))}]"
        if key in seen:
            continue
        seen.add(key)
        try:
            dist_requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for sub in dist_requires:
            sub_req = Requirement(sub)
            for ex in req.extras or {""}:
                todo.append((sub_req, ex))
    return {k.split("[")[0] for k in seen}


def test_bento_packs_every_package_its_entry_points_import():
    """`bentoml serve`, `python -m streaming consume` and the Feast job run from the one image: whatever they
    import must be a bentofile package or one of its dependencies, or the pod dies at start."""
    from importlib import metadata

    from packaging.utils import canonicalize_name

    bento = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    included = " ".join(bento["include"])
    assert "service/**/*.py" in included and "streaming/**/*.py" in included and "mlops/**/*.py" in included
    available = installed_closure(bento["python"]["packages"])
    providers = metadata.packages_distributions()
    missing = []
    for module in sorted(third_party_imports(ENTRY_POINTS)):
        dists = {canonicalize_name(d) for d in providers.get(module, [module])}
        if not dists & available:
            missing.append(f"{module} ({', '.join(sorted(dists))})")
    assert not missing, f"imported but not in bentofile.yaml python.packages: {missing}"
