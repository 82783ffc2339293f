"""The Feast repo's configuration with the online store's connection filled in: one loader for serving (which
reads Redis) and for the offline training reads (which never contact it).

``feature_store.yaml`` names the connection ``${MLOPS_REDIS_ADDRESS}`` for the `feast` CLI; in process the
connection string comes from the settings instead (``mlops.connections.feast_connection_string``: address,
credentials, TLS), never from this process's environment.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import yaml


def repo_config(repo: Path, connection_string: str, offline_store: dict[str, Any] | None = None) -> Any:
    """``RepoConfig`` of the repo at ``repo`` (its ``repo_path`` set); raises OSError when there is none.
    ``offline_store``: another offline store for the same definitions and sources (Feast's Ray store for a
    pipeline on Ray), in place of the file's."""
    from feast import RepoConfig

    repo = Path(repo).resolve()
    text = (repo / "feature_store.yaml").read_text()
    raw = yaml.safe_load(string.Template(text).safe_substitute(MLOPS_REDIS_ADDRESS=connection_string))
    if isinstance(raw, dict) and isinstance(raw.get("online_store"), dict):
        raw["online_store"]["connection_string"] = connection_string
    if offline_store is not None and isinstance(raw, dict):
        raw["offline_store"] = offline_store
    config = RepoConfig(**raw)
    config.repo_path = repo
    return config
