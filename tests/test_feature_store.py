"""The Feast repo on the real Redis: `feast apply` + `materialize-incremental` (run by the fixture)."""

from __future__ import annotations

import pandas as pd
import pytest

from mlops.schema import STORE_FEATURES
from service.feature_lookup import FeatureLookup, open_store
from tools.feast_cli import feast as feast_cli

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def lookup(workspace):
    return FeatureLookup(open_store(workspace.settings))


def test_online_values_equal_the_latest_snapshot(workspace, lookup):
    """customer_stats holds several snapshots per customer; materialization serves the newest."""
    from lifecycle import data as datamod

    source = datamod.read(workspace.feature_repo / "data").latest_customers().set_index("customer_id")
    ids = list(source.index[:50])
    rows = lookup.fetch(ids)
    for entity, row in zip(ids, rows, strict=True):
        assert row is not None
        for name in STORE_FEATURES:
            assert row[name] == pytest.approx(source.loc[entity, name])


def test_unknown_entity_is_none_not_zeros(lookup):
    rows = lookup.fetch(["C000000", "no-such-customer", "C000001"])
    assert rows[0] is not None and rows[2] is not None
    assert rows[1] is None


def test_one_store_call_per_batch(lookup, monkeypatch):
    calls = []
    real = lookup.store.get_online_features

    def spy(*args, **kwargs):
        calls.append(kwargs["entity_rows"])
        return real(*args, **kwargs)

    monkeypatch.setattr(lookup.store, "get_online_features", spy)
    rows = lookup.fetch([f"C{i:06d}" for i in range(40)] + ["C000003"])
    assert len(calls) == 1 and len(calls[0]) == 40  # duplicates asked once
    assert rows[3] == rows[-1]


def test_feast_cli_lists_the_feature_view(workspace):
    out = feast_cli(workspace.feature_repo, workspace.env, "feature-views", "list").stdout
    assert "customer_stats" in out


def test_materialize_incremental_from_the_cli_picks_up_new_rows(workspace, lookup):
    from datetime import UTC, datetime, timedelta

    from lifecycle import data as datamod

    path = workspace.feature_repo / "data" / datamod.CUSTOMERS_FILE
    original = pd.read_parquet(path)
    newcomer = original.iloc[[0]].assign(customer_id="C999999", total_purchases=77,
                                         # the CLI's end date has whole seconds: stay below it
                                         event_timestamp=datetime.now(UTC) - timedelta(seconds=2))
    try:
        pd.concat([original, newcomer]).to_parquet(path, index=False)
        assert lookup.fetch(["C999999"]) == [None]
        feast_cli(workspace.feature_repo, workspace.env, "materialize-incremental",
                  datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S"))
        row = lookup.fetch(["C999999"])[0]
        assert row is not None and row["total_purchases"] == 77
    finally:
        original.to_parquet(path, index=False)
