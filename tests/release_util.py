"""A real fleet server over HTTP with a TUF repository set up from a real keystore in tmp."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn

from edge_agent.update.trust import TrustClient
from fleet_dev import releases as rel
from fleet_dev.devstack import DevStack
from fleet_dev.proc import free_port
from fleet_server.app import create_app
from fleet_server.releases.keystore import Keystore


@dataclass
class Repo:
    stack: DevStack
    url: str
    keystore: Keystore
    rc: Any
    work: Path

    @property
    def tuf(self) -> str:
        return f"{self.url}/tuf"

    def root1(self) -> bytes:
        return (self.keystore.folder / "metadata" / "1.root.json").read_bytes()

    def client(self, name: str = "t1", **kw: Any) -> TrustClient:
        base = self.work / name
        return TrustClient(base / "metadata", self.tuf, self.root1(), base / "downloads", **kw)


def serve(stack: DevStack) -> tuple[uvicorn.Server, threading.Thread, str]:
    port = free_port()
    http = uvicorn.Server(
        uvicorn.Config(
            create_app(stack.settings, stack.server), host="127.0.0.1", port=port, log_level="warning", lifespan="off"
        )
    )
    thread = threading.Thread(target=http.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not http.started and time.monotonic() < deadline:
        time.sleep(0.05)
    return http, thread, f"http://127.0.0.1:{port}"


@contextmanager
def running_repo(tmp_path: Path) -> Iterator[Repo]:
    """A server on a free port, a keystore, the online key in place and the repository set up."""
    st = DevStack(tmp_path / "s")
    http, thread, url = serve(st)
    ks = rel.make_keystore(tmp_path / "keystore")
    rel.install_online_key(ks, st.settings)
    rc = rel.client(url, st.admin_token)
    rel.set_up_server(rc, ks)
    try:
        yield Repo(st, url, ks, rc, tmp_path / "work")
    finally:
        rc.http.close()
        http.should_exit = True
        thread.join(5)
        st.close()


def agent(repo: Repo, version: str, **kw: Any) -> rel.Published:
    dist = rel.write_agent_dist(repo.work / f"dist-{version}", version, **kw)
    return rel.publish_agent(repo.rc, repo.keystore, dist, repo.work)


def fleetctl(url: str, token: str, *args: str) -> Any:
    """Run fleetctl (with its release and rollout groups, as `main()` registers them)."""
    from typer.testing import CliRunner

    from fleet_server import cli

    if not any(g.name == "release" for g in cli.app.registered_groups):
        cli._register_subcommands()
    return CliRunner().invoke(cli.app, ["--url", url, "--token", token, *args])
