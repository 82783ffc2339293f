"""Issue 15, a new user's probe of the lifecycle command lines: every bad input ends fast, with one line on
stderr and the documented exit code, and leaves no store, version label or data file behind.

Most cases run the command as a user does (a subprocess, from a folder that is not the project root)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from lifecycle import data as datamod
from lifecycle import model_store
from lifecycle.registry_cli import main as registry_main
from lifecycle.tracking import Backend
from lifecycle.train import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "model.onnx"
    path.write_bytes(train(datamod.generate(150, 2_000, seed=9), params={"n_estimators": 5}).onnx_bytes)
    return path


@pytest.fixture
def bare_env(tmp_path, monkeypatch) -> dict[str, str]:
    """A user's shell outside the project: no env file, no MLOPS_MLFLOW_* (the default store is relative)."""
    monkeypatch.delenv("MLOPS_MLFLOW_DIR", raising=False)
    monkeypatch.delenv("MLOPS_MLFLOW_URI", raising=False)
    monkeypatch.setenv("MLOPS_ENV_FILE", str(tmp_path / "no-such.env"))
    monkeypatch.chdir(tmp_path)
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def cli(*args: str) -> int:
    try:
        return registry_main(list(args))
    except SystemExit as exc:
        return int(exc.code or 0)


def run(env: dict[str, str], cwd: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=timeout)


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err[-3000:]
    return lines[0]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def name() -> str:
    return f"i15_{uuid.uuid4().hex[:8]}"


# -- 1. an unreachable tracking server fails fast ------------------------------------------------------------


def test_unreachable_server_fails_within_seconds_with_exit_2(bare_env, tmp_path):
    started = time.monotonic()
    out = run(bare_env, tmp_path, "-m", "lifecycle.registry_cli", "--registry", f"http://127.0.0.1:{closed_port()}",
              "list", timeout=90)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "cannot reach MLflow at http://127.0.0.1:" in one_line(out.stderr)
    assert time.monotonic() - started < 40  # interpreter start-up included; it took 257 s (retries with backoff)


def test_a_server_that_accepts_but_never_answers_fails_within_seconds(bare_env, capsys):
    with socket.socket() as silent:  # the kernel completes the handshake; nobody ever reads or answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        started = time.monotonic()
        assert cli("--registry", f"http://127.0.0.1:{silent.getsockname()[1]}", "list") == 2
        assert time.monotonic() - started < 10
    assert "cannot reach MLflow" in one_line(capsys.readouterr().err)


def test_the_short_retries_end_with_the_command(bare_env, monkeypatch, capsys):
    """Called in-process (as here), the CLI must not leave its retry settings to services started later."""
    for key in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "3")  # a user's own choice is kept
    assert cli("--registry", f"http://127.0.0.1:{closed_port()}", "list") == 2
    capsys.readouterr()
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ and "MLFLOW_HTTP_REQUEST_TIMEOUT" not in os.environ
    assert os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] == "3"


