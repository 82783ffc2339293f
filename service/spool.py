"""A bounded on-disk queue for prediction events the broker could not take yet.

One append-only file of JSON lines per serving worker, plus a cursor file that says how far replay got.
Only the prediction log's background thread writes and replays it, so there is no locking between
writers; other threads only read the counters. Replay advances the cursor only past events the broker
acknowledged, so a restart resumes where the last one stopped. When everything is replayed the file is
truncated. A line torn by a crash mid-write (no trailing newline) is cut off when the spool is opened.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path


class Spool:
    def __init__(self, path: Path, max_bytes: int, fsync: bool = True) -> None:
        self.path = path
        self.cursor_path = path.with_name(path.name + ".cursor")
        self.max_bytes = max_bytes
        self.fsync = fsync
        self._lock = threading.Lock()  # guards the counters read by other threads
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "ab")  # noqa: SIM115 (kept open for the life of the spool)
        self._cut_torn_tail()
        self._cursor = self._read_cursor()
        self._bytes = self._file.tell() - self._cursor
        self._events = self._count_lines(self._cursor)

    # -- what other threads may read -------------------------------------------------------------

    @property
    def pending_bytes(self) -> int:
        """Bytes of events waiting for replay."""
        with self._lock:
            return self._bytes

    @property
    def pending_events(self) -> int:
        with self._lock:
            return self._events

    def room(self) -> int:
        with self._lock:
            return self.max_bytes - self._bytes

    # -- the owner thread --------------------------------------------------------------------------

    def append(self, events: list[bytes]) -> int:
        """Append whole events (no newlines inside); returns how many fitted under ``max_bytes``."""
        lines = []
        size = 0
        room = self.room()
        for event in events:
            if size + len(event) + 1 > room:
                break
            lines.append(event)
            size += len(event) + 1
        if lines:
            self._file.write(b"\n".join(lines) + b"\n")
            self._file.flush()
            if self.fsync:
                os.fsync(self._file.fileno())
            with self._lock:
                self._bytes += size
                self._events += len(lines)
        return len(lines)

    def read(self, max_events: int) -> tuple[list[bytes], int]:
        """Up to ``max_events`` events from the cursor on, and the file offset just past them."""
        with open(self.path, "rb") as f:
            f.seek(self._cursor)
            events = []
            offset = self._cursor
            for line in f:
                if not line.endswith(b"\n"):
                    break  # being written right now by nobody else: cannot happen, but never read half a line
                events.append(line[:-1])
                offset += len(line)
                if len(events) >= max_events:
                    break
        return events, offset

    def advance(self, offset: int, events: int) -> None:
        """Mark everything before ``offset`` delivered; truncate the file when nothing is left."""
        with self._lock:
            self._bytes -= offset - self._cursor
            self._events -= events
            self._cursor = offset
            if self._cursor >= self._file.tell():
                self._file.truncate(0)
                self._file.seek(0)
                self._cursor = 0
                self._bytes = self._events = 0
        self._write_cursor()

    def close(self) -> None:
        self._file.close()

    # -- helpers -----------------------------------------------------------------------------------

    def _read_cursor(self) -> int:
        try:
            cursor = int(self.cursor_path.read_text().strip() or 0)
        except (OSError, ValueError):
            cursor = 0
        return min(cursor, self._file.tell())

    def _write_cursor(self) -> None:
        tmp = self.cursor_path.with_name(self.cursor_path.name + ".tmp")
        tmp.write_text(str(self._cursor))
        os.replace(tmp, self.cursor_path)

    def _cut_torn_tail(self) -> None:
        size = self._file.seek(0, os.SEEK_END)
        if size == 0:
            return
        with open(self.path, "rb") as f:
            f.seek(max(0, size - 65536))
            tail = f.read()
        if tail.endswith(b"\n"):
            return
        keep = size - len(tail) + tail.rfind(b"\n") + 1 if b"\n" in tail else 0
        self._file.truncate(keep)
        self._file.seek(keep)

    def _count_lines(self, start: int) -> int:
        with open(self.path, "rb") as f:
            f.seek(start)
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
