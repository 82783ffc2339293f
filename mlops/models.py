"""Reading model versions: ONNX models in MLflow, through a local cache in BentoML's model store.

MLflow is the system of record: a model version is an MLflow Model (``model.onnx`` with its signature and an
input example, the drift reference ``profile.json``, ``calibration.json`` and ``metadata.json`` beside it)
registered in MLflow's Model Registry under ``name``, carrying our version label (``v3``) as the tag
``version``. Versions are immutable. Writing them is training's job (:mod:`lifecycle.model_store`); this module
is the read side every process needs, in the shared core so the service and the stream consumers never import
the training side.

Readers (the service, the stream consumers, `bentoml build`) need local files, so :func:`load` copies a version
once into BentoML's model store as ``name:version`` and serves later calls from there. That keeps BentoML's
store meaningful: it is the cache the serving image is built from, and a Bento carries the version it was
built with, so a container with no MLflow in reach still serves it.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

import bentoml
from bentoml.exceptions import BentoMLException, NotFound

from mlops.settings import Settings

if TYPE_CHECKING:  # MLflow is imported when MLflow is talked to: a cached load (drift consumer) never pays for it
    from mlflow.entities.model_registry import ModelVersion as MlflowVersion

    from mlops.mlflow_backend import Backend

ONNX_FILE = "model.onnx"
METADATA_FILE = "metadata.json"
MODEL_ARTIFACT = "model"
VERSION_TAG = "version"
# Matched with fullmatch: `$` would also match before a final newline and let "v9\n" through.
VERSION_RE = re.compile(r"[a-z0-9]([a-z0-9._-]{0,62}[a-z0-9])?")
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
MODEL_URI_RE = re.compile(r"models:/(?P<name>[^/@\s]+)(?:@(?P<alias>[\w-]+)|/(?P<version>[^/\s]+))?")


class ModelStoreError(RuntimeError):
    """A model could not be saved or found."""


@dataclass(frozen=True)
class StoredModel:
    name: str
    version: str
    path: Path
    metadata: dict[str, Any]

    @property
    def onnx_path(self) -> Path:
        return self.path / ONNX_FILE

    @property
    def tag(self) -> str:
        return f"{self.name}:{self.version}"


def default_backend() -> Backend:
    from mlops.mlflow_backend import Backend

    return Backend.from_settings(Settings.load())


def check_name(name: str) -> None:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ModelStoreError(f"invalid model name {name!r}: use letters, digits, '.', '_' or '-'")


def check_version(version: str) -> None:
    if not isinstance(version, str) or not VERSION_RE.fullmatch(version):
        raise ModelStoreError(f"invalid version {version!r}: use lowercase letters, digits, '.', '_' or '-'")


# --- MLflow side ---------------------------------------------------------------------------------------


def find(backend: Backend, name: str, version: str) -> MlflowVersion | None:
    """The MLflow model version labelled ``version`` (the first one registered, should two race)."""
    check_name(name)
    check_version(version)
    found = backend.client.search_model_versions(f"name='{name}' and tags.{VERSION_TAG}='{version}'")
    return min(found, key=lambda v: int(v.version)) if found else None


def all_versions(backend: Backend, name: str) -> list[MlflowVersion]:
    """Every MLflow version of ``name`` that carries a label, oldest first."""
    check_name(name)
    out, token = [], None
    while True:
        page = backend.client.search_model_versions(f"name='{name}'", max_results=1000, page_token=token)
        out.extend(v for v in page if VERSION_TAG in v.tags)
        token = page.token
        if not token:
            break
    return sorted(out, key=lambda v: int(v.version))


def versions(name: str, backend: Backend | None = None) -> list[str]:
    """All version labels of ``name``, oldest first."""
    return [v.tags[VERSION_TAG] for v in all_versions(backend or default_backend(), name)]


def exists(name: str, version: str, backend: Backend | None = None) -> bool:
    return find(backend or default_backend(), name, version) is not None


# --- local cache (BentoML's model store) ---------------------------------------------------------------


def _cache_metadata(metadata: dict[str, Any], mv: MlflowVersion, backend: Backend) -> dict[str, Any]:
    """BentoML refuses None values in metadata (a missing git commit crashed training outside a checkout)."""
    meta = {k: v for k, v in metadata.items() if v is not None and v != ""}
    meta.update(mlflow_model_version=str(mv.version), mlflow_run_id=mv.run_id or "", mlflow_source=mv.source,
                mlflow_uri=backend.display_uri)
    return meta


def _still_valid(local: StoredModel, uri: str) -> bool:
    """A cached copy taken from this backend whose source still exists (a wiped embedded store invalidates it;
    a server's artifacts are trusted: versions are immutable)."""
    if local.metadata.get("mlflow_uri") != uri:
        return False
    source = urlparse(str(local.metadata.get("mlflow_source", "")))
    return source.scheme != "file" or Path(unquote(source.path)).exists()


def _stored(model: bentoml.Model) -> StoredModel:
    return StoredModel(name=model.tag.name, version=str(model.tag.version), path=Path(model.path),
                       metadata=dict(model.info.metadata))


def cached(name: str, version: str) -> StoredModel | None:
    try:
        return _stored(bentoml.models.get(f"{name}:{version}"))
    except NotFound:
        return None


def _cache_put(name: str, version: str, src: Path, metadata: dict[str, Any]) -> StoredModel:
    try:
        with bentoml.models.create(f"{name}:{version}", metadata=metadata,
                                   labels={"framework": "onnx", "source": "mlflow"}) as model:
            for item in src.iterdir():
                target = Path(model.path) / item.name
                if item.is_dir():
                    shutil.copytree(item, target, dirs_exist_ok=True)
                else:
                    shutil.copy2(item, target)
    except BentoMLException:
        found = cached(name, version)  # another process cached it at the same moment
        if found is None:
            raise
        return found
    found = cached(name, version)
    assert found is not None
    return found


def _fetch(backend: Backend, name: str, version: str, mv: MlflowVersion) -> StoredModel:
    import mlflow.artifacts

    uri = backend.client.get_model_version_download_uri(name, mv.version)
    with tempfile.TemporaryDirectory(prefix="mlops-fetch-") as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp, tracking_uri=backend.uri))
        if not (local / ONNX_FILE).exists():
            raise ModelStoreError(f"MLflow version {mv.version} of {name} ({uri}) holds no {ONNX_FILE}")
        metadata = json.loads((local / METADATA_FILE).read_text()) if (local / METADATA_FILE).exists() else {}
        meta = _cache_metadata({**metadata, "name": name, "version": version}, mv, backend)
        return _cache_put(name, version, local, meta)


