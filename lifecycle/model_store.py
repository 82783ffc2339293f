"""ONNX models and their metadata in BentoML's model store (``$BENTOML_HOME/models``).

Each version is one store entry holding ``model.onnx`` plus metadata (metrics, params, data hash,
feature list), so ``bentoml build`` ships exactly what was evaluated.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bentoml
from bentoml.exceptions import NotFound

ONNX_FILE = "model.onnx"
VERSION_RE = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,62}[a-z0-9])?$")


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


def _stored(model: bentoml.Model) -> StoredModel:
    return StoredModel(
        name=model.tag.name, version=str(model.tag.version), path=Path(model.path), metadata=dict(model.info.metadata)
    )


def save(name: str, version: str, onnx_bytes: bytes, metadata: dict[str, Any],
         extra_files: dict[str, bytes] | None = None) -> StoredModel:
    """Store a new, immutable version; ``extra_files`` (e.g. the drift reference profile) go beside it."""
    if not VERSION_RE.match(version):
        raise ModelStoreError(f"invalid version {version!r}: use lowercase letters, digits, '.', '_' or '-'")
    if exists(name, version):
        raise ModelStoreError(f"model {name}:{version} already exists; versions are immutable")
    with bentoml.models.create(f"{name}:{version}", metadata=metadata, labels={"framework": "onnx"}) as model:
        Path(model.path_of(ONNX_FILE)).write_bytes(onnx_bytes)
        for filename, content in (extra_files or {}).items():
            Path(model.path_of(filename)).write_bytes(content)
    return load(name, version)


def exists(name: str, version: str) -> bool:
    try:
        bentoml.models.get(f"{name}:{version}")
    except NotFound:
        return False
    return True


def load(name: str, version: str | None = None) -> StoredModel:
    """One version, or the newest one when ``version`` is None."""
    try:
        return _stored(bentoml.models.get(f"{name}:{version or 'latest'}"))
    except NotFound as exc:
        raise ModelStoreError(f"model {name}:{version or 'latest'} is not in the BentoML model store") from exc


def versions(name: str) -> list[StoredModel]:
    """All versions of ``name``, oldest first."""
    models = [m for m in bentoml.models.list() if m.tag.name == name]
    return [_stored(m) for m in sorted(models, key=lambda m: m.info.creation_time)]


def next_version(name: str) -> str:
    numbers = [int(v.version[1:]) for v in versions(name) if re.fullmatch(r"v\d+", v.version)]
    return f"v{max(numbers, default=0) + 1}"
