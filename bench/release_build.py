"""What a release venv build costs, and what the test session's build caches save (tests/conftest.py).

Same run, same machine, alternating so that a load change hits both sides: a terminal's release
built by `build_release` (what provisioning and the updater run) with pip run from the plain pip
wheel, the same with the compiled copy of that wheel (fleet_dev.terminal.compiled_pip_wheel), and
a copy of a built release (fleet_dev.terminal.clone_release, what a test terminal's first install
gets). Also the agent's import from a release that has never run (no bytecode, as after an
updater build) against one that carries its bytecode (the cached first release).

    python bench/release_build.py [--reps N]

One JSON line of medians (seconds) and the load average at the start and the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from edge_agent.update.install import Artifact, build_release, find_pip_wheel, release_name
from fleet_dev.dist import build
from fleet_dev.terminal import _sha256, clone_release, compiled_pip_wheel, locked_wheels


def _timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _import_s(release: Path) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    cmd = [str(release / "bin" / "python"), "-c", "import edge_agent.agent, edge_agent.api"]
    return _timed(lambda: subprocess.run(cmd, check=True, env=env, cwd=release, capture_output=True))


def run(reps: int) -> dict[str, Any]:
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-release-build-") as tmp:
        work = Path(tmp)
        built = build(work / "dist")
        assert built.agent_lock is not None and built.wheelhouse is not None
        files = [*locked_wheels(built.agent_lock, built.wheelhouse), built.agent_wheel]
        artifacts = [Artifact(p, _sha256(p)) for p in files]
        name = release_name(built.agent_wheel.name.split("-")[1], artifacts[-1].sha256)
        plain = find_pip_wheel(work, None)
        compiled = compiled_pip_wheel(plain, work / "pip")
        times: dict[str, list[float]] = {"plain_pip": [], "compiled_pip": [], "clone": []}
        imports: dict[str, list[float]] = {"never_ran": [], "with_bytecode": []}
        template = None
        for i in range(reps):
            for label, pip in (("plain_pip", plain), ("compiled_pip", compiled)):
                root = work / f"{label}-{i}"
                times[label].append(_timed(lambda r=root, p=pip: build_release(r, name, artifacts, p, sys.executable)))
                if template is None:
                    template = root / "releases" / name
                    site = next((template / "lib").glob("python3*/site-packages"))
                    subprocess.run([sys.executable, "-m", "compileall", "-q", "-j", "0", str(site)], check=True)
                else:
                    imports["never_ran"].append(_import_s(root / "releases" / name))
            assert template is not None
            dest = work / f"clone-{i}" / "releases" / name
            dest.parent.mkdir(parents=True)
            times["clone"].append(_timed(lambda d=dest, t=template: clone_release(t, d)))
            imports["with_bytecode"].append(_import_s(dest))
            for root in (work / f"plain_pip-{i}", work / f"compiled_pip-{i}", work / f"clone-{i}"):
                if i > 0:
                    shutil.rmtree(root, ignore_errors=True)
    return {
        "bench": "release_build",
        "reps": reps,
        **{f"{k}_s_median": round(statistics.median(v), 2) for k, v in times.items()},
        **{f"import_{k}_s_median": round(statistics.median(v), 2) for k, v in imports.items() if v},
        "load_start": round(load_start, 2),
        "load_end": round(os.getloadavg()[0], 2),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    print(json.dumps(run(max(1, args.reps))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
