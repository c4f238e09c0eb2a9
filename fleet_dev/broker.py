"""A Mosquitto process we own, for tests, benchmarks and the demo (production runs its own broker)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time

from fleet_dev.proc import die_with_parent
from fleet_server.broker.mosquitto import BrokerConfig


class MosquittoNotInstalled(RuntimeError):
    """The mosquitto binary is missing: install the Debian package `mosquitto`."""


class Mosquitto:
    """A Mosquitto process we own: start, stop, kill -9, restart on the same port, reload."""

    def __init__(self, config: BrokerConfig, binary: str | None = None) -> None:
        self.config = config
        self.binary = binary or shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not os.path.exists(self.binary):
            raise MosquittoNotInstalled("mosquitto is not installed; on Debian: apt-get install mosquitto")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout_s: float = 10.0) -> None:
        if self.running:
            return
        self.proc = subprocess.Popen(
            [self.binary, "-c", str(self.config.conf_path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                log = self.config.log_path.read_text(errors="replace")[-2000:] if self.config.log_path.exists() else ""
                raise RuntimeError(f"mosquitto exited with {self.proc.returncode}: {err}{log}")
            try:
                with socket.create_connection((self.config.host, self.config.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not listen on {self.config.host}:{self.config.port}")

    def stop(self, timeout_s: float = 10.0) -> None:
        """Orderly stop (SIGTERM): Mosquitto saves its persistence file."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._close()

    def kill(self) -> None:
        """kill -9: whatever was queued and not yet autosaved is gone."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self._close()

    def restart(self, hard: bool = False) -> None:
        self.kill() if hard else self.stop()
        self.start()

    def reload(self) -> None:
        """SIGHUP: re-read password file and ACL without dropping connected clients."""
        if self.running and self.proc is not None:
            self.proc.send_signal(signal.SIGHUP)

    def _close(self) -> None:
        if self.proc is not None and self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None
