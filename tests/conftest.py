"""Shared fixtures: real PostgreSQL servers in temp dirs, one Prefect test server per session."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

# Prefect reads its settings at import: give this run its own home, no analytics
_HOME = tempfile.mkdtemp(prefix="dr-prefect-home-")
atexit.register(shutil.rmtree, _HOME, True)
os.environ["PREFECT_HOME"] = _HOME
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("DR_CONFIG", None)

import pytest  # noqa: E402

from tests.helpers import LocalEnv, make_env, wait_for_removals  # noqa: E402


@pytest.fixture(scope="session")
def base_dir():
    """A directory the PostgreSQL OS user can enter (pytest's own tmp is 0700 when run as root)."""
    d = Path(tempfile.mkdtemp(prefix="dr-tests-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    wait_for_removals()
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def prefect_server():
    """One Prefect server for the whole session (pauses, artifacts and concurrency need it)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def fresh_env(base_dir, request):
    """A local platform of its own, not started: for tests that destroy things."""
    env = make_env(base_dir, request.node.name)
    yield env
    env.discard()


@pytest.fixture
def live_env(fresh_env: LocalEnv) -> LocalEnv:
    """A local platform of its own, up with sample data and the app."""
    fresh_env.up()
    return fresh_env


@pytest.fixture(scope="module")
def shared_env(base_dir, request):
    """One local platform for a whole module of tests that do not break it."""
    env = make_env(base_dir, request.module.__name__.split(".")[-1])
    env.up()
    yield env
    env.discard()
