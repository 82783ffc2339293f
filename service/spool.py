"""A bounded on-disk queue for prediction events the broker could not take yet.

One append-only file of JSON lines per serving worker, plus a cursor file that says how far replay got.

- **One owner.** The spool takes an exclusive ``flock`` on ``<file>.lock`` when opened, so a second
  process on the same folder (another server started from it, a worker of another server) is refused with
  :class:`SpoolInUse` instead of interleaving its lines; the lock dies with the process, so a restarted
  worker takes it again. Inside the process only the prediction log's background thread writes and
  replays; other threads read the counters.
- **Durable when it says so.** :meth:`append` returns once the lines are written and fsynced (``fsync``
  true, the default); the cursor is replaced atomically (written, fsynced, renamed, directory fsynced), and
  the directory is fsynced when the file is created.
- **A failed write changes nothing.** A write that fails part-way (``ENOSPC``, ``EIO``) is cut back to the
  last whole line and raises :class:`SpoolWriteFailed`: the caller still has every event of the batch.
- **Torn or garbled lines are skipped, not replayed, and counted** (``skipped``): a line torn by a crash
  mid-write at the end is cut off when the spool is opened; one that is not a JSON object anywhere else
  (a disk that lost a block, a hand edit) is passed over by replay.

Replay advances the cursor only past events the broker acknowledged, so a restart resumes where the last one
stopped. When everything is replayed the file is truncated.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class SpoolChunk:
    """Events read from the spool: ``ends[i]`` is the offset just past event i, ``garbled_before[i]`` how many
    garbled lines lie between the cursor and it; ``end``/``garbled`` the same for everything read."""

    events: list[bytes] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)
    garbled_before: list[int] = field(default_factory=list)
    end: int = 0
    garbled: int = 0


class SpoolInUse(RuntimeError):
    """Another process holds this spool."""


class SpoolWriteFailed(OSError):
    """The append did not reach the disk; nothing of it stays in the file."""


def in_use(path: Path) -> str | None:
    """Why the spool at ``path`` cannot be opened by this process (another one holds it), or None."""
    lock_path = path.with_name(path.name + ".lock")
    try:
        fd = os.open(lock_path, os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return _held_by(path, fd)
    finally:
        os.close(fd)  # closing drops a lock taken here
    return None


def pending_on_disk(path: Path) -> int:
    """Bytes of the spool at ``path`` not replayed yet, read from its file and cursor without taking it over
    (its owner may be running: the answer can lag the owner by one cursor write, half a second)."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return 0
    try:
        cursor = int(path.with_name(path.name + ".cursor").read_text().strip() or 0)
    except (OSError, ValueError):
        cursor = 0
    return max(0, size - cursor)


def _held_by(path: Path, lock_fd: int) -> str:
    """Why the spool cannot be taken: the pid its owner wrote into the lock file."""
    holder = os.pread(lock_fd, 64, 0).decode(errors="replace").strip() or "unknown"
    return f"spool {path} is in use (held by pid {holder}): two servers cannot share one MLOPS_SPOOL_PATH"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_json_object(line: bytes) -> bool:
    """Cheap shape check: what replay hands the broker must at least look like one event."""
    return line[:1] == b"{" and line[-1:] == b"}"


