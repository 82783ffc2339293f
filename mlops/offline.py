"""Point-in-time-correct training sets from Feast's offline store.

``get_historical_features`` joins each labelled transaction with the ``customer_stats`` snapshot that was the
newest at the transaction's ``event_timestamp`` (and within the feature view's ttl): a snapshot written after a
transaction never reaches that transaction's row. The same join as :func:`lifecycle.data.point_in_time`, done
by the feature store the service reads online, so training and serving share one definition of the features.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from mlops import feast_config
from mlops.schema import ENTITY, FEATURE_VIEW, LABEL, STORE_FEATURES, TIMESTAMP

ROW = "_row"


class OfflineStoreError(RuntimeError):
    """The Feast repo cannot serve historical features (not applied, no data)."""


def open_store(repo: Path, redis_address: str):
    """The repo's store; the online address is filled in but never contacted by offline reads."""
    from feast import FeatureStore

    repo = Path(repo).resolve()
    try:
        config = feast_config.repo_config(repo, redis_address)
    except OSError as exc:
        raise OfflineStoreError(f"no Feast repo at {repo}: {exc.strerror}") from None
    registry = getattr(config.registry, "path", config.registry)
    if isinstance(registry, str) and not (repo / registry).exists():
        raise OfflineStoreError(f"the Feast repo {repo} has no registry ({registry}): run `feast apply` there first")
    return FeatureStore(repo_path=str(repo), config=config)


def training_frame(repo: Path, transactions: pd.DataFrame, redis_address: str = "127.0.0.1:6379") -> pd.DataFrame:
    """Transactions (``customer_id``, ``event_timestamp``, ``transaction_amount``, ``is_fraud``) with the store
    features as of each one, in the transactions' order; rows with no snapshot within the ttl are dropped."""
    missing = [c for c in (ENTITY, TIMESTAMP, "transaction_amount", LABEL) if c not in transactions.columns]
    if missing:
        raise OfflineStoreError(f"transactions lack columns {missing}")
    store = open_store(repo, redis_address)
    entity_df = transactions[[ENTITY, TIMESTAMP, "transaction_amount", LABEL]]
    entity_df = entity_df.assign(**{ROW: np.arange(len(entity_df))})
    job = store.get_historical_features(entity_df=entity_df,
                                        features=[f"{FEATURE_VIEW}:{name}" for name in STORE_FEATURES])
    frame = job.to_df().sort_values(ROW).drop(columns=[ROW]).reset_index(drop=True)
    columns = [ENTITY, "transaction_amount", LABEL, TIMESTAMP, *STORE_FEATURES]
    return frame[columns].dropna(subset=list(STORE_FEATURES)).reset_index(drop=True)


def features_as_of(repo: Path, entities: pd.DataFrame, redis_address: str = "127.0.0.1:6379",
                   store=None) -> pd.DataFrame:
    """The store features of each (``customer_id``, ``event_timestamp``) row as the offline store has them at
    that time, in the rows' order; NaN where it has no snapshot within the ttl. What training would have seen
    for a served prediction: the reference of the row-level skew check, and batch scoring's features. ``store``:
    one already open (batch scoring asks once per chunk)."""
    store = store or open_store(repo, redis_address)
    keys = entities[[ENTITY, TIMESTAMP]].reset_index(drop=True)
    # Feast answers a repeated (customer, time) pair once (a batch's predictions share their time): ask for each
    # pair once and give every row its pair's answer.
    unique = keys.drop_duplicates().reset_index(drop=True)
    unique[ROW] = np.arange(len(unique))
    row_of = keys.merge(unique, on=[ENTITY, TIMESTAMP], how="left")[ROW].to_numpy()
    job = store.get_historical_features(entity_df=unique,
                                        features=[f"{FEATURE_VIEW}:{name}" for name in STORE_FEATURES])
    frame = job.to_df().set_index(ROW)[list(STORE_FEATURES)].astype(float)
    return frame.reindex(row_of).reset_index(drop=True)
