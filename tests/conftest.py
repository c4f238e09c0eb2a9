"""Shared fixtures: a real Mosquitto on a free loopback port, the real server, real SQLite files."""

from __future__ import annotations

import logging
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fleet_dev.devstack import DevStack

PILOT_OFFICES = ["dongcheng", "haidian", "chaoyang", "mentougou", "miyun", "loan-centre"]


@pytest.fixture(autouse=True)
def _quiet_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)


@pytest.fixture(scope="session", autouse=True)
def _need_mosquitto() -> None:
    if not shutil.which("mosquitto") and not Path("/usr/sbin/mosquitto").exists():
        pytest.fail("mosquitto is not installed: run the suite through ./run.sh test")


@pytest.fixture(scope="session", autouse=True)
def _session_build_caches(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Builds the session repeats, made once: each test agent wheel (by version, defect and a hash
    of the agent's sources; fleet_dev.dist), the compiled copy of the pip wheel that installed
    terminals build their release venvs with, and each distinct first release of a test terminal,
    copied into every terminal that installs it (fleet_dev.terminal; the releases an update
    brings are built by the updater itself, as on a terminal)."""
    from fleet_dev import dist as dist_build
    from fleet_dev import terminal

    caches = tmp_path_factory.mktemp("build-caches")
    dist_build.use_build_cache(caches / "agent-wheels")
    terminal.use_compiled_pip(caches / "pip")
    terminal.use_release_cache(caches / "releases")
    os.environ[dist_build.BUILD_CACHE_ENV] = str(caches)  # the demo the tests start uses them too
    try:
        yield
    finally:
        os.environ.pop(dist_build.BUILD_CACHE_ENV, None)
        dist_build.use_build_cache(None)
        terminal.use_compiled_pip(None)
        terminal.use_release_cache(None)


@pytest.fixture(scope="session")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """`./run.sh dist` once per test session: both wheels, the agent's wheelhouse and hash-pinned lock."""
    from fleet_dev.dist import build

    return build(tmp_path_factory.mktemp("dist"))


@pytest.fixture
def make_stack(tmp_path: Path) -> Iterator[Callable[..., DevStack]]:
    """Build a DevStack (not yet started) with `n` terminals spread over the pilot offices."""
    stacks: list[DevStack] = []
    agents: list[Any] = []

    def build(n: int = 1, start: bool = True, **kwargs: Any) -> DevStack:
        st = DevStack(tmp_path / f"stack{len(stacks)}", **kwargs)
        stacks.append(st)
        for i in range(n):
            st.enrol(f"t-{i:03d}", PILOT_OFFICES[i % len(PILOT_OFFICES)])
        st.tracked_agents = agents  # type: ignore[attr-defined]
        if start:
            st.start_broker()
            st.start_server()
            assert st.server is not None
            assert st.server.link.connected.wait(10), "server did not connect to the broker"
        return st

    yield build
    for a in agents:
        try:
            a.stop(graceful=False)
        except Exception:
            pass
    for st in stacks:
        st.close()


@pytest.fixture(autouse=True)
def _no_leftover_threads() -> Iterator[None]:
    before = {t.ident for t in threading.enumerate()}
    yield
    import time

    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        extra = [
            t
            for t in threading.enumerate()
            if t.ident not in before and t.is_alive() and not t.name.startswith(("asyncio", "AnyIO"))
        ]
        extra = [t for t in extra if t.name.startswith(("pump-", "link-", "ingest-", "paho-"))]
        if not extra:
            return
        time.sleep(0.05)
    pytest.fail(f"threads left running after the test: {[t.name for t in extra]}")
