"""`./run.sh dist`: build the two installables from this one repository.

- `kiosk_fleet_agent-<v>-py3-none-any.whl`: `edge_agent` + `fleet_wire`, the agent's dependencies,
  the face packages as the `face` extra; beside it `agent-wheels/` with every dependency wheel and
  `kiosk_fleet_agent-<v>.lock`, a hash-pinned requirements file of exactly those wheels (what a
  terminal installs with `pip install --no-index --require-hashes`).
- `kiosk_fleet_server-<v>-py3-none-any.whl`: `fleet_server` + `fleet_wire`, with the device profiles
  and playbooks copied in as package data (`fleet_server/data/`); the office list and the service
  catalogue are package data already.

Why a staging copy per distribution rather than two pyproject files beside the code: setuptools
builds only what lies under its project directory, and the layout (top-level `device_profiles/`,
`playbooks/`) stays as it is. Each staged project gets a pyproject generated from the root one's
dependency lists, so the lists are written once and cannot drift.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", ".pytest_cache")


@dataclass(frozen=True)
class Distribution:
    name: str
    summary: str
    packages: tuple[str, ...]
    version_from: str
    extras_as_deps: tuple[str, ...]  # root extras folded into the wheel's own dependencies
    extras: tuple[str, ...]  # root extras kept as extras of the wheel
    scripts: dict[str, str]
    # repository path → path inside the wheel (package data)
    data: dict[str, str] = field(default_factory=dict)
    package_data: dict[str, list[str]] = field(default_factory=dict)


AGENT = Distribution(
    name="kiosk-fleet-agent",
    summary="Edge agent of the kiosk fleet: outbox, MQTT link, health, local API, face login",
    packages=("edge_agent", "fleet_wire"),
    version_from="edge_agent",
    extras_as_deps=(),
    extras=("face",),
    scripts={"edge-agent": "edge_agent.__main__:main"},
    package_data={"fleet_wire": ["catalog/*.yaml"]},
)
SERVER = Distribution(
    name="kiosk-fleet-server",
    summary="Fleet server of the kiosk fleet: registry, ingest, health, usage, playbooks",
    packages=("fleet_server", "fleet_wire"),
    version_from="fleet_server",
    extras_as_deps=("server",),
    extras=(),
    scripts={"fleet-server": "fleet_server.__main__:main", "fleetctl": "fleet_server.cli:main"},
    data={"device_profiles": "fleet_server/data/device_profiles", "playbooks": "fleet_server/data/playbooks"},
    package_data={
        "fleet_wire": ["catalog/*.yaml"],
        # the console's templates and its stylesheet are read from the package at start
        "fleet_server": ["seed/*.yaml", "data/**/*", "console/templates/*.html", "console/static/*"],
    },
)


@dataclass(frozen=True)
class Built:
    agent_wheel: Path
    server_wheel: Path
    agent_lock: Path | None
    wheelhouse: Path | None


def version_of(package: str) -> str:
    text = (REPO / package / "__init__.py").read_text("utf-8")
    match = re.search(r'^__version__ = "([^"]+)"', text, re.M)
    if not match:
        raise RuntimeError(f"{package}/__init__.py has no __version__")
    return match.group(1)


def _toml_list(items: list[str]) -> str:
    return "[" + ", ".join(f'"{i}"' for i in items) + "]"


def staged_pyproject(dist: Distribution, root: dict[str, object], version: str | None = None) -> str:
    """The pyproject.toml of one distribution, its dependency lists taken from the root project."""
    project = root["project"]
    assert isinstance(project, dict)
    extras_root: dict[str, list[str]] = project.get("optional-dependencies", {})
    deps = list(project["dependencies"])
    for extra in dist.extras_as_deps:
        deps += extras_root[extra]
    lines = [
        "[build-system]",
        'requires = ["setuptools>=70.1"]',
        'build-backend = "setuptools.build_meta"',
        "",
        "[project]",
        f'name = "{dist.name}"',
        f'version = "{version or version_of(dist.version_from)}"',
        f'description = "{dist.summary}"',
        f'requires-python = "{project["requires-python"]}"',
        'license = { text = "Proprietary" }',
        f"dependencies = {_toml_list(deps)}",
        "",
        "[project.optional-dependencies]",
        *(f"{extra} = {_toml_list(extras_root[extra])}" for extra in dist.extras),
        "",
        "[project.scripts]",
        *(f'{name} = "{target}"' for name, target in dist.scripts.items()),
        "",
        "[tool.setuptools.packages.find]",
        f"include = {_toml_list([p + '*' for p in dist.packages])}",
        "",
        "[tool.setuptools.package-data]",
        *(f"{pkg} = {_toml_list(globs)}" for pkg, globs in dist.package_data.items()),
        "",
    ]
    return "\n".join(lines)


def build_wheel(
    dist: Distribution,
    out_dir: Path,
    root: dict[str, object],
    *,
    version: str | None = None,
    patch: Callable[[Path], None] | None = None,
) -> Path:
    """Stage one distribution's files and build its wheel into `out_dir`.

    `version` overrides the package's `__version__` (in the staged copy); `patch` may change the
    staged sources before the build (test-only builds; the real sources are never touched)."""
    with tempfile.TemporaryDirectory(prefix=f"{dist.name}-") as tmp:
        stage = Path(tmp)
        for package in dist.packages:
            shutil.copytree(REPO / package, stage / package, ignore=_IGNORE)
        for src, dest in dist.data.items():
            shutil.copytree(REPO / src, stage / dest, ignore=_IGNORE)
        if version is not None:
            init = stage / dist.version_from / "__init__.py"
            text, n = re.subn(
                r'^__version__ = "[^"]+"', f'__version__ = "{version}"', init.read_text("utf-8"), flags=re.M
            )
            if n != 1:
                raise RuntimeError(f"{init} has no __version__ to set")
            init.write_text(text, "utf-8")
        if patch is not None:
            patch(stage)
        (stage / "pyproject.toml").write_text(staged_pyproject(dist, root, version), "utf-8")
        before = set(out_dir.glob("*.whl"))
        _run(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "--no-deps",
                "--no-build-isolation",
                "--quiet",
                "--wheel-dir",
                str(out_dir),
                str(stage),
            ],
            what=f"building {dist.name}",
        )
    prefix = dist.name.replace("-", "_") + "-"
    made = [p for p in out_dir.glob(f"{prefix}*.whl") if p not in before] or sorted(out_dir.glob(f"{prefix}*.whl"))
    return made[-1]


def write_lock(wheel: Path, out_dir: Path, *, extras: str = "") -> tuple[Path, Path]:
    """Download the wheel's dependency wheels into `agent-wheels/` and pin them by hash."""
    house = out_dir / "agent-wheels"
    house.mkdir(exist_ok=True)
    target = f"{wheel}[{extras}]" if extras else str(wheel)
    _run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary", ":all:", "--dest", str(house), target],
        what="downloading the agent's dependency wheels",
    )
    own = wheel.name.split("-")[0]
    lines = [
        f"# {wheel.name}: every dependency wheel, pinned by hash; install with",
        "#   pip install --no-index --find-links agent-wheels --require-hashes -r THIS_FILE",
    ]
    wanted = _resolved_names(wheel, house, extras)
    for whl in sorted(house.glob("*.whl")):
        name, version = whl.name.split("-")[:2]
        if name == own or _norm(name) not in wanted:
            continue
        digest = hashlib.sha256(whl.read_bytes()).hexdigest()
        lines.append(f"{_norm(name)}=={version} --hash=sha256:{digest}")
    suffix = f"-{extras}" if extras else ""
    lock = out_dir / f"{own}-{wheel.name.split('-')[1]}{suffix}.lock"
    lock.write_text("\n".join(lines) + "\n", "utf-8")
    return lock, house


