"""Pipelined HMGET for a whole batch, on a few raw connections with hiredis parsing the replies.

The online-store lookup is one round trip per batch, but through redis-py's asyncio pipeline it cost ~24 µs
of the worker's CPU per request (measured with py-spy at 32 connections): a command object, argument
encoding and a response-callback dispatch per key, an ``asyncio.timeout`` per reply read, the pool's
bookkeeping per batch. The work itself is small: one buffer of RESP commands out, one stream of replies in.
So this writes the commands of a batch as one ``bytes`` (the fields part is the same for every key and is
encoded once) and lets hiredis — the C RESP parser redis-py itself uses — turn the replies into lists, with
one timeout for the whole exchange. Everything else the service asks Redis (PING, SCAN, EXISTS) stays on
redis-py.

A connection that fails or times out mid-exchange is closed, never reused (its replies could be out of step);
the next batch opens a new one. One that Redis closed while it sat idle (a restart, ``timeout``, CLIENT KILL)
is replaced before use, and a reused one found dead on use is retried once on a fresh connection (HMGET only
reads), so a Redis that is back answers the next request instead of failing it; a Redis that is down fails
at the connect, at once. At most ``size`` connections (one per batch in flight is enough); a batch
finding them all busy waits for one, within the same timeout.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Sequence

import hiredis


class LookupFailed(RuntimeError):
    """Redis could not be reached, answered an error, or did not answer in time."""

    def __init__(self, message: str, reply: str | None = None) -> None:
        super().__init__(message)
        self.reply = reply  # Redis's error reply, when it answered one


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


class PipelinedHmget:
    def __init__(self, host: str, port: int, fields: Sequence[bytes | str], timeout_s: float, size: int = 4, *,
                 tls: ssl.SSLContext | None = None, auth: Sequence[str] | None = None) -> None:
        """``tls``: connect over TLS with this context; ``auth``: the AUTH command each new connection sends."""
        self.host = host
        self.port = port
        self._tls = tls
        self._auth = b"".join([b"*%d\r\n" % len(auth), *(_bulk(a.encode()) for a in auth)]) if auth else None
        self.timeout_s = timeout_s
        encoded = [f.encode() if isinstance(f, str) else f for f in fields]
        self._head = b"*%d\r\n$5\r\nHMGET\r\n" % (2 + len(encoded))
        self._tail = b"".join(_bulk(f) for f in encoded)
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._slots = asyncio.Semaphore(size)

    async def fetch(self, keys: Sequence[bytes]) -> list[list[bytes | None]]:
        """The HMGET reply (one value or None per field) of each key, in order."""
        if not keys:
            return []
        head, tail = self._head, self._tail
        payload = b"".join([head + _bulk(key) + tail for key in keys])
        try:
            async with asyncio.timeout(self.timeout_s), self._slots:
                while self._idle:
                    reader, writer = self._idle.pop()
                    if reader.at_eof() or writer.is_closing():  # Redis closed it while idle: restart, timeout
                        writer.close()
                        continue
                    try:
                        return await self._exchange(reader, writer, payload, len(keys))
                    except (OSError, EOFError):
                        # A reused connection that turns out dead (its close not seen yet): HMGET only reads,
                        # so asking again on a fresh connection is safe, and a restarted Redis is not an error.
                        break
                reader, writer = await self._connect()
                return await self._exchange(reader, writer, payload, len(keys))
        except (OSError, TimeoutError, EOFError, hiredis.ProtocolError) as exc:
            raise LookupFailed(str(exc) or type(exc).__name__) from None

    async def _exchange(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, payload: bytes, n: int,
    ) -> list[list[bytes | None]]:
        try:
            writer.write(payload)
            replies = await self._read(reader, n)
        except BaseException:  # failed or cancelled mid-exchange: its replies would be out of step
            writer.close()
            raise
        self._idle.append((reader, writer))
        return replies

    async def _read(self, reader: asyncio.StreamReader, n: int) -> list[list[bytes | None]]:
        parser = hiredis.Reader()
        replies: list[list[bytes | None]] = []
        while len(replies) < n:
            reply = parser.gets()
            if reply is False:
                data = await reader.read(1 << 16)
                if not data:
                    raise EOFError("Redis closed the connection")
                parser.feed(data)
                continue
            if isinstance(reply, hiredis.ReplyError):
                raise LookupFailed(f"Redis answered an error: {reply}", str(reply))
            replies.append(reply)
        if parser.gets() is not False:
            raise hiredis.ProtocolError("more replies than commands")
        return replies

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            reader, writer = await asyncio.open_connection(
                self.host, self.port, ssl=self._tls, server_hostname=self.host if self._tls else None)
        except ssl.SSLError as exc:
            raise LookupFailed(f"TLS with Redis at {self.host}:{self.port} failed: {exc.reason or exc}") from None
        except OSError as exc:
            raise LookupFailed(f"cannot connect to Redis at {self.host}:{self.port}: {exc}") from None
        if self._auth is not None:
            try:
                writer.write(self._auth)
                await self._read(reader, 1)
            except LookupFailed as exc:  # an error reply: the credentials
                writer.close()
                raise LookupFailed(f"Redis refused the credentials: {exc.reply}") from None
            except BaseException:
                writer.close()
                raise
        return reader, writer

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for _, writer in idle:
            writer.close()
        for _, writer in idle:
            try:
                await writer.wait_closed()
            except OSError:
                pass
