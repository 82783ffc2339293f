"""A bounded append-only JSONL file that keeps prediction events Kafka could not take.

Events land here while the broker is unreachable and are replayed, oldest first, once it is back.
Replay takes the whole file at once (renamed aside), so events spilled during a replay are never
lost or sent twice by the same replay.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any


class Spool:
    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)

    @property
    def replay_path(self) -> Path:
        return self.path.with_name(self.path.name + ".replaying")

    def size(self) -> int:
        with self._lock:
            return self._used()

    def _used(self) -> int:
        """Bytes on disk, the pending spool and an unfinished replay together (caller holds the lock)."""
        return sum(p.stat().st_size for p in (self.path, self.replay_path) if p.exists())

    def append(self, events: list[dict[str, Any]]) -> int:
        """Append events; returns how many did not fit under ``max_bytes`` (and were dropped)."""
        lines = [json.dumps(e, separators=(",", ":")) + "\n" for e in events]
        with self._lock:
            used = self._used()
            kept = []
            for line in lines:
                if used + len(line) > self.max_bytes:
                    break
                kept.append(line)
                used += len(line)
            if kept:
                with self.path.open("a", encoding="utf-8") as f:
                    f.writelines(kept)
        return len(lines) - len(kept)

    def take(self) -> list[dict[str, Any]]:
        """Everything spooled so far (including a replay that was interrupted), moved aside for replay."""
        with self._lock:
            if self.path.exists():
                with self.path.open("rb") as src, self.replay_path.open("ab") as dst:
                    dst.write(src.read())
                self.path.unlink()
            if not self.replay_path.exists():
                return []
            text = self.replay_path.read_text(encoding="utf-8")
        events = []
        for line in text.splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line torn by a crash mid-write; the rest is intact
        return events

    def finish_replay(self, failed: list[dict[str, Any]]) -> None:
        """Drop the replayed batch, putting back the events that failed again."""
        with self._lock:
            self.replay_path.unlink(missing_ok=True)
        if failed:
            self.append(failed)
