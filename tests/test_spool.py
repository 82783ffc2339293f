"""The local spool that keeps prediction events while Kafka is unreachable."""

from __future__ import annotations

from service.spool import Spool


def test_append_take_and_finish(tmp_path):
    spool = Spool(tmp_path / "s.jsonl", max_bytes=10_000)
    assert spool.append([{"request_id": "a"}, {"request_id": "b"}]) == 0
    taken = spool.take()
    assert [e["request_id"] for e in taken] == ["a", "b"]
    spool.append([{"request_id": "c"}])  # spilled during the replay: kept apart from it
    spool.finish_replay(failed=[taken[1]])
    assert sorted(e["request_id"] for e in spool.take()) == ["b", "c"]


def test_bounded_size_counts_dropped(tmp_path):
    spool = Spool(tmp_path / "s.jsonl", max_bytes=100)
    dropped = spool.append([{"request_id": f"{i:04d}", "pad": "x" * 20} for i in range(10)])
    assert 0 < dropped < 10
    assert spool.size() <= 100


def test_torn_line_is_skipped_not_fatal(tmp_path):
    spool = Spool(tmp_path / "s.jsonl", max_bytes=10_000)
    spool.append([{"request_id": "a"}])
    with spool.path.open("a") as f:
        f.write('{"request_id": "tor')
    assert [e["request_id"] for e in spool.take()] == ["a"]


def test_interrupted_replay_is_resumed(tmp_path):
    spool = Spool(tmp_path / "s.jsonl", max_bytes=10_000)
    spool.append([{"request_id": "a"}])
    spool.take()  # process dies before finish_replay
    again = Spool(tmp_path / "s.jsonl", max_bytes=10_000)
    again.append([{"request_id": "b"}])
    assert sorted(e["request_id"] for e in again.take()) == ["a", "b"]
