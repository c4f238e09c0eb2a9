"""What the agent measures itself: the host (disk, memory, CPU temperature) and the camera.

Each probe returns a ProbeResult and never raises for a device that is missing or broken: that is
the finding, reported as a fault in plain words. OpenCV is imported only when a camera is probed,
so a terminal without the face packages still judges its host.
"""

from __future__ import annotations

import shutil
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

THERMAL_ROOT = Path("/sys/class/thermal")
CAMERA_PROBE_FRAMES = 5
REOPEN_WINDOW_S = 3600.0


@dataclass(frozen=True, slots=True)
class ProbeResult:
    readings: dict[str, float] = field(default_factory=dict)
    fault: str | None = None
    unavailable: str | None = None


def disk_used_ratio(path: Path) -> float | None:
    """Used share (0-1) of the file system holding `path`."""
    try:
        usage = shutil.disk_usage(path)
    except OSError:
        return None
    return round(usage.used / usage.total, 4) if usage.total else None


def memory_used_ratio(meminfo: Path = Path("/proc/meminfo")) -> float | None:
    """Share (0-1) of memory not available to new work (1 - MemAvailable/MemTotal)."""
    try:
        with meminfo.open(encoding="ascii") as fh:
            info = {line.split(":")[0]: int(line.split()[1]) for line in fh if ":" in line}
        return round(1 - info["MemAvailable"] / info["MemTotal"], 4)
    except (OSError, KeyError, ValueError, IndexError, ZeroDivisionError):
        return None


def cpu_temp_c(root: Path = THERMAL_ROOT) -> float | None:
    """The hottest thermal zone the kernel exposes, in °C; None where the host exposes none."""
    temps: list[float] = []
    try:
        zones = sorted(root.glob("thermal_zone*"))
    except OSError:
        return None
    for zone in zones:
        try:
            milli = int((zone / "temp").read_text(encoding="ascii").strip())
        except (OSError, ValueError):
            continue
        if -40_000 <= milli <= 150_000:  # some boards report sentinel values for absent sensors
            temps.append(milli / 1000.0)
    return max(temps) if temps else None


class HostProbe:
    def __init__(self, data_dir: Path, *, thermal_root: Path = THERMAL_ROOT, meminfo: Path = Path("/proc/meminfo")):
        self._data_dir = data_dir
        self._thermal_root = thermal_root
        self._meminfo = meminfo

    def __call__(self) -> ProbeResult:
        values = {
            "disk_used_ratio": disk_used_ratio(self._data_dir),
            "memory_used_ratio": memory_used_ratio(self._meminfo),
            "cpu_temp_c": cpu_temp_c(self._thermal_root),
        }
        return ProbeResult({k: v for k, v in values.items() if v is not None})


class CameraProbe:
    """Opens the camera source, reads a few frames, closes it again.

    Readings: `fps` (from the spacing of consecutive frames), `frame_timeout_ms` (the longest wait
    for one frame, the first included) and `reopen_per_hour` (probes in the last hour that found the
    camera unusable, i.e. times it had to be opened again).
    """

    def __init__(self, source: str, *, frames: int = CAMERA_PROBE_FRAMES, clock: Callable[[], float] = time.time):
        self._source = source.strip()
        self._frames = max(2, frames)
        self._clock = clock
        self._failures: deque[float] = deque()

    def __call__(self) -> ProbeResult:
        if not self._source:
            return ProbeResult(unavailable="no camera source configured (camera_probe_source or face.camera_source)")
        try:
            from edge_agent.face.camera import open_frame_source
            from edge_agent.face.errors import FaceUnavailable
        except ImportError as err:
            return ProbeResult(unavailable=f"the camera cannot be probed without OpenCV: {err}")
        now = self._clock()
        while self._failures and now - self._failures[0] > REOPEN_WINDOW_S:
            self._failures.popleft()
        waits: list[float] = []
        stamps: list[float] = []
        fault: str | None = None
        try:
            source = open_frame_source(self._source)
            if source is None:
                return ProbeResult(
                    unavailable="no camera source configured (camera_probe_source or face.camera_source)"
                )
            try:
                last = time.monotonic()
                for _ in range(self._frames):
                    got = source.read(1)
                    t = time.monotonic()
                    if not got:
                        fault = f"camera source {self._source!r} opened but gave no frame"
                        break
                    waits.append(t - last)
                    stamps.append(t)
                    last = t
            finally:
                source.close()
        except FaceUnavailable as err:
            fault = str(err)
        except Exception as err:  # OpenCV raises cv2.error for odd devices; that is a finding too
            fault = f"camera source {self._source!r} failed: {err}"
        if fault is not None:
            self._failures.append(now)
        readings = {"reopen_per_hour": float(len(self._failures))}
        if waits:
            readings["frame_timeout_ms"] = round(max(waits) * 1000, 1)
        if len(stamps) >= 2 and stamps[-1] > stamps[0]:
            readings["fps"] = round((len(stamps) - 1) / (stamps[-1] - stamps[0]), 1)
        return ProbeResult(readings, fault)
