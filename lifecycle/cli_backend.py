"""The MLflow backend a command line opens, checked before MLflow is touched.

Left to itself, MLflow's client retries an unreachable server for about four minutes (7 retries with backoff),
creates an empty store wherever the relative default path points from the current folder, and adds its tables to
any SQLite file it is handed. A command line must instead say at once, in one line, what is wrong: so it checks
that a server answers (a few seconds at most), that a SQLite file is an MLflow store, and that a store exists
unless the command is one that creates stores (``register --model-file``, training, ``pipeline run``).
"""

from __future__ import annotations

import os
import re
import socket
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

from lifecycle.tracking import Backend, TrackingError, sqlite_file
from mlops.connections import apply_mlflow_auth, redact_uri, with_db_password
from mlops.settings import Settings

# A command line gives up on a server within seconds; a user's own MLFLOW_HTTP_* settings still win.
CLI_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                     "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
CONNECT_TIMEOUT_S = 3.0
ANSWER_TIMEOUT_S = 5.0
DB_PORTS = {"postgresql": 5432, "postgres": 5432, "mysql": 3306, "mssql": 1433}
DEFAULT_STORE_HINT = ("the default store is .run/mlflow under the current folder: run from the project root, set "
                      "MLOPS_MLFLOW_DIR or MLOPS_MLFLOW_URI, or pass --registry")
CREATE_HINT = "check the path (a store is created only by register --model-file, training or pipeline run)"


class BackendUnavailable(TrackingError):
    """The backend cannot be used at all (unreachable, missing, not an MLflow store): bad input, exit 2."""


@contextmanager
def fail_fast() -> Iterator[None]:
    """Short HTTP retries while a command runs, unless the user chose their own; restored afterwards, so a
    command called in-process (tests) does not shorten the retries of the services started later."""
    added = [key for key in CLI_HTTP_DEFAULTS if key not in os.environ]
    os.environ.update({key: CLI_HTTP_DEFAULTS[key] for key in added})
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def open_backend(uri: str | None, settings: Settings, *, create: bool) -> Backend:
    """The backend ``uri`` names (else the settings' one), after the checks above; raises BackendUnavailable."""
    target = uri or settings.mlflow_uri
    if target:
        apply_mlflow_auth(settings)
        target = with_db_password(target, settings)
    if target and sqlite_file(target) is None:
        check_reachable(target)
        return Backend.for_uri(target, settings.mlflow_experiment)
    db = sqlite_file(target) if target else (settings.mlflow_dir / "mlflow.db").resolve()
    if db is not None:
        check_sqlite(db, create, CREATE_HINT if target else DEFAULT_STORE_HINT)
    try:
        if target:
            return Backend.for_uri(target, settings.mlflow_experiment)
        return Backend.from_settings(settings)
    except OSError as exc:
        raise BackendUnavailable(f"cannot create the MLflow store at {db}: {exc.strerror}") from None


def check_sqlite(db: Path, create: bool, hint: str) -> None:
    """An existing MLflow store; or, when ``create``, nothing yet (or an empty file). Never a foreign database."""
    if db.is_dir():
        raise BackendUnavailable(f"{db} is a folder, not an MLflow store (a SQLite file)")
    if not db.exists():
        if create:
            return
        raise BackendUnavailable(f"no MLflow store at {db}: {hint}")
    try:
        conn = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True, timeout=5)
        try:
            tables = {row[0] for row in conn.execute("select name from sqlite_master where type = 'table'")}
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        raise BackendUnavailable(f"{db} is not an MLflow store: {exc}") from None
    if not tables:
        if create:
            return
        raise BackendUnavailable(f"no MLflow store at {db} (the file is empty): {hint}")
    if not {"experiments", "alembic_version"} <= tables:
        raise BackendUnavailable(f"{db} is not an MLflow store: a SQLite database with other tables "
                                 f"({', '.join(sorted(tables)[:5])}), left untouched")


def check_reachable(uri: str) -> None:
    """Something answers at ``uri``: HTTP for a server (any answer will do; MLflow judges it), a TCP connection
    for a database server."""
    parts = urlsplit(uri)
    scheme = parts.scheme.split("+", 1)[0]
    if scheme in ("http", "https"):
        _http_answers(uri)
    elif parts.hostname and scheme in DB_PORTS:
        try:
            socket.create_connection((parts.hostname, parts.port or DB_PORTS[scheme]), CONNECT_TIMEOUT_S).close()
        except OSError as exc:
            raise BackendUnavailable(f"cannot reach MLflow's database at {redact_uri(uri)}: {_reason(exc)}") from None


def _http_answers(uri: str) -> None:
    import requests

    try:
        requests.get(uri, timeout=(CONNECT_TIMEOUT_S, ANSWER_TIMEOUT_S), allow_redirects=False, stream=True).close()
    except requests.exceptions.SSLError:
        return  # a TLS server answered; MLflow applies its own TLS settings
    except requests.exceptions.ConnectTimeout:
        raise BackendUnavailable(f"cannot reach MLflow at {redact_uri(uri)}: no connection within "
                                 f"{CONNECT_TIMEOUT_S:g} s") from None
    except requests.exceptions.ReadTimeout:
        raise BackendUnavailable(f"cannot reach MLflow at {redact_uri(uri)}: connected, but no answer within "
                                 f"{ANSWER_TIMEOUT_S:g} s") from None
    except requests.exceptions.RequestException as exc:
        raise BackendUnavailable(f"cannot reach MLflow at {redact_uri(uri)}: {_reason(exc)}") from None


def _reason(exc: Exception) -> str:
    """'Connection refused', not urllib3's nested repr."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    found = re.findall(r"\[Errno -?\d+\] ([^'\")\]]+)", str(exc))
    return found[-1].strip() if found else (str(exc).splitlines() or [type(exc).__name__])[0][:200]
