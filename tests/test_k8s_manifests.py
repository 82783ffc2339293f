"""Every kustomize overlay renders, validates against the Kubernetes schemas offline, and keeps the invariants.

The renderer is the real kustomize binary (scripts/install.sh) and the schemas those `kubernetes-validate`
bundles; the negative cases prove the checks bite on the kind of mistake they exist for.
"""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from mlops.settings import Settings
from tools import manifests
from tools.services import TOPICS

OVERLAYS = manifests.overlays()
SECRETS_DIR = "/etc/mlops/secrets"
BENTO_SRC = "/home/bentoml/bento/src"  # where a Bento image holds the project's code
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {overlay: manifests.render(overlay) for overlay in OVERLAYS}


def by_name(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and (o["metadata"]["name"] == name or (
        kind == "ConfigMap" and o["metadata"]["name"].startswith(name + "-")))]  # a generated name has a hash
    assert len(found) == 1, f"{kind}/{name}: {len(found)} objects"
    return found[0]


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    return deployment["spec"]["template"]["spec"]["containers"][0]


def test_overlays_exist():
    assert {"production", "gpu"} <= set(OVERLAYS)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_is_valid_kubernetes_and_keeps_the_invariants(rendered, overlay):
    objects = rendered[overlay]
    assert manifests.validate_schema(objects) == []
    assert manifests.check_invariants(objects) == []
    kinds = {o["kind"] for o in objects}
    assert {"StatefulSet", "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ConfigMap",
            "CronJob", "NetworkPolicy"} <= kinds
    assert all(o["metadata"].get("namespace") == "mlops" for o in objects)


def test_the_cli_reports_valid_overlays(capsys):
    assert manifests.main([]) == 0
    out = capsys.readouterr().out
    assert all(f"{overlay}: " in out and "valid for Kubernetes" in out for overlay in OVERLAYS)


def test_schema_validation_rejects_a_misspelt_field_and_a_wrong_type(rendered):
    serving = copy.deepcopy(by_name(rendered["production"], "StatefulSet", "fraud-detector"))
    container(serving)["readinesProbe"] = container(serving).pop("readinessProbe")
    service = copy.deepcopy(by_name(rendered["production"], "Service", "fraud-detector"))
    service["spec"]["ports"][0]["port"] = "eighty"
    problems = manifests.validate_schema([serving, service])
    assert any("StatefulSet/fraud-detector" in p and "readinesProbe" in p for p in problems), problems
    assert any("Service/fraud-detector" in p and "ports/0/port" in p for p in problems), problems


def test_invariant_checks_catch_unpinned_privileged_and_unprobed_containers(rendered):
    deployment = copy.deepcopy(by_name(rendered["production"], "StatefulSet", "fraud-detector"))
    c = container(deployment)
    c["image"] = "registry.example.com/mlops/fraud_detector:latest"
    c["securityContext"]["privileged"] = True
    del c["livenessProbe"], c["resources"]["limits"]
    problems = " | ".join(manifests.check_invariants([deployment]))
    for expected in ("not pinned", "privileged", "liveness probes", "no cpu/memory limits"):
        assert expected in problems, problems
    assert manifests.image_pinned("repo/app@sha256:" + "0" * 64)
    assert not manifests.image_pinned("repo/app") and not manifests.image_pinned("localhost:5000/app")


