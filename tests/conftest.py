"""Session fixtures: real Redis + Kafka (tools.services), a trained model, a Feast repo, a live server, and
on request PostgreSQL with an MLflow tracking server on it.

Everything lives in one temporary workspace; BENTOML_HOME and the embedded MLflow store point there before
bentoml or mlflow is imported so tests never touch the user's model store or registry.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKSPACE = Path(tempfile.mkdtemp(prefix="mlops-tests-"))
os.environ["BENTOML_HOME"] = str(WORKSPACE / "bentoml")
os.environ["BENTOML_DO_NOT_TRACK"] = "true"
os.environ["MLOPS_ENV_FILE"] = str(WORKSPACE / "run" / "services.env")
os.environ["MLOPS_MLFLOW_DIR"] = str(WORKSPACE / "mlflow")
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
(WORKSPACE / "tmp").mkdir()
os.environ["TMPDIR"] = str(WORKSPACE / "tmp")  # what the tests and their children leave in /tmp goes with it
tempfile.tempdir = None  # recomputed from TMPDIR

import pytest  # noqa: E402

from tests.support import (  # noqa: E402
    MLFLOW_CREDENTIALS,
    Workspace,
    prepare_workspace,
    ray_turn_held,
    server_backend,
    start_server,
)

# Helpers Python's multiprocessing starts for this pytest process itself; they end when it does.
OWN_HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")


def left_behind(root: Path) -> list[str]:
    """Processes still running from the test workspace (working directory, command line or environment in it)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cwd = os.readlink(proc / "cwd")
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            environ = (proc / "environ").read_bytes().decode(errors="replace")
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == os.getpid() and any(helper in cmdline for helper in OWN_HELPERS):
            continue
        if int(proc.name) != os.getpid() and (cwd.startswith(str(root)) or str(root) in cmdline + environ):
            found.append(f"{proc.name}: {cmdline[:160]}")
    return found


def pytest_sessionfinish(session, exitstatus) -> None:
    """Every fixture has stopped what it started by now: anything still running from the workspace is a leak
    (it fails the run, and is killed so CI does not hang on it)."""
    leaks = left_behind(WORKSPACE)
    for line in leaks:
        try:
            os.kill(int(line.split(":", 1)[0]), 9)
        except OSError:
            pass
    shutil.rmtree(WORKSPACE, ignore_errors=True)
    if leaks:
        print("\nprocesses left behind by the tests:\n  " + "\n  ".join(leaks))
        session.exitstatus = 1


@pytest.fixture(scope="session")
def services():
    from tools import services as svc

    run_dir = WORKSPACE / "run"
    state = svc.up(run_dir)
    yield run_dir, state
    svc.down(run_dir, purge=True)


@pytest.fixture(scope="session")
def mlflow_server() -> str:
    """``mlflow server`` on PostgreSQL (started only by the tests that ask), in a run folder of its own so the
    default services env keeps the embedded store. Yields its URI.

    Secured, as a shared registry is in production: MLflow's basic-auth app in front, PostgreSQL with SCRAM
    passwords behind it. The stack's credentials (user + password file) are put in this process's
    environment, so every lifecycle test on this server also checks that they reach MLflow's client; a
    client without them gets 401 (tests/test_secured_stack.py)."""
    from tools import services as svc

    run_dir = WORKSPACE / "run-mlflow"
    try:
        state = svc.up(run_dir, with_=("mlflow",), only="mlflow", secure=True)
        sec = svc.RunDir(run_dir).security(state)
        assert sec is not None
        os.environ.update({"MLOPS_MLFLOW_USERNAME": svc.MLFLOW_ADMIN,
                           "MLOPS_MLFLOW_PASSWORD_FILE": str(sec.file("mlflow"))})
        yield f"http://127.0.0.1:{state['mlflow']['port']}"
    finally:
        for key in MLFLOW_CREDENTIALS:
            os.environ.pop(key, None)
        svc.down(run_dir, purge=True)


@pytest.fixture(scope="session")
def workspace(services) -> Workspace:
    run_dir, _ = services
    return prepare_workspace(WORKSPACE, run_dir)


