"""Writing model versions: a new, immutable version logged in its training run and registered in MLflow's
Model Registry, then cached locally. The read side (load, find, the local cache) is :mod:`mlops.models`, which
every process shares; its names are imported here so training code has one module to call.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mlops.models import (
    METADATA_FILE,
    MODEL_ARTIFACT,
    MODEL_URI_RE,
    NAME_RE,
    ONNX_FILE,
    VERSION_RE,
    VERSION_TAG,
    ModelStoreError,
    StoredModel,
    _cache_metadata,
    _cache_put,
    all_versions,
    cached,
    check_name,
    check_version,
    default_backend,
    exists,
    find,
    load,
    load_uri,
    versions,
)

if TYPE_CHECKING:
    from lifecycle.tracking import Backend, TrainingRun

__all__ = ["METADATA_FILE", "MODEL_ARTIFACT", "MODEL_URI_RE", "NAME_RE", "ONNX_FILE", "VERSION_RE", "VERSION_TAG",
           "ModelStoreError", "StoredModel", "all_versions", "cached", "check_name", "check_version",
           "default_backend", "ensure_registered_model", "exists", "find", "load", "load_uri", "next_version",
           "save", "versions"]


def next_version(name: str, backend: Backend | None = None) -> str:
    numbers = [int(v[1:]) for v in versions(name, backend) if re.fullmatch(r"v\d+", v)]
    return f"v{max(numbers, default=0) + 1}"


def ensure_registered_model(backend: Backend, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        backend.client.create_registered_model(name, description="Fraud detection model (ONNX), see mlops-stack")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def _signature(onnx_bytes: bytes):
    """The MLflow signature read from the ONNX graph itself: what the served model really takes and returns."""
    import onnx
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    graph = onnx.load_from_string(onnx_bytes).graph

    def specs(values) -> Schema:
        out = []
        for value in values:
            tensor = value.type.tensor_type
            if not tensor.elem_type:
                continue  # non-tensor outputs (e.g. a ZipMap sequence) have no tensor spec
            dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim)
            out.append(TensorSpec(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type), dims, value.name))
        return Schema(out)

    return ModelSignature(inputs=specs(graph.input), outputs=specs(graph.output))


def _write_model_dir(path: Path, onnx_bytes: bytes, metadata: dict[str, Any], extra_files: dict[str, bytes],
                     input_example: np.ndarray | None) -> None:
    import mlflow.onnx
    import onnx
    import onnxruntime

    from mlops.onnx_contract import INPUT_NAME

    n_features = len(metadata.get("features") or []) or 5
    example = input_example if input_example is not None else np.zeros((1, n_features))
    mlflow.onnx.save_model(onnx.load_from_string(onnx_bytes), str(path), signature=_signature(onnx_bytes),
                           input_example={INPUT_NAME: np.asarray(example[:5], dtype=np.float32)},
                           save_as_external_data=False,
                           # named, not inferred: inference imports the model in a subprocess (1.5 s a version)
                           pip_requirements=[f"onnx=={onnx.__version__}", f"onnxruntime=={onnxruntime.__version__}"])
    (path / ONNX_FILE).write_bytes(onnx_bytes)  # byte-identical to what was evaluated
    for filename, content in extra_files.items():
        (path / filename).write_bytes(content)
    (path / METADATA_FILE).write_text(json.dumps(metadata, indent=2, default=str))


def _version_tags(version: str, metadata: dict[str, Any]) -> dict[str, str]:
    tags = {VERSION_TAG: version}
    for key in ("training_data_hash", "git_commit", "created_at"):
        if metadata.get(key):
            tags[key] = str(metadata[key])
    for key in ("metrics", "params", "features"):
        if metadata.get(key) is not None:
            tags[key] = json.dumps(metadata[key], sort_keys=True)[:4900]
    return tags


def save(name: str, version: str, onnx_bytes: bytes, metadata: dict[str, Any],
         extra_files: dict[str, bytes] | None = None, *, run: TrainingRun | None = None,
         backend: Backend | None = None, input_example: np.ndarray | None = None) -> StoredModel:
    """Log a new, immutable version in ``run`` (a run of its own when None) and register it in MLflow."""
    from mlflow.exceptions import MlflowException

    from lifecycle.tracking import training_run

    backend = run.backend if run is not None else (backend or default_backend())
    check_name(name)
    check_version(version)
    try:
        if find(backend, name, version) is not None:
            raise ModelStoreError(f"model {name}:{version} already exists; versions are immutable")
        metadata = {**metadata, "name": name, "version": version}
        with tempfile.TemporaryDirectory(prefix="mlops-model-") as tmp:
            local = Path(tmp) / MODEL_ARTIFACT
            _write_model_dir(local, onnx_bytes, metadata, extra_files or {}, input_example)
            if run is None:
                with training_run(backend, f"store {name}:{version}", {"model_name": name, "version": version}) as own:
                    mv = _log_and_register(own, name, version, local, metadata)
            else:
                mv = _log_and_register(run, name, version, local, metadata)
            return _cache_put(name, version, local, _cache_metadata(metadata, mv, backend))
    except MlflowException as exc:
        raise ModelStoreError(f"MLflow refused to store {name}:{version}: {exc.message}") from None


def _log_and_register(run: TrainingRun, name: str, version: str, local: Path, metadata: dict[str, Any]):
    run.log_artifacts(local, MODEL_ARTIFACT)
    run.set_tags({"model_name": name, "version": version})
    client = run.backend.client
    ensure_registered_model(run.backend, name)
    mv = client.create_model_version(name, f"{run.artifact_uri}/{MODEL_ARTIFACT}", run_id=run.run_id,
                                     tags=_version_tags(version, metadata))
    first = find(run.backend, name, version)
    if first is not None and first.version != mv.version:  # another writer took the label first
        client.delete_model_version(name, mv.version)
        raise ModelStoreError(f"model {name}:{version} already exists; versions are immutable")
    run.set_tags({"registered_model_version": mv.version})
    return mv