def load(name: str, version: str | None = None, backend: Backend | None = None) -> StoredModel:
    """One version, or the newest one when ``version`` is None, as local files.

    A named version already cached from this backend is read locally, without asking MLflow (versions are
    immutable; a copy whose embedded store was wiped is fetched again). Otherwise MLflow is asked and the files
    are fetched once. With MLflow out of reach, or not knowing the model (a Bento shipped without its
    registry), the cached copy serves.
    """
    from mlflow.exceptions import MlflowException

    local = cached(name, version) if version else None
    uri = backend.display_uri if backend else Settings.load().tracking_uri.split("?", 1)[0]
    if local is not None and _still_valid(local, uri):
        return local
    backend = backend or default_backend()
    try:
        mv = find(backend, name, version) if version else _newest(backend, name)
    except MlflowException as exc:
        if local is not None:
            return local
        if version is None and (newest := _newest_cached(name)) is not None:
            return newest
        raise ModelStoreError(f"cannot reach MLflow at {backend.display_uri} for {name}: {exc.message}") from None
    if mv is None:
        fallback = local if version else _newest_cached(name)
        if fallback is not None:
            return fallback
        raise ModelStoreError(f"model {name}:{version or 'latest'} is not in the MLflow registry at "
                              f"{backend.display_uri}")
    version = mv.tags[VERSION_TAG]
    local = local or cached(name, version)
    if local is not None and local.metadata.get("mlflow_source") == mv.source:
        return local  # (taken from another URI of the same store)
    if local is not None:  # a cache entry from another registry (e.g. a wiped .run): replace it
        bentoml.models.delete(local.tag)
    return _fetch(backend, name, version, mv)


def load_uri(uri: str, backend: Backend | None = None) -> StoredModel:
    """``models:/name@alias`` (``models:/fraud_detector@production``), ``models:/name/<label>`` or ``models:/name``."""
    match = MODEL_URI_RE.fullmatch(uri)
    if not match:
        raise ModelStoreError(f"not a model URI: {uri!r} (expected models:/name@alias or models:/name/version)")
    from mlflow.exceptions import MlflowException

    backend = backend or default_backend()
    name, alias = match["name"], match["alias"]
    if alias:
        try:
            mv = backend.client.get_model_version_by_alias(name, alias)
        except MlflowException as exc:
            raise ModelStoreError(f"{uri}: {exc.message}") from None
        return load(name, mv.tags.get(VERSION_TAG), backend)
    return load(name, match["version"], backend)


def _newest(backend: Backend, name: str) -> MlflowVersion | None:
    found = all_versions(backend, name)
    return found[-1] if found else None


def _newest_cached(name: str) -> StoredModel | None:
    models = [m for m in bentoml.models.list() if m.tag.name == name]
    return _stored(max(models, key=lambda m: m.info.creation_time)) if models else None
