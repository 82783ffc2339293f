"""Who owns the gRPC port: the workers of one server share it, no other process may.

gRPC binds with ``SO_REUSEPORT`` so that every worker of a server can listen on the same port (the kernel
spreads connections). The same option would let a *second* server join the port and silently take part of
the traffic, so two checks keep it the first server's alone:

- before any worker starts, ``bentoml serve`` itself tries to bind the port *without* ``SO_REUSEPORT``
  (:func:`preflight`): any listener there — another server, whatever host spelling it used, or a process
  that is not BentoML at all — makes the server exit with status 2 and one line saying why;
- each worker then records its server (the BentoML arbiter's pid) as the port's owner in one
  machine-wide table (:func:`claim`), keyed by the port number alone, so ``localhost``, ``127.0.0.1`` and
  ``0.0.0.0`` are the same port; a live other owner refuses the worker (two servers started at once).

The table is one small JSON file, ``/tmp/mlops-grpc-ports.json``, rewritten under an exclusive ``flock``; entries of
servers that are gone are dropped whenever it is written, so it never grows past the live servers.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

EXIT_PORT_IN_USE = 2


class PortInUse(RuntimeError):
    """Another process (not a worker of this server) holds the gRPC port."""


def table_path() -> Path:
    """Machine-wide, whatever TMPDIR a server was given (the tools give each server a temp dir of its own)."""
    return Path(os.environ.get("MLOPS_PORT_TABLE") or "/tmp/mlops-grpc-ports.json")


@contextlib.contextmanager
def _locked_table() -> Iterator[dict[str, dict[str, Any]]]:
    """``{"ports": {port: {"owner", "host"}}, "refused": {owner: reason}}``, live servers only."""
    with open(table_path(), "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        try:
            raw = json.loads(f.read() or "{}")
        except json.JSONDecodeError:
            raw = {}
        raw = raw if isinstance(raw, dict) else {}
        ports = raw.get("ports") if isinstance(raw.get("ports"), dict) else {}
        refused = raw.get("refused") if isinstance(raw.get("refused"), dict) else {}
        table = {
            "ports": {port: entry for port, entry in ports.items()
                      if isinstance(entry, dict) and _alive(_pid(entry.get("owner")))},
            "refused": {owner: reason for owner, reason in refused.items() if _alive(_pid(owner))},
        }
        yield table
        f.seek(0)
        f.truncate()
        f.write(json.dumps(table, sort_keys=True))


def _pid(value: object) -> int:
    try:
        return int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return 0


def _alive(pid: int) -> bool:
    """A live BentoML server process (a recycled pid of something else does not count)."""
    try:
        return pid > 0 and b"bentoml" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def claim(host: str, port: int, owner: int) -> None:
    """Record ``owner`` (this server's arbiter pid) as the port's holder, or raise if another live server is."""
    with _locked_table() as table:
        entry = table["ports"].get(str(port))
        if entry is not None and _pid(entry.get("owner")) != owner:
            reason = (f"gRPC port {port} is already served by another server (pid {entry['owner']}, "
                      f"on {entry.get('host')}); set MLOPS_GRPC_PORT to a free port, or 0 to turn gRPC off")
            table["refused"][str(owner)] = reason
            raise PortInUse(reason)
        table["ports"][str(port)] = {"owner": owner, "host": host}


def refuse(owner: int, reason: str) -> None:
    """Record why a worker of server ``owner`` could not serve gRPC (the server reports it on exit)."""
    with _locked_table() as table:
        table["refused"][str(owner)] = reason


def refusal_of(owner: int) -> str | None:
    """Why a worker of server ``owner`` refused to start; read, and forgotten, by that server on exit."""
    try:
        with _locked_table() as table:
            return table["refused"].pop(str(owner), None)
    except OSError:
        return None


def addresses(host: str, port: int) -> list[tuple[int, tuple]]:
    """Every address ``host`` names (``localhost`` is 127.0.0.1 and often ::1 too)."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise PortInUse(f"gRPC host {host!r} does not resolve: {exc}") from None
    return list(dict.fromkeys((family, address) for family, _, _, _, address in infos))


def in_use(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be bound without SO_REUSEPORT (something listens there), or None if it can."""
    for family, address in addresses(host, port):
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a TIME_WAIT from a restart is no owner
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return f"gRPC port {address[0]}:{port} is already in use by another process"
                if exc.errno == errno.EADDRNOTAVAIL:
                    continue  # e.g. ::1 on a host without IPv6: gRPC skips it too
                return f"gRPC cannot bind {address[0]}:{port}: {exc.strerror}"
    return None


def serving_cli_host(argv: list[str]) -> str | None:
    """The HTTP host of a ``bentoml serve`` command line, or None when this process is not one."""
    if not argv or "bentoml" not in Path(argv[0]).as_posix() or "serve" not in argv[1:]:
        return None
    for i, arg in enumerate(argv):
        if arg == "--host" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--host="):
            return arg.split("=", 1)[1]
    return os.environ.get("BENTOML_HOST", "0.0.0.0")


def preflight(grpc_host: str | None, port: int, argv: list[str] | None = None,
              other_checks: Sequence[Callable[[], str | None]] = ()) -> None:
    """In the ``bentoml serve`` process, before any worker starts: exit 2 with one line if the gRPC port is
    taken, or another check (e.g. the spool files another server holds) says why the server cannot run.

    Also makes a refusal that only a worker could see (two servers started at the same moment) end the
    server with the same status instead of 0.
    """
    http_host = serving_cli_host(sys.argv if argv is None else argv)
    if http_host is None:
        return
    for check in other_checks:
        reason = check()
        if reason is not None:
            print(f"bentoml serve: {reason}", file=sys.stderr, flush=True)
            raise SystemExit(EXIT_PORT_IN_USE)
    if port:
        host = grpc_host or http_host
        reason = in_use(host, port)
        if reason is not None:
            print(f"bentoml serve: {reason}; set MLOPS_GRPC_PORT to a free port, or 0 to turn gRPC off",
                  file=sys.stderr, flush=True)
            raise SystemExit(EXIT_PORT_IN_USE)
    atexit.register(_exit_if_refused, os.getpid())


def _exit_if_refused(owner: int) -> None:
    reason = refusal_of(owner)
    if reason is not None:
        print(f"bentoml serve: {reason}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(EXIT_PORT_IN_USE)