class Spool:
    def __init__(self, path: Path, max_bytes: int, fsync: bool = True) -> None:
        self.path = path
        self.cursor_path = path.with_name(path.name + ".cursor")
        self.lock_path = path.with_name(path.name + ".lock")
        self.max_bytes = max_bytes
        self.fsync = fsync
        self._lock = threading.Lock()  # guards the counters read by other threads
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_fd = self._take_ownership()
        created = not path.exists()
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if created and fsync:
            _fsync_dir(path.parent)
        self._size = os.fstat(self._fd).st_size
        self.skipped = 0  # torn or garbled lines dropped (cut at open, or passed over by replay)
        self._cut_torn_tail()
        self._cursor = self._read_cursor()
        self._bytes = self._size - self._cursor
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
        """Append whole events (no newlines inside); returns how many fitted under ``max_bytes``. Raises
        :class:`SpoolWriteFailed` when the disk refused the write: then none of them was kept."""
        lines = []
        size = 0
        room = self.room()
        for event in events:
            if size + len(event) + 1 > room:
                break
            lines.append(event)
            size += len(event) + 1
        if not lines:
            return 0
        data = memoryview(b"\n".join(lines) + b"\n")
        start = self._size
        try:
            written = 0
            while written < len(data):
                written += os.write(self._fd, data[written:])
            if self.fsync:
                os.fdatasync(self._fd)
        except OSError as exc:
            self._cut_back(start)
            raise SpoolWriteFailed(exc.errno or errno.EIO, f"spool {self.path}: {exc.strerror or exc}") from None
        self._size = start + len(data)
        with self._lock:
            self._bytes += size
            self._events += len(lines)
        return len(lines)

    @property
    def cursor(self) -> int:
        return self._cursor

    def read(self, max_events: int) -> SpoolChunk:
        """Up to ``max_events`` events from the cursor on, each with the file offset just past it, passing
        over garbled lines (counted once :meth:`advance` moves past them)."""
        chunk = SpoolChunk()
        offset = self._cursor
        with open(self.path, "rb") as f:
            f.seek(self._cursor)
            for line in f:
                if not line.endswith(b"\n"):
                    break  # never half a line (only this thread writes, so it cannot be mid-write)
                offset += len(line)
                if _is_json_object(line[:-1]):
                    if len(chunk.events) >= max_events:
                        offset -= len(line)
                        break
                    chunk.events.append(line[:-1])
                    chunk.ends.append(offset)
                    chunk.garbled_before.append(chunk.garbled)
                else:
                    chunk.garbled += 1
        chunk.end = offset
        return chunk

    def advance(self, offset: int, events: int, garbled: int = 0) -> None:
        """Mark everything before ``offset`` delivered (``events`` events and ``garbled`` skipped lines);
        truncate the file when nothing is left."""
        with self._lock:
            self._bytes -= offset - self._cursor
            self._events -= events + garbled
            self.skipped += garbled
            self._cursor = offset
            if self._cursor >= self._size:
                os.ftruncate(self._fd, 0)
                self._size = 0
                self._cursor = 0
                self._bytes = self._events = 0
        self._write_cursor()

    def close(self) -> None:
        os.close(self._fd)
        os.close(self._lock_fd)  # releases the flock

    # -- helpers -----------------------------------------------------------------------------------

    def _take_ownership(self) -> int:
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            reason = _held_by(self.path, fd)
            os.close(fd)
            raise SpoolInUse(reason) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        return fd

    def _cut_back(self, size: int) -> None:
        """After a failed write: the file back to its last whole line (a truncate needs no free space)."""
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, size)

    def _read_cursor(self) -> int:
        try:
            cursor = int(self.cursor_path.read_text().strip() or 0)
        except (OSError, ValueError):
            cursor = 0
        return min(cursor, self._size)

    def _write_cursor(self) -> None:
        tmp = self.cursor_path.with_name(self.cursor_path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, str(self._cursor).encode())
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.cursor_path)
        if self.fsync:
            _fsync_dir(self.cursor_path.parent)

    def _cut_torn_tail(self) -> None:
        size = self._size
        if size == 0:
            return
        with open(self.path, "rb") as f:
            f.seek(max(0, size - 65536))
            tail = f.read()
        if tail.endswith(b"\n"):
            return
        keep = size - len(tail) + tail.rfind(b"\n") + 1 if b"\n" in tail else 0
        os.ftruncate(self._fd, keep)
        self._size = keep
        self.skipped += 1

    def _count_lines(self, start: int) -> int:
        with open(self.path, "rb") as f:
            f.seek(start)
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