@pytest.fixture(scope="session")
def server(workspace: Workspace):
    srv = start_server(workspace)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def trained(workspace: Workspace):
    """Two visibly different models on the workspace's data (registry and rollout tests)."""
    from lifecycle.train import train

    return train(workspace.dataset), train(workspace.dataset, params={"n_estimators": 30, "max_depth": 2})


@pytest.fixture
def rollout(workspace: Workspace, trained):
    """A model with v1 in Production and v2 registered: (registry, rollouts, name) - rollout and experiment
    tests."""
    from lifecycle import model_store
    from lifecycle.registry import Registry
    from lifecycle.rollout.state import Rollouts
    from tests.support import stored

    reg = Registry(model_store.default_backend())
    name = stored(reg.backend, trained)
    reg.register(name, "v1")
    reg.promote(name, "v1", "production")
    reg.register(name, "v2")
    return reg, Rollouts(reg), name


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.integration)])
def mlflow_backend(request, tmp_path):
    """The same lifecycle test on the embedded SQLite store and on the MLflow server backed by PostgreSQL."""
    from lifecycle.tracking import Backend

    if request.param == "sqlite":
        return Backend.for_uri(str(tmp_path / "mlflow.db"))
    return server_backend(request.getfixturevalue("mlflow_server"))


@pytest.fixture
def ray_turn() -> Iterator[None]:
    with ray_turn_held():
        yield


@pytest.fixture
def ray_cluster(workspace, tmp_path, ray_turn):
    """A one-node Ray cluster started as an operator starts one (`ray start --head`), reached by its address:
    the driver is only a client, the tasks run in the cluster's own worker processes."""
    import signal
    import subprocess
    import sys
    import time

    import psutil

    from tools.services import free_port

    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths stop at 107 bytes
    port = free_port()
    # Every port a free one: the dashboard agent's default (52365) may still be held by an earlier Ray of this
    # machine, and the raylet shares the agent's fate (ray-project/ray#51705, #55638).
    ports = [arg for flag in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--metrics-export-port",
                              "--runtime-env-agent-port", "--node-manager-port", "--object-manager-port",
                              "--ray-client-server-port") for arg in (flag, str(free_port()))]
    # and the workers' range clear of them all (Ray's default, 10002-19999, may hold one: Ray refuses to start)
    taken = {port, *(int(arg) for arg in ports[1::2])}
    low = next(p for p in range(20_000, 32_000, 100) if not any(p <= t < p + 100 for t in taken))
    ports += ["--min-worker-port", str(low), "--max-worker-port", str(low + 99)]
    with (tmp_path / "ray-head.log").open("wb") as log:
        head = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--port",
                                 str(port), "--node-ip-address", "127.0.0.1", "--num-cpus", "2", "--include-dashboard",
                                 "false", "--disable-usage-stats", "--temp-dir", temp, *ports],
                                cwd=REPO_ROOT, stdout=log,
                                # Ray 2.60's `ray start` turns token authentication on; a test cluster on
                                # this machine goes without (a real one: RAY_AUTH_TOKEN in the job's env)
                                env={**workspace.env, "PYTHONPATH": str(REPO_ROOT), "RAY_AUTH_MODE": "disabled"},
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while b"Ray runtime started" not in (tmp_path / "ray-head.log").read_bytes():  # up before the driver
            assert head.poll() is None and time.monotonic() < deadline, \
                (tmp_path / "ray-head.log").read_text(errors="replace")[-3000:]
            time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        cluster: list[psutil.Process] = []
        with contextlib.suppress(psutil.Error):  # the cluster's processes (its workers and actors retitle
            cluster = psutil.Process(head.pid).children(recursive=True)  # themselves "ray::…")
        for sig, wait in ((signal.SIGTERM, 3), (signal.SIGKILL, 10)):  # (SIGTERM alone drains for 30 s)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(head.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                head.wait(wait)
        for proc in [*cluster, *psutil.process_iter(["cmdline"])]:  # and nothing of the cluster is left running
            if proc in cluster or temp in " ".join(proc.info["cmdline"] or []):
                with contextlib.suppress(psutil.Error):
                    proc.kill()
        shutil.rmtree(temp, ignore_errors=True)
