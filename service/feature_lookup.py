"""Online feature lookup through the Feast SDK: one Redis round trip per batch of rows."""

from __future__ import annotations

import string
from typing import Any

import yaml
from feast import FeatureStore, RepoConfig

from mlops.schema import ENTITY, FEATURE_VIEW, STORE_FEATURES
from mlops.settings import Settings


def open_store(settings: Settings) -> FeatureStore:
    """The repo's ``feature_store.yaml`` with the Redis address taken from settings, not the process env."""
    repo = settings.feature_repo.resolve()
    text = (repo / "feature_store.yaml").read_text()
    raw = yaml.safe_load(string.Template(text).safe_substitute(MLOPS_REDIS_ADDRESS=settings.redis_address))
    config = RepoConfig(**raw)
    config.repo_path = repo
    return FeatureStore(repo_path=str(repo), config=config)


class FeatureLookup:
    def __init__(self, store: FeatureStore) -> None:
        self.store = store
        self.refs = [f"{FEATURE_VIEW}:{name}" for name in STORE_FEATURES]

    def fetch(self, entity_ids: list[str]) -> list[dict[str, Any] | None]:
        """Store features per entity id, in order; None where the online store has no complete row."""
        if not entity_ids:
            return []
        unique = list(dict.fromkeys(entity_ids))
        table = self.store.get_online_features(
            features=self.refs, entity_rows=[{ENTITY: e} for e in unique]
        ).to_dict()
        by_id: dict[str, dict[str, Any] | None] = {}
        for i, entity in enumerate(unique):
            row = {name: table[name][i] for name in STORE_FEATURES}
            by_id[entity] = None if any(v is None for v in row.values()) else row
        return [by_id[e] for e in entity_ids]

    def ping(self) -> bool:
        """True when the online store answers (an unknown id still needs Redis to say so)."""
        self.fetch(["__readiness_probe__"])
        return True