def test_serving_keeps_its_spool_on_a_claim_of_its_own_and_drains(rendered):
    """A StatefulSet: each pod's spool on the claim of its ordinal (kept when the pod goes, also on scale-in),
    so a pod deleted during a Kafka outage leaves its answered predictions to the pod that takes the ordinal
    next; preStop keeps serving while endpoints drop the pod, then waits for the spool to empty."""
    objects = rendered["production"]
    serving = by_name(objects, "StatefulSet", "fraud-detector")
    spec = serving["spec"]
    assert spec["persistentVolumeClaimRetentionPolicy"] == {"whenDeleted": "Retain", "whenScaled": "Retain"}
    claims = {t["metadata"]["name"]: t["spec"] for t in spec["volumeClaimTemplates"]}
    assert claims["spool"]["accessModes"] == ["ReadWriteOnce"]
    c = container(serving)
    spool_dir = PurePosixPath(by_name(objects, "ConfigMap", "mlops-config")["data"]["MLOPS_SPOOL_PATH"]).parent
    assert {"name": "spool", "mountPath": str(spool_dir)} in c["volumeMounts"]
    assert "spool" not in {v["name"] for v in spec["template"]["spec"].get("volumes", [])}  # not an emptyDir
    headless = by_name(objects, "Service", spec["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    # readiness through the standard gRPC health service, which follows /readyz (tests/test_grpc.py)
    assert c["readinessProbe"]["grpc"] == {"port": 3001, "service": "mlops.fraud.v1.FraudDetector"}
    assert c["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert c["startupProbe"]["httpGet"]["path"] == "/livez"
    pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[:3] == ["python", "-m", "service.drain"]
    waits = float(pre_stop[pre_stop.index("--settle") + 1]) + float(pre_stop[pre_stop.index("--timeout") + 1])
    assert waits + 15 <= spec["template"]["spec"]["terminationGracePeriodSeconds"]  # time left for the flush
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": 3000, "grpc": 3001}
    service = by_name(objects, "Service", "fraud-detector")
    assert {p["targetPort"] for p in service["spec"]["ports"]} == {"http", "grpc"}
    assert [p["appProtocol"] for p in service["spec"]["ports"] if p["name"] == "grpc"] == ["grpc"]
    hpa = by_name(objects, "HorizontalPodAutoscaler", "fraud-detector")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "fraud-detector"}
    assert hpa["spec"]["minReplicas"] >= 3 and spec["replicas"] >= 3  # a roll takes one pod out of three
    pdb = by_name(objects, "PodDisruptionBudget", "fraud-detector")
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]  # a drain can always evict one pod


def test_credentials_are_secret_files_and_production_secures_every_connection(rendered):
    for overlay, objects in rendered.items():
        for workload in (o for o in objects if manifests.pod_spec(o)):
            spec = manifests.pod_spec(workload)
            volumes = {v["name"]: v for v in spec.get("volumes", [])}
            assert volumes["secrets"]["secret"]["secretName"] == "mlops-secrets", manifests.name_of(workload)
            for _, c in manifests.containers(workload):
                assert {"name": "secrets", "mountPath": SECRETS_DIR, "readOnly": True} in c["volumeMounts"]
                assert not any("secretRef" in source for source in c["envFrom"])  # files, not variables
        config = by_name(objects, "ConfigMap", "mlops-config")["data"]
        assert config["MLOPS_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL" and config["MLOPS_REDIS_TLS"] == "true"
        files = {k: v for k, v in config.items() if k.endswith("_FILE")}
        assert {"MLOPS_KAFKA_SASL_PASSWORD_FILE", "MLOPS_REDIS_PASSWORD_FILE", "MLOPS_MLFLOW_PASSWORD_FILE",
                "MLOPS_API_TOKEN_FILE"} <= set(files), overlay
        assert all(v.startswith(SECRETS_DIR + "/") for v in files.values()), files
        assert not any(k in config for k in ("MLOPS_KAFKA_SASL_PASSWORD", "MLOPS_REDIS_PASSWORD", "MLOPS_API_TOKEN"))
        assert config["MLOPS_DRIFT_METRICS_HOST"] == "0.0.0.0"  # in a pod; loopback is the default elsewhere


def test_selectors_match_the_pods_they_mean(rendered):
    objects = rendered["production"]
    pods = {o["metadata"]["name"]: (manifests.pod_spec(o), o) for o in objects if manifests.pod_spec(o)}

    def template_labels(obj: dict[str, Any]) -> dict[str, str]:
        if obj["kind"] == "CronJob":
            return obj["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]
        return obj["spec"]["template"]["metadata"]["labels"]

    def selects(selector: dict[str, str]) -> list[str]:
        return [n for n, (_, o) in pods.items() if selector.items() <= template_labels(o).items()]

    for o in objects:
        if o["kind"] in ("PodDisruptionBudget", "Deployment", "StatefulSet"):
            assert selects(o["spec"]["selector"]["matchLabels"]) == [o["metadata"]["name"]]
        if o["kind"] == "Service":
            assert selects(o["spec"]["selector"]) == ["fraud-detector"]
        if o["kind"] == "NetworkPolicy" and o["spec"]["podSelector"]:
            assert selects(o["spec"]["podSelector"]["matchLabels"]) == [o["metadata"]["name"]]
    # Every port a pod listens on is open in its NetworkPolicy, and scrape annotations name a real port.
    for name, (spec, obj) in pods.items():
        listening = {p["containerPort"] for c in spec["containers"] for p in c.get("ports", [])}
        policy = by_name(objects, "NetworkPolicy", name)
        opened = {p["port"] for rule in policy["spec"].get("ingress", []) for p in rule["ports"]}
        assert listening == opened, (name, listening, opened)
        annotations = obj["spec"].get("template", {}).get("metadata", {}).get("annotations", {})
        if annotations.get("prometheus.io/scrape") == "true":
            assert int(annotations["prometheus.io/port"]) in listening


@pytest.mark.parametrize(("name", "command"), [("drift-consumer", "consume"), ("outcome-join", "join")])
def test_stream_consumers_never_outnumber_partitions(rendered, name, command):
    for overlay, objects in rendered.items():
        deployment = by_name(objects, "Deployment", name)
        spec = deployment["spec"]
        partitions = int(deployment["metadata"]["annotations"]["mlops/predictions-partitions"])
        assert partitions == TOPICS["predictions"] == TOPICS["prediction-outcomes"]
        assert spec["replicas"] + spec["strategy"]["rollingUpdate"].get("maxSurge", 0) <= partitions, overlay
        c = container(deployment)
        assert c["command"][:4] == ["python", "-m", "streaming", command]
        assert {"name": "BENTOML_HOME", "value": "/home/bentoml/bento"} in c["env"]


def test_feast_materialisation_cronjob(rendered):
    job = by_name(rendered["production"], "CronJob", "feast-materialize")
    assert job["spec"]["concurrencyPolicy"] == "Forbid"
    c = job["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert "python -m tools.feast_cli --repo feature_repo materialize-incremental" in " ".join(c["command"])
    assert c["workingDir"].endswith("/src")


def test_skew_check_reads_the_offline_data_and_checks_every_five_minutes(rendered):
    deployment = by_name(rendered["production"], "Deployment", "skew-check")
    assert deployment["spec"]["replicas"] == 1
    c = container(deployment)
    assert c["command"] == ["python", "-m", "streaming", "skew", "--every", "300"]
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["offline-data"]["persistentVolumeClaim"]["claimName"] == "feast-offline-data"
    assert any(m["name"] == "offline-data" and m["readOnly"] for m in c["volumeMounts"])


def test_the_rollout_controller_runs_the_controller_with_registry_and_kafka_access(rendered):
    deployment = by_name(rendered["production"], "Deployment", "rollout-controller")
    c = container(deployment)
    assert c["command"][:3] == ["python", "-m", "lifecycle.rollout.controller"] and "9111" in c["command"]
    policy = by_name(rendered["production"], "NetworkPolicy", "rollout-controller")
    ports = {p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"]}
    assert {9092, 5000} <= ports and 6379 not in ports  # Kafka and MLflow; no Redis


def test_config_map_holds_only_real_settings(rendered):
    for overlay, objects in rendered.items():
        config = by_name(objects, "ConfigMap", "mlops-config")["data"]
        unknown = [k for k in config if k.removeprefix("MLOPS_").lower() not in Settings.model_fields]
        assert not unknown, (overlay, unknown)
        Settings(**{k.removeprefix("MLOPS_").lower(): v for k, v in config.items()})  # the values parse too
        generated_name = by_name(objects, "ConfigMap", "mlops-config")["metadata"]["name"]
        for workload in (o for o in objects if manifests.pod_spec(o)):
            for _, c in manifests.containers(workload):
                assert {"configMapRef": {"name": generated_name}} in c["envFrom"], manifests.name_of(workload)


def test_images_are_the_project_version(rendered):
    version = tomllib.loads((manifests.ROOT / "pyproject.toml").read_text())["project"]["version"]
    for objects in rendered.values():
        for obj in objects:
            for _, c in manifests.containers(obj):
                assert c["image"].endswith(f":{version}"), c["image"]


def test_gpu_overlay_asks_for_a_gpu_and_the_cuda_provider(rendered):
    gpu, cpu = rendered["gpu"], rendered["production"]
    serving = container(by_name(gpu, "StatefulSet", "fraud-detector"))
    assert serving["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "fraud_detector_gpu" in serving["image"]
    assert by_name(gpu, "ConfigMap", "mlops-config")["data"]["MLOPS_ONNX_PROVIDER"] == "cuda"
    assert "fraud_detector_gpu" not in container(by_name(gpu, "Deployment", "drift-consumer"))["image"]
    assert "nvidia.com/gpu" not in container(by_name(cpu, "StatefulSet", "fraud-detector"))["resources"]["limits"]
    assert by_name(cpu, "ConfigMap", "mlops-config")["data"]["MLOPS_ONNX_PROVIDER"] == "cpu"


def test_install_script_builds_the_kustomize_version_the_renderer_uses():
    install = (manifests.ROOT / "scripts" / "install.sh").read_text()
    assert f"KUSTOMIZE_VERSION={manifests.KUSTOMIZE_VERSION}\n" in install


@pytest.mark.parametrize(("args", "message"), [
    (["--overlay", "staging"], "unknown overlay 'staging'"),
    (["--kube-version", "1.10.0"], "no bundled schemas for Kubernetes 1.10.0"),
])
def test_cli_bad_input_exits_2_with_one_line(capsys, args, message):
    assert manifests.main(args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_the_batch_rayjob_is_valid_and_runs_the_cli_with_arguments_it_accepts():
    """deploy/k8s/jobs: the RayJob's fields are KubeRay v1's, its pod templates valid Kubernetes held to the
    same invariants, its Ray the version we pin, and its entrypoint a command line mlops-score accepts."""
    import shlex

    import ray

    from lifecycle.batch.cli import parser

    objects = manifests.render(manifests.JOBS)
    assert manifests.validate_schema(objects) == []
    assert manifests.check_invariants(objects) == []
    job = by_name(objects, "RayJob", "batch-score")
    assert job["metadata"]["namespace"] == "mlops"
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == ray.__version__
    command = shlex.split(job["spec"]["entrypoint"])
    assert command[:3] == ["python", "-m", "lifecycle.batch.cli"]  # the image has the Bento's code, no scripts
    args = parser().parse_args(command[3:])
    assert (args.engine, args.address) == ("ray", "auto")
    _holds_the_bento_code_and_settings(objects, job)


def _holds_the_bento_code_and_settings(objects: list[dict], job: dict) -> None:
    """Every node of the job's cluster runs the stack's image with the Bento's code importable (the driver's
    `python -m` and the tasks' `lifecycle.*`) and the jobs' settings, all of them real settings."""
    config = by_name(objects, "ConfigMap", "mlops-batch-config")
    pods = manifests.pod_specs(job)
    assert len(pods) == 2
    for pod in pods:
        c = pod["containers"][0]
        assert c["envFrom"] == [{"configMapRef": {"name": config["metadata"]["name"]}}]
        assert {"name": "PYTHONPATH", "value": BENTO_SRC} in c["env"]
        assert c["image"].startswith("registry.example.com/mlops/fraud-detector:")
    assert set(config["data"]) <= set(f"MLOPS_{name.upper()}" for name in Settings.model_fields)


def test_the_retraining_rayjob_runs_the_shipped_pipeline_on_its_cluster():
    """deploy/k8s/jobs/retrain.yaml: valid, its entrypoint a command line `pipeline run` accepts, on Ray at the
    job's own cluster, with the pipeline file the Bento ships."""
    import shlex

    from lifecycle.pipeline.cli import parser

    objects = manifests.render(manifests.JOBS)
    assert manifests.validate_schema(objects) == []
    assert manifests.check_invariants(objects) == []
    job = by_name(objects, "RayJob", "retrain")
    command = shlex.split(job["spec"]["entrypoint"])
    assert command[:3] == ["python", "-m", "lifecycle.pipeline"]
    args = parser().parse_args(command[3:])
    assert (args.command, args.engine, args.address) == ("run", "ray", "auto")
    assert args.pipeline == Path(BENTO_SRC) / "pipeline.yaml"
    assert "pipeline.yaml" in yaml.safe_load((ROOT / "bentofile.yaml").read_text())["include"]
    _holds_the_bento_code_and_settings(objects, job)


def test_the_rayjob_checks_bite():
    objects = manifests.render(manifests.JOBS)
    job = by_name(objects, "RayJob", "batch-score")
    unknown = copy.deepcopy(job)
    unknown["spec"]["entryPoint"] = unknown["spec"].pop("entrypoint")
    assert any("unknown field 'entryPoint'" in p for p in manifests.validate_schema([unknown], ("1.29.0",)))
    assert any("no spec.entrypoint" in p for p in manifests.validate_schema([unknown], ("1.29.0",)))
    bad_pod = copy.deepcopy(job)
    bad_pod["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["cpus"] = 2
    assert any("worker group scorers" in p for p in manifests.validate_schema([bad_pod], ("1.29.0",)))
    unbounded = copy.deepcopy(job)
    del unbounded["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]
    assert any("ray-head: no cpu/memory limits" in p for p in manifests.check_invariants([unbounded]))


def test_the_retrain_controller_is_single_active_with_registry_kafka_and_offline_data(rendered):
    deployment = by_name(rendered["production"], "Deployment", "retrain-controller")
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    c = container(deployment)
    assert c["command"][:5] == ["python", "-m", "lifecycle.retrain", "--pipeline", "pipeline.yaml"]
    from lifecycle.retrain.controller import load

    load(manifests.ROOT / c["command"][4])  # the file it names parses, guard rails included
    mounted = {m["mountPath"].rsplit("/", 1)[-1] for m in c["volumeMounts"] if m["name"] == "offline-data"}
    assert mounted == {"customer_stats.parquet", "transactions.parquet"}
    assert all(m["readOnly"] for m in c["volumeMounts"] if m["name"] == "offline-data")
    policy = by_name(rendered["production"], "NetworkPolicy", "retrain-controller")
    ports = {p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"]}
    assert {9092, 5000} <= ports and 6379 not in ports  # Kafka and MLflow; no Redis