def _resolved_names(wheel: Path, house: Path, extras: str) -> set[str]:
    """Names pip resolves for the wheel from the wheelhouse alone (so a stale extra wheel is not pinned)."""
    target = f"{wheel}[{extras}]" if extras else str(wheel)
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        _run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--dry-run",
                "--ignore-installed",
                "--no-index",
                "--find-links",
                str(house),
                "--report",
                str(report),
                target,
            ],
            what="resolving the agent's lock",
        )
        import json

        doc = json.loads(report.read_text("utf-8"))
    return {_norm(item["metadata"]["name"]) for item in doc["install"]}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _run(cmd: list[str], *, what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed ({proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")


# -- agent builds for update tests --------------------------------------------------------------------

# Test-only defects, each made by patching the STAGED copy of the sources:
#   crash_at_start  `edge-agent run` dies at once (a release that crash-loops)
#   gate_fails      runs, stores and sends events, but its pump reports itself stuck (fails the health gate)
DEFECTS = ("crash_at_start", "gate_fails")


def _patch_source(stage: Path, rel: str, old: str, new: str) -> None:
    path = stage / rel
    text = path.read_text("utf-8")
    if text.count(old) != 1:
        raise RuntimeError(f"defect patch does not apply to {rel}: {old!r} not found exactly once")
    path.write_text(text.replace(old, new), "utf-8")


def _defect(name: str) -> Callable[[Path], None]:
    if name == "crash_at_start":
        return lambda stage: _patch_source(
            stage,
            "edge_agent/__main__.py",
            "    args = parser.parse_args(argv)\n",
            '    args = parser.parse_args(argv)\n    raise RuntimeError("defective test build: crashes at start")\n',
        )
    if name == "gate_fails":
        doc = '        """The pump turned recently (for the systemd watchdog)."""\n'
        return lambda stage: _patch_source(
            stage, "edge_agent/agent.py", doc, doc + "        return False  # defective test build\n"
        )
    raise ValueError(f"unknown defect {name!r}; known: {', '.join(DEFECTS)}")


def build_agent_wheel(out_dir: Path, version: str, *, defect: str | None = None) -> Path:
    """The agent wheel as `./run.sh dist` builds it, but versioned `version` and, for tests, with
    one of DEFECTS. Its dependencies are those of the normal build (reuse its wheelhouse).

    After `use_build_cache(folder)` each (version, defect, agent sources) is built once into that
    folder and copied into `out_dir` from there (the test session shares its builds this way)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    root = tomllib.loads((REPO / "pyproject.toml").read_text("utf-8"))
    patch = _defect(defect) if defect else None
    with _cache_lock:
        cache = _cache_dir
    if cache is None:
        return build_wheel(AGENT, out_dir, root, version=version, patch=patch)
    key = f"{version}-{defect or 'good'}-{agent_sources_digest()[:16]}"
    with _cache_lock:
        folder = cache / key
        if not folder.exists():
            scratch = Path(tempfile.mkdtemp(dir=cache, prefix=f".{key}-"))
            build_wheel(AGENT, scratch, root, version=version, patch=patch)
            try:
                scratch.rename(folder)  # whole or not at all
            except OSError:  # another process of the session built it first: use that one
                shutil.rmtree(scratch, ignore_errors=True)
        [cached] = folder.glob("*.whl")
    dest = out_dir / cached.name
    shutil.copyfile(cached, dest)
    return dest


# The test session's caches (tests/conftest.py), also for the processes it starts (the demo):
# a folder holding agent-wheels/ here and pip/ + releases/ for fleet_dev.terminal.
BUILD_CACHE_ENV = "KIOSK_DEV_BUILD_CACHE"
_cache_lock = threading.Lock()
_cache_dir: Path | None = (
    Path(os.environ[BUILD_CACHE_ENV]) / "agent-wheels" if os.environ.get(BUILD_CACHE_ENV) else None
)


def use_build_cache(folder: Path | None) -> None:
    """Build each test agent wheel once into `folder` (None: build every time, the default)."""
    global _cache_dir
    with _cache_lock:
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
        _cache_dir = folder


def agent_sources_digest() -> str:
    """SHA-256 over the agent distribution's sources and the root pyproject: what its wheel is built from."""
    h = hashlib.sha256((REPO / "pyproject.toml").read_bytes())
    for package in AGENT.packages:
        for path in sorted((REPO / package).rglob("*")):
            rel = path.relative_to(REPO)
            if path.is_file() and not any(part == "__pycache__" or part.endswith(".egg-info") for part in rel.parts):
                if path.suffix == ".pyc":
                    continue
                h.update(str(rel).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def build(out_dir: Path, *, lock: bool = True, face: bool = False) -> Built:
    """Build both wheels (and the agent's lock) into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    root = tomllib.loads((REPO / "pyproject.toml").read_text("utf-8"))
    agent = build_wheel(AGENT, out_dir, root)
    server = build_wheel(SERVER, out_dir, root)
    agent_lock = house = None
    if lock:
        agent_lock, house = write_lock(agent, out_dir)
        if face:
            write_lock(agent, out_dir, extras="face")
    return Built(agent, server, agent_lock, house)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="run.sh dist", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "dist"), help="where to write the wheels (default: dist/)")
    parser.add_argument("--no-lock", action="store_true", help="build the wheels only, no dependency download")
    parser.add_argument("--face", action="store_true", help="also lock the agent's face extra")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    steps = ["agent wheel", "server wheel"] + ([] if args.no_lock else ["agent dependency wheels + lock"])
    print(f"building into {out}: {', '.join(steps)}", flush=True)
    try:
        built = build(out, lock=not args.no_lock, face=args.face)
    except RuntimeError as err:
        print(f"dist: {err}", file=sys.stderr)
        return 1
    for label, path in (
        ("agent", built.agent_wheel),
        ("server", built.server_wheel),
        ("agent lock", built.agent_lock),
        ("agent wheelhouse", built.wheelhouse),
    ):
        if path is not None:
            size = sum(f.stat().st_size for f in path.rglob("*")) if path.is_dir() else path.stat().st_size
            print(
                f"  {label:<17} {path.relative_to(out.parent) if out.parent in path.parents else path}"
                f"  ({size / 1024:,.0f} KiB)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
