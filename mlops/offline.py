"""Point-in-time-correct training sets from Feast's offline store.

``get_historical_features`` joins each labelled transaction with the ``customer_stats`` snapshot that was the
newest at the transaction's ``event_timestamp`` (and within the feature view's ttl): a snapshot written after a
transaction never reaches that transaction's row. The same join as :func:`point_in_time`, done by the feature
store the service reads online, so training and serving share one definition of the features.

Batch scoring joins millions of rows a chunk at a time, and the training pipeline the whole history, here or
in parts by customer on Ray: Feast's file offline store re-reads and re-joins the source for every call, and
its Ray store is slower still. :class:`AsOfJoin` takes the feature view's definition from Feast's registry
(source file, timestamp field, ttl), loads the source once and joins with :func:`point_in_time`
(:func:`join_training_rows` for training rows); the tests hold it equal to ``get_historical_features``.
Feature views on other sources go through Feast.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mlops import feast_config
from mlops.schema import ENTITY, FEATURE_VIEW, LABEL, STORE_FEATURES, TIMESTAMP

ROW = "_row"
NS_UTC = "datetime64[ns, UTC]"  # merge_asof needs one time unit on both sides


def point_in_time(events: pd.DataFrame, history: pd.DataFrame, ttl: timedelta) -> pd.DataFrame:
    """For each event (``customer_id``, ``event_timestamp``), the store features of the newest snapshot taken
    at or before it and at most ``ttl`` older (NaN when none): Feast's point-in-time join, in pandas.

    Rows keep the events' order and index."""
    left = events[[ENTITY, TIMESTAMP]].assign(_row=np.arange(len(events))).sort_values(TIMESTAMP, kind="stable")
    right = history[[ENTITY, *STORE_FEATURES, TIMESTAMP]].sort_values(TIMESTAMP, kind="stable")
    joined = pd.merge_asof(left, right, on=TIMESTAMP, by=ENTITY, direction="backward", tolerance=pd.Timedelta(ttl),
                           allow_exact_matches=True)
    joined = joined.sort_values("_row")
    return joined[list(STORE_FEATURES)].set_index(events.index)


TRAINING_COLUMNS = [ENTITY, "transaction_amount", LABEL, TIMESTAMP, *STORE_FEATURES]


def join_training_rows(transactions: pd.DataFrame, history: pd.DataFrame, ttl: timedelta) -> pd.DataFrame:
    """:func:`training_frame`'s rows from a history already loaded: the transactions with the store features as
    of each one, in their order, those with no snapshot within the ttl dropped. Exact on any subset of
    customers with all of their history (the join never crosses customers): the unit of a join spread over
    workers by customer. The rows kept keep their position in ``transactions`` as their index."""
    events = transactions.reset_index(drop=True)  # (the rows kept are named by their position)
    events[TIMESTAMP] = pd.to_datetime(events[TIMESTAMP], utc=True).astype(NS_UTC)
    return _with_features(events, point_in_time(events, history, ttl))


def _with_features(events: pd.DataFrame, features: pd.DataFrame) -> pd.DataFrame:
    """Training rows: each event's columns beside its store features (same positions), those without dropped."""
    frame = pd.concat([events[[ENTITY, "transaction_amount", LABEL, TIMESTAMP]], features], axis=1)
    return frame[TRAINING_COLUMNS].dropna(subset=list(STORE_FEATURES))


class OfflineStoreError(RuntimeError):
    """The Feast repo cannot serve historical features (not applied, no data)."""


def open_store(repo: Path, redis_address: str, offline_store: dict[str, Any] | None = None):
    """The repo's store; the online address is filled in but never contacted by offline reads.
    ``offline_store``: the offline store to read through instead of the repo's (``{"type": "ray", ...}``)."""
    from feast import FeatureStore

    repo = Path(repo).resolve()
    try:
        config = feast_config.repo_config(repo, redis_address, offline_store)
    except OSError as exc:
        raise OfflineStoreError(f"no Feast repo at {repo}: {exc.strerror}") from None
    registry = getattr(config.registry, "path", config.registry)
    if isinstance(registry, str) and not (repo / registry).exists():
        raise OfflineStoreError(f"the Feast repo {repo} has no registry ({registry}): run `feast apply` there first")
    return FeatureStore(repo_path=str(repo), config=config)


def training_frame(repo: Path, transactions: pd.DataFrame, redis_address: str = "127.0.0.1:6379",
                   offline_store: dict[str, Any] | None = None) -> pd.DataFrame:
    """Transactions (``customer_id``, ``event_timestamp``, ``transaction_amount``, ``is_fraud``) with the store
    features as of each one, in the transactions' order; rows with no snapshot within the ttl are dropped.
    ``offline_store``: as :func:`open_store` (Feast's Ray store joins on Ray, the same definitions). Two
    transactions of a customer at the same time are two rows (Feast answers the pair once: asked once, given to
    both)."""
    missing = [c for c in (ENTITY, TIMESTAMP, "transaction_amount", LABEL) if c not in transactions.columns]
    if missing:
        raise OfflineStoreError(f"transactions lack columns {missing}")
    events = transactions.reset_index(drop=True)
    features = features_as_of(repo, events, redis_address, store=open_store(repo, redis_address, offline_store))
    return _with_features(events, features).reset_index(drop=True)


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


class AsOfJoin:
    """The feature view's point-in-time join over its file source, loaded once (see the module's docstring)."""

    def __init__(self, history: pd.DataFrame, ttl: timedelta) -> None:
        self.history, self.ttl = history, ttl

    @classmethod
    def from_store(cls, store) -> AsOfJoin | None:
        """None when the feature view's source is not a file (Feast then joins) or has its own timestamp names."""
        from feast import FileSource

        view = store.get_feature_view(FEATURE_VIEW)
        source = view.batch_source
        if not isinstance(source, FileSource) or source.created_timestamp_column or \
                source.timestamp_field != TIMESTAMP or source.field_mapping or not view.ttl:
            return None
        path = Path(source.path)
        if not path.is_absolute():
            path = Path(store.repo_path) / path
        history = pd.read_parquet(path, columns=[ENTITY, TIMESTAMP, *STORE_FEATURES])
        history[TIMESTAMP] = pd.to_datetime(history[TIMESTAMP], utc=True).astype(NS_UTC)
        return cls(history.sort_values(TIMESTAMP, kind="stable").reset_index(drop=True), view.ttl)

    def training_rows(self, transactions: pd.DataFrame) -> pd.DataFrame:
        """As :func:`training_frame`, on the definition loaded here: the rows it keeps, in their order."""
        return join_training_rows(transactions, self.history, self.ttl)

    def features(self, entities: pd.DataFrame) -> pd.DataFrame:
        """As :func:`features_as_of`: the store features of each row as of its time, NaN where none."""
        keys = entities[[ENTITY, TIMESTAMP]].assign(**{TIMESTAMP: pd.to_datetime(entities[TIMESTAMP], utc=True)
                                                       .astype(NS_UTC)})
        return point_in_time(keys, self.history, self.ttl).astype(float).reset_index(drop=True)
