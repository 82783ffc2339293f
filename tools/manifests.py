"""Render the Kubernetes overlays with kustomize and check them offline, before any cluster sees them.

    python -m tools.manifests [--overlay production|gpu|jobs|all] [--kube-version 1.29.0 ...] [--out DIR]

Every rendered object is validated (strict: unknown fields are errors) against the Kubernetes JSON schemas
that the `kubernetes-validate` package bundles, for the oldest and the newest Kubernetes minor we support,
then checked for the invariants an operator expects: every container has resource requests and limits,
long-running containers have readiness and liveness probes, images are pinned (a tag other than `latest`,
or a digest), nothing runs privileged or as root. Exit 0 when all hold, 1 with one line per problem.
No network and no cluster: kustomize is the pinned binary scripts/install.sh builds from the Go module proxy.

`jobs` (deploy/k8s/jobs: batch jobs on KubeRay, applied on their own) holds a custom resource, RayJob, that
the Kubernetes schemas do not cover: its fields are checked against KubeRay's v1 API by name, and each pod
template in it is validated as a Kubernetes PodTemplate and held to the same invariants.
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
JOBS = "jobs"  # deploy/k8s/jobs: not an overlay (applying the stack must not start a batch job)
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
    """The objects `kustomize build deploy/k8s/overlays/<overlay>` (or deploy/k8s/jobs) produces."""
    path = K8S_DIR / JOBS if overlay == JOBS else OVERLAYS_DIR / overlay
    if not (path / "kustomization.yaml").is_file():
        raise ManifestError(f"unknown overlay {overlay!r}: choose from {', '.join([*overlays(), JOBS])}")
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
            if obj.get("kind") == "RayJob":
                problems += rayjob_problems(obj, version)
                continue
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                where = "/".join(str(p) for p in exc.path)
                problems.append(f"{name_of(obj)}: invalid for Kubernetes {version} at {where}: {exc.message}")
            except kubernetes_validate.SchemaNotFoundError:
                problems.append(f"{name_of(obj)}: no schema for {obj['apiVersion']} in Kubernetes {version}")
    return problems


# KubeRay's v1 RayJob API (ray.io_rayjobs.yaml of KubeRay 1.4): the fields a spec may have, per level.
RAYJOB_FIELDS = {
    "spec": {"activeDeadlineSeconds", "backoffLimit", "clusterSelector", "deletionStrategy", "entrypoint",
             "entrypointNumCpus", "entrypointNumGpus", "entrypointResources", "jobId", "managedBy", "metadata",
             "rayClusterSpec", "runtimeEnvYAML", "shutdownAfterJobFinishes", "submissionMode", "submitterConfig",
             "submitterPodTemplate", "suspend", "ttlSecondsAfterFinished"},
    "rayClusterSpec": {"autoscalerOptions", "enableInTreeAutoscaling", "gcsFaultToleranceOptions", "headGroupSpec",
                       "headServiceAnnotations", "managedBy", "rayVersion", "suspend", "workerGroupSpecs"},
    "headGroupSpec": {"enableIngress", "headService", "rayStartParams", "serviceType", "template"},
    "workerGroupSpecs": {"groupName", "idleTimeoutSeconds", "maxReplicas", "minReplicas", "numOfHosts",
                         "rayStartParams", "replicas", "scaleStrategy", "suspend", "template"},
}
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}


def _unknown(where: str, part: dict[str, Any], allowed: set[str]) -> list[str]:
    return [f"{where}: unknown field {key!r} for KubeRay v1" for key in sorted(set(part) - allowed)]


def rayjob_problems(obj: dict[str, Any], version: str) -> list[str]:
    """A RayJob's fields by name, its entrypoint and cluster present, each pod template a valid PodTemplate."""
    import kubernetes_validate

    name = name_of(obj)
    if obj.get("apiVersion") != "ray.io/v1":
        return [f"{name}: apiVersion {obj.get('apiVersion')!r} is not ray.io/v1"]
    spec = obj.get("spec", {})
    problems = _unknown(f"{name} spec", spec, RAYJOB_FIELDS["spec"])
    if not spec.get("entrypoint"):
        problems.append(f"{name}: no spec.entrypoint")
    if spec.get("submissionMode", "K8sJobMode") not in SUBMISSION_MODES:
        problems.append(f"{name}: spec.submissionMode {spec['submissionMode']!r} is not one of "
                        f"{', '.join(sorted(SUBMISSION_MODES))}")
    cluster = spec.get("rayClusterSpec")
    if not cluster:
        return [*problems, f"{name}: no spec.rayClusterSpec (a RayJob here brings its own cluster)"]
    problems += _unknown(f"{name} rayClusterSpec", cluster, RAYJOB_FIELDS["rayClusterSpec"])
    head = cluster.get("headGroupSpec") or {}
    problems += _unknown(f"{name} headGroupSpec", head, RAYJOB_FIELDS["headGroupSpec"])
    groups = cluster.get("workerGroupSpecs", [])
    for group in groups:
        problems += _unknown(f"{name} workerGroupSpecs", group, RAYJOB_FIELDS["workerGroupSpecs"])
        if not group.get("groupName"):
            problems.append(f"{name}: a worker group without groupName")
    for where, template in _rayjob_templates(obj):
        if not template:
            problems.append(f"{name} {where}: no pod template")
            continue
        wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"}, "template": template}
        try:
            kubernetes_validate.validate(wrapped, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            at = "/".join(str(p) for p in exc.path)
            problems.append(f"{name} {where}: invalid for Kubernetes {version} at {at}: {exc.message}")
    return problems


def _rayjob_templates(obj: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    cluster = obj.get("spec", {}).get("rayClusterSpec") or {}
    yield "head", (cluster.get("headGroupSpec") or {}).get("template")
    for group in cluster.get("workerGroupSpecs", []):
        yield f"worker group {group.get('groupName')}", group.get("template")
    if submitter := obj.get("spec", {}).get("submitterPodTemplate"):
        yield "submitter", submitter


def pod_specs(obj: dict[str, Any]) -> list[dict[str, Any]]:
    spec = obj.get("spec", {})
    if obj["kind"] == "CronJob":
        return [spec["jobTemplate"]["spec"]["template"]["spec"]]
    if obj["kind"] in WORKLOAD_KINDS:
        return [spec["template"]["spec"]]
    if obj["kind"] == "RayJob":
        return [t["spec"] for _, t in _rayjob_templates(obj) if t and "spec" in t]
    return []


def pod_spec(obj: dict[str, Any]) -> dict[str, Any] | None:
    """The pod spec of a workload with one (a RayJob has several: :func:`pod_specs`)."""
    specs = pod_specs(obj)
    return specs[0] if len(specs) == 1 else None


def containers(obj: dict[str, Any]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(pod spec, container) for every container, init containers included."""
    for spec in pod_specs(obj):
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
        for spec in pod_specs(obj):
            if spec.get("hostNetwork") or spec.get("hostPID") or spec.get("hostIPC"):
                problems.append(f"{name_of(obj)}: shares a host namespace")
    return problems


def check(overlay: str, versions: tuple[str, ...] = KUBE_VERSIONS) -> tuple[list[dict[str, Any]], list[str]]:
    objects = render(overlay)
    return objects, validate_schema(objects, versions) + check_invariants(objects)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.manifests", description=__doc__.splitlines()[0])
    parser.add_argument("--overlay", default="all", help="overlay under deploy/k8s/overlays, jobs "
                                                          "(deploy/k8s/jobs), or all (default)")
    parser.add_argument("--kube-version", action="append", help=f"schema versions (default {KUBE_VERSIONS})")
    parser.add_argument("--out", type=Path, help="also write each rendered overlay to DIR/<overlay>.yaml")
    args = parser.parse_args(argv)
    versions = tuple(args.kube_version) if args.kube_version else KUBE_VERSIONS
    failed = False
    try:
        for overlay in [*overlays(), JOBS] if args.overlay == "all" else [args.overlay]:
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
