"""The registry's fenced promotion lock, on the embedded SQLite store and on the MLflow server (PostgreSQL):
concurrent promoters (threads and processes) serialize, a holder paused past its lease is refused its next
write, only the holder releases or renews, and of two waiters breaking the same expired lease one wins."""

from __future__ import annotations

import itertools
import multiprocessing
import threading
import time
import uuid
from typing import Any

import pytest

from lifecycle import data as datamod
from lifecycle import model_store
from lifecycle.registry import Lease, Registry, RegistryError, lock_name
from lifecycle.tracking import Backend
from lifecycle.train import train


@pytest.fixture(scope="module")
def onnx_bytes() -> bytes:
    return train(datamod.generate(150, 2_000, seed=9), params={"n_estimators": 10}).onnx_bytes


@pytest.fixture
def reg(mlflow_backend) -> Registry:
    return Registry(mlflow_backend, lock_timeout_s=120.0, lock_lease_s=120.0)


def registered(reg: Registry, onnx: bytes, n: int) -> tuple[str, list[str]]:
    name = f"lock_{uuid.uuid4().hex[:8]}"
    versions = [f"v{i}" for i in range(n)]
    for v in versions:
        model_store.save(name, v, onnx, {"metrics": {"auc": 0.9}, "params": {}, "features": ["a"] * 5},
                         backend=reg.backend)
        reg.register(name, v)
    return name, versions


def assert_serial(reg: Registry, name: str, promotions: int) -> None:
    """Exactly one Production version, and a history in which every promotion is one block of one fence
    generation (no interleaving) that archives exactly the version that was Production before it."""
    stages = [v.stage for v in reg.list(name)]
    assert stages.count("Production") == 1, stages
    changes = [h for h in reg.history(name) if h["reason"] != "registered"]
    fences = [h["fence"] for h in changes]
    assert fences == sorted(fences), fences  # one generation's writes are never interleaved with another's
    current = None
    blocks = 0
    for _, rows in itertools.groupby(changes, key=lambda h: h["fence"]):
        rows = list(rows)
        assert [r["to_stage"] for r in rows if r["to_stage"] == "Production"] == ["Production"], rows
        assert [r["version"] for r in rows if r["to_stage"] == "Archived"] == ([current] if current else []), rows
        current = next(r["version"] for r in rows if r["to_stage"] == "Production")
        blocks += 1
    assert blocks == promotions
    assert reg.production(name).version == current
    # Every stage tag written names the generation that wrote it.
    fence_of = {(h["version"], h["to_stage"]): h["fence"] for h in changes}
    for v in reg.list(name):
        if v.stage != "None":
            mv = reg.client.get_model_version(name, v.mlflow_version)
            assert int(mv.tags["stage_fence"]) == fence_of[(v.version, v.stage)]