def test_a_server_that_keeps_failing_is_given_up_on_within_seconds(bare_env, tmp_path):
    """It answers, so it is reachable; MLflow's retries (7, with backoff: minutes) are cut short for the CLI."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Unavailable(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            self.send_error(503)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Unavailable)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        started = time.monotonic()
        out = run(bare_env, tmp_path, "-m", "lifecycle.registry_cli", "list", "--registry",
                  f"http://127.0.0.1:{server.server_address[1]}", timeout=120)
        elapsed = time.monotonic() - started
    finally:
        server.shutdown()
        server.server_close()
    assert out.returncode == 1 and "registry: MLflow:" in one_line(out.stderr)
    assert elapsed < 45  # start-up, then 2 retries after about 1 s and 2 s


# -- 2. outside the project root: no silent new store ------------------------------------------------------


@pytest.mark.parametrize("args", [
    ["list"], ["history", "--name", "m"], ["compare", "--name", "m", "--versions", "v1", "v2"],
    ["promote", "--name", "m", "--version", "v1", "--stage", "production"], ["rollback", "--name", "m"],
    ["register", "--name", "m", "--version", "v1"],
])
def test_read_verbs_refuse_a_store_that_does_not_exist_and_create_none(bare_env, tmp_path, capsys, args):
    assert cli(*args) == 2
    line = one_line(capsys.readouterr().err)
    assert f"no MLflow store at {tmp_path / '.run' / 'mlflow' / 'mlflow.db'}" in line and "MLOPS_MLFLOW_URI" in line
    assert not (tmp_path / ".run").exists()
    assert cli("--registry", str(tmp_path / "other.db"), *args) == 2
    assert "no MLflow store at" in one_line(capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


def test_list_from_another_folder_as_a_user_runs_it(bare_env, tmp_path):
    out = run(bare_env, tmp_path, "-m", "lifecycle.registry_cli", "list")
    assert out.returncode == 2 and "no MLflow store at" in one_line(out.stderr)
    assert list(tmp_path.iterdir()) == []


def test_register_with_a_model_file_creates_the_store(bare_env, tmp_path, model_file, capsys):
    assert cli("register", "--name", "m", "--version", "v1", "--model-file", str(model_file)) == 0
    assert (tmp_path / ".run" / "mlflow" / "mlflow.db").is_file()
    capsys.readouterr()
    assert cli("list", "--json") == 0
    assert [v["version"] for v in json.loads(capsys.readouterr().out)] == ["v1"]


# -- 3. --registry and --json before or after the verb -----------------------------------------------------


def test_registry_and_json_options_go_before_or_after_the_verb(tmp_path, model_file, capsys):
    db, model = str(tmp_path / "m.db"), name()
    assert cli("register", "--registry", db, "--name", model, "--version", "v1", "--model-file", str(model_file)) == 0
    capsys.readouterr()
    for args in (["--registry", db, "--json", "list"], ["list", "--registry", db, "--json"],
                 ["--json", "list", "--mlflow-uri", db], ["--registry", db, "list", "--json"]):
        assert cli(*args) == 0, args
        assert [v["name"] for v in json.loads(capsys.readouterr().out)] == [model], args


# -- 4. a trailing newline is not part of a valid id -------------------------------------------------------


@pytest.mark.parametrize(("check", "value"), [
    (model_store.check_version, "v9\n"), (model_store.check_name, "fraud_detector\n"),
])
def test_ids_with_a_trailing_newline_are_refused(check, value):
    with pytest.raises(model_store.ModelStoreError):
        check(value)


def test_a_model_uri_with_a_trailing_newline_is_refused():
    with pytest.raises(model_store.ModelStoreError, match="not a model URI"):
        model_store.load_uri("models:/fraud_detector@production\n")


@pytest.mark.parametrize("args", [
    ["register", "--name", "NAME", "--version", "v9\n", "--model-file", "MODEL"],
    ["register", "--name", "NAME\n", "--version", "v9", "--model-file", "MODEL"],
    ["promote", "--name", "NAME", "--version", "v1\n", "--stage", "production"],
    ["compare", "--name", "NAME", "--versions", "v1", "v1\n"],
    ["rollback", "--name", "NAME", "--to", "v1\n"],
    ["history", "--name", "NAME'\n"],
])
def test_the_cli_refuses_ids_with_a_trailing_newline(tmp_path, model_file, capsys, args):
    db, model = str(tmp_path / "m.db"), name()
    assert cli("--registry", db, "register", "--name", model, "--version", "v1", "--model-file", str(model_file)) == 0
    capsys.readouterr()
    args = [str(model_file) if a == "MODEL" else a.replace("NAME", model) for a in args]
    assert cli("--registry", db, *args) == 2
    assert "invalid" in one_line(capsys.readouterr().err)
    assert model_store.versions(model, Backend.for_uri(db)) == ["v1"]


# -- 5 and 7. every argument is checked before anything is written -----------------------------------------


@pytest.mark.parametrize(("extra", "code", "message"), [
    (["--stage", "production"], 1, "register into staging or none"),
    (["--stage", "gold"], 1, "unknown stage"),
    (["--metrics", '{"auc": NaN}'], 2, "--metrics"),
    (["--metrics", '{"auc": Infinity}'], 2, "--metrics"),
    (["--metrics", '{"auc": 1e400}'], 2, "finite"),
    (["--metrics", '{"auc": "high"}'], 2, "number"),
    (["--metrics", '{"auc": true}'], 2, "number"),
    (["--params", '{"lr": NaN}'], 2, "--params"),
    (["--params", '{"lr": 1e999}'], 2, "--params: param 'lr' must be a finite number, not inf"),
    (["--params", '{"grid": {"lr": [0.1, -1e999]}}'], 2, "param 'grid' must hold only finite numbers, not -inf"),
])
def test_a_refused_register_stores_nothing_and_leaves_the_label_free(tmp_path, model_file, capsys, extra, code,
                                                                      message):
    db, model = str(tmp_path / "m.db"), name()
    base = ["--registry", db, "register", "--name", model, "--version", "v1", "--model-file", str(model_file)]
    assert cli(*base, *extra) == code
    assert message in one_line(capsys.readouterr().err)
    assert cli(*base, "--stage", "staging", "--metrics", '{"auc": 0.9}') == 0  # v1 was not used up
    assert "registered" in capsys.readouterr().out


# -- 6. unreadable input: one line and exit 2, never a traceback ---------------------------------------------


def test_a_text_file_as_the_registry_is_refused_and_left_alone(bare_env, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("my notes\n")
    out = run(bare_env, tmp_path, "-m", "lifecycle.registry_cli", "--registry", str(text), "list")
    assert out.returncode == 2 and "not an MLflow store" in one_line(out.stderr)
    assert text.read_text() == "my notes\n"


def test_a_foreign_sqlite_database_is_not_turned_into_a_store(tmp_path, model_file, capsys):
    import sqlite3

    db = tmp_path / "app.db"
    with sqlite3.connect(db) as conn:
        conn.execute("create table users (id integer)")
    conn.close()
    assert cli("--registry", str(db), "register", "--name", "m", "--version", "v1",
               "--model-file", str(model_file)) == 2
    assert "not an MLflow store" in one_line(capsys.readouterr().err)
    with sqlite3.connect(db) as conn:
        assert [r[0] for r in conn.execute("select name from sqlite_master")] == ["users"]
    conn.close()


def test_a_binary_pipeline_file_is_unreadable_input(bare_env, tmp_path):
    binary = tmp_path / "pipeline.yaml"
    binary.write_bytes(bytes(range(256)) * 4)
    out = run(bare_env, tmp_path, "-m", "lifecycle.pipeline", "--pipeline", str(binary))
    assert out.returncode == 2 and "pipeline:" in one_line(out.stderr)


def test_data_to_an_unwritable_folder_is_one_line(bare_env, tmp_path):
    out = run(bare_env, tmp_path, "-m", "lifecycle.data", "--out", "/proc/x", "--customers", "20",
              "--transactions", "100")
    assert out.returncode == 2 and "mlops-data: cannot write" in one_line(out.stderr)


def test_data_refuses_counts_below_one(bare_env, tmp_path):
    out = run(bare_env, tmp_path, "-m", "lifecycle.data", "--out", str(tmp_path / "d"), "--customers", "0")
    assert out.returncode == 2 and "--customers" in one_line(out.stderr)
    assert not (tmp_path / "d").exists()


def test_train_on_a_folder_of_non_parquet_files_is_one_line(bare_env, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for file in ("customer_stats.parquet", "transactions.parquet", "readme.txt"):
        (folder / file).write_text("not parquet\n")
    out = run(bare_env, tmp_path, "-m", "lifecycle.train", "--data-dir", str(folder))
    assert out.returncode == 2 and "mlops-train: cannot read" in one_line(out.stderr)
    assert not (tmp_path / ".run").exists()  # refused before any store was made
