"""Render the Kubernetes overlays with kustomize and check them offline, before any cluster sees them.

    python -m tools.manifests [--overlay production|gpu|all] [--kube-version 1.29.0 ...] [--out DIR]

Every rendered object is validated (strict: unknown fields are errors) against the Kubernetes JSON schemas
that the `kubernetes-validate` package bundles, for the oldest and the newest Kubernetes minor we support,
then checked for the invariants an operator expects: every container has resource requests and limits,
long-running containers have readiness and liveness probes, images are pinned (a tag other than `latest`,
or a digest), nothing runs privileged or as root. Exit 0 when all hold, 1 with one line per problem.
No network and no cluster: kustomize is the pinned binary scripts/install.sh builds from the Go module proxy.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S_DIR = ROOT / "deploy" / "k8s"
OVERLAYS_DIR = K8S_DIR / "overlays"
KUSTOMIZE_VERSION = "v5.8.1"
KUSTOMIZE_CACHED = Path.home() / ".cache" / "mlops-stack" / "bin" / f"kustomize-{KUSTOMIZE_VERSION}"
# Oldest and newest Kubernetes minor the manifests must be valid for (gRPC probes are GA since 1.27).
KUBE_VERSIONS = ("1.29.0", "1.37.0")
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob"}
LONG_RUNNING_KINDS = {"Deployment", "StatefulSet", "DaemonSet"}


class ManifestError(RuntimeError):
    """kustomize is missing or failed."""


def overlays() -> list[str]:
    return sorted(p.name for p in OVERLAYS_DIR.iterdir() if (p / "kustomization.yaml").is_file())


def kustomize_command() -> list[str]:
    """The pinned kustomize (scripts/install.sh), else one on PATH, else `kubectl kustomize`."""
    if KUSTOMIZE_CACHED.is_file():
        return [str(KUSTOMIZE_CACHED), "build"]
    if found := shutil.which("kustomize"):
        return [found, "build"]
    if found := shutil.which("kubectl"):
        return [found, "kustomize"]
    raise ManifestError(f"kustomize not found: run scripts/install.sh (builds {KUSTOMIZE_CACHED})")


def render(overlay: str) -> list[dict[str, Any]]:
    """The objects `kustomize build deploy/k8s/overlays/<overlay>` produces."""
    path = OVERLAYS_DIR / overlay
    if not (path / "kustomization.yaml").is_file():
        raise ManifestError(f"unknown overlay {overlay!r}: choose from {', '.join(overlays())}")
    result = subprocess.run([*kustomize_command(), str(path)], capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise ManifestError(f"kustomize build {overlay} failed: {result.stderr.strip().splitlines()[-1:]}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def name_of(obj: dict[str, Any]) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


def validate_schema(objects: list[dict[str, Any]], versions: tuple[str, ...] = KUBE_VERSIONS) -> list[str]:
    """One message per object that does not validate (strict) against a version's schema."""
    import kubernetes_validate
    from kubernetes_validate.utils import all_versions

    supported = {v.rsplit(".", 1)[0] for v in all_versions()}
    for version in versions:
        if ".".join(version.split(".")[:2]) not in supported:
            choices = ", ".join(sorted(supported))
            raise ManifestError(f"no bundled schemas for Kubernetes {version}: choose from {choices}")
    problems = []
    for version in versions:
        for obj in objects:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                where = "/".join(str(p) for p in exc.path)
                problems.append(f"{name_of(obj)}: invalid for Kubernetes {version} at {where}: {exc.message}")
            except kubernetes_validate.SchemaNotFoundError:
                problems.append(f"{name_of(obj)}: no schema for {obj['apiVersion']} in Kubernetes {version}")
    return problems


def pod_spec(obj: dict[str, Any]) -> dict[str, Any] | None:
    spec = obj.get("spec", {})
    if obj["kind"] == "CronJob":
        return spec["jobTemplate"]["spec"]["template"]["spec"]
    if obj["kind"] in WORKLOAD_KINDS:
        return spec["template"]["spec"]
    return None


def containers(obj: dict[str, Any]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(pod spec, container) for every container, init containers included."""
    spec = pod_spec(obj)
    if spec is not None:
        for container in spec.get("initContainers", []) + spec.get("containers", []):
            yield spec, container


def image_pinned(image: str) -> bool:
    if "@sha256:" in image:
        return True
    name = image.rsplit("/", 1)[-1]
    return ":" in name and name.rsplit(":", 1)[1] not in ("", "latest")


def check_invariants(objects: list[dict[str, Any]]) -> list[str]:
    problems = []
    for obj in objects:
        for spec, c in containers(obj):
            where = f"{name_of(obj)} container {c['name']}"
            resources = c.get("resources", {})
            for part in ("requests", "limits"):
                if not {"cpu", "memory"} <= set(resources.get(part, {})):
                    problems.append(f"{where}: no cpu/memory {part}")
            if obj["kind"] in LONG_RUNNING_KINDS and not (c.get("readinessProbe") and c.get("livenessProbe")):
                problems.append(f"{where}: needs readiness and liveness probes")
            if not image_pinned(c.get("image", "")):
                problems.append(f"{where}: image {c.get('image')!r} is not pinned to a tag or digest")
            security = c.get("securityContext", {})
            if security.get("privileged") or security.get("allowPrivilegeEscalation", True):
                problems.append(f"{where}: privileged or may escalate privileges")
            if not (spec.get("securityContext", {}).get("runAsNonRoot") or security.get("runAsNonRoot")):
                problems.append(f"{where}: may run as root (set runAsNonRoot)")
        spec = pod_spec(obj)
        if spec and (spec.get("hostNetwork") or spec.get("hostPID") or spec.get("hostIPC")):
            problems.append(f"{name_of(obj)}: shares a host namespace")
    return problems


def check(overlay: str, versions: tuple[str, ...] = KUBE_VERSIONS) -> tuple[list[dict[str, Any]], list[str]]:
    objects = render(overlay)
    return objects, validate_schema(objects, versions) + check_invariants(objects)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.manifests", description=__doc__.splitlines()[0])
    parser.add_argument("--overlay", default="all", help="overlay under deploy/k8s/overlays, or all (default)")
    parser.add_argument("--kube-version", action="append", help=f"schema versions (default {KUBE_VERSIONS})")
    parser.add_argument("--out", type=Path, help="also write each rendered overlay to DIR/<overlay>.yaml")
    args = parser.parse_args(argv)
    versions = tuple(args.kube_version) if args.kube_version else KUBE_VERSIONS
    failed = False
    try:
        for overlay in overlays() if args.overlay == "all" else [args.overlay]:
            objects, problems = check(overlay, versions)
            if args.out:
                args.out.mkdir(parents=True, exist_ok=True)
                (args.out / f"{overlay}.yaml").write_text(yaml.safe_dump_all(objects, sort_keys=False))
            for problem in problems:
                print(f"{overlay}: {problem}", file=sys.stderr)
            failed |= bool(problems)
            kinds = ", ".join(sorted({o["kind"] for o in objects}))
            print(f"{overlay}: {len(objects)} objects ({kinds}): "
                  f"{'INVALID' if problems else 'valid for Kubernetes ' + ' and '.join(versions)}")
    except ManifestError as exc:
        print(f"manifests: {exc}", file=sys.stderr)
        return 2
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
