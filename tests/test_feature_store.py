"""The Feast repo on the real Redis (`feast apply` + `materialize`, run by the fixture), and the service's
own online-store reader, which must see exactly what Feast's SDK sees."""

from __future__ import annotations

import asyncio

import pandas as pd
import pytest

from mlops.schema import STORE_FEATURES
from service.online_store import OnlineStore
from tests.support import feast_features
from tools.feast_cli import feast as feast_cli

pytestmark = pytest.mark.integration


class Reader:
    """The service's OnlineStore, driven synchronously from a test."""

    def __init__(self, settings) -> None:
        self.loop = asyncio.new_event_loop()
        self.store = OnlineStore(settings)
        self.loop.run_until_complete(self.store.check())

    def fetch(self, ids: list[str]) -> list[dict | None]:
        rows = self.loop.run_until_complete(self.store.fetch(ids))
        return [None if row is None else row.features for row in rows]

    def close(self) -> None:
        self.loop.run_until_complete(self.store.close())
        self.loop.close()


@pytest.fixture(scope="module")
def lookup(workspace):
    reader = Reader(workspace.settings)
    yield reader
    reader.close()


def test_online_values_equal_the_latest_snapshot_and_the_feast_sdk(workspace, lookup):
    """customer_stats holds several snapshots per customer; materialization serves the newest."""
    from lifecycle import data as datamod

    source = datamod.read(workspace.feature_repo / "data").latest_customers().set_index("customer_id")
    ids = list(source.index[:50])
    rows = lookup.fetch(ids)
    assert rows == feast_features(workspace, ids)
    for entity, row in zip(ids, rows, strict=True):
        assert row is not None
        for name in STORE_FEATURES:
            assert row[name] == pytest.approx(source.loc[entity, name])


def test_unknown_entity_is_none_not_zeros(lookup):
    rows = lookup.fetch(["C000000", "no-such-customer", "C000001"])
    assert rows[0] is not None and rows[2] is not None
    assert rows[1] is None


def test_one_round_trip_per_batch(lookup, monkeypatch):
    """All rows of a batch in one pipelined exchange (one write, replies read until all arrived); duplicates
    asked once. Redis' own statistics count the HMGETs."""
    import redis

    sent = []
    fetch = lookup.store._hmget.fetch

    async def counted(keys):
        sent.append(len(keys))
        return await fetch(keys)

    monkeypatch.setattr(lookup.store._hmget, "fetch", counted)
    client = redis.Redis(host=lookup.store._hmget.host, port=lookup.store._hmget.port)
    before = client.info("commandstats").get("cmdstat_hmget", {}).get("calls", 0)
    rows = lookup.fetch([f"C{i:06d}" for i in range(40)] + ["C000003"])
    assert sent == [40]
    assert client.info("commandstats")["cmdstat_hmget"]["calls"] - before == 40
    assert rows[3] == rows[-1]


def test_connections_redis_closed_while_idle_are_replaced_not_failed(lookup):
    """Redis closing the idle lookup connections (a restart, its ``timeout``, CLIENT KILL) costs the next
    request nothing: the dead connection is replaced, the lookup answers, the store stays up."""
    import redis

    assert lookup.fetch(["C000001"])[0] is not None
    client = redis.Redis(host=lookup.store._hmget.host, port=lookup.store._hmget.port)
    for _ in range(3):
        client.client_kill_filter(_type="normal", skipme=True)  # every connection but this one: the reader's too
        assert lookup.fetch(["C000001", "C000002"])[0] is not None
        assert lookup.store.up


def test_a_dead_connection_found_on_use_is_retried_once_on_a_fresh_one(lookup):
    """The close not yet seen when the connection is taken (no loop turn in between): the exchange fails on
    the reused connection and is asked again on a new one."""
    import redis

    hmget = lookup.store._hmget
    assert lookup.fetch(["C000001"])[0] is not None
    reader, _ = hmget._idle[-1]
    client = redis.Redis(host=hmget.host, port=hmget.port)
    client.client_kill_filter(_type="normal", skipme=True)
    reader.at_eof = lambda: False  # as if the FIN had not been read yet
    assert lookup.fetch(["C000003"])[0] is not None


def test_lookups_fail_fast_when_redis_is_down(workspace, tmp_path):
    """Nothing listening: the lookup fails at the connect, well within its timeout, as a LookupFailed."""
    import time

    from service.hmget import LookupFailed, PipelinedHmget
    from tools.services import free_port

    hmget = PipelinedHmget("127.0.0.1", free_port(), [b"f"], timeout_s=5.0)
    loop = asyncio.new_event_loop()
    try:
        started = time.monotonic()
        with pytest.raises(LookupFailed, match="cannot connect"):
            loop.run_until_complete(hmget.fetch([b"k"]))
        assert time.monotonic() - started < 1.0
    finally:
        loop.run_until_complete(hmget.close())
        loop.close()


def test_reachability_and_emptiness_checks(workspace, lookup):
    assert lookup.store.up and not lookup.store.empty
    assert lookup.store.ttl_s == 86400


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


def test_rows_lost_since_the_last_check_mean_an_empty_store_not_unknown_customers(workspace, tmp_path):
    """FLUSHALL between two background checks: the very next lookup must say "empty" (a retryable 503), not
    "unknown customer" (a 404) — even right after another lookup, and even when other keys (a drift
    consumer's checkpoints) share the Redis. A Redis of its own, holding a copy of some rows, so flushing it
    disturbs no other test."""
    import redis

    from tools import services as svc

    run_dir = tmp_path / "run"
    port = svc.up(run_dir, only="redis")["redis"]["port"]
    try:
        source = redis.Redis(host=workspace.settings.redis_host, port=workspace.settings.redis_port)
        target = redis.Redis(host="127.0.0.1", port=port)
        reader = Reader(workspace.settings.model_copy(update={"redis_address": f"127.0.0.1:{port}"}))
        ids = ["C000001", "C000002", "C000003"]
        for key in (reader.store.key(i) for i in ids):
            target.restore(key, 0, source.dump(key))
        reader.loop.run_until_complete(reader.store.check())
        assert not reader.store.empty and all(reader.fetch(ids))
        assert reader.fetch(["nobody"]) == [None] and not reader.store.empty  # unknown: the store still has rows
        target.flushall()
        target.set("drift:checkpoint", b"x")  # another tenant of the same Redis
        reader.store._seen_in_pass = True  # a background SCAN pass saw rows before the flush, and goes on
        reader.store._scan_cursor = 7
        assert reader.fetch(ids) == [None, None, None]
        assert reader.store.empty, "rows lost since the last check were taken for unknown customers"
        reader.loop.run_until_complete(reader.store.check())  # that pass ends, having seen rows only before
        assert reader.store.empty, "a SCAN pass begun before the loss vouched for rows that are gone"
        assert reader.fetch(["nobody"]) == [None] and reader.store.empty
        reader.close()
    finally:
        svc.down(run_dir, purge=True)
