"""Session fixtures: real Redis + Kafka (tools.services), a trained model, a Feast repo, a live server.

Everything lives in one temporary workspace; BENTOML_HOME points there before bentoml is imported so
tests never touch the user's model store.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

WORKSPACE = Path(tempfile.mkdtemp(prefix="mlops-tests-"))
os.environ["BENTOML_HOME"] = str(WORKSPACE / "bentoml")
os.environ["BENTOML_DO_NOT_TRACK"] = "true"
os.environ["MLOPS_ENV_FILE"] = str(WORKSPACE / "run" / "services.env")

import pytest  # noqa: E402

from tests.harness import Workspace, prepare_workspace, start_server  # noqa: E402


def pytest_sessionfinish(session, exitstatus) -> None:
    shutil.rmtree(WORKSPACE, ignore_errors=True)


@pytest.fixture(scope="session")
def services():
    from tools import services as svc

    run_dir = WORKSPACE / "run"
    state = svc.up(run_dir)
    yield run_dir, state
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