def test_concurrent_promoters_in_threads_serialize(reg, onnx_bytes):
    name, versions = registered(reg, onnx_bytes, 8)
    errors: list[BaseException] = []

    def promoter(mine: list[str]) -> None:
        r = Registry(reg.backend, lock_timeout_s=120.0, lock_lease_s=120.0)
        try:
            for v in mine:
                r.promote(name, v, "production")
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=promoter, args=(versions[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not errors, errors
    assert_serial(reg, name, 8)


def _promote_all(uri: str, artifact_root: str | None, name: str, versions: list[str]) -> None:
    r = Registry(Backend(uri, artifact_root), lock_timeout_s=120.0, lock_lease_s=120.0)
    for v in versions:
        r.promote(name, v, "production")


def test_concurrent_promoters_in_processes_serialize(reg, onnx_bytes):
    name, versions = registered(reg, onnx_bytes, 8)
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_promote_all, args=(reg.backend.uri, reg.backend.artifact_root, name, versions[i::4]))
             for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
    assert [p.exitcode for p in procs] == [0] * 4
    assert_serial(reg, name, 8)
    # What the lock leaves is its newest generation (the counter), released; older ones were cleared away.
    locks = reg._lock_models(name)
    assert len(locks) == 1 and "released" in next(iter(locks.values())).tags, locks


def test_a_holder_paused_past_its_lease_is_refused_its_next_write(reg, onnx_bytes):
    name, _ = registered(reg, onnx_bytes, 2)
    paused = Registry(reg.backend, lock_timeout_s=30.0, lock_lease_s=1.0)
    other = Registry(reg.backend, lock_timeout_s=30.0, lock_lease_s=120.0)
    inside, taken_over = threading.Event(), threading.Event()
    seen: dict[str, Any] = {}
    real_alias_map = paused._alias_map

    def stall(model: str) -> dict[str, str]:
        # Inside the locked section, before the first write: stall until another promoter has taken over.
        seen["generation"] = max(paused._lock_models(name))
        inside.set()
        taken_over.wait(60)
        return real_alias_map(model)

    paused._alias_map = stall  # type: ignore[method-assign]

    def first() -> None:
        try:
            paused.promote(name, "v0", "production")
        except RegistryError as exc:
            seen["error"] = str(exc)

    t = threading.Thread(target=first)
    t.start()
    assert inside.wait(60)
    started = time.monotonic()
    assert other.promote(name, "v1", "production").stage == "Production"  # waits out the 1 s lease, takes over
    assert time.monotonic() - started >= 0.5
    taken_over.set()
    t.join(60)
    assert "lost the registry lock" in seen.get("error", ""), seen
    assert reg.production(name).version == "v1" and reg.get(name, "v0").stage == "None"
    history = reg.history(name)
    assert not [h for h in history if h["fence"] == seen["generation"]], history  # the paused holder wrote nothing
    assert [h["to_stage"] for h in history if h["reason"] != "registered"] == ["Production"]
    assert "released" in reg._lock_models(name)[max(reg._lock_models(name))].tags


def test_a_takeover_is_seen_by_the_fence_even_before_the_lease_ends(reg, onnx_bytes):
    """The clock is not the only guard: a newer generation (a waiter whose clock ran ahead) fences the holder."""
    name, _ = registered(reg, onnx_bytes, 1)
    holder = reg._acquire(name)
    thief = Registry(reg.backend, lock_lease_s=120.0)._claim(name, holder.generation)
    assert thief is not None and thief.generation == holder.generation + 1
    with pytest.raises(RegistryError, match=f"generation {thief.generation} took it over"):
        reg._alias(holder, "production", 1)
    assert reg.production(name) is None  # refused before the write
    with pytest.raises(RegistryError, match="took it over"):
        holder.release()
    # The stale holder's release touched nothing of the new holder's lock.
    assert "released" not in reg._lock_models(name)[thief.generation].tags
    thief.check()
    thief.release()


def test_only_the_holder_releases_or_renews(reg, onnx_bytes):
    name, _ = registered(reg, onnx_bytes, 1)
    holder = reg._acquire(name)
    impostor = Lease(reg, name, holder.generation, uuid.uuid4().hex, holder.expires, holder.lease_s)
    with pytest.raises(RegistryError, match="not the holder"):
        impostor.release()
    with pytest.raises(RegistryError, match="not the holder"):
        impostor.renew()
    lock = reg._lock_models(name)[holder.generation]
    assert "released" not in lock.tags and float(lock.tags["expires"]) == holder.expires
    holder.check()  # still held
    assert reg._try_acquire(name) is None  # and others still wait
    holder.release()
    with pytest.raises(RegistryError, match="was released"):
        holder.check()
    assert reg._try_acquire(name) is not None


def test_the_holder_renews_its_lease_as_it_writes(reg, onnx_bytes):
    name, _ = registered(reg, onnx_bytes, 1)
    short = Registry(reg.backend, lock_lease_s=2.0)
    lease = short._acquire(name)
    first_expiry = lease.expires
    time.sleep(1.2)  # past half the lease
    lease.check()
    assert lease.expires > first_expiry
    assert float(reg._lock_models(name)[lease.generation].tags["expires"]) == lease.expires
    time.sleep(max(0.0, first_expiry - time.time()) + 0.2)
    assert reg._try_acquire(name) is None  # the original expiry has passed; the renewed lease holds
    lease.release()


def _expired_lock(reg: Registry, name: str) -> int:
    generation = max(reg._lock_models(name)) + 1
    reg.client.create_registered_model(lock_name(name, generation),
                                       tags={"owner": "crashed", "expires": str(time.time() - 1)})
    return generation


def test_two_waiters_breaking_the_same_expired_lease_one_wins(reg, onnx_bytes):
    name, _ = registered(reg, onnx_bytes, 1)
    stale = _expired_lock(reg, name)
    # Both read the same state (the newest generation, expired), then both break it: one creation wins.
    a, b = Registry(reg.backend, lock_lease_s=120.0), Registry(reg.backend, lock_lease_s=120.0)
    assert max(a._lock_models(name)) == max(b._lock_models(name)) == stale
    won = [a._claim(name, stale), b._claim(name, stale)]
    assert won[0] is not None and won[1] is None
    won[0].check()
    won[0].release()

    # The same race with eight threads released at once by a barrier.
    stale = _expired_lock(reg, name)
    barrier = threading.Barrier(8)
    results: list[Lease | None] = []

    def waiter() -> None:
        r = Registry(reg.backend, lock_lease_s=120.0)
        barrier.wait(30)
        results.append(r._try_acquire(name))

    threads = [threading.Thread(target=waiter) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    winners = [lease for lease in results if lease is not None]
    assert len(results) == 8 and len(winners) == 1, results
    assert winners[0].generation == stale + 1
    winners[0].check()
    winners[0].release()


def test_the_lease_length_comes_from_the_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("MLOPS_REGISTRY_LOCK_LEASE_S", "7")
    r = Registry(Backend.for_uri(str(tmp_path / "mlflow.db")))  # as the CLIs build it: the timeout alone
    before = time.time()
    lease = r._acquire("leased")
    after = time.time()
    tags = r._lock_models("leased")[lease.generation].tags
    assert r.lock_lease_s == 7.0 and tags["lease_s"] == "7"
    # Stamped at acquisition: 7 s after a moment between the call and its return (a slow MLflow store under
    # load takes seconds before the tags are read back, so "now" is no reference).
    assert before + 7.0 - 0.01 <= float(tags["expires"]) <= after + 7.0 + 0.01
    lease.release()
